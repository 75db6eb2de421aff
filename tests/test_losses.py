"""rlhf_jax.core.losses against float64 NumPy references written as plain loops."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rlhf_jax
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
            vc = min(max(v[b, t], old[b, t] - eps), old[b, t] + eps)
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


# ---------------------------------------------------------------------------
# Clip-higher, GSPO's sequence ratio, the value-clip rounding fix, TIS.


def ref_policy_general(logp, old, adv, mask, eps_low, eps_high, ratio="token"):
    """float64 loops: per-token loss, clipfrac_low, clipfrac_high, ratios used."""
    per_token = np.zeros_like(logp, dtype=np.float64)
    rho = np.zeros_like(logp, dtype=np.float64)
    low = high = 0
    for b in range(logp.shape[0]):
        valid = [t for t in range(logp.shape[1]) if mask[b, t] > 0]
        seq = math.exp(sum(logp[b, t] - old[b, t] for t in valid) / max(len(valid), 1))
        for t in valid:
            r = seq if ratio == "sequence" else math.exp(logp[b, t] - old[b, t])
            a = adv[b, t]
            l1, l2 = -a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high)
            per_token[b, t] = max(l1, l2)
            rho[b, t] = r
            low += (l2 > l1) and a < 0
            high += (l2 > l1) and a > 0
    n = max(mask.sum(), 1)
    return per_token, low / n, high / n, rho


@pytest.mark.parametrize("ratio", ["token", "sequence"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_clip_higher_and_sequence_ratio_match_loops(agg, ratio):
    logp, old, adv, mask = policy_inputs(11)
    if ratio == "sequence":
        adv = np.repeat(adv[:, :1], T, axis=1)  # one advantage per sequence (GRPO-style)
    lo, hi = (0.1, 0.15) if ratio == "token" else (0.01, 0.02)
    f = jax.jit(losses.ppo_policy_loss, static_argnames=("clip_eps", "clip_eps_high", "agg", "ratio"))
    loss, aux = f(logp, old, adv, mask, clip_eps=lo, clip_eps_high=hi, agg=agg, ratio=ratio)
    inputs64 = (a.astype(np.float64) for a in (logp, old, adv))
    per_token, low, high, rho = ref_policy_general(*inputs64, mask, lo, hi, ratio)
    np.testing.assert_allclose(loss, ref_aggregate(per_token, mask, agg), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["clipfrac_low"], low, rtol=1e-6)
    np.testing.assert_allclose(aux["clipfrac_high"], high, rtol=1e-6)
    np.testing.assert_allclose(aux["clipfrac"], aux["clipfrac_low"] + aux["clipfrac_high"], rtol=1e-6)
    assert low > 0 and high > 0  # both sides are exercised
    np.testing.assert_allclose(aux["ratio_mean"], rho[mask > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["ratio_max"], rho[mask > 0].max(), rtol=1e-5)


def test_defaults_unchanged_and_symmetric_clip_high():
    logp, old, adv, mask = policy_inputs(12)
    base_loss, base_aux = losses.ppo_policy_loss(logp, old, adv, mask, dual_clip=2.5)
    for kwargs in (dict(clip_eps_high=0.2), dict(ratio="token")):
        loss, aux = losses.ppo_policy_loss(logp, old, adv, mask, dual_clip=2.5, **kwargs)
        assert float(loss) == float(base_loss)
        for key in base_aux:
            assert float(aux[key]) == float(base_aux[key]), key
    # clip-higher lets a positive-advantage token's ratio rise further before its gradient stops
    logp1, old1, adv1, mask1 = jnp.array([[0.25]]), jnp.array([[0.0]]), jnp.array([[1.0]]), jnp.ones((1, 1))
    g = jax.grad(lambda lp, **k: losses.ppo_policy_loss(lp, old1, adv1, mask1, **k)[0])
    assert float(g(logp1)[0, 0]) == 0.0  # ratio e^0.25 = 1.28 > 1.2: clipped
    assert float(g(logp1, clip_eps_high=0.3)[0, 0]) == pytest.approx(-math.exp(0.25))  # < 1.3: not clipped


def test_gspo_sequence_ratio_gradient_equals_sequence_objective():
    """GSPO-token with a per-sequence advantage == GSPO's -A_b s_b with s_b differentiated."""
    logp, old, adv, mask = policy_inputs(13, np.float64)
    adv = np.repeat(adv[:, :1], T, axis=1)
    eps = 0.05
    with jax.enable_x64(True):
        logp, old, adv, mask = map(jnp.asarray, (logp, old, adv, mask))

        def gspo_sequence_objective(lp, agg):
            # the paper's objective written per sequence: s_b = exp(mean_t log ratio), full gradient
            n = jnp.sum(mask, axis=1)
            s = jnp.exp(jnp.sum(jnp.where(mask > 0, lp - old, 0.0), axis=1) / jnp.maximum(n, 1.0))
            a = adv[:, 0]
            per_seq = jnp.maximum(-a * s, -a * jnp.clip(s, 1 - eps, 1 + eps))
            per_tok = jnp.broadcast_to(per_seq[:, None], lp.shape)
            return losses.aggregate(per_tok, mask, agg=agg)

        for agg in AGGREGATIONS:
            ours = lambda lp: losses.ppo_policy_loss(lp, old, adv, mask, clip_eps=eps, agg=agg, ratio="sequence")[0]  # noqa: E731
            np.testing.assert_allclose(ours(logp), gspo_sequence_objective(logp, agg), rtol=1e-12)
            np.testing.assert_allclose(
                jax.grad(ours)(logp), jax.grad(gspo_sequence_objective)(logp, agg), rtol=1e-9, atol=1e-12
            )
        # the token-form gradient is s_b * d logp_bt: check it against finite differences
        # away from the clip boundary (eps large)
        check_grads(
            lambda lp: losses.ppo_policy_loss(lp, old, adv, mask, clip_eps=10.0, ratio="sequence")[0],
            (logp,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-5,
        )


def test_sequence_ratio_masked_equals_sliced_and_finite():
    logp, old, adv, mask = policy_inputs(14)
    f = jax.jit(lambda *a: losses.ppo_policy_loss(*a, ratio="sequence", agg="seq-mean-token-mean"))
    for b in range(B - 1):
        n = int(mask[b].sum())
        row = (logp[b : b + 1], old[b : b + 1], adv[b : b + 1], mask[b : b + 1])
        np.testing.assert_allclose(f(*row)[0], f(*(a[:, :n] for a in row))[0], rtol=1e-5, atol=1e-7)
    dirty = np.where(mask > 0, logp, np.inf).astype(np.float32)
    vg = jax.jit(jax.value_and_grad(lambda lp: f(lp, old, adv, mask)[0]))
    np.testing.assert_allclose(vg(dirty)[1], vg(logp)[1], rtol=1e-6)
    z = jnp.zeros((B, T))
    loss, aux = f(z, z, z + 1, z)
    assert float(loss) == 0.0 and all(np.isfinite(v) for v in aux.values())
    assert np.all(np.isfinite(jax.grad(lambda lp: f(lp, z, z + 1, z)[0])(z)))
    stacked = [np.stack(x) for x in zip(*[policy_inputs(s) for s in range(3)])]
    batched = jax.jit(jax.vmap(lambda *a: f(*a)[0]))(*stacked)
    for i in range(3):
        np.testing.assert_allclose(batched[i], f(*policy_inputs(i))[0], rtol=1e-6)


def test_new_policy_options_errors():
    x = jnp.ones((B, T))
    with pytest.raises(ValueError, match="ratio"):
        losses.ppo_policy_loss(x, x, x, x, ratio="seq")
    with pytest.raises(ValueError, match="clip_eps_high"):
        losses.ppo_policy_loss(x, x, x, x, clip_eps_high=-0.1)


def test_value_clipfrac_counts_no_in_range_token_despite_float32_rounding():
    rng = np.random.default_rng(15)
    n = 4096
    old = (rng.normal(size=(1, n)) * 0.05).astype(np.float32)
    v = (old + rng.uniform(-0.1, 0.1, size=(1, n))).astype(np.float32)  # |v - old| < eps / 2
    ret = rng.normal(size=(1, n)).astype(np.float32)
    mask = np.ones((1, n), np.float32)
    eps = np.float32(0.2)
    # the old form, in float32: old + clip(v - old) != v for many tokens, and some then
    # look "clipped" (this is what the test guards against; it must be non-empty)
    v_old_form = old + np.clip(v - old, -eps, eps)
    old_form_clipfrac = np.mean((v_old_form - ret) ** 2 > (v - ret) ** 2)
    assert old_form_clipfrac > 0.005
    loss, aux = jax.jit(losses.ppo_value_loss)(v, old, ret, mask)
    assert float(aux["value_clipfrac"]) == 0.0
    np.testing.assert_allclose(loss, 0.5 * np.mean((v.astype(np.float64) - ret) ** 2), rtol=1e-5)
    # out-of-range tokens still clip, with zero gradient
    far = old + np.float32(0.5)
    loss_far, aux_far = losses.ppo_value_loss(far, old, old + np.float32(1.0), mask)
    assert float(aux_far["value_clipfrac"]) == 1.0
    g = jax.grad(lambda x: losses.ppo_value_loss(x, old, old + np.float32(1.0), mask)[0])(far)
    assert np.all(np.asarray(g) == 0.0)


def ref_tis(train, sampler, mask, cap, level):
    w = np.zeros_like(train, dtype=np.float64)
    for b in range(train.shape[0]):
        valid = [t for t in range(train.shape[1]) if mask[b, t] > 0]
        seq = sum(train[b, t] - sampler[b, t] for t in valid)
        for t in valid:
            d = seq if level == "sequence" else train[b, t] - sampler[b, t]
            w[b, t] = min(math.exp(min(d, 700.0)), cap)
    return w


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_truncated_importance_weights_match_loops(level):
    rng = np.random.default_rng(16)
    sampler = (rng.normal(size=(B, T)) - 2).astype(np.float32)
    train = (sampler + rng.normal(size=(B, T)) * 0.5).astype(np.float32)
    mask = padded_mask(rng)
    train[1, 0] = sampler[1, 0] + 300.0  # a huge ratio: capped, no overflow
    f = jax.jit(rlhf_jax.truncated_importance_weights, static_argnames=("level",))
    dirty = np.where(mask > 0, train, np.nan).astype(np.float32)
    for cap in (2.0, 3.0):
        w = f(dirty, sampler, mask, cap=cap, level=level)
        want = ref_tis(train.astype(np.float64), sampler.astype(np.float64), mask, cap, level)
        np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-7)
        assert np.all(np.isfinite(w)) and float(w.max()) <= cap
        assert np.any(np.asarray(w)[mask > 0] < 1.0) and np.any(np.asarray(w) == cap)
    g = jax.grad(lambda x: jnp.sum(rlhf_jax.truncated_importance_weights(x, sampler, mask, level=level)))(train)
    assert np.all(np.asarray(g) == 0.0)  # constants for autodiff
    z = jnp.zeros((B, T))
    assert np.all(np.asarray(f(z, z, z, level=level)) == 0.0)
    with pytest.raises(ValueError, match="level"):
        rlhf_jax.truncated_importance_weights(train, sampler, mask, level="seq")
    with pytest.raises(ValueError, match="cap"):
        rlhf_jax.truncated_importance_weights(train, sampler, mask, cap=0.0)
    with pytest.raises(ValueError, match="sampler_logprobs"):
        rlhf_jax.truncated_importance_weights(train, sampler[:, :-1], mask)


# ---------------------------------------------------------------------------
# Loss normalisation: the whole batch's gradient == the weighted sum over 4 micro-batches.

NB, NT, ND, NUM_MICRO = 16, 6, 3, 4  # 4 micro-batches of 4 rows (a group of 4 each for GRPO)


def _features(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(NB, NT, ND)).astype(np.float32)
    lengths = rng.integers(1, NT + 1, size=NB)
    lengths[[1, 6]] = 0  # empty rows in two micro-batches
    mask = (np.arange(NT)[None, :] < lengths[:, None]).astype(np.float32)
    w = rng.normal(size=ND).astype(np.float32)
    return rng, x, mask, w


def _logp(w, x):
    """A tiny shared-parameter 'policy': log-probs of the sampled tokens, [B, T]."""
    return -jax.nn.softplus(x @ w)


def _check_invariance(loss_of_rows, weight_of_rows, w, *, naive_weight_of_rows=None):
    full_rows = np.arange(NB)
    g_full = jax.grad(loss_of_rows)(w, full_rows)
    parts = np.split(full_rows, NUM_MICRO)
    grads = [jax.grad(loss_of_rows)(w, rows) for rows in parts]
    weights = [float(weight_of_rows(rows)) for rows in parts]
    g_acc = sum(wk * gk for wk, gk in zip(weights, grads)) / sum(weights)
    np.testing.assert_allclose(g_acc, g_full, rtol=2e-5, atol=1e-6)
    if naive_weight_of_rows is not None:
        # the wrong weights (e.g. all rows, empty ones included) give a different gradient
        naive = [float(naive_weight_of_rows(rows)) for rows in parts]
        g_naive = sum(wk * gk for wk, gk in zip(naive, grads)) / sum(naive)
        assert not np.allclose(g_naive, g_full, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_ppo_losses_micro_batch_invariance(agg):
    rng, x, mask, w = _features(20)
    old = np.asarray(_logp(w + 0.2 * rng.normal(size=ND).astype(np.float32), x))
    adv = rng.normal(size=(NB, NT)).astype(np.float32)
    old_v = rng.normal(size=(NB, NT)).astype(np.float32)
    ret = rng.normal(size=(NB, NT)).astype(np.float32)
    weight = lambda rows: losses.aggregation_weight(mask[rows], agg=agg)  # noqa: E731

    def policy(w, rows):
        return losses.ppo_policy_loss(_logp(w, x[rows]), old[rows], adv[rows], mask[rows], agg=agg, dual_clip=3.0)[0]

    def value(w, rows):
        return losses.ppo_value_loss(x[rows] @ w, old_v[rows], ret[rows], mask[rows], agg=agg)[0]

    def sft(w, rows):
        return losses.sft_loss(_logp(w, x[rows]), mask[rows], agg=agg)[0]

    naive = None
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        naive = lambda rows: len(rows) - 0.0 * mask[rows].sum()  # noqa: E731  (all rows, empty ones too)
    for loss_of_rows in (policy, value, sft):
        _check_invariance(loss_of_rows, weight, w, naive_weight_of_rows=naive)
    assert float(losses.aggregation_weight(mask, agg=agg)) == {
        "token-mean": mask.sum(), "seq-mean-token-sum-norm": NB
    }.get(agg, NB - 2)


@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "grpo_batch_std", "dapo", "gspo", "rloo", "reinforce_pp"])
def test_critic_free_objectives_micro_batch_invariance(variant):
    rng, x, mask, w = _features(21)
    old = np.asarray(_logp(w + 0.01 * rng.normal(size=ND).astype(np.float32), x))
    scores = rng.normal(size=NB).astype(np.float32)
    # advantages are computed once on the whole batch, then the loss is split
    kwargs = dict(agg="seq-mean-token-mean")
    if variant == "grpo":
        adv = rlhf_jax.group_advantages(scores, group_size=4)
    elif variant == "grpo_batch_std":
        adv = rlhf_jax.group_advantages(scores, group_size=4, scale="batch")
    elif variant == "dr_grpo":
        adv = rlhf_jax.group_advantages(scores, group_size=4, scale="none")
        kwargs = dict(agg="seq-mean-token-sum-norm", norm_constant=float(NT))
    elif variant == "dapo":
        adv = rlhf_jax.group_advantages(scores, group_size=4)
        kwargs = dict(agg="token-mean", clip_eps_high=0.28)
    elif variant == "gspo":
        adv = rlhf_jax.group_advantages(scores, group_size=4)
        kwargs = dict(agg="seq-mean-token-mean", ratio="sequence", clip_eps=3e-3, clip_eps_high=4e-3)
    elif variant == "rloo":
        adv = rlhf_jax.rloo_advantages(scores, group_size=4)
        kwargs = dict(agg="token-mean")
    if variant == "reinforce_pp":
        rewards = rng.normal(size=(NB, NT)).astype(np.float32) * 0.1
        adv_t = rlhf_jax.reinforce_pp_advantages(rewards, mask, baseline="group", scores=scores, group_size=4)
        adv_t = np.asarray(adv_t)
        kwargs = dict(agg="token-mean")
    else:
        adv_t = np.asarray(adv)[:, None] * mask
    weight = lambda rows: losses.aggregation_weight(mask[rows], agg=kwargs["agg"])  # noqa: E731

    def loss_of_rows(w, rows):
        return losses.ppo_policy_loss(_logp(w, x[rows]), old[rows], adv_t[rows], mask[rows], **kwargs)[0]

    _check_invariance(loss_of_rows, weight, w)


def test_pairwise_losses_micro_batch_invariance():
    rng, x, mask, w = _features(22)
    _, x_r, mask_r, _ = _features(23)
    ref_c = rng.normal(size=NB).astype(np.float32) - 5
    ref_r = rng.normal(size=NB).astype(np.float32) - 5
    pairs = lambda rows: len(rows)  # noqa: E731

    def seq(w, xx, mm, rows, average=False):
        return rlhf_jax.sequence_logprobs(_logp(w, xx[rows]), mm[rows], average=average)

    for loss_type, ls in (("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)):

        def dpo(w, rows, loss_type=loss_type, ls=ls):
            return rlhf_jax.dpo_loss(
                seq(w, x, mask, rows), seq(w, x_r, mask_r, rows), ref_c[rows], ref_r[rows],
                beta=0.5, loss_type=loss_type, label_smoothing=ls,
            )[0]

        _check_invariance(dpo, pairs, w)

    def simpo(w, rows):
        return rlhf_jax.simpo_loss(seq(w, x, mask, rows, True), seq(w, x_r, mask_r, rows, True))[0]

    def bt(w, rows):
        return losses.bradley_terry_loss(x[rows, 0] @ w, x_r[rows, 0] @ w, center_coef=0.01)[0]

    _check_invariance(simpo, pairs, w)
    _check_invariance(bt, pairs, w)
