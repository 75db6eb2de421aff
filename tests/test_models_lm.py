"""LM behaviour without torch: KV cache == full forward, padding invariance, heads,
response log-probs, config round trips and input errors."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.core import ops
from rlhf_jax.models import LM, ModelConfig, from_config

VOCAB = 64


def _cfg(family, **kw):
    return ModelConfig.tiny(family, VOCAB, hidden_size=32, max_position_embeddings=32,
                            initializer_range=0.2, **kw)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    """(lm, params, jitted logits) for GPT-2 and a GQA Llama (4 query heads, 2 KV heads)."""
    lm, params = from_config(_cfg(request.param), seed=0)
    return lm, params, jax.jit(lm.logits)


def _left_padded(rs, batch, length, pads):
    ids = rs.randint(0, VOCAB, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), np.int32)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
    return ids, mask


def test_kv_cache_prefill_then_decode_equals_full_forward(model):
    lm, params, logits_fn = model
    rs = np.random.RandomState(0)
    prompt_len, new = 6, 4
    ids, mask = _left_padded(rs, 3, prompt_len + new, pads=[0, 2, 5])
    full = np.asarray(logits_fn(params, ids, mask))

    traces = []

    @jax.jit
    def step(params, tokens, mask, cache, index):
        traces.append(1)
        hidden, cache = lm.hidden_states(params, tokens, mask, cache=cache, cache_index=index)
        return lm.lm_head(params, hidden), cache

    cache = lm.init_cache(3, prompt_len + new)
    assert cache["k"].shape == (lm.config.num_layers, 3, prompt_len + new, lm.config.num_kv_heads,
                                lm.config.head_dim)
    out, cache = step(params, ids[:, :prompt_len], mask, cache, jnp.int32(0))
    pieces = [np.asarray(out)]
    for i in range(prompt_len, prompt_len + new):
        out, cache = step(params, ids[:, i:i + 1], mask, cache, jnp.int32(i))
        pieces.append(np.asarray(out))
    incremental = np.concatenate(pieces, axis=1)
    assert np.abs(incremental - full)[mask > 0].max() < 1e-5
    # prefill (T=6) and decode (T=1) are the only two compilations: the index is traced
    assert len(traces) == 2

    # decode from an empty cache, then a multi-token chunk at a nonzero index
    # (the same two shapes: nothing new to compile)
    cache = lm.init_cache(3, prompt_len + new)
    pieces = []
    for i in range(new):
        out, cache = step(params, ids[:, i:i + 1], mask, cache, jnp.int32(i))
        pieces.append(np.asarray(out))
    out, _ = step(params, ids[:, new:], mask, cache, jnp.int32(new))
    pieces.append(np.asarray(out))
    incremental = np.concatenate(pieces, axis=1)
    assert np.abs(incremental - full)[mask > 0].max() < 1e-5
    assert len(traces) == 2


def test_sliding_window_kv_cache_equals_full_forward():
    """Mistral's window (3 here) in the explicit (cache) mask form equals the packed form."""
    lm, params = from_config(_cfg("mistral", sliding_window=3), seed=0)
    rs = np.random.RandomState(3)
    prompt_len, new = 6, 4
    ids, mask = _left_padded(rs, 3, prompt_len + new, pads=[0, 2, 5])
    full = np.asarray(jax.jit(lm.logits)(params, ids, mask))

    @jax.jit
    def step(params, tokens, mask, cache, index):
        hidden, cache = lm.hidden_states(params, tokens, mask, cache=cache, cache_index=index)
        return lm.lm_head(params, hidden), cache

    out, cache = step(params, ids[:, :prompt_len], mask, lm.init_cache(3, prompt_len + new), jnp.int32(0))
    pieces = [np.asarray(out)]
    for i in range(prompt_len, prompt_len + new):
        out, cache = step(params, ids[:, i:i + 1], mask, cache, jnp.int32(i))
        pieces.append(np.asarray(out))
    assert np.abs(np.concatenate(pieces, axis=1) - full)[mask > 0].max() < 1e-5


def test_left_padding_equals_unpadded_rows(model):
    """Masked equals sliced: a left-padded row gives the logits of the bare row."""
    lm, params, logits_fn = model
    rs = np.random.RandomState(1)
    ids, mask = _left_padded(rs, 3, 10, pads=[0, 5, 0])  # [3, 10]: logits_fn is compiled
    padded = np.asarray(logits_fn(params, ids, mask))
    bare = np.asarray(logits_fn(params, np.tile(ids[1:2, 5:], (3, 2)), np.ones((3, 10), np.int32)))
    np.testing.assert_allclose(padded[1, 5:], bare[0, :5], atol=1e-5)


def test_fully_masked_rows_are_finite(model):
    lm, params, logits_fn = model
    ids = np.zeros((3, 10), np.int32)
    mask = np.zeros((3, 10), np.int32)
    mask[1, 7:] = 1
    out = np.asarray(logits_fn(params, ids, mask))
    assert np.isfinite(out).all()


def test_response_logprobs_match_full_logits(model):
    lm, params, logits_fn = model
    rs = np.random.RandomState(2)
    prompt_len, n = 6, 4
    ids, mask = _left_padded(rs, 3, prompt_len + n, pads=[0, 1, 3])
    mask[0, -1] = 0  # right-padded response
    full = logits_fn(params, ids, mask)
    want = ops.token_logprobs(full[:, prompt_len - 1:-1], ids[:, prompt_len:], temperature=0.7)
    want_ent = ops.token_entropy(full[:, prompt_len - 1:-1], temperature=0.7)
    fn = jax.jit(lambda p, i, m: lm.response_logprobs(p, i, m, n, temperature=0.7,
                                                      with_entropy=True))
    got, ent = fn(params, ids, mask)
    assert got.shape == (3, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(want_ent), atol=1e-5)
    with pytest.raises(ValueError, match="num_response"):
        lm.response_logprobs(params, ids, mask, prompt_len + n)


@pytest.fixture(scope="module")
def reward_model():
    return from_config(_cfg("llama"), head="scalar", seed=1)


def test_scalar_head_init_and_scores_at_last_valid_token(reward_model):
    rm, rm_params = reward_model
    d = rm.config.hidden_size
    kernel = np.asarray(rm_params["score"]["kernel"])
    assert kernel.shape == (d, 1)
    assert np.all(np.asarray(rm_params["score"]["bias"]) == 0)
    assert 0.5 / np.sqrt(d + 1) < kernel.std() < 1.5 / np.sqrt(d + 1)
    rs = np.random.RandomState(3)
    ids, mask = _left_padded(rs, 3, 8, pads=[0, 2, 4])
    mask[0, 6:] = 0  # [prompt | response] with a right-padded response
    values = np.asarray(jax.jit(rm.values)(rm_params, ids, mask))
    scores = np.asarray(jax.jit(rm.scores)(rm_params, ids, mask))
    assert values.shape == (3, 8) and scores.shape == (3,)
    np.testing.assert_allclose(scores, values[[0, 1, 2], [5, 7, 7]], atol=1e-6)
    # tokens after the last valid one do not change the score
    ids2 = ids.copy()
    ids2[0, 6:] = (ids2[0, 6:] + 1) % VOCAB
    np.testing.assert_allclose(np.asarray(jax.jit(rm.scores)(rm_params, ids2, mask)), scores,
                               atol=1e-6)
    with pytest.raises(ValueError, match="no LM head"):
        rm.lm_head(rm_params, jnp.zeros((1, d)))


def test_with_head_reuses_trunk_and_value_head_starts_at_zero():
    policy, params = from_config(_cfg("gpt2"), seed=0)
    rm, rm_params = policy.with_head("scalar", params, seed=5)
    assert rm.head == "scalar" and policy.head == "lm" and rm.config == policy.config
    assert set(rm_params) == {"trunk", "score"} and "score" not in params
    for a, b in zip(jax.tree_util.tree_leaves(params["trunk"]),
                    jax.tree_util.tree_leaves(rm_params["trunk"])):
        assert a is b
    pv, pv_params = policy.with_head("lm+value", params)
    ids = np.arange(12, dtype=np.int32).reshape(2, 6) % VOCAB
    mask = np.ones((2, 6), np.int32)
    values = pv.values(pv_params, ids, mask)
    assert values.shape == (2, 6) and float(jnp.abs(values).max()) == 0.0
    np.testing.assert_allclose(np.asarray(pv.logits(pv_params, ids, mask)),
                               np.asarray(policy.logits(params, ids, mask)), atol=1e-6)
    with pytest.raises(ValueError, match="no scalar/value head"):
        policy.values(params, ids, mask)


def test_untied_llama_has_lm_head_and_grads_are_finite():
    lm, params = from_config(_cfg("llama", tie_word_embeddings=False), seed=2)
    assert params["lm_head"]["kernel"].shape == (32, VOCAB)
    ids = np.arange(10, dtype=np.int32).reshape(2, 5)
    mask = np.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)
    grads = jax.jit(jax.grad(lambda p: lm.response_logprobs(p, ids, mask, 2).sum()))(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert float(jnp.abs(grads["lm_head"]["kernel"]).max()) > 0


def test_bfloat16_params_and_compute_give_float32_logits():
    lm, params = from_config(_cfg("qwen3"), seed=0, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
    ids = np.arange(8, dtype=np.int32).reshape(2, 4)
    out = jax.jit(lm.logits)(params, ids, np.ones((2, 4), np.int32))
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
    assert lm.init_cache(2, 4)["k"].dtype == jnp.bfloat16


def test_params_are_plain_nested_dicts_with_string_keys():
    lm, params = from_config(_cfg("llama"))
    assert isinstance(params, dict)
    # the layers are one stacked block: a leading layer axis on every per-layer tensor
    assert set(params["trunk"]["layers"]) == {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
    assert params["trunk"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 32, 128)
    assert lm.num_params(params) == sum(x.size for x in jax.tree_util.tree_leaves(params))
    _, same = from_config(_cfg("llama"))
    _, other = from_config(_cfg("llama"), seed=1)
    leaf = lambda p: np.asarray(p["trunk"]["embed_tokens"]["embedding"])  # noqa: E731
    np.testing.assert_array_equal(leaf(params), leaf(same))
    assert not np.array_equal(leaf(params), leaf(other))
    abstract = lm.abstract_params()
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))


# ------------------------------------------------------------------ errors
def test_input_errors_name_the_problem():
    lm, params = from_config(_cfg("gpt2"))
    long_ids = np.zeros((1, 33), np.int32)
    with pytest.raises(ValueError, match="33 exceeds .*max_position_embeddings=32"):
        lm.logits(params, long_ids, np.ones_like(long_ids))
    with pytest.raises(ValueError, match="33 exceeds"):
        lm.check_inputs(long_ids)
    with pytest.raises(ValueError, match="vocab_size=64"):
        lm.check_inputs(np.array([[1, 64]]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="vocab_size=64"):
        lm.check_inputs(np.array([[-1, 3]]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        lm.check_inputs(np.array([[1, 2]]), np.ones((1, 3)))
    with pytest.raises(ValueError, match="only 0 and 1"):
        lm.check_inputs(np.array([[1, 2]]), np.array([[1, 2]]))
    lm.check_inputs(np.array([[1, 63]]), np.array([[0, 1]]))  # fine
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        lm.logits(params, np.zeros((2, 3), np.int32), np.ones((2, 4)))
    with pytest.raises(ValueError, match="cache max_length 40"):
        lm.init_cache(1, 40)
    cache = lm.init_cache(1, 8)
    with pytest.raises(ValueError, match="cache_index is required"):
        lm.hidden_states(params, np.zeros((1, 2), np.int32), np.ones((1, 8)), cache=cache)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        lm.hidden_states(params, np.zeros((1, 2), np.int32), np.ones((1, 2)), cache=cache,
                         cache_index=0)
    with pytest.raises(ValueError, match="head must be one of"):
        from_config(_cfg("gpt2"), head="value")
    with pytest.raises(TypeError, match="ModelConfig"):
        from_config({"family": "gpt2"})


def test_config_validation_errors():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig.tiny("llama", num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic'"):
        ModelConfig.tiny("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="model_type 'bert'"):
        ModelConfig.from_hf_config({"model_type": "bert", "vocab_size": 10})
    with pytest.raises(ValueError, match="family"):
        ModelConfig.tiny("t5")
    with pytest.raises(ValueError, match="layer_types has 1 entries for 2 layers"):
        ModelConfig.tiny("gemma2", layer_types=("sliding_attention",))
    with pytest.raises(ValueError, match="sliding_window is None"):
        ModelConfig.tiny("gemma3_text", sliding_window=None)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        ModelConfig.tiny("gpt_neox", partial_rotary_factor=0.0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text",
                                    "gpt_neox"])
def test_config_hf_round_trip(family):
    extra = {} if family == "gpt2" else {
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}
    cfg = ModelConfig.tiny(family, 100, eos_token_id=3, pad_token_id=0, **extra)
    hash(cfg)
    back = ModelConfig.from_hf_config(cfg.to_hf_config())
    assert back == cfg
    assert dataclasses.replace(cfg, vocab_size=7).vocab_size == 7


def test_config_reads_transformers4_rope_layout():
    hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
          "rope_scaling": {"type": "linear", "factor": 4.0}, "eos_token_id": [5, 6]}
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 4.0}
    assert cfg.eos_token_id == 5 and cfg.num_kv_heads == 2 and cfg.head_dim == 8


def test_lm_is_a_static_value_and_equal_models_share_one_compilation(count_compiles):
    """Two LMs built separately from one config are equal and hash equal, hold no weights,
    and reuse one compilation as a static jit argument; another head or dtype compiles anew."""
    a, a_params = from_config(_cfg("gpt2"), seed=0)
    b, b_params = from_config(_cfg("gpt2"), seed=1)
    assert isinstance(a, LM) and "gpt2" in repr(a)
    assert a is not b and a == b and hash(a) == hash(b)
    assert {f.name for f in dataclasses.fields(a)} == {"config", "head", "dtype", "param_dtype", "remat",
                                                       "logits_chunk_size", "lora"}
    assert dataclasses.replace(a, remat="full") != a  # how the program is built: part of the value
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.head = "scalar"
    assert a.graphdef == b.graphdef  # derived from the fields, equal by value
    scalar, scalar_params = a.with_head("scalar", a_params)
    bf16 = dataclasses.replace(a, dtype=jnp.bfloat16)
    assert scalar != a and bf16 != a
    assert LM(_cfg("gpt2"), "lm", dtype="bfloat16") == bf16 and hash(LM(_cfg("gpt2"))) == hash(a)

    @functools.partial(jax.jit, static_argnames="lm")
    def last_hidden(lm, params, ids, mask):
        hidden, _ = lm.hidden_states(params, ids, mask)
        return hidden[:, -1].astype(jnp.float32)

    ids = np.arange(12, dtype=np.int32).reshape(2, 6) % VOCAB
    mask = np.ones((2, 6), np.int32)
    with count_compiles() as compiles:
        out_a = last_hidden(a, a_params, ids, mask)
        out_b = last_hidden(b, b_params, ids, mask)
    assert compiles["jit(last_hidden)"] == 1, compiles
    assert not np.allclose(out_a, out_b)  # the weights are arguments, not baked-in constants
    with count_compiles() as compiles:
        last_hidden(bf16, a_params, ids, mask)
        last_hidden(scalar, scalar_params, ids, mask)
        last_hidden(dataclasses.replace(bf16), a_params, ids, mask)
    assert compiles["jit(last_hidden)"] == 2, compiles
