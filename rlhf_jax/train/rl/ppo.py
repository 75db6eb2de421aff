"""PPO for RLHF: the `RLTrainer` preset (GAE with a critic, the KL in the reward).

`PPOTrainer(policy, cfg, tx, ...)` is `RLTrainer` (train/rl/trainer.py) with the
`RLConfig` that `rl_config_from_ppo(cfg)` maps the flat `PPOConfig` to; its three
jitted phases:

1. rollout: `rlhf_jax.generate` with the policy at `cfg.temperature`;
2. score: a reward model's `scores` on [prompt | response] (on device), or a host
   `reward_fn` (NumPy in, NumPy out: programmatic verifiers, RLVR);
3. update: reference log-probs (frozen `ref_params`, an argument), old log-probs and
   values from the current networks, shaped rewards with the KL controller's current
   coefficient, GAE, whitening, then `ppo_epochs x num_minibatches (x grad_accum_steps
   micro-batches)` as nested `lax.scan`s over `jax.random.permutation`s, then the
   KL-controller update.

The array math (`shaped_rewards`, `gae`, `masked_whiten`, `ppo_policy_loss`,
`ppo_value_loss`, `kl_penalty`, ...) comes from `rlhf_jax`; this module only wires it.
`ppo_advantages` and `ppo_minibatch_loss` (in `train/ppo_batch.py`, re-exported here) are
the two pure pieces, public so a researcher (and the TRL golden test) can call them alone.

Batch semantics: one iteration samples one response for each of `cfg.batch_size`
prompts; those `batch_size` sequences are the PPO batch, split into `num_minibatches`
minibatches (one optimizer update each) per epoch, each minibatch into
`grad_accum_steps` micro-batches whose gradients are accumulated. So one iteration
makes `ppo_epochs * num_minibatches` optimizer updates.

Where the score lands: on the last valid response token (the EOS when there is one),
where the reward model read it; the value bootstrap stops there too. TRL 1.8 adds it one
token past the EOS when that fits (tests/test_ppo_golden_trl.py checks both, with the
shift accounted for).

References:
  Schulman et al. 2017, arXiv 1707.06347 (PPO); Schulman et al. 2015, arXiv 1506.02438
  (GAE); Ziegler et al. 2019, arXiv 1909.08593; Ouyang et al. 2022, arXiv 2203.02155;
  Huang et al. 2024, arXiv 2403.17031 (the N+ implementation details).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import optax

from rlhf_jax.train.rl.batch import PPOBatch, ppo_advantages, ppo_minibatch_loss
from rlhf_jax.train.rl.presets import rl_config_from_ppo
from rlhf_jax.train.rl.trainer import RLState, RLTrainer

__all__ = [
    "PPOConfig",
    "PPOState",
    "PPOTrainer",
    "PPOBatch",
    "ppo_advantages",
    "ppo_minibatch_loss",
]

_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
_ESTIMATORS = ("k1", "k2", "k3")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Hyper-parameters of a PPO-RLHF iteration.

    Batch semantics:
      batch_size: prompts per iteration; one response is sampled per prompt, so this is
        also the number of sequences in the PPO batch.
      num_minibatches: optimizer updates per epoch; minibatch = batch_size / num_minibatches.
      ppo_epochs: passes over the batch per iteration (a fresh permutation each).
      grad_accum_steps: micro-batches per minibatch (gradients accumulated, weighted by
        the loss normaliser); `batch_size` must be divisible by
        `num_minibatches * grad_accum_steps`.

    Sampling (the same temperature divides the logits in the training forward):
      max_new_tokens, temperature, top_k (0 = off), top_p (1 = off), eos_token_id,
      pad_token_id. The PPO ratio uses log-probs of the full tempered distribution
      (before top-k / top-p filtering), as TRL does and as `generate` reports them.

    Losses:
      clip_eps: policy ratio clip. dual_clip: dual-clip constant c > 1 (None = off).
      value_clip_eps: value clip around the old values. vf_coef: value-loss weight.
      entropy_coef: entropy bonus weight (loss -= coef * entropy).
      loss_agg, norm_constant: token aggregation of all three losses (see `aggregate`).

    Rewards and advantages:
      gamma, lam, gae_method: GAE. kl_coef: initial KL coefficient. kl_target: adaptive
      controller target (None = fixed coefficient), compared with the batch mean of the
      per-sequence KL sums (of `kl_estimator`); the controller steps by `batch_size`
      samples per iteration. kl_horizon: its horizon.
      kl_estimator: "k1" | "k2" | "k3" in the shaped reward. whiten_rewards (no mean
      shift, as OpenAI), whiten_advantages. missing_eos_penalty: subtracted from the score
      of responses that did not end with EOS (None = off). reward_clip: clip scores to
      [-c, c] (None = off).

    Optimizer (policy; the value network uses `value_learning_rate` or the same):
      learning_rate, value_learning_rate, warmup_steps, total_steps, schedule,
      weight_decay, max_grad_norm, b1, b2.

    seed: PRNG seed of the state.
    """

    batch_size: int = 64
    num_minibatches: int = 4
    ppo_epochs: int = 4
    grad_accum_steps: int = 1
    max_new_tokens: int = 32
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int = 0
    clip_eps: float = 0.2
    dual_clip: float | None = None
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    norm_constant: float | None = None
    gamma: float = 1.0
    lam: float = 0.95
    gae_method: str = "auto"
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None
    reward_clip: float | None = None
    learning_rate: float = 1e-5
    value_learning_rate: float | None = None
    warmup_steps: int = 0
    total_steps: int | None = None
    schedule: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.999
    seed: int = 0

    def __post_init__(self):
        positive = ("batch_size", "num_minibatches", "ppo_epochs", "grad_accum_steps", "max_new_tokens")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        per = self.num_minibatches * self.grad_accum_steps
        if self.batch_size % per:
            raise ValueError(
                f"`batch_size` ({self.batch_size}) must be divisible by `num_minibatches` * "
                f"`grad_accum_steps` ({self.num_minibatches} * {self.grad_accum_steps} = {per})"
            )
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}")
        if self.loss_agg not in _AGGS:
            raise ValueError(f"`loss_agg` must be one of {_AGGS}, got {self.loss_agg!r}")
        if self.kl_estimator not in _ESTIMATORS:
            raise ValueError(f"`kl_estimator` must be one of {_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"`dual_clip` must be > 1 (or None), got {self.dual_clip}")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError(f"`kl_target` must be > 0 (or None), got {self.kl_target}")

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def micro_batch_size(self) -> int:
        return self.minibatch_size // self.grad_accum_steps


# The PPO state is the RL trainer's state (same fields; checkpoints are interchangeable).
PPOState = RLState


class PPOTrainer(RLTrainer):
    """PPO-RLHF: the `RLTrainer` preset with GAE, a critic and the KL in the reward.

    Args:
      policy: the policy `LM` ("lm" head with a separate `value_model`, or "lm+value"
        for a value head on the shared trunk).
      cfg: `PPOConfig` (mapped to the equal `RLConfig` by `rl_config_from_ppo`; `self.cfg`
        stays the `PPOConfig`, `self.rl_cfg` is the `RLConfig`).
      tx: the policy optimizer (e.g. `optimizer_from_config(cfg)`).
      value_model: a scalar-head `LM` used as a separate value network (may be
        initialised from the reward model, as in the N+ paper), or None to use the
        policy's own value head (one loss: policy + vf_coef * value).
      value_tx: the value network's optimizer (default: `tx`).
      reward_model: a scalar-head `LM` whose `scores` on [prompt | response] is the
        reward (its params are passed to `iteration`).
      reward_fn: host function `(prompt_ids, prompt_mask, response_tokens, response_mask,
        prompt_index) -> np.ndarray [B]`, used instead of a reward model.

    Rows with a non-finite score are masked out of the update (`reward/nonfinite_rows`);
    when no row is finite the update is skipped (params, optimizer states and the KL
    controller unchanged, the rng advanced as usual, `skipped_nonfinite` = 1).
    Non-finite gradients skip their minibatch's update.
    """

    def __init__(
        self,
        policy,
        cfg: PPOConfig,
        tx: optax.GradientTransformation,
        *,
        value_model=None,
        value_tx: optax.GradientTransformation | None = None,
        reward_model=None,
        reward_fn: Callable | None = None,
        reward_source: str | None = None,
    ):
        head = getattr(policy, "head", None)
        if value_model is None and head is not None and head != "lm+value":
            raise ValueError(
                f"`value_model` is None, so the policy must have head='lm+value' (a value head "
                f"on the shared trunk); got head={head!r}"
            )
        super().__init__(policy, rl_config_from_ppo(cfg), tx, value_model=value_model, value_tx=value_tx,
                         reward_model=reward_model, reward_fn=reward_fn, reward_source=reward_source)
        self.ppo_cfg = cfg

    @property
    def cfg(self) -> PPOConfig:
        return self.ppo_cfg
