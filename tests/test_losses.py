"""rlhf_jax.core.losses against float64 NumPy references written as plain loops."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rlhf_jax.core import losses
from rlhf_jax.core.losses import AGGREGATIONS

B, T = 6, 8


def padded_mask(rng, b=B, t=T):
    lengths = rng.integers(1, t + 1, size=b)
    lengths[0] = t
    lengths[-1] = 0  # an empty row
    return (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)


def ref_aggregate(per_token, mask, agg, norm_constant=None):
    """Plain loops, float64."""
    per_token = np.asarray(per_token, np.float64)
    rows = []
    total, count = 0.0, 0
    for b in range(per_token.shape[0]):
        vals = [per_token[b, t] for t in range(per_token.shape[1]) if mask[b, t] > 0]
        total += sum(vals)
        count += len(vals)
        if agg == "seq-mean-token-sum-norm":
            rows.append(sum(vals) / (norm_constant or per_token.shape[1]))
        elif vals:
            rows.append(sum(vals) / len(vals) if agg == "seq-mean-token-mean" else sum(vals))
    if agg == "token-mean":
        return total / max(count, 1)
    return sum(rows) / max(len(rows), 1)


def ref_policy(logp, old, adv, mask, eps, dual_clip=None):
    per_token = np.zeros_like(logp, dtype=np.float64)
    clipped_count = 0
    kl = []
    ratios = []
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[b, t] == 0:
                continue
            r = math.exp(logp[b, t] - old[b, t])
            a = adv[b, t]
            l1, l2 = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
            loss = max(l1, l2)
            if dual_clip is not None and a < 0:
                loss = min(loss, -dual_clip * a)
            per_token[b, t] = loss
            clipped_count += l2 > l1
            kl.append(r - 1 - math.log(r))
            ratios.append(r)
    n = max(len(ratios), 1)
    return per_token, clipped_count / n, sum(kl) / n, sum(ratios) / n, max(ratios, default=0.0)


def ref_value(v, old, ret, mask, eps):
    per_token = np.zeros_like(v, dtype=np.float64)
    clipped = 0
    for b in range(v.shape[0]):
        for t in range(v.shape[1]):
            if mask[b, t] == 0:
                continue
            u = (v[b, t] - ret[b, t]) ** 2
            vc = old[b, t] + min(max(v[b, t] - old[b, t], -eps), eps)
            c = (vc - ret[b, t]) ** 2
            per_token[b, t] = 0.5 * max(u, c)
            clipped += c > u
    return per_token, clipped / max(mask.sum(), 1)


def policy_inputs(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    old = rng.normal(size=(B, T)) * 0.5 - 2
    logp = old + rng.normal(size=(B, T)) * 0.3
    adv = rng.normal(size=(B, T))
    return logp.astype(dtype), old.astype(dtype), adv.astype(dtype), padded_mask(rng)


@pytest.fixture(scope="module")
def jit_policy():
    return jax.jit(losses.ppo_policy_loss, static_argnames=("clip_eps", "agg", "dual_clip", "norm_constant"))


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_aggregate_matches_loops(agg):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T))
    mask = padded_mask(rng)
    got = jax.jit(losses.aggregate, static_argnames="agg")(x.astype(np.float32), mask, agg=agg)
    np.testing.assert_allclose(got, ref_aggregate(x, mask, agg), rtol=1e-5)
    if agg == "seq-mean-token-sum-norm":
        got = losses.aggregate(x.astype(np.float32), mask, agg=agg, norm_constant=3.0)
        np.testing.assert_allclose(got, ref_aggregate(x, mask, agg, 3.0), rtol=1e-5)


agg_j = jax.jit(losses.aggregate, static_argnames=("agg", "norm_constant"))
policy_j = jax.jit(losses.ppo_policy_loss, static_argnames=("clip_eps", "agg", "dual_clip", "norm_constant"))


def test_aggregate_invariances():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(B, T)).astype(np.float32)
    mask = padded_mask(rng)
    wider_x = np.concatenate([x, rng.normal(size=(B, 3)).astype(np.float32)], 1)
    wider_m = np.concatenate([mask, np.zeros((B, 3), np.float32)], 1)
    # Extra padding columns change nothing, except Dr. GRPO's constant (default T).
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        np.testing.assert_allclose(agg_j(wider_x, wider_m, agg=agg), agg_j(x, mask, agg=agg), rtol=1e-6)
    np.testing.assert_allclose(
        agg_j(wider_x, wider_m, agg="seq-mean-token-sum-norm", norm_constant=T),
        agg_j(x, mask, agg="seq-mean-token-sum-norm"),
        rtol=1e-6,
    )
    # token-mean weighs tokens equally; seq-mean-token-mean weighs sequences equally.
    two = np.array([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]], np.float32)
    m2 = np.array([[1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
    assert float(agg_j(two, m2, agg="token-mean")) == pytest.approx(7 / 5)
    assert float(agg_j(two, m2, agg="seq-mean-token-mean")) == pytest.approx(2.0)
    assert float(agg_j(two, m2, agg="seq-mean-token-sum")) == pytest.approx(3.5)
    assert float(agg_j(two, m2, agg="seq-mean-token-sum-norm")) == pytest.approx(7 / 4 / 2)
    # a constant per-token loss: seq-mean-token-sum grows with length, token-mean does not
    ones = np.ones((1, T), np.float32)
    short = (np.arange(T) < 2).astype(np.float32)[None]
    assert float(agg_j(ones, short, agg="token-mean")) == pytest.approx(1.0)
    assert float(agg_j(ones, short, agg="seq-mean-token-sum")) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="agg"):
        agg_j(x, mask, agg="mean")


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_ppo_policy_loss_matches_loops(jit_policy, agg, dual_clip):
    logp, old, adv, mask = policy_inputs(2)
    loss, aux = jit_policy(logp, old, adv, mask, clip_eps=0.2, agg=agg, dual_clip=dual_clip)
    per_token, clipfrac, kl, ratio_mean, ratio_max = ref_policy(
        logp.astype(np.float64), old.astype(np.float64), adv.astype(np.float64), mask, 0.2, dual_clip
    )
    np.testing.assert_allclose(loss, ref_aggregate(per_token, mask, agg), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["policy_loss"], loss)
    np.testing.assert_allclose(aux["clipfrac"], clipfrac, rtol=1e-6)
    assert 0.0 < clipfrac < 1.0  # the inputs exercise both branches
    np.testing.assert_allclose(aux["approx_kl"], kl, rtol=1e-4)
    np.testing.assert_allclose(aux["ratio_mean"], ratio_mean, rtol=1e-5)
    np.testing.assert_allclose(aux["ratio_max"], ratio_max, rtol=1e-5)
    assert ("dual_clipfrac" in aux) == (dual_clip is not None)


def test_dual_clip_bounds_negative_advantage_loss():
    # A = -1, ratio = e^2 >> 1 + eps: standard PPO loss is -A*ratio = 7.39; dual clip bounds it at 3.
    logp, old, adv, mask = (jnp.array([[2.0]]), jnp.array([[0.0]]), jnp.array([[-1.0]]), jnp.ones((1, 1)))
    plain, _ = policy_j(logp, old, adv, mask)
    dual, aux = policy_j(logp, old, adv, mask, dual_clip=3.0)
    assert float(plain) == pytest.approx(math.exp(2.0), rel=1e-6)
    assert float(dual) == pytest.approx(3.0)
    assert float(aux["dual_clipfrac"]) == 1.0
    grad = jax.jit(jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, adv, mask, dual_clip=3.0)[0]))(logp)
    assert float(grad[0, 0]) == 0.0
    # positive advantages are untouched by dual clip
    pos, _ = policy_j(logp, old, -adv, mask, dual_clip=3.0)
    assert float(pos) == pytest.approx(-1.2)
    with pytest.raises(ValueError, match="dual_clip"):
        losses.ppo_policy_loss(logp, old, adv, mask, dual_clip=0.5)


def test_ppo_value_loss_matches_loops():
    rng = np.random.default_rng(3)
    old = rng.normal(size=(B, T))
    v = old + rng.normal(size=(B, T)) * 0.3
    ret = rng.normal(size=(B, T))
    mask = padded_mask(rng)
    f = jax.jit(losses.ppo_value_loss, static_argnames=("clip_eps", "agg"))
    for agg in AGGREGATIONS:
        loss, aux = f(v.astype(np.float32), old.astype(np.float32), ret.astype(np.float32), mask, agg=agg)
        per_token, clipfrac = ref_value(v, old, ret, mask, 0.2)
        np.testing.assert_allclose(loss, ref_aggregate(per_token, mask, agg), rtol=1e-5)
        np.testing.assert_allclose(aux["value_clipfrac"], clipfrac, rtol=1e-6)
        assert 0.0 < clipfrac < 1.0
    loss, aux = f(v, old, ret, mask, clip_eps=None)
    valid = mask > 0
    np.testing.assert_allclose(loss, 0.5 * np.mean((v - ret)[valid] ** 2), rtol=1e-5)
    np.testing.assert_allclose(aux["value_mse"], np.mean((v - ret)[valid] ** 2), rtol=1e-5)


def test_bradley_terry_loss_and_accuracy():
    rng = np.random.default_rng(4)
    chosen = rng.normal(size=16)
    rejected = rng.normal(size=16)
    rejected[0] = chosen[0]  # a tie counts as wrong
    margin = rng.uniform(0, 1, size=16)
    bt_j = jax.jit(losses.bradley_terry_loss, static_argnames="center_coef")
    loss, aux = bt_j(chosen.astype(np.float32), rejected.astype(np.float32))
    want = np.mean(np.log1p(np.exp(-(chosen - rejected))))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux["accuracy"], np.mean(chosen > rejected))
    np.testing.assert_allclose(aux["reward_margin"], np.mean(chosen - rejected), rtol=1e-5)
    loss_m, _ = bt_j(chosen, rejected, margin=margin)
    np.testing.assert_allclose(loss_m, np.mean(np.log1p(np.exp(-(chosen - rejected - margin)))), rtol=1e-5)
    loss_c, aux_c = bt_j(chosen, rejected, center_coef=0.01)
    np.testing.assert_allclose(loss_c, want + 0.01 * np.mean((chosen + rejected) ** 2), rtol=1e-5)
    np.testing.assert_allclose(aux_c["bt_loss"], want, rtol=1e-5)
    # numerically stable far in the tails
    big, _ = bt_j(jnp.array([-100.0]), jnp.array([100.0]))
    assert float(big) == pytest.approx(200.0)
    with pytest.raises(ValueError, match="rejected_rewards"):
        losses.bradley_terry_loss(jnp.ones(3), jnp.ones(4))


def test_sft_loss():
    rng = np.random.default_rng(5)
    logp = -rng.uniform(0.1, 3, size=(B, T))
    mask = padded_mask(rng)
    sft_j = jax.jit(losses.sft_loss, static_argnames="agg")
    loss, aux = sft_j(logp.astype(np.float32), mask)
    nll = -logp[mask > 0].mean()
    np.testing.assert_allclose(loss, nll, rtol=1e-5)
    np.testing.assert_allclose(aux["perplexity"], np.exp(nll), rtol=1e-5)
    assert float(aux["num_tokens"]) == mask.sum()
    loss_s, aux_s = sft_j(logp.astype(np.float32), mask, agg="seq-mean-token-sum")
    np.testing.assert_allclose(loss_s, ref_aggregate(-logp, mask, "seq-mean-token-sum"), rtol=1e-5)
    np.testing.assert_allclose(aux_s["nll"], nll, rtol=1e-5)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_gradients_match_finite_differences(agg):
    logp, old, adv, mask = policy_inputs(6, np.float64)
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        logp, old, adv, mask = map(jnp.asarray, (logp, old, adv, mask))
        check_grads(
            jax.jit(lambda lp: losses.ppo_policy_loss(lp, old, adv, mask, agg=agg, dual_clip=3.0)[0]),
            (logp,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-5,
        )
        v = jnp.asarray(rng.normal(size=(B, T)))
        ret = jnp.asarray(rng.normal(size=(B, T)))
        old_v = v + jnp.asarray(rng.normal(size=(B, T)) * 0.3)
        check_grads(
            jax.jit(lambda v: losses.ppo_value_loss(v, old_v, ret, mask, agg=agg)[0]),
            (v,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-5,
        )
        check_grads(jax.jit(lambda lp: losses.sft_loss(lp, mask, agg=agg)[0]), (logp,), order=1, modes=["rev"],
                    eps=1e-6)
        if agg == "token-mean":
            c, r = jnp.asarray(rng.normal(size=5)), jnp.asarray(rng.normal(size=5))
            check_grads(
                lambda c, r: losses.bradley_terry_loss(c, r, center_coef=0.1)[0], (c, r), order=1, modes=["rev"],
                eps=1e-6,
            )
            assert losses.ppo_policy_loss(logp, old, adv, mask)[0].dtype == jnp.float64


def test_masked_equals_sliced_and_padding_garbage():
    all_aggs = jax.jit(
        lambda *a: [losses.ppo_policy_loss(*a, agg=g, norm_constant=7.0) for g in AGGREGATIONS]
    )
    logp, old, adv, mask = policy_inputs(7)
    for b in range(B - 1):
        n = int(mask[b].sum())
        row = (logp[b : b + 1], old[b : b + 1], adv[b : b + 1], mask[b : b + 1])
        padded = all_aggs(*row)
        sliced = all_aggs(*(a[:, :n] for a in row))
        for (padded_loss, padded_aux), (sliced_loss, sliced_aux) in zip(padded, sliced):
            np.testing.assert_allclose(padded_loss, sliced_loss, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(padded_aux["clipfrac"], sliced_aux["clipfrac"], rtol=1e-6)
    # garbage (inf / nan) at padded positions changes neither loss nor gradient
    dirty = [np.where(mask > 0, a, np.nan).astype(np.float32) for a in (logp, old, adv)]
    dirty[0] = np.where(mask > 0, logp, np.inf).astype(np.float32)
    f = lambda lp, o, a: losses.ppo_policy_loss(lp, o, a, mask)  # noqa: E731
    vg = jax.jit(jax.value_and_grad(f, has_aux=True))
    (clean_loss, _), clean_grad = vg(logp, old, adv)
    (dirty_loss, _), dirty_grad = vg(*dirty)
    np.testing.assert_allclose(dirty_loss, clean_loss, rtol=1e-6)
    np.testing.assert_allclose(dirty_grad, clean_grad, rtol=1e-6)


def test_all_masked_rows_are_finite():
    z = jnp.zeros((B, T))

    @jax.jit
    def everything(z):
        out = []
        for agg in AGGREGATIONS:
            out.append(losses.ppo_policy_loss(z, z, z + 1, z, agg=agg))
            out.append(losses.ppo_value_loss(z, z, z + 1, z, agg=agg))
            out.append(losses.sft_loss(z - 1, z, agg=agg))
            out.append((jax.grad(lambda lp: losses.ppo_policy_loss(lp, z, z + 1, z, agg=agg)[0])(z), {}))
        return out

    for loss, aux in everything(z):
        assert np.all(np.asarray(loss) == 0.0)
        for x in aux.values():
            assert np.isfinite(x)


def test_vmap_and_compile_once():
    traces = []

    def step(logp, old, adv, mask):
        traces.append(1)
        return losses.ppo_policy_loss(logp, old, adv, mask)[0]

    stepj = jax.jit(jax.value_and_grad(step))
    for seed in range(3):
        stepj(*policy_inputs(seed))
    assert len(traces) == 1
    stacked = [np.stack(x) for x in zip(*[policy_inputs(s) for s in range(3)])]
    batched = jax.jit(jax.vmap(lambda *a: losses.ppo_policy_loss(*a)[0]))(*stacked)
    for i in range(3):
        np.testing.assert_allclose(batched[i], policy_j(*policy_inputs(i))[0], rtol=1e-6)


def test_shape_errors_name_the_argument():
    x = jnp.ones((B, T))
    with pytest.raises(ValueError, match="advantages"):
        losses.ppo_policy_loss(x, x, jnp.ones((B, 1)), x)
    with pytest.raises(ValueError, match="returns"):
        losses.ppo_value_loss(x, x, jnp.ones((B,)), x)
    with pytest.raises(ValueError, match="logprobs"):
        losses.sft_loss(jnp.ones((T,)), jnp.ones((T,)))
