"""DPO: the step against a float64 NumPy reference, the reference pass, learning, resume.

The pairs are random token sequences with random prompt and completion lengths (right
padding), so the sequence log-probs sum over different numbers of tokens per row.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.io.metrics import strip_timing
from rlhf_jax.models import ModelConfig, from_config
from rlhf_jax.train import DPOConfig, OptimizerConfig, RunOptions, dpo_init, make_dpo_step, reference_logprobs
from rlhf_jax.train.dpo import pair_logprobs

V, L = 24, 12


def dpo_pairs(n, seed, *, length=L):
    """Right-padded `[prompt | completion]` pairs sharing a prompt; chosen and rejected lengths differ."""
    rng = np.random.default_rng(seed)
    out = {f"{s}_{k}": np.zeros((n, length), np.int32) for s in ("chosen", "rejected") for k in
           ("ids", "mask", "loss_mask")}
    for i in range(n):
        p = int(rng.integers(2, 5))
        prompt = rng.integers(3, V, p)
        for side in ("chosen", "rejected"):
            c = int(rng.integers(1, length - p + 1))
            out[f"{side}_ids"][i, :p] = prompt
            out[f"{side}_ids"][i, p:p + c] = rng.integers(3, V, c)
            out[f"{side}_mask"][i, :p + c] = 1
            out[f"{side}_loss_mask"][i, p:p + c] = 1
    return out


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.tiny("gpt2", V, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=16)
    lm, params = from_config(cfg, head="lm", seed=0)
    _, ref_params = from_config(cfg, head="lm", seed=1)
    return lm, params, ref_params


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_sequence_logprobs(lm, params, ids, attn, loss_mask, *, average):
    """float64: sum (or mean) over completion tokens of log p(token | prefix)."""
    logits = np.asarray(lm.logits(params, jnp.asarray(ids), jnp.asarray(attn)), np.float64)[:, :-1]
    logp = np.take_along_axis(_np_log_softmax(logits), ids[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
    mask = (loss_mask * attn)[:, 1:].astype(np.float64)
    total = (logp * mask).sum(-1)
    return total / np.maximum(mask.sum(-1), 1.0) if average else total


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_dpo_objective(pc, pr, rc, rr, *, loss_type, beta, label_smoothing=0.0, gamma=0.5):
    if loss_type == "simpo":
        return float(np.mean(-np_log_sigmoid(beta * (pc - pr) - gamma)))
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        per = -(1 - label_smoothing) * np_log_sigmoid(beta * h) - label_smoothing * np_log_sigmoid(-beta * h)
    elif loss_type == "ipo":
        per = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        per = np.maximum(0.0, 1.0 - beta * h)
    return float(np.mean(per))


def jnp_objective(lm, params, batch, ref, *, loss_type, beta, label_smoothing=0.0, gamma=0.5):
    """An independent jnp formulation (full logits, log_softmax, masks written out) to differentiate."""
    average = loss_type in ("ipo", "simpo")

    def seq(side):
        ids, attn, lmask = batch[f"{side}_ids"], batch[f"{side}_mask"], batch[f"{side}_loss_mask"]
        logp = jax.nn.log_softmax(lm.logits(params, ids, attn)[:, :-1], axis=-1)
        tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        mask = (lmask * attn)[:, 1:].astype(jnp.float32)
        total = jnp.sum(tok * mask, -1)
        return total / jnp.maximum(jnp.sum(mask, -1), 1.0) if average else total

    pc, pr = seq("chosen"), seq("rejected")
    if loss_type == "simpo":
        return jnp.mean(-jax.nn.log_sigmoid(beta * (pc - pr) - gamma))
    h = (pc - ref[0]) - (pr - ref[1])
    if loss_type == "sigmoid":
        return jnp.mean(-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                        - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    if loss_type == "ipo":
        return jnp.mean((h - 1.0 / (2.0 * beta)) ** 2)
    return jnp.mean(jax.nn.relu(1.0 - beta * h))


CASES = [("sigmoid", 0.5, 0.1), ("ipo", 0.5, 0.0), ("hinge", 2.0, 0.0), ("simpo", 2.0, 0.0)]


@pytest.mark.parametrize("loss_type,beta,smoothing", CASES)
def test_dpo_step_equals_float64_reference(tiny, loss_type, beta, smoothing):
    lm, params, ref_params = tiny
    data = dpo_pairs(8, seed=0)
    cfg = DPOConfig(loss_type=loss_type, beta=beta, label_smoothing=smoothing, batch_size=8, grad_accum_steps=2)
    average = cfg.average_logprobs

    # the reference pass (chunks of 3: the last one is padded) against float64 NumPy
    ref = reference_logprobs(lm, ref_params, data, batch_size=3, average=average)
    sides = {s: np_sequence_logprobs(lm, ref_params, data[f"{s}_ids"], data[f"{s}_mask"],
                                     data[f"{s}_loss_mask"], average=average) for s in ("chosen", "rejected")}
    np.testing.assert_allclose(ref["ref_chosen_logps"], sides["chosen"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref["ref_rejected_logps"], sides["rejected"], rtol=1e-5, atol=1e-5)

    pc, pr = (np_sequence_logprobs(lm, params, data[f"{s}_ids"], data[f"{s}_mask"], data[f"{s}_loss_mask"],
                                   average=average) for s in ("chosen", "rejected"))
    want_loss = np_dpo_objective(pc, pr, sides["chosen"], sides["rejected"], loss_type=loss_type, beta=beta,
                                 label_smoothing=smoothing, gamma=cfg.simpo_gamma)
    tx = optax.sgd(1.0)  # new params = params - grad
    step = jax.jit(make_dpo_step(lm, tx, cfg))
    batch = {k: jnp.asarray(v) for k, v in {**data, **ref}.items()}
    state, metrics = step(dpo_init(lm, params, tx), batch)
    np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=1e-5, atol=1e-6)
    if loss_type == "simpo":  # SimPO's implicit reward has no reference
        rewards_c, rewards_r = beta * pc, beta * pr
    else:
        rewards_c, rewards_r = beta * (pc - sides["chosen"]), beta * (pr - sides["rejected"])
    np.testing.assert_allclose(float(metrics["margin"]), np.mean(rewards_c - rewards_r), rtol=1e-4, atol=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(rewards_c > rewards_r))

    # the update is minus the gradient of the independently written objective
    grads = jax.grad(jnp_objective, argnums=1)(lm, params, batch, (batch["ref_chosen_logps"],
                                               batch["ref_rejected_logps"]), loss_type=loss_type, beta=beta,
                                               label_smoothing=smoothing, gamma=cfg.simpo_gamma)
    for got_new, old, g in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), jax.tree.leaves(grads),
                               strict=True):
        np.testing.assert_allclose(np.asarray(old) - np.asarray(got_new), np.asarray(g), rtol=1e-3, atol=2e-6)
    assert float(metrics["grad_norm"]) > 0


def test_on_the_fly_reference_equals_precomputed(tiny):
    lm, params, ref_params = tiny
    data = {k: jnp.asarray(v) for k, v in dpo_pairs(8, seed=3).items()}
    tx = optax.sgd(1.0)
    pre = DPOConfig(batch_size=8, beta=0.5)
    fly = DPOConfig(batch_size=8, beta=0.5, reference="on_the_fly")
    ref = {k: jnp.asarray(v) for k, v in reference_logprobs(lm, ref_params, data, batch_size=8).items()}
    s1, m1 = jax.jit(make_dpo_step(lm, tx, pre))(dpo_init(lm, params, tx), {**data, **ref})
    s2, m2 = jax.jit(make_dpo_step(lm, tx, fly))(dpo_init(lm, params, tx), data, ref_params)
    for k in m1:
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        make_dpo_step(lm, tx, pre)(dpo_init(lm, params, tx), data)


def test_config_errors_name_the_key():
    from rlhf_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="`loss_type`"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ConfigError, match="`label_smoothing`"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="`beta`"):
        DPOConfig(beta=0.0)
    with pytest.raises(ConfigError, match="`reference`"):
        DPOConfig(reference="never")


def _run(path, **kw):
    return RunOptions(output_dir=str(path), stdout=False, tensorboard=False, async_checkpoint=False,
                      checkpoint_every=3, seed=4, **kw)


@pytest.fixture(scope="module")
def dpo_run(tiny, tmp_path_factory):
    """8 DPO updates from the policy as its own reference (the DPO paper's set-up)."""
    from rlhf_jax.train.drivers import fit_dpo

    lm, params, _ = tiny
    data = dpo_pairs(16, seed=5)
    cfg = DPOConfig(batch_size=8, num_epochs=4, grad_accum_steps=2, beta=0.5,
                    optimizer=OptimizerConfig(learning_rate=3e-3))
    out = tmp_path_factory.mktemp("dpo_full")
    final, history = fit_dpo(lm, params, data, cfg, _run(out))
    return lm, params, data, cfg, out, final, history


def test_dpo_steps_raise_margin_and_accuracy(dpo_run):
    lm, params, data, cfg, out, final, history = dpo_run
    assert [r["step"] for r in history] == list(range(1, 9))
    # the policy starts as the reference: every implicit reward is 0, the loss log 2
    assert history[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert abs(history[0]["margin"]) < 1e-5
    assert (out / "reference_logprobs.npz").exists()
    batch = {k: jnp.asarray(v) for k, v in data.items()}
    before = pair_logprobs(lm, params, batch)
    after = pair_logprobs(lm, final, batch)
    margin = cfg.beta * ((after[0] - before[0]) - (after[1] - before[1]))
    assert float(jnp.mean(margin)) > 0.5, float(jnp.mean(margin))
    assert float(jnp.mean(margin > 0)) >= 0.9
    assert history[-1]["loss"] < 0.5 < math.log(2.0)


def test_dpo_resume_is_bit_identical_and_reads_the_saved_reference(dpo_run, tmp_path, monkeypatch):
    import rlhf_jax.train.dpo as dpo_module
    from rlhf_jax.train.drivers import fit_dpo

    lm, params, data, cfg, _, want_params, want_history = dpo_run
    fit_dpo(lm, params, data, cfg, _run(tmp_path), max_steps=4)  # checkpoint at 3 (and at the end, 4)
    saved = np.load(tmp_path / "reference_logprobs.npz")["ref_chosen_logps"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("a resumed run recomputed the reference log-probs")

    monkeypatch.setattr(dpo_module, "reference_logprobs", must_not_run)
    got_params, got_history = fit_dpo(lm, params, data, cfg, _run(tmp_path))
    assert [strip_timing(r) for r in got_history] == [strip_timing(r) for r in want_history]
    for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.load(tmp_path / "reference_logprobs.npz")["ref_chosen_logps"], saved)
