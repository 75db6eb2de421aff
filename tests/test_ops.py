"""rlhf_jax.core.ops against float64 NumPy references on randomly right-padded inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.core import ops

B, T, V = 5, 7, 11


def padded_mask(rng, b, t, *, allow_empty=True):
    lengths = rng.integers(0 if allow_empty else 1, t + 1, size=b)
    lengths[0] = t  # one full row
    if allow_empty and b > 1:
        lengths[-1] = 0  # one empty row
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32), lengths


@pytest.fixture(scope="module")
def jitted():
    return {
        "mean": jax.jit(ops.masked_mean),
        "var": jax.jit(ops.masked_var),
        "whiten": jax.jit(ops.masked_whiten, static_argnames="shift_mean"),
        "logp": jax.jit(ops.token_logprobs, static_argnames="temperature"),
        "ent": jax.jit(ops.token_entropy, static_argnames="temperature"),
        "last": jax.jit(ops.last_valid_index),
    }


def ref_log_softmax(logits):
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("seed", range(3))
def test_masked_stats_match_numpy(jitted, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T)) * 3 + 1
    mask, _ = padded_mask(rng, B, T)
    valid = x[mask > 0]
    np.testing.assert_allclose(jitted["mean"](x, mask), valid.mean(), rtol=1e-5)
    np.testing.assert_allclose(jitted["var"](x, mask), valid.var(ddof=1), rtol=1e-5)
    extra = jax.jit(
        lambda x, m: (ops.masked_var(x, m, unbiased=False), ops.masked_sum(x, m), ops.masked_mean(x, m, axis=1))
    )
    var_biased, total, row_mean = extra(x, mask)
    np.testing.assert_allclose(var_biased, valid.var(), rtol=1e-5)
    np.testing.assert_allclose(total, valid.sum(), rtol=1e-5)
    # per-row statistics (axis=1); the empty last row gives 0
    row_means = [x[b, mask[b] > 0].mean() if mask[b].sum() else 0.0 for b in range(B)]
    np.testing.assert_allclose(row_mean, row_means, rtol=1e-5, atol=1e-6)
    white = np.asarray(jitted["whiten"](x, mask))
    expected = (x - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8) * mask
    np.testing.assert_allclose(white, expected, rtol=1e-4, atol=1e-5)
    assert abs(white[mask > 0].mean()) < 1e-5
    np.testing.assert_allclose(white[mask > 0].std(ddof=1), 1.0, rtol=1e-4)
    kept = np.asarray(jitted["whiten"](x, mask, shift_mean=False))
    np.testing.assert_allclose(kept[mask > 0].mean(), valid.mean(), rtol=1e-4)
    assert np.all(kept[mask == 0] == 0)


def test_bool_mask_equals_float_mask(jitted):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(B, T)).astype(np.float32)
    mask, _ = padded_mask(rng, B, T)
    np.testing.assert_allclose(jitted["mean"](x, mask > 0), jitted["mean"](x, mask))
    np.testing.assert_allclose(jitted["whiten"](x, mask > 0), jitted["whiten"](x, mask))


def test_padding_garbage_does_not_leak(jitted):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(B, T)).astype(np.float32)
    mask, _ = padded_mask(rng, B, T)
    dirty = np.where(mask > 0, x, np.nan).astype(np.float32)
    dirty[0, -1] = x[0, -1]  # row 0 is full
    dirty[1, mask[1] == 0] = np.inf
    for name in ("mean", "var"):
        np.testing.assert_allclose(jitted[name](dirty, mask), jitted[name](x, mask), rtol=1e-6)
    np.testing.assert_allclose(jitted["whiten"](dirty, mask), jitted["whiten"](x, mask), rtol=1e-6)


def test_all_masked_is_finite_zero(jitted):
    x = jnp.ones((B, T))
    mask = jnp.zeros((B, T))
    assert float(jitted["mean"](x, mask)) == 0.0
    assert float(jitted["var"](x, mask)) == 0.0
    w = jitted["whiten"](x, mask)
    assert np.all(np.asarray(w) == 0.0)
    g = jax.jit(jax.grad(lambda x: ops.masked_mean(x, mask) + ops.masked_whiten(x, mask).sum()))(x)
    assert np.all(np.isfinite(g))


def test_masked_equals_sliced(jitted):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, T)).astype(np.float32)
    for length in (1, 4, T):
        mask = (np.arange(T) < length).astype(np.float32)[None]
        np.testing.assert_allclose(jitted["mean"](x, mask), jitted["mean"](x[:, :length], mask[:, :length]))
        np.testing.assert_allclose(
            jitted["whiten"](x, mask)[:, :length], jitted["whiten"](x[:, :length], mask[:, :length]), rtol=1e-6
        )


_last_valid_jit = jax.jit(ops.last_valid_index)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=4, max_size=4))
def test_last_valid_index_any_mask(rows):
    mask = np.array(rows, dtype=bool)
    got = np.asarray(_last_valid_jit(mask))
    want = [max(np.nonzero(r)[0], default=-1) for r in mask]
    assert got.dtype == np.int32
    assert got.tolist() == want


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy(jitted, temperature):
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(B, T, V)) * 4).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T))
    ref = ref_log_softmax(logits.astype(np.float64) / temperature)
    want = np.take_along_axis(ref, tokens[..., None], -1)[..., 0]
    got = jitted["logp"](logits, tokens, temperature=temperature)
    assert got.dtype == jnp.float32 and got.shape == (B, T)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ent_want = -(np.exp(ref) * ref).sum(-1)
    np.testing.assert_allclose(jitted["ent"](logits, temperature=temperature), ent_want, rtol=1e-5, atol=1e-5)


def test_token_logprobs_bfloat16_upcast_and_extreme_logits(jitted):
    logits = jnp.array([[[1000.0, 0.0, -1000.0]]], jnp.bfloat16)
    lp = jitted["logp"](logits, jnp.array([[2]]))
    assert lp.dtype == jnp.float32
    np.testing.assert_allclose(lp, [[-2000.0]], rtol=1e-3)
    assert np.isfinite(jitted["ent"](logits)).all()
    # a uniform distribution has entropy log V
    np.testing.assert_allclose(jitted["ent"](jnp.zeros((2, 3, 5))), np.full((2, 3), np.log(5)), rtol=1e-6)


def test_token_logprobs_gradient_is_softmax_minus_onehot():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 3, V)).astype(np.float32)
    tokens = rng.integers(0, V, size=(2, 3))
    g = jax.jit(jax.grad(lambda z: ops.token_logprobs(z, tokens).sum()))(logits)
    p = np.exp(ref_log_softmax(logits.astype(np.float64)))
    want = np.eye(V)[tokens] - p
    np.testing.assert_allclose(g, want, atol=1e-5)


def test_vmap_and_compile_once(jitted):
    traces = []

    def f(x, mask):
        traces.append(1)
        return ops.masked_whiten(x, mask), ops.masked_mean(x, mask)

    fj = jax.jit(f)
    rng = np.random.default_rng(6)
    for _ in range(3):
        x = rng.normal(size=(B, T)).astype(np.float32)
        mask, _ = padded_mask(rng, B, T)
        fj(x, mask)
    assert len(traces) == 1
    traces.clear()
    xs = rng.normal(size=(3, B, T)).astype(np.float32)
    ms = np.stack([padded_mask(rng, B, T)[0] for _ in range(3)])
    w, m = jax.jit(jax.vmap(fj))(xs, ms)
    for i in range(3):
        wi, mi = fj(xs[i], ms[i])
        np.testing.assert_allclose(w[i], wi, rtol=1e-6)
        np.testing.assert_allclose(m[i], mi, rtol=1e-6)
    logits = rng.normal(size=(3, B, T, V)).astype(np.float32)
    toks = rng.integers(0, V, size=(3, B, T))
    lv = jax.jit(jax.vmap(ops.token_logprobs))(logits, toks)
    np.testing.assert_allclose(lv[1], jitted["logp"](logits[1], toks[1]), rtol=1e-6)


def test_shape_errors_name_the_argument():
    x = jnp.ones((B, T))
    with pytest.raises(ValueError, match="mask"):
        ops.masked_mean(x, jnp.ones((B, T + 1)))
    with pytest.raises(ValueError, match="mask"):
        ops.masked_mean(x, jnp.ones((T,)))  # would broadcast silently elsewhere
    with pytest.raises(ValueError, match="tokens"):
        ops.token_logprobs(jnp.ones((B, T, V)), jnp.ones((B, T + 1), jnp.int32))
    with pytest.raises(ValueError, match="logits"):
        ops.token_logprobs(jnp.ones((V,)), jnp.ones((), jnp.int32))
    with pytest.raises(ValueError, match="temperature"):
        ops.token_logprobs(jnp.ones((B, T, V)), jnp.ones((B, T), jnp.int32), temperature=0.0)
    with pytest.raises(ValueError, match="mask"):
        ops.last_valid_index(jnp.ones((T,)))


def test_package_exports_math_without_importing_models():
    import subprocess
    import sys

    code = (
        "import sys, rlhf_jax\n"
        "names = ['gae', 'masked_whiten', 'ppo_policy_loss', 'ppo_value_loss', 'bradley_terry_loss', 'sft_loss',\n"
        "         'aggregate', 'kl_penalty', 'kl_controller_init', 'kl_controller_update', 'KLControllerState',\n"
        "         'shaped_rewards', 'pass_at_k', 'pass_at_k_curve', 'pass_at_k_bootstrap', 'token_logprobs',\n"
        "         'token_entropy', 'last_valid_index', 'masked_mean', 'masked_var', 'masked_sum']\n"
        "missing = [n for n in names if not callable(getattr(rlhf_jax, n, None))]\n"
        "assert not missing, missing\n"
        "assert not any(m.startswith(('rlhf_jax.models', 'rlhf_jax.rollout')) for m in sys.modules), 'eager import'\n"
        "try:\n"
        "    rlhf_jax.foo\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('unknown attribute resolved')\n"
        "import importlib.util\n"
        "if importlib.util.find_spec('rlhf_jax.rollout') is not None:\n"
        "    assert callable(rlhf_jax.generate) and rlhf_jax.Rollout is not None\n"
        "    assert 'rlhf_jax.rollout' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_no_vocab_sized_temporaries():
    # logits [B, T, V] are an argument; log-probs and entropy must not allocate another one
    logits = jnp.zeros((2, 16, 2048))
    tokens = jnp.zeros((2, 16), jnp.int32)
    vocab_bytes = logits.size * 4
    for fn in (
        lambda z, t: ops.token_logprobs(z, t, temperature=0.7),
        lambda z, t: ops.token_logprobs(z, t),
        lambda z, t: ops.token_entropy(z),
    ):
        compiled = jax.jit(fn).lower(logits, tokens).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("no memory analysis on this backend")
        assert analysis.temp_size_in_bytes < vocab_bytes // 8
