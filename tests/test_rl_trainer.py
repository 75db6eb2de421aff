"""RLTrainer end to end: GRPO learns a trivial reward on a tiny GPT-2 policy and every phase
compiles once per iteration shape; every critic-free estimator as the trainer calls it against
float64 NumPy; the config and presets check their keys.

One learning run stands for the estimators: the trainer picks the estimator by name and feeds
its advantages to the same objective, so what differs between them is the estimator's
arithmetic, checked without a model (`test_estimators_equal_float64_formulas`), and its
aggregation's normaliser (tests/test_rl_invariance.py). Token-level advantages learn in
tests/test_train_ppo.py (GAE) and tests/test_lora.py.
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


def test_grpo_learns_the_reward_and_compiles_once(policy, prompts, count_compiles):
    algorithm = "grpo"
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


def _np_kl(d, estimator):
    return {"k1": d, "k2": 0.5 * d**2, "k3": np.exp(-d) - 1 + d}[estimator]


def _np_group_std(x):
    return np.sqrt(((x - x.mean(1, keepdims=True)) ** 2).sum(1, keepdims=True) / (x.shape[1] - 1))


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_estimators_equal_float64_formulas(algorithm):
    """`ESTIMATORS[name](batch, cfg)` with the preset's KL placement and estimator, on random
    arrays with responses of different lengths, against the papers' formulas in float64."""
    from rlhf_jax.train.rl.estimators import ESTIMATORS

    rows, n, kl_coef, gamma = B * G, N, 0.3, 0.9
    cfg = make_rl_cfg(algorithm, advantages={"gamma": gamma})
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, n + 1, rows)
    mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float64)
    scores = rng.normal(size=rows)
    logprobs = -rng.uniform(0.2, 3.0, (rows, n))
    ref_logprobs = logprobs + rng.normal(0, 0.5, (rows, n))
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    got = ESTIMATORS[cfg.advantages.estimator]({
        "scores": f32(scores), "logprobs": f32(logprobs), "ref_logprobs": f32(ref_logprobs),
        "values": None, "mask": f32(mask), "kl_coef": np.float32(kl_coef)}, cfg)

    kl = _np_kl(logprobs - ref_logprobs, cfg.kl.kl_estimator) * mask
    coef = kl_coef if cfg.kl.placement == "in_reward" else 0.0
    if algorithm in ("grpo", "dr_grpo", "rloo"):
        s = (scores - coef * kl.sum(1)).reshape(B, G)
        if algorithm == "grpo":
            adv = (s - s.mean(1, keepdims=True)) / (_np_group_std(s) + cfg.advantages.eps)
        elif algorithm == "dr_grpo":
            adv = s - s.mean(1, keepdims=True)
        else:  # leave one out
            adv = s - (s.sum(1, keepdims=True) - s) / (G - 1)
        want = adv.reshape(-1)[:, None] * mask
    else:
        last = np.arange(n)[None, :] == (lengths - 1)[:, None]
        s = scores
        if algorithm == "reinforce_pp_baseline":
            s = scores - np.repeat(scores.reshape(B, G).mean(1), G)
        rewards = -coef * kl + last * s[:, None]
        returns = np.zeros((rows, n))
        for t in reversed(range(n)):
            returns[:, t] = rewards[:, t] + (gamma * returns[:, t + 1] * mask[:, t + 1] if t + 1 < n else 0.0)
        valid = returns[mask > 0]
        want = (returns - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8) * mask
    assert cfg.kl.placement == {"grpo": "in_loss", "dr_grpo": "none"}.get(algorithm, "in_reward")
    np.testing.assert_allclose(np.asarray(got["advantages"]), want, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(got["kl"]), kl, rtol=1e-4, atol=1e-5)  # the logged estimate
    np.testing.assert_array_equal(np.asarray(got["returns"]), 0.0)  # no critic, no value target


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
