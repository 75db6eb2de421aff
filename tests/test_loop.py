"""Tests of the drivers in rlhf_jax.train.drivers: data order, fit_reward end to end, hooks,
warnings, and the input / resume errors. (Resume after SIGKILL: test_resume.py; meshes:
test_sharding.py.)"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from rlhf_jax.io.checkpoint import ConfigMismatchError
from rlhf_jax.io.metrics import read_metrics
from rlhf_jax.train import RunOptions
from rlhf_jax.train.drivers import batch_rows, epoch_permutation, fit_reward

VOCAB = 32


def test_epoch_order_is_seeded_and_drops_the_partial_batch():
    first = epoch_permutation(10, seed=3, epoch=0)
    assert sorted(first) == list(range(10))
    np.testing.assert_array_equal(first, epoch_permutation(10, seed=3, epoch=0))
    assert not np.array_equal(first, epoch_permutation(10, seed=3, epoch=1))
    assert not np.array_equal(first, epoch_permutation(10, seed=4, epoch=0))
    # 10 rows, batch 4: two steps per epoch; rows 8-9 of each epoch's order are dropped
    seen = [batch_rows(s, num_rows=10, batch_size=4, seed=3) for s in range(4)]
    assert [(e, i) for e, i, _ in seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    np.testing.assert_array_equal(np.concatenate([seen[0][2], seen[1][2]]), first[:8])
    with pytest.raises(ValueError, match="batch_size"):
        batch_rows(0, num_rows=3, batch_size=4, seed=0)


def _preference_data(n, length, seed):
    """Chosen responses use the token 7 often, rejected ones never: a decidable preference."""
    rng = np.random.default_rng(seed)
    mask = np.ones((n, length), np.int32)
    chosen = rng.integers(8, VOCAB, (n, length)).astype(np.int32)
    chosen[:, 2::2] = 7
    rejected = rng.integers(8, VOCAB, (n, length)).astype(np.int32)
    return {"chosen_ids": chosen, "chosen_mask": mask, "rejected_ids": rejected, "rejected_mask": mask}


def _same(a, b):
    """Record lists equal, NaN included (NaN != NaN for `==`; its JSON text is equal)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


NAN_ROW = 5  # its margin is NaN: every step whose batch holds it must be skipped


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    from rlhf_jax.models import ModelConfig, from_config
    from rlhf_jax.train import OptimizerConfig, RewardConfig

    rm, rm_params = from_config(ModelConfig.tiny("gpt2", VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                                                 max_position_embeddings=16), head="scalar", seed=0)
    cfg = RewardConfig(batch_size=8, num_epochs=4, optimizer=OptimizerConfig(learning_rate=3e-3))
    train, held_out = _preference_data(32, 8, 0), _preference_data(16, 8, 1)
    train["margin"] = np.zeros(32, np.float32)
    train["margin"][NAN_ROW] = np.nan
    out = tmp_path_factory.mktemp("rm")
    seen = []

    def on_step(step, metrics):
        seen.append((step, metrics["loss"]))
        return {"hook/step_squared": step * step}

    run = RunOptions(output_dir=str(out), checkpoint_every=8, stdout=False, tensorboard=False)
    params, history = fit_reward(rm, rm_params, train, cfg, run, eval_data=held_out, on_step=on_step)
    return rm, rm_params, cfg, train, held_out, run, params, history, seen


def test_fit_reward_trains_logs_and_evaluates(reward_run):
    rm, rm_params, cfg, train, held_out, run, params, history, seen = reward_run
    out = run.output_dir
    # 32 pairs / 8 = 4 steps per epoch, 4 epochs
    assert [r["step"] for r in history] == list(range(1, 17))
    assert _same(read_metrics(out), history)
    assert [s for s, _ in seen] == list(range(1, 17))
    assert all(r["hook/step_squared"] == r["step"] ** 2 for r in history)
    assert all("time/step" in r["timing"] for r in history)
    assert [r["epoch"] for r in history] == [e for e in range(4) for _ in range(4)]
    # the held-out evaluation runs at the end only (eval_every=None)
    assert "eval/accuracy" in history[-1] and "eval/accuracy" not in history[0]
    assert history[-1]["eval/accuracy"] >= 0.9
    # the input params are still alive (the step donates a copy of them) and were trained
    first = lambda p: np.asarray(jax.tree.leaves(p)[0])  # noqa: E731
    assert np.isfinite(first(rm_params)).all()
    assert not np.allclose(first(params), first(rm_params))


def test_nonfinite_steps_are_skipped_with_a_warning(reward_run):
    *_, params, history, _ = reward_run
    expected = [NAN_ROW in batch_rows(r["step"] - 1, num_rows=32, batch_size=8, seed=0)[2]
                for r in history]
    assert sum(expected) == 4  # once per epoch
    assert [r["skipped_nonfinite"] == 1.0 for r in history] == expected
    assert [("warnings" in r) for r in history] == expected
    assert all("skipped" in r["warnings"][0] for r in history if "warnings" in r)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    finite_losses = [r["loss"] for r, skipped in zip(history, expected) if not skipped]
    assert np.mean(finite_losses[-3:]) < np.mean(finite_losses[:3])


def test_finished_run_resumes_to_the_same_result(reward_run):
    rm, rm_params, cfg, train, held_out, run, params, history, _ = reward_run
    again, again_history = fit_reward(rm, rm_params, train, cfg, run, eval_data=held_out,
                                      on_step=lambda step, m: {"hook/step_squared": step * step})
    assert _same(again_history, history)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_resume_refuses_other_config_data_or_resume_false(reward_run):
    rm, rm_params, cfg, train, held_out, run, *_ = reward_run
    import dataclasses

    faster = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, learning_rate=1e-3))
    with pytest.raises(ConfigMismatchError, match="cfg.optimizer.learning_rate"):
        fit_reward(rm, rm_params, train, faster, run)
    with pytest.raises(ConfigMismatchError, match="seed: checkpoint=0 run=1"):
        fit_reward(rm, rm_params, train, cfg, dataclasses.replace(run, seed=1))
    other = dict(train, chosen_ids=np.roll(train["chosen_ids"], 1, axis=0))
    with pytest.raises(ConfigMismatchError, match="data.hash"):
        fit_reward(rm, rm_params, other, cfg, run)
    with pytest.raises(ValueError, match="resume=False"):
        fit_reward(rm, rm_params, train, cfg, dataclasses.replace(run, resume=False))


def test_bad_inputs_are_named(reward_run, tmp_path):
    rm, rm_params, cfg, train, *_ = reward_run
    run = RunOptions(output_dir=str(tmp_path), stdout=False, tensorboard=False)
    with pytest.raises(ValueError, match="missing keys \\['rejected_mask'\\]"):
        fit_reward(rm, rm_params, {k: v for k, v in train.items() if k != "rejected_mask"}, cfg, run)
    with pytest.raises(ValueError, match="fewer than `batch_size`"):
        fit_reward(rm, rm_params, {k: v[:5] for k, v in train.items()}, cfg, run)
    with pytest.raises(ValueError, match="same number of rows"):
        fit_reward(rm, rm_params, dict(train, chosen_mask=train["chosen_mask"][:4]), cfg, run)
    bad = dict(train, chosen_ids=train["chosen_ids"] + VOCAB)
    with pytest.raises(ValueError, match="vocab_size"):
        fit_reward(rm, rm_params, bad, cfg, run)
    with pytest.raises(ValueError, match="max_steps"):
        fit_reward(rm, rm_params, train, cfg, run, max_steps=0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        RunOptions(output_dir=str(tmp_path), checkpoint_every=0)
