"""shaped_rewards against a float64 loop: KL on every token, the score on the last valid one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.core.kl import kl_controller_init
from rlhf_jax.core.shaping import shaped_rewards

B, T = 6, 7


def ref_shaped(scores, logp, ref, mask, kl_coef, estimator, eos=None, penalty=None, clip=None):
    rewards = np.zeros(logp.shape)
    kl = np.zeros(logp.shape)
    for b in range(logp.shape[0]):
        last = -1
        for t in range(logp.shape[1]):
            if mask[b, t] > 0:
                d = logp[b, t] - ref[b, t]
                kl[b, t] = {"k1": d, "k2": d * d / 2, "k3": np.exp(-d) - 1 + d}[estimator]
                rewards[b, t] = -kl_coef * kl[b, t]
                last = t
        if last >= 0:
            s = scores[b]
            if clip is not None:
                s = min(max(s, -clip), clip)
            if penalty is not None and not eos[b]:
                s -= penalty
            rewards[b, last] += s
    return rewards, kl


def inputs(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T
    lengths[-1] = 0
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    logp = (rng.normal(size=(B, T)) * 0.5 - 2).astype(np.float32)
    ref = (logp + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    scores = (rng.normal(size=B) * 3).astype(np.float32)
    eos = rng.uniform(size=B) > 0.5
    return scores, logp, ref, mask, eos


@pytest.fixture(scope="module")
def shaped():
    return jax.jit(
        shaped_rewards, static_argnames=("estimator", "missing_eos_penalty", "reward_clip")
    )


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_matches_loop(shaped, estimator):
    scores, logp, ref, mask, eos = inputs(0)
    rewards, kl = shaped(scores, logp, ref, mask, kl_coef=0.1, estimator=estimator)
    want_r, want_kl = ref_shaped(scores, logp.astype(np.float64), ref.astype(np.float64), mask, 0.1, estimator)
    np.testing.assert_allclose(rewards, want_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-5, atol=1e-6)


def test_eos_penalty_and_clipping(shaped):
    scores, logp, ref, mask, eos = inputs(1)
    assert eos.any() and not eos.all()
    rewards, _ = shaped(scores, logp, ref, mask, kl_coef=0.05, eos_mask=eos, missing_eos_penalty=1.0, reward_clip=2.0)
    want, _ = ref_shaped(scores, logp, ref, mask, 0.05, "k1", eos, 1.0, 2.0)
    np.testing.assert_allclose(rewards, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="eos_mask"):
        shaped_rewards(scores, logp, ref, mask, kl_coef=0.1, missing_eos_penalty=1.0)
    with pytest.raises(ValueError, match="reward_clip"):
        shaped_rewards(scores, logp, ref, mask, kl_coef=0.1, reward_clip=-1.0)


def test_score_lands_on_last_valid_token_only():
    # no KL (logp == ref): the rewards are exactly the score at the last valid index
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
    scores = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    z = np.zeros((4, 4), np.float32)
    rewards, kl = shaped_rewards(scores, z, z, mask, kl_coef=0.5)
    want = np.array([[0, 0, 1, 0], [2, 0, 0, 0], [0, 0, 0, 3], [0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(rewards, want)  # the empty row gets no score
    np.testing.assert_array_equal(kl, z)
    # bool masks work the same
    np.testing.assert_array_equal(shaped_rewards(scores, z, z, mask > 0, kl_coef=0.5)[0], want)


def test_padding_garbage_ignored(shaped):
    scores, logp, ref, mask, _ = inputs(2)
    dirty_logp = np.where(mask > 0, logp, np.nan).astype(np.float32)
    dirty_ref = np.where(mask > 0, ref, -np.inf).astype(np.float32)
    for est in ("k1", "k3"):
        clean = shaped(scores, logp, ref, mask, kl_coef=0.1, estimator=est)
        dirty = shaped(scores, dirty_logp, dirty_ref, mask, kl_coef=0.1, estimator=est)
        for c, d in zip(clean, dirty):
            np.testing.assert_array_equal(c, d)


def test_traced_kl_coef_from_controller_compiles_once():
    traces = []

    @jax.jit
    def f(state, scores, logp, ref, mask):
        traces.append(1)
        return shaped_rewards(scores, logp, ref, mask, kl_coef=state.kl_coef)

    scores, logp, ref, mask, _ = inputs(3)
    r1, kl = f(kl_controller_init(0.1, target=6.0), scores, logp, ref, mask)
    r2, _ = f(kl_controller_init(0.3, target=6.0), scores, logp, ref, mask)
    assert len(traces) == 1
    np.testing.assert_allclose(np.asarray(r2 - r1), -0.2 * np.asarray(kl), rtol=1e-4, atol=1e-6)
    # vmap over an extra leading axis
    stacked = [np.stack(x) for x in zip(*[inputs(s)[:4] for s in range(3)])]
    rv, _ = jax.jit(jax.vmap(lambda s, lp, rf, m: shaped_rewards(s, lp, rf, m, kl_coef=0.1)))(*stacked)
    np.testing.assert_allclose(rv[2], shaped_rewards(*inputs(2)[:4], kl_coef=0.1)[0], rtol=1e-6)


def test_shape_errors_name_the_argument():
    scores, logp, ref, mask, eos = inputs(4)
    with pytest.raises(ValueError, match="scores"):
        shaped_rewards(scores[:-1], logp, ref, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        shaped_rewards(scores, logp, ref[:, :-1], mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="mask"):
        shaped_rewards(scores, logp, ref, mask[:, :-1], kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        shaped_rewards(scores, logp, ref, mask, kl_coef=jnp.ones(2))
    with pytest.raises(ValueError, match="eos_mask"):
        shaped_rewards(scores, logp, ref, mask, kl_coef=0.1, eos_mask=eos[:-1], missing_eos_penalty=1.0)
