"""Tests for rlhf_jax.rollout: the jitted KV-cache sampler.

Checked against slow, obvious references: a fresh full forward for the
log-probs, NumPy softmax + chi-square for the sampling distribution, a NumPy
nucleus for top-p, and a fixed-length run truncated by hand for EOS handling.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rlhf_jax import rollout
from rlhf_jax.data import left_pad
from rlhf_jax.models import ModelConfig, from_config
from rlhf_jax.models.lm import LM
from rlhf_jax.rollout import Rollout, generate

VOCAB = 64
CONTEXT = 64
P = 8
N = 10


def _config():
    return ModelConfig.tiny("gpt2", VOCAB, hidden_size=32, num_heads=2, max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def model():
    return from_config(_config(), seed=0)


@pytest.fixture(scope="module")
def lm(model):
    return model[0]


@pytest.fixture(scope="module")
def params(model):
    return model[1]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, VOCAB, size=n).tolist() for n in (3, 8, 5, 1)]
    return left_pad(seqs, P, pad_id=0)


def _full_sequence(prompt_ids, prompt_mask, out: Rollout):
    ids = jnp.concatenate([jnp.asarray(prompt_ids), out.tokens], axis=1)
    mask = jnp.concatenate([jnp.asarray(prompt_mask, jnp.int32), out.mask.astype(jnp.int32)], axis=1)
    return ids, mask


# The slow references, jitted: one compilation per model and shape instead of one per eager op.
@functools.partial(jax.jit, static_argnames=("lm", "n"))
def _fresh_logprobs(lm, params, ids, mask, temperature, *, n):
    """A fresh full forward's log-probs of the last `n` tokens (temperature traced)."""
    return lm.response_logprobs(params, ids, mask, n, temperature=temperature)


@functools.partial(jax.jit, static_argnames=("lm",))
def _logits(lm, params, ids, mask):
    return lm.logits(params, ids, mask)


def _last_logits(lm, params, prompt_ids, prompt_mask):
    logits = _logits(lm, params, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask))
    return np.asarray(logits[:, -1], np.float64)


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _chi_square_pvalue(samples, probs):
    """Pearson chi-square p-value of integer `samples` against `probs`, small bins pooled."""
    counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    expected = probs * len(samples)
    order = np.argsort(expected)
    pooled_obs, pooled_exp, acc_o, acc_e = [], [], 0.0, 0.0
    for i in order:
        acc_o += counts[i]
        acc_e += expected[i]
        if acc_e >= 5:
            pooled_obs.append(acc_o)
            pooled_exp.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0:  # left-over tail joins the last bin
        pooled_obs[-1] += acc_o
        pooled_exp[-1] += acc_e
    return stats.chisquare(pooled_obs, pooled_exp).pvalue


# ---------------------------------------------------------------------------
# Output contract, determinism, log-probs.


def test_output_shapes_and_dtypes(lm, params, prompts):
    ids, mask = prompts
    out = generate(lm, params, ids, mask, jax.random.key(0), max_new_tokens=N, temperature=0.7,
                   eos_token_id=7)
    assert isinstance(out, Rollout)
    assert out.tokens.shape == (4, N) and out.tokens.dtype == jnp.int32
    assert out.logprobs.shape == (4, N) and out.logprobs.dtype == jnp.float32
    assert out.mask.shape == (4, N) and out.mask.dtype == jnp.float32
    assert out.ended_with_eos.shape == (4,) and out.ended_with_eos.dtype == jnp.bool_
    assert np.all(np.asarray(out.tokens) >= 0) and np.all(np.asarray(out.tokens) < VOCAB)


def test_fixed_key_is_deterministic(lm, params, prompts):
    ids, mask = prompts
    kw = dict(max_new_tokens=N, temperature=1.0)
    a = generate(lm, params, ids, mask, jax.random.key(3), **kw)
    b = generate(lm, params, ids, mask, jax.random.key(3), **kw)
    c = generate(lm, params, ids, mask, jax.random.key(4), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 0.8), (0.0, 0, 1.0)]
)
def test_logprobs_equal_fresh_forward(lm, params, prompts, temperature, top_k, top_p):
    ids, mask = prompts
    out = generate(lm, params, ids, mask, jax.random.key(1), max_new_tokens=N,
                   temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=7)
    full_ids, full_mask = _full_sequence(ids, mask, out)
    # Unfiltered tempered distribution; greedy reports the untempered one.
    fresh = _fresh_logprobs(lm, params, full_ids, full_mask, temperature if temperature > 0 else 1.0, n=N)
    m = np.asarray(out.mask)
    assert m.sum() > 0
    np.testing.assert_allclose(np.asarray(out.logprobs) * m, np.asarray(fresh) * m, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.logprobs)[m == 0], 0.0)


def test_greedy_is_argmax_of_fresh_forward(lm, params, prompts):
    ids, mask = prompts
    kw = dict(max_new_tokens=N, temperature=0.0, eos_token_id=7)
    out = generate(lm, params, ids, mask, jax.random.key(0), **kw)
    full_ids, full_mask = _full_sequence(ids, mask, out)
    logits = _logits(lm, params, full_ids, full_mask)
    argmax = np.asarray(jnp.argmax(logits[:, P - 1:-1], axis=-1))
    m = np.asarray(out.mask) > 0
    np.testing.assert_array_equal(np.asarray(out.tokens)[m], argmax[m])
    # the key does not matter for greedy decoding
    again = generate(lm, params, ids, mask, jax.random.key(9), **kw)
    np.testing.assert_array_equal(out.tokens, again.tokens)


# ---------------------------------------------------------------------------
# The sampling distribution.

BIG = 4096


@pytest.fixture(scope="module")
def one_prompt_batch():
    ids, mask = left_pad([[3, 14, 15, 9, 2, 6]], P, pad_id=0)
    return np.repeat(ids, BIG, axis=0), np.repeat(mask, BIG, axis=0)


@pytest.fixture(scope="module")
def spread_temperature(lm, params, one_prompt_batch):
    """A temperature giving the scaled logits unit spread: a distribution neither
    peaked nor flat, whatever the random init of the test model."""
    ids, mask = one_prompt_batch
    logits = _last_logits(lm, params, ids[:1], mask[:1])[0]
    return float(f"{logits.std():.3g}")


def test_one_step_distribution_matches_softmax(lm, params, one_prompt_batch, spread_temperature):
    ids, mask = one_prompt_batch
    logits = _last_logits(lm, params, ids[:1], mask[:1])[0]
    temperature = spread_temperature
    out = generate(lm, params, ids, mask, jax.random.key(11), max_new_tokens=1,
                   temperature=temperature)
    samples = np.asarray(out.tokens[:, 0])
    probs = _softmax(logits / temperature)
    assert probs.max() < 0.9, "test model too peaked for a meaningful test"
    assert _chi_square_pvalue(samples, probs) > 1e-3
    # The same test rejects a wrong distribution (power check).
    wrong = _softmax(logits / (2 * temperature))
    assert _chi_square_pvalue(samples, wrong) < 1e-3
    np.testing.assert_allclose(np.asarray(out.logprobs[:, 0]), np.log(probs[samples]), atol=1e-5)


def test_top_k_and_top_p_restrict_support(lm, params, one_prompt_batch, spread_temperature):
    ids, mask = one_prompt_batch
    logits = _last_logits(lm, params, ids[:1], mask[:1])[0]
    temperature = spread_temperature
    z = logits / temperature
    probs = _softmax(z)

    k = 5
    out = generate(lm, params, ids, mask, jax.random.key(12), max_new_tokens=1,
                   temperature=temperature, top_k=k)
    samples = np.asarray(out.tokens[:, 0])
    top = np.argsort(-z)[:k]
    assert set(samples.tolist()) == set(top.tolist())
    restricted = np.zeros_like(probs)
    restricted[top] = probs[top] / probs[top].sum()
    assert _chi_square_pvalue(samples, restricted) > 1e-3
    # log-probs stay those of the unfiltered distribution
    np.testing.assert_allclose(np.asarray(out.logprobs[:, 0]), np.log(probs[samples]), atol=1e-5)

    # top_p halfway between the masses of the 5 and the 6 most likely tokens, so float32
    # rounding cannot move the nucleus boundary: exactly 6 tokens stay.
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order])
    top_p = float((cum[4] + cum[5]) / 2)
    nucleus = order[cum - probs[order] < top_p]
    assert len(nucleus) == 6
    out = generate(lm, params, ids, mask, jax.random.key(13), max_new_tokens=1,
                   temperature=temperature, top_p=top_p)
    samples = np.asarray(out.tokens[:, 0])
    assert 1 < len(nucleus) < VOCAB
    assert set(samples.tolist()) <= set(nucleus.tolist())
    restricted = np.zeros_like(probs)
    restricted[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert _chi_square_pvalue(samples, restricted) > 1e-3


def test_sample_logits_on_hand_built_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32))[None], (BIG, 1))
    key = jax.random.key(0)
    sample_logits = jax.jit(rollout.sample_logits, static_argnames=("temperature", "top_k", "top_p"))
    for top_p, support in [(0.45, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})]:
        tokens, logprobs = sample_logits(logits, key, top_p=top_p)
        assert set(np.asarray(tokens).tolist()) == support, top_p
        np.testing.assert_allclose(np.asarray(logprobs), np.log(probs[np.asarray(tokens)]), atol=1e-6)
    tokens, _ = sample_logits(logits, key, top_k=2, top_p=0.9)  # top-k first: {0, 1}
    assert set(np.asarray(tokens).tolist()) == {0, 1}
    tokens, logprobs = sample_logits(logits, key, temperature=0.0)
    assert set(np.asarray(tokens).tolist()) == {0}
    np.testing.assert_allclose(np.asarray(logprobs), np.log(0.5), atol=1e-6)
    # temperature sharpens: T = 0.5 squares the probabilities (renormalised)
    tokens, _ = sample_logits(logits, key, temperature=0.5)
    sharp = probs**2 / (probs**2).sum()
    assert _chi_square_pvalue(np.asarray(tokens), sharp) > 1e-3


# ---------------------------------------------------------------------------
# EOS handling.


def test_eos_rows_stop_and_are_masked(lm, params, prompts):
    ids, mask = prompts
    key = jax.random.key(21)
    free = generate(lm, params, ids, mask, key, max_new_tokens=N, temperature=1.0)
    free_tokens = np.asarray(free.tokens)
    eos = int(free_tokens[0, 2])  # row 0 ends by step 2 at the latest
    pad = (eos + 1) % VOCAB
    out = generate(lm, params, ids, mask, key, max_new_tokens=N, temperature=1.0,
                   eos_token_id=eos, pad_token_id=pad)
    tokens, m = np.asarray(out.tokens), np.asarray(out.mask)
    for b in range(len(tokens)):
        hits = np.nonzero(free_tokens[b] == eos)[0]
        length = hits[0] + 1 if len(hits) else N
        # Same key, same tokens until the first EOS; pad and mask 0 afterwards.
        np.testing.assert_array_equal(tokens[b, :length], free_tokens[b, :length])
        np.testing.assert_array_equal(tokens[b, length:], pad)
        np.testing.assert_array_equal(m[b], (np.arange(N) < length).astype(np.float32))
        assert bool(out.ended_with_eos[b]) == bool(len(hits))
        np.testing.assert_allclose(np.asarray(out.logprobs)[b, :length],
                                   np.asarray(free.logprobs)[b, :length], atol=1e-5)
        np.testing.assert_array_equal(np.asarray(out.logprobs)[b, length:], 0.0)
    assert bool(out.ended_with_eos[0])


def test_early_exit_when_every_row_ends(lm, params, prompts):
    ids, mask = prompts
    kw = dict(max_new_tokens=N, temperature=0.0)
    greedy = generate(lm, params, ids, mask, jax.random.key(0), eos_token_id=7, **kw)
    g = np.asarray(greedy.tokens)
    # Every row gets row 0's prompt, and EOS := row 0's greedy token at step 1, so all
    # rows end by step 1 and the loop exits early.
    same_ids, same_mask = np.repeat(ids[:1], len(ids), axis=0), np.repeat(mask[:1], len(ids), axis=0)
    eos = int(g[0, 1]) if g[0, 0] != 7 else 7
    pad = (eos + 1) % VOCAB
    out = generate(lm, params, same_ids, same_mask, jax.random.key(0), eos_token_id=eos,
                   pad_token_id=pad, **kw)
    length = int(np.nonzero(g[0] == eos)[0][0]) + 1
    assert length <= 2
    for b in range(len(ids)):
        np.testing.assert_array_equal(np.asarray(out.tokens)[b, :length], g[0, :length])
        np.testing.assert_array_equal(np.asarray(out.tokens)[b, length:], pad)
        assert np.asarray(out.mask)[b].sum() == length
    assert np.asarray(out.ended_with_eos).all()


# ---------------------------------------------------------------------------
# Compilation and tracing.


def test_compiles_once_per_bucket(lm, params, count_compiles):
    rng = np.random.default_rng(5)
    # The same config built again (other weights): an equal static value, no new compilation.
    twin, twin_params = from_config(_config(), seed=1)
    assert twin == lm and twin is not lm
    results = []
    # New prompts, keys, temperatures, top_p, EOS and PAD ids, an equal model: at most one
    # compilation (none when an earlier test already compiled this structure: N tokens,
    # top-k 5, top-p on, EOS on, as in test_logprobs_equal_fresh_forward).
    with count_compiles() as compiles:
        for i, (temperature, top_p, eos, pad) in enumerate([(0.9, 0.9, 3, 1), (1.1, 0.7, 4, 2),
                                                            (0.5, 0.95, 3, 0)]):
            seqs = [rng.integers(4, VOCAB, size=int(rng.integers(1, P + 1))).tolist() for _ in range(4)]
            ids, mask = left_pad(seqs, P, pad_id=pad)
            model, weights = (twin, twin_params) if i == 2 else (lm, params)
            results.append(generate(model, weights, ids, mask, jax.random.key(i), max_new_tokens=N,
                                    temperature=temperature, top_k=5, top_p=top_p, eos_token_id=eos,
                                    pad_token_id=pad))
    assert compiles["jit(_generate_body)"] <= 1, compiles
    assert not np.array_equal(results[0].tokens, results[1].tokens)


def test_traceable_inside_callers_jit(lm, params, prompts):
    ids, mask = prompts
    kw = dict(max_new_tokens=N, temperature=1.3, top_k=5, top_p=0.8, eos_token_id=7)

    @jax.jit
    def sample_and_score(params, ids, mask, key):
        out = generate(lm, params, ids, mask, key, **kw)
        return out, jnp.sum(out.logprobs * out.mask, axis=1)

    out, total = sample_and_score(params, ids, mask, jax.random.key(2))
    eager = generate(lm, params, ids, mask, jax.random.key(2), **kw)
    np.testing.assert_array_equal(out.tokens, eager.tokens)
    np.testing.assert_allclose(out.logprobs, eager.logprobs, atol=1e-6)
    np.testing.assert_allclose(total, jnp.sum(eager.logprobs * eager.mask, axis=1), atol=1e-5)


# ---------------------------------------------------------------------------
# Bad input.


def test_errors(lm, params, prompts):
    ids, mask = prompts
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=rf"{P}.*{CONTEXT - P + 1}.*{CONTEXT}"):
        generate(lm, params, ids, mask, key, max_new_tokens=CONTEXT - P + 1)
    bad = ids.copy()
    bad[0, -1] = VOCAB
    with pytest.raises(ValueError, match="vocabulary"):
        generate(lm, params, bad, mask, key, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_mask"):
        generate(lm, params, ids, mask[:, 1:], key, max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(lm, params, ids[0], mask[0], key, max_new_tokens=2)
    with pytest.raises(ValueError, match="left-padded"):
        generate(lm, params, ids[:, ::-1], mask[:, ::-1], key, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, params, ids, mask, key, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(lm, params, ids, mask, key, max_new_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(lm, params, ids, mask, key, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(lm, params, ids, mask, key, max_new_tokens=2, top_k=-1)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(lm, params, ids, mask, key, max_new_tokens=2, eos_token_id=VOCAB)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(lm, params, ids.astype(np.float32), mask, key, max_new_tokens=2)
    with pytest.warns(UserWarning, match="PAD and EOS"):
        with pytest.raises(ValueError, match="vocabulary"):  # warns before compiling anything
            generate(lm, params, bad, mask, key, max_new_tokens=2, eos_token_id=0, pad_token_id=0)
    # the context check also runs under a caller's jit (shapes are static)
    with pytest.raises(ValueError, match="context"):
        jax.jit(lambda i, m: generate(lm, params, i, m, key, max_new_tokens=CONTEXT).tokens)(ids, mask)



def test_bfloat16_model_is_its_own_static_value(prompts, count_compiles):
    """bf16 compute still returns float32 log-probs close to a fresh bf16 forward; a bf16 model
    is a static value of its own (unequal to the float32 model of the same config, so jit's
    cache cannot hand it the float32 sampler) and compiles its sampler once, which an equal
    bf16 model built separately reuses."""
    config = ModelConfig.tiny("llama", VOCAB, hidden_size=32, num_heads=2, num_kv_heads=1,
                              intermediate_size=64, max_position_embeddings=CONTEXT)
    lm16, params16 = from_config(config, seed=3, dtype=jnp.bfloat16)
    lm32 = LM(config, "lm")  # the float32 model of the same config (no weights needed)
    assert lm16.dtype == jnp.bfloat16 and lm16 != lm32 and hash(lm16) != hash(lm32)
    ids, mask = prompts
    with count_compiles() as compiles:
        out = generate(lm16, params16, ids, mask, jax.random.key(0), max_new_tokens=N, temperature=1.0)
        again = generate(from_config(config, seed=4, dtype=jnp.bfloat16)[0], params16, ids, mask,
                         jax.random.key(0), max_new_tokens=N, temperature=1.0)
    assert compiles["jit(_generate_body)"] == 1, compiles
    np.testing.assert_array_equal(out.tokens, again.tokens)
    assert out.logprobs.dtype == jnp.float32 and np.isfinite(np.asarray(out.logprobs)).all()
    full_ids, full_mask = _full_sequence(ids, mask, out)
    fresh = _fresh_logprobs(lm16, params16, full_ids, full_mask, 1.0, n=N)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(fresh), atol=0.1)
