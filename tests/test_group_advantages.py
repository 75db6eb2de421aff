"""Critic-free advantage estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) against float64 loops."""
import doctest
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlhf_jax
from rlhf_jax.core import advantages
from rlhf_jax.core.advantages import group_advantages, reinforce_pp_advantages, returns_to_go, rloo_advantages

G, NUM_PROMPTS, T = 4, 3, 7
B = G * NUM_PROMPTS


def ref_group(scores, g, scale, eps):
    """Plain loops, float64; unbiased std (n - 1)."""
    s = [float(x) for x in scores]
    out = []
    all_mean = sum(s) / len(s)
    batch_std = math.sqrt(sum((x - all_mean) ** 2 for x in s) / max(len(s) - 1, 1))
    for start in range(0, len(s), g):
        group = s[start : start + g]
        mean = sum(group) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / max(g - 1, 1))
        for x in group:
            if scale == "none":
                out.append(x - mean)
            else:
                out.append((x - mean) / ((std if scale == "group" else batch_std) + eps))
    return np.array(out)


def ref_rloo(scores, g):
    s = [float(x) for x in scores]
    out = []
    for start in range(0, len(s), g):
        group = s[start : start + g]
        for i, x in enumerate(group):
            others = [y for j, y in enumerate(group) if j != i]
            out.append(x - sum(others) / len(others))
    return np.array(out)


def ref_reinforce_pp(rewards, mask, gamma, scores=None, g=None):
    b, t = rewards.shape
    r = np.where(mask > 0, rewards, 0.0).astype(np.float64)
    if scores is not None:
        for i in range(b):
            start = (i // g) * g
            base = sum(float(x) for x in scores[start : start + g]) / g
            valid = [j for j in range(t) if mask[i, j] > 0]
            if valid:
                r[i, valid[-1]] -= base
    ret = np.zeros((b, t))
    for i in range(b):
        acc = 0.0
        for j in reversed(range(t)):
            if mask[i, j] == 0:
                acc = 0.0
                continue
            acc = r[i, j] + gamma * acc
            ret[i, j] = acc
    vals = ret[mask > 0]
    n = len(vals)
    mean = vals.sum() / max(n, 1)
    var = ((vals - mean) ** 2).sum() / max(n - 1, 1)
    return np.where(mask > 0, (ret - mean) / np.sqrt(var + 1e-8), 0.0), ret


def padded_mask(rng, b=B, t=T):
    lengths = rng.integers(1, t + 1, size=b)
    lengths[0] = t
    lengths[-1] = 0  # an empty row
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


group_j = jax.jit(group_advantages, static_argnames=("group_size", "scale"))
rloo_j = jax.jit(rloo_advantages, static_argnames="group_size")
rpp_j = jax.jit(reinforce_pp_advantages, static_argnames=("baseline", "group_size"))


@pytest.mark.parametrize("scale", advantages.GROUP_SCALES)
@pytest.mark.parametrize("seed", range(2))
def test_group_advantages_match_loops(scale, seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=B).astype(np.float32)
    scores[G : 2 * G] = 0.3  # one constant group
    got = group_j(scores, group_size=G, scale=scale)
    want = ref_group(scores, G, scale, 1e-6)
    assert got.shape == (B,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # a constant group carries no signal: exactly 0, whatever the scale
    assert np.all(np.asarray(got)[G : 2 * G] == 0.0)
    if scale != "none":
        # zero mean per group; unit unbiased std per group for "group"
        rows = np.asarray(got, np.float64).reshape(NUM_PROMPTS, G)
        np.testing.assert_allclose(rows.mean(1), 0.0, atol=1e-6)
        if scale == "group":
            np.testing.assert_allclose(rows[[0, 2]].std(1, ddof=1), 1.0, rtol=1e-4)


def test_group_advantages_binary_rewards_and_eps():
    # verifier rewards 0/1: GRPO with G = 4, one right answer -> (1 - 1/4) / std
    scores = jnp.array([1.0, 0.0, 0.0, 0.0])
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)
    got = group_j(scores, group_size=4, scale="group", eps=0.0)
    np.testing.assert_allclose(got, [0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std], rtol=1e-6)
    # G = 1: nothing to compare with, all zero and finite
    assert np.all(np.asarray(group_j(scores, group_size=1)) == 0.0)


def test_rloo_matches_loops_and_is_scaled_centering():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=B).astype(np.float32)
    scores[:G] = -1.25
    got = rloo_j(scores, group_size=G)
    np.testing.assert_allclose(got, ref_rloo(scores, G), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[:G] == 0.0)
    np.testing.assert_allclose(
        got, group_j(scores, group_size=G, scale="none") * G / (G - 1), rtol=1e-5, atol=1e-6
    )


def test_returns_to_go_is_a_scan_matching_loops():
    rng = np.random.default_rng(4)
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    mask = padded_mask(rng)
    for gamma in (1.0, 0.9):
        got = jax.jit(returns_to_go)(rewards, mask, gamma=gamma)
        np.testing.assert_allclose(got, ref_reinforce_pp(rewards, mask, gamma)[1], rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda r, m: returns_to_go(r, m))(rewards, mask))
    assert "scan" in jaxpr  # a scan, not T unrolled steps
    # equals GAE with no values and lambda = 1
    np.testing.assert_allclose(
        returns_to_go(rewards, mask, gamma=0.9),
        rlhf_jax.gae(rewards, np.zeros_like(rewards), mask, gamma=0.9, lam=1.0, method="scan")[0],
        rtol=1e-6,
    )


@pytest.mark.parametrize("gamma", [1.0, 0.95])
@pytest.mark.parametrize("baseline", [None, "group"])
def test_reinforce_pp_matches_loops(gamma, baseline):
    rng = np.random.default_rng(int(gamma * 100) + (baseline is None))
    mask = padded_mask(rng)
    scores = rng.normal(size=B).astype(np.float32)
    kl = rng.normal(size=(B, T)).astype(np.float32) * 0.1
    logp = rng.normal(size=(B, T)).astype(np.float32)
    rewards, _ = rlhf_jax.shaped_rewards(scores, logp, logp - kl, mask, kl_coef=0.05)
    rewards = np.where(mask > 0, np.asarray(rewards), np.nan).astype(np.float32)  # padding garbage
    kwargs = dict(scores=scores, group_size=G) if baseline else {}
    got = rpp_j(rewards, mask, gamma=gamma, baseline=baseline, **kwargs)
    want, _ = ref_reinforce_pp(
        np.nan_to_num(rewards), mask, gamma, scores if baseline else None, G if baseline else None
    )
    assert got.shape == (B, T)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(got)[mask == 0] == 0.0)


def test_reinforce_pp_baseline_equals_shaping_centred_scores():
    # subtracting the group mean at the last token == shaping (s - mean_group s)
    rng = np.random.default_rng(7)
    mask = padded_mask(rng)
    scores = rng.normal(size=B).astype(np.float32)
    logp = rng.normal(size=(B, T)).astype(np.float32)
    ref = logp - rng.normal(size=(B, T)).astype(np.float32) * 0.1
    rewards, _ = rlhf_jax.shaped_rewards(scores, logp, ref, mask, kl_coef=0.1)
    centred = scores - scores.reshape(-1, G).mean(1).repeat(G)
    rewards_c, _ = rlhf_jax.shaped_rewards(centred, logp, ref, mask, kl_coef=0.1)
    np.testing.assert_allclose(
        rpp_j(rewards, mask, gamma=0.9, baseline="group", scores=scores, group_size=G),
        rpp_j(rewards_c, mask, gamma=0.9),
        rtol=1e-4, atol=1e-5,
    )


def test_masked_equals_sliced():
    rng = np.random.default_rng(8)
    mask = padded_mask(rng)
    mask[-1, :2] = 1.0  # no empty row here: slicing drops nothing
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    scores = rng.normal(size=B).astype(np.float32)
    n = int(mask.sum(1).max())
    wide_r = np.concatenate([rewards, rng.normal(size=(B, 3)).astype(np.float32)], 1)
    wide_m = np.concatenate([mask, np.zeros((B, 3), np.float32)], 1)
    for kwargs in ({}, dict(baseline="group", scores=scores, group_size=G)):
        base = rpp_j(rewards, mask, **kwargs)
        np.testing.assert_allclose(rpp_j(wide_r, wide_m, **kwargs)[:, :T], base, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rpp_j(rewards[:, :n], mask[:, :n], **kwargs), base[:, :n], rtol=1e-5, atol=1e-6)


def test_finite_on_all_padding_and_constant_scores():
    z = jnp.zeros((B, T))
    const = jnp.full((B,), 2.0)
    outs = [
        group_j(const, group_size=G),
        group_j(const, group_size=G, scale="batch"),
        group_j(const, group_size=G, scale="none"),
        rloo_j(const, group_size=G),
        rpp_j(z, z),
        rpp_j(z + 1.0, z, baseline="group", scores=const, group_size=G),
        rpp_j(z + 1.0, jnp.ones((B, T)), baseline="group", scores=const, group_size=G),
    ]
    for out in outs:
        assert np.all(np.isfinite(out))
    for out in outs[:6]:
        assert np.all(np.asarray(out) == 0.0)


def test_jit_vmap_and_compile_once():
    traces = []

    def f(scores):
        traces.append(1)
        return group_advantages(scores, group_size=G) + rloo_advantages(scores, group_size=G)

    fj = jax.jit(f)
    rng = np.random.default_rng(9)
    stacked = rng.normal(size=(3, B)).astype(np.float32)
    for row in stacked:
        fj(row)
    assert len(traces) == 1
    batched = jax.vmap(f)(stacked)
    for i in range(3):
        np.testing.assert_allclose(batched[i], fj(stacked[i]), rtol=1e-6)
    mask = np.stack([padded_mask(rng) for _ in range(3)])
    rewards = rng.normal(size=(3, B, T)).astype(np.float32)
    vm = jax.jit(jax.vmap(lambda r, m, s: reinforce_pp_advantages(r, m, baseline="group", scores=s, group_size=G)))
    got = vm(rewards, mask, stacked)
    for i in range(3):
        np.testing.assert_allclose(
            got[i], rpp_j(rewards[i], mask[i], baseline="group", scores=stacked[i], group_size=G), rtol=1e-5, atol=1e-6
        )


def test_errors():
    s = jnp.ones(B)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(s, group_size=5)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(s, group_size=0)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(s, group_size=G, scale="std")
    with pytest.raises(ValueError, match="scores"):
        group_advantages(jnp.ones((B, 1)), group_size=G)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(s, group_size=1)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(s, group_size=5)
    r = jnp.ones((B, T))
    with pytest.raises(ValueError, match="baseline"):
        reinforce_pp_advantages(r, r, baseline="mean")
    with pytest.raises(ValueError, match="needs"):
        reinforce_pp_advantages(r, r, baseline="group", group_size=G)
    with pytest.raises(ValueError, match="only used"):
        reinforce_pp_advantages(r, r, scores=s)
    with pytest.raises(ValueError, match="scores"):
        reinforce_pp_advantages(r, r, baseline="group", scores=jnp.ones(B + 1), group_size=G)
    with pytest.raises(ValueError, match="group_size"):
        reinforce_pp_advantages(r, r, baseline="group", scores=s, group_size=5)
    with pytest.raises(ValueError, match="mask"):
        reinforce_pp_advantages(r, jnp.ones((B, T + 1)))


def test_doctests():
    assert doctest.testmod(advantages).failed == 0
