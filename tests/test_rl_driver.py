"""The RL trainer through the driver (`fit_ppo`) and DAPO's data-side pieces.

- non-finite rewards: a reward that is always NaN stops the run with `TrainingStalledError`
  naming the reward source after `rewards.max_stalled_iterations` iterations; the same for
  non-finite gradients;
- dynamic sampling: groups of equal scores are dropped and refilled from fresh prompts
  (bounded tries, counted in the metrics);
- overlong filtering and the soft overlong penalty.

Two trainers for the module (each compiles its update once): one without a KL for the stall
tests, its reward switched to NaN for the first; one with DAPO's data-side pieces on
(dynamic sampling and the overlong filter, host-side and in the update respectively) for
the other two.
"""
import jax
import numpy as np
import pytest

from rlhf_jax.errors import TrainingStalledError
from rlhf_jax.models import ModelConfig, from_config
from rlhf_jax.train import RunOptions, make_optimizer
from rlhf_jax.train.drivers import fit_ppo
from rlhf_jax.train.rl.estimators import shape_scores
from rlhf_jax.train.rl.presets import rl_config
from rlhf_jax.train.rl.trainer import RLTrainer

V, B, G, P, N = 16, 2, 4, 4, 4
EOS = 2


def _cfg(**sections):
    base = {
        "batch": {"batch_size": B, "group_size": G, "num_minibatches": 1, "ppo_epochs": 1},
        "sampling": {"max_new_tokens": N, "temperature": 1.0, "eos_token_id": EOS},
        "rewards": {"max_stalled_iterations": 2},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return rl_config("grpo", base)


@pytest.fixture(scope="module")
def policy():
    config = ModelConfig.tiny("gpt2", V, hidden_size=32, num_heads=2, max_position_embeddings=32)
    return from_config(config, head="lm", seed=0)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    n = 12
    return {"prompt_ids": rng.integers(3, V, (n, P)).astype(np.int32), "prompt_mask": np.ones((n, P), np.int32)}


def target_reward(prompt_ids, prompt_mask, tokens, mask, prompt_index):
    return ((tokens == 5) * mask).sum(1) / np.maximum(mask.sum(1), 1)


class SwitchableReward:
    """Calls `self.fn` (`target_reward` unless a test swaps it, restoring it afterwards)."""

    def __init__(self):
        self.fn = target_reward

    def __call__(self, *args):
        return self.fn(*args)


def nan_reward(prompt_ids, prompt_mask, tokens, mask, prompt_index):
    return np.full(tokens.shape[0], np.nan, np.float32)


def _quiet(output_dir):
    return RunOptions(output_dir=str(output_dir), stdout=False, tensorboard=False, checkpoint_every=None,
                      async_checkpoint=False)


@pytest.fixture(scope="module")
def stall_trainer(policy):
    reward = SwitchableReward()
    trainer = RLTrainer(policy[0], _cfg(kl={"placement": "none"}), make_optimizer(1e-3, schedule="constant"),
                        reward_fn=reward, reward_source="reward.function=tests:switchable_reward")
    return trainer, reward


@pytest.fixture(scope="module")
def dapo_trainer(policy):
    reward = SwitchableReward()
    cfg = _cfg(rewards={"dynamic_sampling": True, "dynamic_sampling_max_tries": 3, "overlong_filter": True})
    return RLTrainer(policy[0], cfg, make_optimizer(1e-3, schedule="constant"), reward_fn=reward), reward


def test_nan_reward_stalls_the_run_naming_the_reward_source(policy, prompts, stall_trainer, tmp_path):
    lm, params = policy
    trainer, reward = stall_trainer
    reward.fn = nan_reward
    try:
        with pytest.raises(TrainingStalledError,
                           match=r"iteration 2: 2 consecutive.*non-finite.*tests:switchable_reward"):
            fit_ppo(trainer, params, params, prompts, _quiet(tmp_path / "nan"), max_steps=5)
    finally:
        reward.fn = target_reward


def test_nonfinite_gradients_stall_the_run(policy, prompts, stall_trainer, tmp_path):
    lm, params = policy
    trainer, _ = stall_trainer
    leaves, treedef = jax.tree.flatten(params)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(np.inf)  # one poisoned weight
    broken = jax.tree.unflatten(treedef, leaves)
    with pytest.raises(TrainingStalledError, match="non-finite gradients"):
        fit_ppo(trainer, broken, params, prompts, _quiet(tmp_path / "grad"), max_steps=5)


def test_dynamic_sampling_drops_equal_groups_and_refills(policy, prompts, dapo_trainer):
    lm, params = policy
    trainer, reward = dapo_trainer
    seen = []

    def informative_but_prompt_0(prompt_ids, prompt_mask, tokens, mask, prompt_index):
        seen.append(np.asarray(prompt_index))
        score = 0.01 * (tokens * mask).sum(1)  # samples of a prompt differ in their tokens
        return np.where(prompt_index == 0, 1.0, score)  # prompt 0: every sample scores 1

    state = trainer.init(params)
    ids, mask = prompts["prompt_ids"], prompts["prompt_mask"]

    def more(attempt):
        rows = np.array([2 * attempt + 1, 2 * attempt + 2])
        return ids[rows], mask[rows], rows

    reward.fn = informative_but_prompt_0
    try:
        state, metrics, rollout = trainer.iteration(state, ids[:2], mask[:2], ref_params=params,
                                                    prompt_index=np.array([0, 1]), more_prompts=more)
        assert metrics["dynamic_sampling/tries"] == 2.0  # prompt 0's group dropped, one refill
        assert metrics["dynamic_sampling/filled_groups"] == 0.0
        assert metrics["dynamic_sampling/informative_groups"] >= 2.0
        assert float(metrics["groups_all_equal"]) == 0.0
        assert np.asarray(rollout.tokens).shape == (B * G, N)
        np.testing.assert_array_equal(seen[1], np.repeat([3, 4], G))
        # Without a prompt source, the batch is completed with the uninformative group.
        state, metrics, _ = trainer.iteration(state, ids[:2], mask[:2], ref_params=params,
                                              prompt_index=np.array([0, 1]))
    finally:
        reward.fn = target_reward
    assert metrics["dynamic_sampling/tries"] == 1.0 and metrics["dynamic_sampling/filled_groups"] == 1.0
    assert float(metrics["groups_all_equal"]) == 1.0


def test_overlong_filter_and_soft_penalty(policy, prompts, dapo_trainer):
    lm, params = policy
    # Responses that hit max_new_tokens without EOS leave the loss.
    trainer, _ = dapo_trainer
    state = trainer.init(params)
    ids, mask = prompts["prompt_ids"][:B], prompts["prompt_mask"][:B]
    state, metrics, rollout = trainer.iteration(state, ids, mask, ref_params=params)
    truncated = ~np.asarray(rollout.ended_with_eos)
    assert float(metrics["overlong_fraction"]) == pytest.approx(truncated.mean())
    assert float(metrics["loss_rows"]) == float((~truncated).sum())
    # The soft overlong penalty (DAPO eq. 13) against the formula.
    soft = rl_config("grpo", {"batch": {"batch_size": 1, "group_size": 4},
                              "sampling": {"max_new_tokens": 8},
                              "rewards": {"overlong_buffer": 4, "overlong_penalty": 0.5}})
    lengths = np.array([3, 4, 6, 8])
    m = (np.arange(8)[None, :] < lengths[:, None]).astype(np.float32)
    got = shape_scores(np.ones(4, np.float32), m, np.ones(4, bool), soft)
    want = 1.0 - 0.5 * np.clip((lengths - 4) / 4, 0, 1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
