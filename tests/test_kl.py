"""KL estimators and the KL-coefficient controllers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.core.kl import KLControllerState, kl_controller_init, kl_controller_update, kl_penalty


def test_estimator_values():
    rng = np.random.default_rng(0)
    logp = rng.normal(size=(4, 6)) - 2
    ref = rng.normal(size=(4, 6)) - 2
    d = logp - ref
    f = jax.jit(kl_penalty, static_argnames="estimator")
    np.testing.assert_allclose(f(logp, ref, estimator="k1"), d, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f(logp, ref, estimator="k2"), d**2 / 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f(logp, ref, estimator="k3"), np.exp(-d) - 1 + d, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(f(logp, ref, estimator="k3")) >= 0)
    # k3 stays accurate for tiny d where exp(-d) - 1 would cancel
    tiny = kl_penalty(jnp.array([1e-4]), jnp.array([0.0]), estimator="k3")
    np.testing.assert_allclose(tiny, [0.5e-8], rtol=1e-3)


def test_k1_and_k3_are_unbiased_k2_is_not():
    # Exact expectations over a categorical pi: sum_x pi(x) k(x) = KL(pi || ref) for k1 and k3.
    rng = np.random.default_rng(1)
    logits_p, logits_q = rng.normal(size=50), rng.normal(size=50)
    logp = logits_p - np.log(np.exp(logits_p).sum())
    logq = logits_q - np.log(np.exp(logits_q).sum())
    p = np.exp(logp)
    true_kl = np.sum(p * (logp - logq))
    for est in ("k1", "k3"):
        np.testing.assert_allclose(np.sum(p * np.asarray(kl_penalty(logp, logq, estimator=est))), true_kl, rtol=1e-4)
    k2 = np.sum(p * np.asarray(kl_penalty(logp, logq, estimator="k2")))
    assert abs(k2 - true_kl) > 1e-3


def test_estimator_errors():
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(jnp.ones(3), jnp.ones(3), estimator="k4")
    with pytest.raises(ValueError, match="ref_logprobs"):
        kl_penalty(jnp.ones((2, 3)), jnp.ones((2, 4)))


def ref_adaptive(coef, target, horizon, kls, n_steps):
    out = []
    for kl in kls:
        error = min(max(kl / target - 1.0, -0.2), 0.2)
        coef = coef * (1.0 + error * n_steps / horizon)
        out.append(coef)
    return out


def test_fixed_controller_never_changes():
    state = kl_controller_init(0.05)
    for kl in (0.0, 1.0, 100.0):
        state = kl_controller_update(state, jnp.float32(kl), 64)
    assert float(state.kl_coef) == pytest.approx(0.05)
    assert not bool(state.adaptive)


def test_adaptive_controller_matches_rule():
    state = kl_controller_init(0.2, target=6.0, horizon=10000)
    kls = [8.0, 12.0, 1.0, 6.0, 5.5]
    want = ref_adaptive(0.2, 6.0, 10000.0, kls, 512)
    update = jax.jit(kl_controller_update)
    for kl, w in zip(kls, want):
        state = update(state, jnp.float32(kl), 512)
        np.testing.assert_allclose(state.kl_coef, w, rtol=1e-6)
    # too much KL raises the coefficient, too little lowers it; the error is clipped at +-0.2
    up = kl_controller_update(kl_controller_init(1.0, target=1.0, horizon=100), 50.0, 10)
    down = kl_controller_update(kl_controller_init(1.0, target=1.0, horizon=100), 0.0, 10)
    assert float(up.kl_coef) == pytest.approx(1.02)
    assert float(down.kl_coef) == pytest.approx(0.98)


def test_coefficient_changes_inside_jitted_loops(count_compiles):
    kls = jnp.array([8.0, 9.0, 10.0, 3.0, 2.0, 7.0], jnp.float32)

    @jax.jit
    def run(state):
        def body(i, s):
            return kl_controller_update(s, kls[i], 256)

        by_fori = jax.lax.fori_loop(0, kls.shape[0], body, state)

        def scan_body(s, kl):
            s = kl_controller_update(s, kl, 256)
            return s, s.kl_coef

        _, trajectory = jax.lax.scan(scan_body, state, kls)
        return by_fori, trajectory

    with count_compiles() as compiles:
        adaptive, trajectory = run(kl_controller_init(0.1, target=6.0))
    want = ref_adaptive(0.1, 6.0, 10000.0, [float(k) for k in kls], 256)
    np.testing.assert_allclose(trajectory, want, rtol=1e-5)
    np.testing.assert_allclose(adaptive.kl_coef, want[-1], rtol=1e-5)
    assert len(set(np.asarray(trajectory).tolist())) == len(want)  # it moved at every step
    # the same compiled loop serves a fixed controller (same pytree structure)
    with count_compiles() as again:
        fixed, fixed_traj = run(kl_controller_init(0.1))
    np.testing.assert_allclose(fixed_traj, np.full(6, 0.1), rtol=1e-7)
    assert compiles["jit(run)"] == 1 and again["jit(run)"] == 0, (compiles, again)


def test_state_is_a_pytree():
    s = kl_controller_init(0.1, target=3.0, horizon=500)
    leaves, treedef = jax.tree_util.tree_flatten(s)
    assert len(leaves) == 4
    assert isinstance(jax.tree_util.tree_unflatten(treedef, leaves), KLControllerState)
    assert jax.tree_util.tree_structure(kl_controller_init(0.1)) == treedef


def test_init_errors():
    with pytest.raises(ValueError, match="kl_coef"):
        kl_controller_init(-1.0)
    with pytest.raises(ValueError, match="target"):
        kl_controller_init(0.1, target=0.0)
    with pytest.raises(ValueError, match="horizon"):
        kl_controller_init(0.1, target=1.0, horizon=0)
    with pytest.raises(ValueError, match="current_kl"):
        kl_controller_update(kl_controller_init(0.1), jnp.ones(3), 1)
