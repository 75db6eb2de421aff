"""DPO: the losses and the step against float64 NumPy and jnp references, the reference pass,
learning, resume.

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
from rlhf_jax.train.dpo import dpo_loss_fn

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


def np_sequence_logprobs(logits_fn, params, ids, attn, loss_mask, *, average):
    """float64: sum (or mean) over completion tokens of log p(token | prefix)."""
    logits = np.asarray(logits_fn(params, jnp.asarray(ids), jnp.asarray(attn)), np.float64)[:, :-1]
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


def jnp_sigmoid_objective(lm, params, batch, *, beta, label_smoothing):
    """An independent jnp formulation of (label-smoothed) DPO (full logits, log_softmax, masks
    written out) to differentiate."""

    def seq(side):
        ids, attn, lmask = batch[f"{side}_ids"], batch[f"{side}_mask"], batch[f"{side}_loss_mask"]
        logp = jax.nn.log_softmax(lm.logits(params, ids, attn)[:, :-1], axis=-1)
        tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        mask = (lmask * attn)[:, 1:].astype(jnp.float32)
        return jnp.sum(tok * mask, -1)

    h = (seq("chosen") - batch["ref_chosen_logps"]) - (seq("rejected") - batch["ref_rejected_logps"])
    return jnp.mean(-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                    - label_smoothing * jax.nn.log_sigmoid(-beta * h))


# (loss_type, beta, label_smoothing): sum (sigmoid, hinge) and length-averaged (ipo, simpo)
# sequence log-probs, with and without a reference (simpo).
CASES = [("sigmoid", 0.5, 0.1), ("ipo", 0.5, 0.0), ("hinge", 2.0, 0.0), ("simpo", 2.0, 0.0)]


def test_dpo_losses_and_reference_pass_equal_float64_reference(tiny):
    """Every loss type's loss, margin and accuracy (one jitted forward for all four) and the
    reference pass, summed and averaged, against float64 NumPy."""
    lm, params, ref_params = tiny
    data = dpo_pairs(8, seed=0)
    logits_fn = jax.jit(lm.logits)
    refs, np_ref, np_policy = {}, {}, {}
    for average in (False, True):
        # the reference pass (chunks of 3: the last one is padded) against float64 NumPy
        refs[average] = reference_logprobs(lm, ref_params, data, batch_size=3, average=average)
        for side in ("chosen", "rejected"):
            args = (data[f"{side}_ids"], data[f"{side}_mask"], data[f"{side}_loss_mask"])
            np_ref[average, side] = np_sequence_logprobs(logits_fn, ref_params, *args, average=average)
            np_policy[average, side] = np_sequence_logprobs(logits_fn, params, *args, average=average)
            np.testing.assert_allclose(refs[average][f"ref_{side}_logps"], np_ref[average, side],
                                       rtol=1e-5, atol=1e-5)

    cfgs = {t: DPOConfig(loss_type=t, beta=beta, label_smoothing=smoothing, batch_size=8)
            for t, beta, smoothing in CASES}
    batches = {average: {k: jnp.asarray(v) for k, v in {**data, **refs[average]}.items()} for average in refs}

    @jax.jit
    def all_losses(params, batches):
        return {t: dpo_loss_fn(lm, params, batches[cfg.average_logprobs], cfg) for t, cfg in cfgs.items()}

    got = all_losses(params, batches)
    for loss_type, cfg in cfgs.items():
        avg = cfg.average_logprobs
        assert avg == (loss_type in ("ipo", "simpo"))
        pc, pr = np_policy[avg, "chosen"], np_policy[avg, "rejected"]
        want_loss = np_dpo_objective(pc, pr, np_ref[avg, "chosen"], np_ref[avg, "rejected"], loss_type=loss_type,
                                     beta=cfg.beta, label_smoothing=cfg.label_smoothing, gamma=cfg.simpo_gamma)
        loss, (aux, weight) = got[loss_type]
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6, err_msg=loss_type)
        if loss_type == "simpo":  # SimPO's implicit reward has no reference
            rewards_c, rewards_r = cfg.beta * pc, cfg.beta * pr
        else:
            rewards_c, rewards_r = cfg.beta * (pc - np_ref[avg, "chosen"]), cfg.beta * (pr - np_ref[avg, "rejected"])
        np.testing.assert_allclose(float(aux["margin"]), np.mean(rewards_c - rewards_r), rtol=1e-4, atol=1e-5,
                                   err_msg=loss_type)
        assert float(aux["accuracy"]) == pytest.approx(np.mean(rewards_c > rewards_r)), loss_type
        assert float(weight) == 8.0
    # the four losses are really different functions of the same log-probs
    assert len({round(float(got[t][0]), 4) for t in cfgs}) == 4


def test_dpo_step_is_minus_the_gradient_with_a_precomputed_or_on_the_fly_reference(tiny):
    """One SGD(1) step with 2 micro-batches: its update is minus the gradient of an independently
    written objective (the loss types differ only in `dpo_loss_fn`, checked above); the
    on-the-fly reference gives the same step as the precomputed one."""
    lm, params, ref_params = tiny
    data = {k: jnp.asarray(v) for k, v in dpo_pairs(8, seed=0).items()}
    beta, smoothing = 0.5, 0.1
    tx = optax.sgd(1.0)  # new params = params - grad
    pre = DPOConfig(loss_type="sigmoid", beta=beta, label_smoothing=smoothing, batch_size=8, grad_accum_steps=2)
    fly = DPOConfig(loss_type="sigmoid", beta=beta, label_smoothing=smoothing, batch_size=8, grad_accum_steps=2,
                    reference="on_the_fly")
    ref = {k: jnp.asarray(v) for k, v in reference_logprobs(lm, ref_params, data, batch_size=3).items()}
    batch = {**data, **ref}
    state, metrics = jax.jit(make_dpo_step(lm, tx, pre))(dpo_init(lm, params, tx), batch)
    objective = jax.jit(jax.value_and_grad(
        lambda p, b: jnp_sigmoid_objective(lm, p, b, beta=beta, label_smoothing=smoothing)))
    want_loss, grads = objective(params, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5, atol=1e-6)
    for got_new, old, g in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), jax.tree.leaves(grads),
                               strict=True):
        np.testing.assert_allclose(np.asarray(old) - np.asarray(got_new), np.asarray(g), rtol=1e-3, atol=2e-6)
    assert float(metrics["grad_norm"]) > 0

    s2, m2 = jax.jit(make_dpo_step(lm, tx, fly))(dpo_init(lm, params, tx), data, ref_params)
    for k in metrics:
        np.testing.assert_allclose(metrics[k], m2[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(s2.params), strict=True):
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
    # the reference pass the run compiled (same model, chunk size and sums)
    before = reference_logprobs(lm, params, data, batch_size=cfg.batch_size)
    after = reference_logprobs(lm, final, data, batch_size=cfg.batch_size)
    margin = cfg.beta * ((after["ref_chosen_logps"] - before["ref_chosen_logps"])
                         - (after["ref_rejected_logps"] - before["ref_rejected_logps"]))
    assert float(np.mean(margin)) > 0.5, float(np.mean(margin))
    assert float(np.mean(margin > 0)) >= 0.9
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
