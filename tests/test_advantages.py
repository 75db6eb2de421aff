"""GAE (scan and associative scan) against a float64 loop and against rlax."""
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.core import advantages
from rlhf_jax.core.advantages import gae

B, T = 6, 9
METHODS = ("scan", "associative")


def ref_gae(rewards, values, mask, gamma, lam):
    """The defining recursion, a float64 loop over t backwards (any 0/1 mask)."""
    b, t = rewards.shape
    adv = np.zeros((b, t))
    for i in range(b):
        next_adv = 0.0
        for j in reversed(range(t)):
            m_next = mask[i, j + 1] if j + 1 < t else 0.0
            v_next = values[i, j + 1] if j + 1 < t else 0.0
            delta = rewards[i, j] + gamma * m_next * v_next - values[i, j]
            next_adv = delta + gamma * lam * m_next * next_adv
            adv[i, j] = next_adv
    return adv * mask, (adv + values) * mask


def random_inputs(rng, b=B, t=T):
    lengths = rng.integers(0, t + 1, size=b)
    lengths[0] = t
    lengths[-1] = 0
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    rewards = rng.normal(size=(b, t)).astype(np.float32)
    values = rng.normal(size=(b, t)).astype(np.float32)
    return rewards, values, mask


@pytest.fixture(scope="module")
def jitted():
    # gamma and lam are traced (not static): one compile serves every value
    return {m: jax.jit(gae, static_argnames=("method",)) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_float64_loop(jitted, method, gamma, lam):
    rng = np.random.default_rng(int(gamma * 100 + lam * 10))
    rewards, values, mask = random_inputs(rng)
    adv, ret = jitted[method](rewards, values, mask, gamma=gamma, lam=lam, method=method)
    want_adv, want_ret = ref_gae(rewards.astype(np.float64), values.astype(np.float64), mask, gamma, lam)
    assert adv.dtype == jnp.float32 and adv.shape == (B, T)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 5), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
    lam=st.floats(0.0, 1.0),
)
def test_gae_hypothesis_both_methods_agree_with_loop(jitted, lengths, seed, lam):
    rng = np.random.default_rng(seed)
    mask = (np.arange(5)[None, :] < np.array(lengths)[:, None]).astype(np.float32)
    rewards = rng.normal(size=(3, 5)).astype(np.float32)
    values = rng.normal(size=(3, 5)).astype(np.float32)
    want_adv, want_ret = ref_gae(rewards.astype(np.float64), values.astype(np.float64), mask, 0.95, lam)
    for method in METHODS:
        adv, ret = jitted[method](rewards, values, mask, gamma=0.95, lam=lam, method=method)
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_gae_general_masks_with_holes(jitted):
    # not the contract (ones then zeros), but both methods follow the recursion for any mask
    rng = np.random.default_rng(11)
    rewards, values, _ = random_inputs(rng)
    mask = (rng.uniform(size=(B, T)) > 0.3).astype(np.float32)
    want_adv, _ = ref_gae(rewards.astype(np.float64), values.astype(np.float64), mask, 0.9, 0.8)
    for method in METHODS:
        adv, _ = jitted[method](rewards, values, mask, gamma=0.9, lam=0.8, method=method)
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)


def test_gae_matches_rlax_on_unpadded_rows(jitted):
    rng = np.random.default_rng(3)
    rewards, values, mask = random_inputs(rng)
    gamma, lam = 0.97, 0.9
    ours = [jitted[m](rewards, values, mask, gamma=gamma, lam=lam, method=m)[0] for m in METHODS]
    for b in range(B):
        n = int(mask[b].sum())
        if n == 0:
            continue
        # rlax: r_t at times [1, n], values at [0, n] with V_n = 0 (the episode ends), discounts gamma
        want = rlax.truncated_generalized_advantage_estimation(
            rewards[b, :n], jnp.full((n,), gamma), lam, jnp.concatenate([values[b, :n], jnp.zeros(1)])
        )
        for adv in ours:
            np.testing.assert_allclose(adv[b, :n], want, rtol=1e-5, atol=1e-5)


def test_gae_padding_garbage_and_empty_rows(jitted):
    rng = np.random.default_rng(4)
    rewards, values, mask = random_inputs(rng)
    dirty_r = np.where(mask > 0, rewards, np.nan).astype(np.float32)
    dirty_v = np.where(mask > 0, values, np.inf).astype(np.float32)
    for method in METHODS:
        clean = jitted[method](rewards, values, mask, gamma=1.0, lam=0.95, method=method)
        dirty = jitted[method](dirty_r, dirty_v, mask, gamma=1.0, lam=0.95, method=method)
        for c, d in zip(clean, dirty):
            np.testing.assert_array_equal(c, d)
            assert np.all(np.asarray(d)[-1] == 0.0)  # the empty row


def test_gae_masked_equals_sliced(jitted):
    rng = np.random.default_rng(5)
    rewards, values, mask = random_inputs(rng, b=1)
    for n in (1, 4, T):
        m = (np.arange(T) < n).astype(np.float32)[None]
        for method in METHODS:
            full, _ = jitted[method](rewards, values, m, gamma=1.0, lam=0.95, method=method)
            cut, _ = jitted[method](rewards[:, :n], values[:, :n], m[:, :n], gamma=1.0, lam=0.95, method=method)
            np.testing.assert_allclose(full[:, :n], cut, rtol=1e-6, atol=1e-6)


def test_gae_auto_picks_by_backend(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert advantages._default_method() == "scan"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert advantages._default_method() == "associative"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert advantages._default_method() == "associative"


def test_gae_vmap_compile_once_and_errors(jitted):
    traces = []

    @jax.jit
    def f(r, v, m):
        traces.append(1)
        return gae(r, v, m)

    rng = np.random.default_rng(6)
    for _ in range(3):
        f(*random_inputs(rng))
    assert len(traces) == 1
    stacked = [np.stack(x) for x in zip(*[random_inputs(np.random.default_rng(s)) for s in range(3)])]
    adv, _ = jax.jit(jax.vmap(lambda r, v, m: gae(r, v, m, method="associative")))(*stacked)
    for i in range(3):
        want = jitted["scan"](*(x[i] for x in stacked), method="scan")[0]
        np.testing.assert_allclose(adv[i], want, rtol=1e-5, atol=1e-6)
    r, v, m = random_inputs(rng)
    with pytest.raises(ValueError, match="values"):
        gae(r, v[:, :-1], m)
    with pytest.raises(ValueError, match="mask"):
        gae(r, v, m[0])
    with pytest.raises(ValueError, match="rewards"):
        gae(r[0], v[0], m[0])
    with pytest.raises(ValueError, match="method"):
        gae(r, v, m, method="loop")


def test_docstring_example():
    assert doctest.testmod(advantages, raise_on_error=False).failed == 0
