"""DPO (sigmoid, IPO, hinge), SimPO and sequence log-probs against float64 NumPy formulas.

TRL is not installed in this environment, so the reference is TRL DPOTrainer's formulas
written out in NumPy (h = (pi_c - ref_c) - (pi_r - ref_r)):
sigmoid: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h); ipo: (h - 1/(2 beta))^2;
hinge: relu(1 - beta h); rewards beta * (pi - ref); accuracy mean(r_c > r_r); margin mean(r_c - r_r).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rlhf_jax
from rlhf_jax.core import preference
from rlhf_jax.core.ops import sequence_logprobs

B = 16

dpo_j = jax.jit(preference.dpo_loss, static_argnames=("beta", "loss_type", "label_smoothing"))
simpo_j = jax.jit(preference.simpo_loss, static_argnames=("beta", "gamma"))


def log_sigmoid(x):
    # stable float64: log sigmoid(x) = -log(1 + exp(-x))
    return -np.logaddexp(0.0, -x)


def ref_dpo(pc, pr, rc, rr, beta, loss_type, ls):
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        losses = -(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = np.maximum(0.0, 1 - beta * h)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return losses.mean(), {
        "rewards_chosen": chosen.mean(),
        "rewards_rejected": rejected.mean(),
        "accuracy": (chosen > rejected).mean(),
        "margin": (chosen - rejected).mean(),
    }


def pair_inputs(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    ref_c = -rng.uniform(5, 40, size=B)
    ref_r = -rng.uniform(5, 40, size=B)
    pol_c = ref_c + rng.normal(size=B) * 2
    pol_r = ref_r + rng.normal(size=B) * 2
    return tuple(a.astype(dtype) for a in (pol_c, pol_r, ref_c, ref_r))


@pytest.mark.parametrize(
    "loss_type,beta,ls",
    [
        ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.1), ("ipo", 0.1, 0.0),
        ("ipo", 1.0, 0.0), ("hinge", 0.1, 0.0), ("hinge", 1.0, 0.0),
    ],
)
def test_dpo_matches_trl_formulas(loss_type, beta, ls):
    inputs = pair_inputs(int(beta * 10) + len(loss_type))
    loss, aux = dpo_j(*inputs, beta=beta, loss_type=loss_type, label_smoothing=ls)
    want, want_aux = ref_dpo(*inputs, beta, loss_type, ls)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["dpo_loss"], loss)
    for key, value in want_aux.items():
        np.testing.assert_allclose(aux[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert 0.0 < float(aux["accuracy"]) < 1.0  # both outcomes occur
    for value in aux.values():
        assert jnp.shape(value) == ()


def test_dpo_a_few_numbers_by_hand():
    # h = (-1 - -2) - (-3 - -2) = 2, beta = 0.5: sigmoid loss log(1 + e^-1)
    args = (jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]))
    loss, aux = preference.dpo_loss(*args, beta=0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    assert float(aux["rewards_chosen"]) == pytest.approx(0.5)
    assert float(aux["rewards_rejected"]) == pytest.approx(-0.5)
    assert float(aux["margin"]) == pytest.approx(1.0) and float(aux["accuracy"]) == 1.0
    assert float(preference.dpo_loss(*args, beta=0.5, loss_type="ipo")[0]) == pytest.approx(1.0)
    assert float(preference.dpo_loss(*args, beta=0.5, loss_type="hinge")[0]) == pytest.approx(0.0)
    assert float(preference.dpo_loss(*args, beta=0.25, loss_type="hinge")[0]) == pytest.approx(0.5)
    # label smoothing 0.5 would be symmetric (no signal): not allowed; 0.25 mixes both sides
    smooth = preference.dpo_loss(*args, beta=0.5, label_smoothing=0.25)[0]
    assert float(smooth) == pytest.approx(0.75 * math.log1p(math.exp(-1)) + 0.25 * math.log1p(math.exp(1)), rel=1e-6)


def test_dpo_gradients_and_reference_is_constant():
    with jax.enable_x64(True):
        pc, pr, rc, rr = (jnp.asarray(a) for a in pair_inputs(3, np.float64))
        for loss_type, ls in (("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)):
            def f(c, r, loss_type=loss_type, ls=ls):
                return preference.dpo_loss(c, r, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=ls)[0]

            check_grads(f, (pc, pr), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-5)
        g_ref = jax.grad(lambda a, b: preference.dpo_loss(pc, pr, a, b)[0], argnums=(0, 1))(rc, rr)
        assert all(np.all(np.asarray(g) == 0.0) for g in g_ref)
        # sigmoid gradient by hand: d/d pi_c = -beta * (1 - ls) * sigmoid(-beta h) + beta * ls * sigmoid(beta h)
        beta, ls = 0.3, 0.1
        h = np.asarray((pc - rc) - (pr - rr))
        sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
        want = (-beta * (1 - ls) * sig(-beta * h) + beta * ls * sig(beta * h)) / B
        got = jax.grad(lambda c: preference.dpo_loss(c, pr, rc, rr, beta=beta, label_smoothing=ls)[0])(pc)
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_dpo_is_stable_in_the_tails():
    big = jnp.array([500.0, -500.0])
    zero = jnp.zeros(2)
    loss, aux = dpo_j(big, -big, zero, zero, beta=1.0)
    assert np.isfinite(loss) and float(loss) == pytest.approx(500.0)  # mean(0, 1000)
    g = jax.grad(lambda c: preference.dpo_loss(c, -big, zero, zero, beta=1.0)[0])(big)
    assert np.all(np.isfinite(g))


def test_simpo_matches_formula():
    rng = np.random.default_rng(4)
    a_c = -rng.uniform(0.2, 3, size=B)
    a_r = -rng.uniform(0.2, 3, size=B)
    for beta, gamma in ((2.0, 0.5), (2.5, 1.4)):
        loss, aux = simpo_j(a_c.astype(np.float32), a_r.astype(np.float32), beta=beta, gamma=gamma)
        want = np.mean(-log_sigmoid(beta * (a_c - a_r) - gamma))
        np.testing.assert_allclose(loss, want, rtol=1e-5)
        np.testing.assert_allclose(aux["rewards_chosen"], beta * a_c.mean(), rtol=1e-5)
        np.testing.assert_allclose(aux["margin"], beta * (a_c - a_r).mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(aux["accuracy"], np.mean(a_c > a_r))
    with jax.enable_x64(True):
        check_grads(
            lambda c, r: preference.simpo_loss(c, r)[0], (jnp.asarray(a_c), jnp.asarray(a_r)),
            order=1, modes=["rev"], eps=1e-6,
        )


def test_sequence_logprobs_sum_and_average():
    rng = np.random.default_rng(5)
    t = 9
    logp = -rng.uniform(0.1, 4, size=(B, t)).astype(np.float32)
    lengths = rng.integers(0, t + 1, size=B)
    lengths[0] = 0
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    dirty = np.where(mask > 0, logp, -np.inf).astype(np.float32)
    f = jax.jit(sequence_logprobs, static_argnames="average")
    sums = [sum(float(logp[b, i]) for i in range(lengths[b])) for b in range(B)]
    np.testing.assert_allclose(f(dirty, mask), sums, rtol=1e-5)
    avgs = [s / max(n, 1) for s, n in zip(sums, lengths)]
    np.testing.assert_allclose(f(dirty, mask, average=True), avgs, rtol=1e-5)
    assert float(f(dirty, mask)[0]) == 0.0  # empty row
    # masked equals sliced
    for b in range(1, 4):
        n = int(lengths[b])
        sliced = f(logp[b : b + 1, :n], mask[b : b + 1, :n])
        np.testing.assert_allclose(sliced, f(dirty[b : b + 1], mask[b : b + 1]), rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(sequence_logprobs(x, mask, average=True)))(dirty)
    np.testing.assert_allclose(g, mask / np.maximum(lengths, 1)[:, None], rtol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        sequence_logprobs(logp, mask[:, :-1])


def test_dpo_on_sequence_logprobs_end_to_end_jit_and_vmap():
    rng = np.random.default_rng(6)
    t = 6
    mask = (np.arange(t)[None, :] < rng.integers(1, t + 1, size=(2 * B, 1))).astype(np.float32)
    logp = -rng.uniform(0.1, 3, size=(3, 2 * B, t)).astype(np.float32)
    ref = -rng.uniform(0.1, 3, size=(3, 2 * B, t)).astype(np.float32)

    def loss(logp, ref):
        seq = sequence_logprobs(logp, mask)
        ref_seq = sequence_logprobs(ref, mask)
        return preference.dpo_loss(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:])[0]

    batched = jax.jit(jax.vmap(loss))(logp, ref)
    for i in range(3):
        s, r = logp[i].astype(np.float64) * mask, ref[i].astype(np.float64) * mask
        s, r = s.sum(1), r.sum(1)
        want, _ = ref_dpo(s[:B], s[B:], r[:B], r[B:], 0.1, "sigmoid", 0.0)
        np.testing.assert_allclose(batched[i], want, rtol=1e-5)


def test_errors_and_exports():
    x = jnp.ones(B)
    with pytest.raises(ValueError, match="loss_type"):
        preference.dpo_loss(x, x, x, x, loss_type="robust")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference.dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        preference.dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        preference.dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        preference.dpo_loss(x, x, x, jnp.ones(B + 1))
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        preference.simpo_loss(jnp.ones((B, 2)), jnp.ones((B, 2)))
    with pytest.raises(ValueError, match="beta"):
        preference.simpo_loss(x, x, beta=-1.0)
    assert rlhf_jax.dpo_loss is preference.dpo_loss and rlhf_jax.simpo_loss is preference.simpo_loss
    for name in ("dpo_loss", "simpo_loss", "sequence_logprobs"):
        assert name in rlhf_jax.__all__
