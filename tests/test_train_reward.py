"""Reward-model step, held-out evaluation and head normalisation on a decidable preference set.

The preference is decidable: of two responses to the same prompt (same length), the
chosen one contains the GOOD token more often. A tiny scalar-head GPT-2 must learn to
count it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import ModelConfig, from_config
from rlhf_jax.train import (
    OptimizerConfig,
    RewardConfig,
    evaluate_reward_model,
    make_reward_step,
    normalize_reward_head,
    optimizer_from_config,
    reward_init,
)

V, P, R = 24, 3, 6
L = P + R
GOOD = 5
BATCH = 32


def preference_pairs(n, seed):
    """(chosen, rejected) with equal prompts and lengths; chosen has more GOOD tokens."""
    rng = np.random.default_rng(seed)
    ids = {k: np.zeros((n, L), np.int32) for k in ("chosen", "rejected")}
    mask = np.zeros((n, L), np.int32)
    others = np.array([t for t in range(3, V) if t != GOOD])
    for i in range(n):
        length = rng.integers(3, R + 1)
        c_bad, c_good = sorted(rng.choice(length + 1, 2, replace=False))
        prompt = rng.choice(others, P)
        for key, count in (("chosen", c_good), ("rejected", c_bad)):
            resp = rng.choice(others, length)
            resp[rng.choice(length, count, replace=False)] = GOOD
            ids[key][i, :P] = prompt
            ids[key][i, P:P + length] = resp
        mask[i, :P + length] = 1
    return {"chosen_ids": ids["chosen"], "chosen_mask": mask, "rejected_ids": ids["rejected"],
            "rejected_mask": mask.copy()}


@pytest.fixture(scope="module")
def trained(count_compiles):
    cfg_model = ModelConfig.tiny("gpt2", V, hidden_size=32, num_heads=2, max_position_embeddings=16)
    rm, rm_params = from_config(cfg_model, head="scalar", seed=0)
    cfg = RewardConfig(batch_size=BATCH, grad_accum_steps=2, optimizer=OptimizerConfig(learning_rate=3e-3))
    tx = optimizer_from_config(cfg.optimizer)
    state = reward_init(rm, rm_params, tx, seed=0)
    step = jax.jit(make_reward_step(rm, tx, cfg))
    train = preference_pairs(1024, seed=0)
    held_out = preference_pairs(256, seed=1)
    margins = np.random.default_rng(2).uniform(0.0, 0.5, BATCH).astype(np.float32)
    history = []
    with count_compiles() as compiles:
        for i in range(60):
            rows = slice((i * BATCH) % 1024, (i * BATCH) % 1024 + BATCH)
            batch = {k: jnp.asarray(v[rows]) for k, v in train.items()}
            batch["margin"] = jnp.asarray(margins if i == 0 else np.zeros(BATCH, np.float32))
            if i == 0:
                first_batch, first_params = batch, state.params
            state, metrics = step(state, batch)
            history.append({k: float(v) for k, v in metrics.items()})
    return dict(rm=rm, state=state, step_compiles=compiles["jit(step)"], history=history,
                held_out=held_out,
                first_batch=first_batch, first_params=first_params, scores=jax.jit(rm.scores))


def test_reward_model_learns_decidable_preference(trained):
    rm, state, history = trained["rm"], trained["state"], trained["history"]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    metrics = evaluate_reward_model(rm, state.params, trained["held_out"], batch_size=128)
    assert metrics["accuracy"] > 0.9, metrics
    assert int(state.step) == 60
    assert trained["step_compiles"] == 1
    assert all(h["skipped_nonfinite"] == 0.0 for h in history)


def test_first_step_loss_is_bradley_terry_with_margin(trained):
    batch, params = trained["first_batch"], trained["first_params"]
    scores = trained["scores"]
    c = np.asarray(scores(params, batch["chosen_ids"], batch["chosen_mask"]), np.float64)
    r = np.asarray(scores(params, batch["rejected_ids"], batch["rejected_mask"]), np.float64)
    m = np.asarray(batch["margin"], np.float64)
    expected = np.mean(np.logaddexp(0.0, -(c - r - m)))
    first = trained["history"][0]
    np.testing.assert_allclose(first["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(first["accuracy"], np.mean(c > r), rtol=1e-6)
    np.testing.assert_allclose(first["score_gap"], np.mean(c - r), rtol=1e-4, atol=1e-6)


def test_evaluate_matches_numpy(trained):
    rm, params, pairs = trained["rm"], trained["state"].params, trained["held_out"]
    got = evaluate_reward_model(rm, params, pairs, batch_size=128)
    scores = trained["scores"]
    c = np.concatenate([scores(params, jnp.asarray(pairs["chosen_ids"][i:i + 128]),
                               jnp.asarray(pairs["chosen_mask"][i:i + 128])) for i in (0, 128)]).astype(np.float64)
    r = np.concatenate([scores(params, jnp.asarray(pairs["rejected_ids"][i:i + 128]),
                               jnp.asarray(pairs["rejected_mask"][i:i + 128])) for i in (0, 128)]).astype(np.float64)
    np.testing.assert_allclose(got["accuracy"], np.mean(c > r))
    np.testing.assert_allclose(got["loss"], np.mean(np.logaddexp(0, r - c)), rtol=1e-5)
    np.testing.assert_allclose(got["score_mean"], np.mean(np.concatenate([c, r])), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target_std", [None, 1.0])
def test_normalize_reward_head(trained, target_std):
    rm, params, pairs = trained["rm"], trained["state"].params, trained["held_out"]
    ids, mask = pairs["chosen_ids"][:128], pairs["chosen_mask"][:128]
    new = normalize_reward_head(rm, params, ids, mask, target_std=target_std)
    scores = trained["scores"]
    before = np.asarray(scores(params, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
    after = np.asarray(scores(new, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
    assert abs(after.mean()) < 1e-4 * max(1.0, np.abs(before).max())
    if target_std is None:
        np.testing.assert_allclose(after, before - before.mean(), atol=1e-4)
    else:
        np.testing.assert_allclose(after.std(), target_std, rtol=1e-4)
    # A positive affine map keeps every preference.
    acc = lambda p: evaluate_reward_model(rm, p, pairs, batch_size=128)["accuracy"]  # noqa: E731
    assert acc(new) == acc(params)
    # Only the head moved.
    np.testing.assert_array_equal(jax.tree.leaves(new["trunk"])[0], jax.tree.leaves(params["trunk"])[0])


def test_reward_bad_input(trained):
    rm, params = trained["rm"], trained["first_params"]
    pairs = preference_pairs(4, seed=3)
    with pytest.raises(ValueError, match="rejected_mask"):
        evaluate_reward_model(rm, params, {k: v for k, v in pairs.items() if k != "rejected_mask"})
    with pytest.raises(ValueError, match="same number of rows"):
        evaluate_reward_model(rm, params, dict(pairs, rejected_ids=pairs["rejected_ids"][:2],
                                                  rejected_mask=pairs["rejected_mask"][:2]))
    with pytest.raises(ValueError, match="empty"):
        normalize_reward_head(rm, params, pairs["chosen_ids"][:0], pairs["chosen_mask"][:0])
    with pytest.raises(ValueError, match="grad_accum_steps"):
        RewardConfig(batch_size=6, grad_accum_steps=4)
