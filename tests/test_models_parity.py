"""Parity of rlhf_jax.models with the HF PyTorch models on tiny random checkpoints.

Each test builds an HF model with torch (seeded, weights scrambled to O(0.1) so a
wrong mapping cannot hide behind near-zero logits), saves it with
``save_pretrained`` and loads it with ours; logits are compared on left-padded
batches at valid positions.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch as torch  # a test extra: missing is a failure, not a skip
import transformers as transformers  # a test extra: missing is a failure, not a skip

from rlhf_jax.models import ModelConfig, from_config, from_pretrained, save_pretrained  # noqa: E402

VOCAB = 96
TOL = 1e-4


def _scramble(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _hf_causal(kind):
    tf = transformers
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                n_positions=64, bos_token_id=1, eos_token_id=2))
    if kind == "llama-gqa-llama3-bias":
        rope = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, rope_scaling=rope,
                                                  tie_word_embeddings=False, attention_bias=True,
                                                  mlp_bias=True, **small))
    if kind == "qwen2-tied":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True,
                                                  **small))
    if kind == "qwen3-yarn":
        rope = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(num_key_value_heads=2, head_dim=16,
                                                  rope_scaling=rope, **small))
    if kind == "mistral-linear":
        return tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2,
                                                      rope_scaling={"rope_type": "linear", "factor": 2.0},
                                                      **small))
    if kind == "mistral-window":
        # a window of 4 over 12-token rows: most queries see only part of their past
        return tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, sliding_window=4, **small))
    raise AssertionError(kind)


KINDS = ["gpt2", "llama-gqa-llama3-bias", "qwen2-tied", "qwen3-yarn", "mistral-linear", "mistral-window"]


@pytest.fixture(scope="module")
def batch():
    """Left-padded batch: rows with 0, 3 and 7 padding tokens (pad id 0)."""
    rs = np.random.RandomState(0)
    ids = rs.randint(1, VOCAB, (3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, :3] = 0
    mask[2, :7] = 0
    ids[mask == 0] = 0
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return ids, mask, positions


def _hf_logits(model, ids, mask, positions):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (folder, HF model)."""
    torch.manual_seed(0)
    out = {}
    for kind in KINDS:
        model = _scramble(_hf_causal(kind))
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        out[kind] = (folder, model)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_causal_lm_logits_match_hf(kind, checkpoints, batch):
    folder, model = checkpoints[kind]
    ids, mask, positions = batch
    ref = _hf_logits(model, ids, mask, positions)
    lm, params = from_pretrained(folder)
    ours = np.asarray(jax.jit(lm.logits)(params, jnp.asarray(ids), jnp.asarray(mask)))
    assert ours.dtype == np.float32
    assert np.isfinite(ours).all()  # padding rows included
    err = np.abs(ours - ref)[mask > 0].max()
    assert err < TOL, (kind, err)
    assert np.abs(ref).max() > 1.0  # the comparison is not trivially small


def test_sliding_window_is_applied(checkpoints, batch):
    """Without the window the Mistral logits differ from HF's (so the parity above is not luck)."""
    import dataclasses

    folder, model = checkpoints["mistral-window"]
    ids, mask, positions = batch
    lm, params = from_pretrained(folder)
    assert lm.config.sliding_window == 4
    full = dataclasses.replace(lm, config=dataclasses.replace(lm.config, sliding_window=None))
    ours = np.asarray(jax.jit(full.logits)(params, jnp.asarray(ids), jnp.asarray(mask)))
    ref = _hf_logits(model, ids, mask, positions)
    assert np.abs(ours - ref)[mask > 0].max() > 100 * TOL


def test_rope_scaling_is_applied(checkpoints, batch):
    """Dropping the llama3 rope scaling changes the logits: the parity above tests it."""
    folder, _ = checkpoints["llama-gqa-llama3-bias"]
    ids, mask, _ = batch
    lm, params = from_pretrained(folder)
    plain_cfg = ModelConfig(**{**lm.config.__dict__, "rope_scaling": ()})
    plain, _ = from_config(plain_cfg, seed=0)
    a = lm.logits(params, jnp.asarray(ids), jnp.asarray(mask))
    b = plain.logits(params, jnp.asarray(ids), jnp.asarray(mask))
    assert float(jnp.abs(a - b)[jnp.asarray(mask) > 0].max()) > 1e-3


def test_bf16_compute_close_to_f32(checkpoints, batch):
    folder, _ = checkpoints["llama-gqa-llama3-bias"]
    ids, mask, _ = batch
    f32, f32_params = from_pretrained(folder)
    bf16, bf16_params = from_pretrained(folder, dtype=jnp.bfloat16)
    assert jnp.dtype(bf16_params["trunk"]["norm"]["scale"].dtype) == jnp.float32  # master weights
    a = np.asarray(f32.logits(f32_params, jnp.asarray(ids), jnp.asarray(mask)))
    b = np.asarray(bf16.logits(bf16_params, jnp.asarray(ids), jnp.asarray(mask)))
    assert b.dtype == np.float32
    valid = mask > 0
    assert np.abs(a - b)[valid].max() < 0.1 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1))[valid].mean() > 0.8


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_sequence_classification_score_matches_hf(kind, tmp_path, batch):
    tf = transformers
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            num_labels=1, pad_token_id=0)
        model = tf.GPT2ForSequenceClassification(cfg)
    else:
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, num_labels=1, pad_token_id=0)
        model = tf.LlamaForSequenceClassification(cfg)
    _scramble(model)
    model.save_pretrained(tmp_path)
    ids, mask, positions = batch
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions)).logits[:, 0].numpy()
    rm, rm_params = from_pretrained(tmp_path, head="scalar")
    ours = np.asarray(jax.jit(rm.scores)(rm_params, jnp.asarray(ids), jnp.asarray(mask)))
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours, ref, atol=TOL)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "qwen3"])
def test_export_loads_in_transformers_with_same_logits(family, tmp_path, batch):
    cfg = ModelConfig.tiny(family, VOCAB, hidden_size=32, max_position_embeddings=64,
                           tie_word_embeddings=family != "llama", initializer_range=0.2,
                           pad_token_id=0, eos_token_id=2)
    lm, params = from_config(cfg, seed=3)
    save_pretrained(lm, params, tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["model_type"] == family
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == hf_config["architectures"][0]
    ids, mask, positions = batch
    ref = _hf_logits(hf, ids, mask, positions)
    ours = np.asarray(jax.jit(lm.logits)(params, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(ours - ref)[mask > 0].max() < TOL
    # and back: our loader reads our export to identical parameters and an equal LM
    again, again_params = from_pretrained(tmp_path)
    assert again == lm
    np.testing.assert_array_equal(_flat(params), _flat(again_params))


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_scalar_head_as_sequence_classifier(family, tmp_path, batch):
    cfg = ModelConfig.tiny(family, VOCAB, hidden_size=32, max_position_embeddings=64,
                           initializer_range=0.2, pad_token_id=0)
    rm, rm_params = from_config(cfg, head="scalar", seed=4)
    save_pretrained(rm, rm_params, tmp_path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == 0
    ids, mask, positions = batch
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits[:, 0].numpy()
    ours = np.asarray(jax.jit(rm.scores)(rm_params, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours, ref, atol=TOL)
