"""RLTrainer end to end: each advantage estimator learns a trivial reward on a tiny GPT-2 policy,
every phase compiles once per iteration shape, and the config and presets check their keys.

One policy ("lm" head, no critic) and one sampling setting for the module, so the jitted
sampler compiles once; each estimator compiles its own update.
"""
import jax
import numpy as np
import pytest

from rlhf_jax.errors import ConfigError
from rlhf_jax.models import ModelConfig, from_config
from rlhf_jax.train import make_optimizer
from rlhf_jax.train.rl.presets import ALGORITHMS, rl_config
from rlhf_jax.train.rl.trainer import RLTrainer

V, B, G, P, N = 16, 4, 4, 4, 6
PAD, EOS, TARGET = 0, 2, 5
CTX = 32


def target_reward(prompt_ids, prompt_mask, tokens, mask, prompt_index):
    """Fraction of valid response tokens equal to TARGET."""
    return ((tokens == TARGET) * mask).sum(1) / np.maximum(mask.sum(1), 1)


def make_rl_cfg(algorithm, **sections):
    base = {
        "batch": {"batch_size": B, "group_size": G, "num_minibatches": 2, "ppo_epochs": 2},
        "sampling": {"max_new_tokens": N, "temperature": 1.0, "eos_token_id": EOS, "pad_token_id": PAD},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return rl_config(algorithm, base)


@pytest.fixture(scope="module")
def model_config():
    return ModelConfig.tiny("gpt2", V, hidden_size=32, num_heads=2, max_position_embeddings=CTX)


@pytest.fixture(scope="module")
def policy(model_config):
    return from_config(model_config, head="lm", seed=0)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, V, (B, P)).astype(np.int32)
    mask = np.ones((B, P), np.int32)
    mask[:2, :1] = 0
    return ids * mask, mask


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_estimator_learns_the_reward_and_compiles_once(algorithm, policy, prompts, count_compiles):
    lm, params = policy
    cfg = make_rl_cfg(algorithm, kl={"kl_coef": 0.01})
    trainer = RLTrainer(lm, cfg, make_optimizer(5e-3, schedule="constant"), reward_fn=target_reward)
    state = trainer.init(params)
    ids, mask = prompts
    hist = []
    with count_compiles() as compiles:
        for i in range(12):
            state, metrics, rollout = trainer.iteration(state, ids, mask, ref_params=params,
                                                        prompt_index=np.arange(B) + i)
            hist.append({k: float(v) for k, v in metrics.items()})
    assert compiles["jit(_update)"] == 1 and compiles["jit(_rollout)"] <= 1, compiles
    assert np.asarray(rollout.tokens).shape == (B * G, N)
    first = np.mean([h["score_mean"] for h in hist[:2]])
    last = np.mean([h["score_mean"] for h in hist[-3:]])
    assert last > first + 0.2, (algorithm, first, last)
    for key in ("policy_loss", "kl_k1", "clipfrac", "entropy", "grad_norm", "advantages_std"):
        assert np.isfinite(hist[-1][key]), key
    assert all(h["skipped_nonfinite"] == 0.0 and h["reward/nonfinite_rows"] == 0.0 for h in hist)
    assert hist[-1]["value_loss"] == 0.0  # no critic


def test_group_advantages_are_zero_for_equal_scores(policy, prompts):
    """GRPO with a constant reward: every advantage 0, so the policy loss's gradient is 0."""
    lm, params = policy
    cfg = make_rl_cfg("grpo", kl={"placement": "none"})
    trainer = RLTrainer(lm, cfg, make_optimizer(5e-3, schedule="constant"),
                        reward_fn=lambda *a: np.ones(B * G, np.float32))
    state = trainer.init(params)
    ids, mask = prompts
    rollout = trainer.rollout(params, ids, mask, jax.random.key(0))
    loss, (grads, _) = trainer.gradient(state, ids, mask, rollout, np.ones(B * G, np.float32), ref_params=None)
    assert float(loss) == 0.0
    assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_config_and_trainer_errors(policy, model_config):
    lm, params = policy
    with pytest.raises(ConfigError, match="group_size"):
        make_rl_cfg("grpo", batch={"group_size": 1})
    with pytest.raises(ConfigError, match="`algorithm`"):
        rl_config("a2c")
    with pytest.raises(ConfigError, match="unknown key `loss.clip`"):
        rl_config("grpo", {"loss": {"clip": 0.1}})
    with pytest.raises(ConfigError, match="`placement`"):
        rl_config("grpo", {"kl": {"placement": "in_value"}})
    with pytest.raises(ConfigError, match="`estimator`"):
        rl_config("ppo", {"advantages": {"estimator": "vtrace"}})
    with pytest.raises(ConfigError, match="divisible"):
        make_rl_cfg("grpo", batch={"num_minibatches": 3})
    for name in ALGORITHMS:
        cfg = make_rl_cfg(name)
        assert cfg.batch.rows == B * cfg.batch.group_size
    with pytest.raises(ValueError, match="needs a critic"):
        RLTrainer(lm, make_rl_cfg("ppo"), make_optimizer(1e-3, schedule="constant"), reward_fn=target_reward)
    rm, _ = from_config(model_config, head="scalar", seed=1)
    with pytest.raises(ValueError, match="no critic"):
        RLTrainer(lm, make_rl_cfg("grpo"), make_optimizer(1e-3, schedule="constant"), value_model=rm,
                  reward_fn=target_reward)
