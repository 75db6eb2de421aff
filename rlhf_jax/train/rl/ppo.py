"""PPO for RLHF: the `RLTrainer` preset (GAE with a critic, the KL in the reward).

`PPOTrainer(policy, cfg, tx, ...)` is `RLTrainer` (train/rl/trainer.py) with the
`RLConfig` that `rl_config_from_ppo(cfg)` maps the `PPOConfig` to (the same sections,
plus the optimizers); its three jitted phases:

1. rollout: `rlhf_jax.generate` with the policy at `cfg.sampling.temperature`;
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

Batch semantics: one iteration samples one response for each of `cfg.batch.batch_size`
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
from typing import Callable, Literal

import optax

from rlhf_jax.train.options import OptimizerConfig, check, check_choices, check_positive_int, hyper
from rlhf_jax.train.rl.batch import PPOBatch, ppo_advantages, ppo_minibatch_loss
from rlhf_jax.train.rl.presets import rl_config_from_ppo
from rlhf_jax.train.rl.trainer import RLState, RLTrainer

__all__ = [
    "PPOConfig",
    "BatchConfig",
    "SamplingConfig",
    "LossConfig",
    "KLConfig",
    "RewardShapingConfig",
    "AdvantageConfig",
    "PPOState",
    "PPOTrainer",
    "PPOBatch",
    "ppo_advantages",
    "ppo_minibatch_loss",
]

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Batch semantics: one response per prompt, so `batch_size` prompts are the PPO batch."""

    batch_size: int = hyper(64, "prompts per iteration (one response each: the sequences of the PPO batch)")
    num_minibatches: int = hyper(4, "optimizer updates per PPO epoch (minibatch = batch_size / num_minibatches)")
    ppo_epochs: int = hyper(4, "passes over the batch per iteration (a fresh permutation each)")
    grad_accum_steps: int = hyper(
        1, "micro-batches per minibatch (gradients accumulated, weighted by the loss normaliser); batch_size "
           "must be divisible by num_minibatches * grad_accum_steps")

    def __post_init__(self):
        check_positive_int(self, "batch_size", "num_minibatches", "ppo_epochs", "grad_accum_steps")
        per = self.num_minibatches * self.grad_accum_steps
        check(self.batch_size % per == 0,
              f"`batch_size` ({self.batch_size}) must be divisible by `num_minibatches` * `grad_accum_steps` "
              f"({self.num_minibatches} * {self.grad_accum_steps} = {per})")

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def micro_batch_size(self) -> int:
        return self.minibatch_size // self.grad_accum_steps


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """The rollout sampler (the same temperature divides the logits in the training forward).

    The PPO ratio uses log-probs of the full tempered distribution (before top-k / top-p
    filtering), as TRL does and as `generate` reports them.
    """

    max_new_tokens: int = hyper(32, "response length limit of the sampler (>= 1)")
    temperature: float = hyper(0.7, "sampling temperature (> 0; the training forward divides the logits by it)")
    top_k: int = hyper(0, "top-k sampling (0 = off)")
    top_p: float = hyper(1.0, "nucleus sampling, in (0, 1] (1 = off)")
    eos_token_id: int | None = hyper(None, "EOS id (null: the tokenizer's; the CLI writes the id it uses)")
    pad_token_id: int | None = hyper(None, "PAD id (null: the tokenizer's from the CLI, 0 in library use)")

    def __post_init__(self):
        check_positive_int(self, "max_new_tokens")
        check(self.temperature > 0, f"`temperature` must be > 0, got {self.temperature}")
        check(isinstance(self.top_k, int) and self.top_k >= 0, f"`top_k` must be an int >= 0, got {self.top_k!r}")
        check(0 < self.top_p <= 1, f"`top_p` must lie in (0, 1], got {self.top_p}")
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and value >= 0),
                  f"`{name}` must be an int >= 0 or null, got {value!r}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The clipped policy and value losses, the entropy bonus and their aggregation."""

    clip_eps: float = hyper(0.2, "policy ratio clip (> 0)")
    dual_clip: float | None = hyper(None, "dual-clip constant c > 1 for negative advantages (null = off)")
    value_clip_eps: float = hyper(0.2, "value clip around the old values (> 0)")
    vf_coef: float = hyper(0.1, "value-loss weight (>= 0)")
    entropy_coef: float = hyper(0.0, "entropy bonus weight (>= 0; loss -= coef * entropy)")
    loss_agg: LossAgg = hyper("token-mean", "token aggregation of all three losses (see rlhf_jax.aggregate)")
    norm_constant: float | None = hyper(None, "the constant of seq-mean-token-sum-norm (null: the length)")

    def __post_init__(self):
        check_choices(self)
        check(self.clip_eps > 0, f"`clip_eps` must be > 0, got {self.clip_eps}")
        check(self.dual_clip is None or self.dual_clip > 1, f"`dual_clip` must be > 1 or null, got {self.dual_clip}")
        check(self.value_clip_eps > 0, f"`value_clip_eps` must be > 0, got {self.value_clip_eps}")
        check(self.vf_coef >= 0, f"`vf_coef` must be >= 0, got {self.vf_coef}")
        check(self.entropy_coef >= 0, f"`entropy_coef` must be >= 0, got {self.entropy_coef}")
        check(self.norm_constant is None or self.norm_constant > 0,
              f"`norm_constant` must be > 0 or null, got {self.norm_constant}")


@dataclasses.dataclass(frozen=True)
class KLConfig:
    """The KL penalty in the shaped reward and its controller."""

    kl_coef: float = hyper(0.05, "initial (or fixed) KL coefficient (>= 0)")
    kl_target: float | None = hyper(
        None, "adaptive controller target (null = fixed coefficient), compared with the batch mean of the "
              "per-sequence KL sums of kl_estimator; the controller steps by batch_size samples per iteration")
    kl_horizon: int = hyper(10000, "horizon of the adaptive KL controller (>= 1)")
    kl_estimator: Literal["k1", "k2", "k3"] = hyper("k1", "KL estimator in the shaped reward: k1, k2 or k3")

    def __post_init__(self):
        check_choices(self)
        check(self.kl_coef >= 0, f"`kl_coef` must be >= 0, got {self.kl_coef}")
        check(self.kl_target is None or self.kl_target > 0, f"`kl_target` must be > 0 or null, got {self.kl_target}")
        check_positive_int(self, "kl_horizon")


@dataclasses.dataclass(frozen=True)
class RewardShapingConfig:
    """What happens to the scores before they enter the per-token rewards."""

    missing_eos_penalty: float | None = hyper(
        None, "subtracted from the score of responses that did not end with EOS (>= 0; null = off)")
    reward_clip: float | None = hyper(None, "clip scores to [-c, c] (c > 0; null = off)")

    def __post_init__(self):
        check(self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
              f"`missing_eos_penalty` must be >= 0 or null, got {self.missing_eos_penalty}")
        check(self.reward_clip is None or self.reward_clip > 0,
              f"`reward_clip` must be > 0 or null, got {self.reward_clip}")


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """GAE and whitening (the field names and sections are `RLConfig`'s)."""

    gamma: float = hyper(1.0, "GAE discount, in [0, 1]")
    lam: float = hyper(0.95, "GAE lambda, in [0, 1]")
    gae_method: Literal["auto", "scan", "associative"] = hyper("auto", "GAE implementation: auto, scan or associative")
    whiten_advantages: bool = hyper(True, "whiten the advantages over valid tokens")
    whiten_rewards: bool = hyper(False, "whiten the shaped rewards without shifting the mean (OpenAI)")

    def __post_init__(self):
        check_choices(self)
        check(0 <= self.gamma <= 1, f"`gamma` must lie in [0, 1], got {self.gamma}")
        check(0 <= self.lam <= 1, f"`lam` must lie in [0, 1], got {self.lam}")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Hyper-parameters of a PPO-RLHF iteration, in sections (the seed is `RunOptions.seed`).

    One iteration samples one response for each of `batch.batch_size` prompts and makes
    `batch.ppo_epochs * batch.num_minibatches` optimizer updates on them.
    """

    batch: BatchConfig = hyper(help="batch semantics", factory=BatchConfig)
    sampling: SamplingConfig = hyper(help="the rollout sampler", factory=SamplingConfig)
    loss: LossConfig = hyper(help="losses", factory=LossConfig)
    kl: KLConfig = hyper(help="KL penalty and controller", factory=KLConfig)
    rewards: RewardShapingConfig = hyper(help="score shaping", factory=RewardShapingConfig)
    advantages: AdvantageConfig = hyper(help="GAE and whitening", factory=AdvantageConfig)
    optimizer: OptimizerConfig = hyper(help="policy optimizer", factory=lambda: OptimizerConfig(learning_rate=1e-5))
    value_optimizer: OptimizerConfig | None = hyper(
        None, "optimizer of a separate value network (null: the same settings as `optimizer`)")

    @property
    def value_optimizer_config(self) -> OptimizerConfig:
        """The value network's optimizer settings (`value_optimizer`, else `optimizer`)."""
        return self.value_optimizer if self.value_optimizer is not None else self.optimizer


# The PPO state is the RL trainer's state (same fields; checkpoints are interchangeable).
PPOState = RLState


class PPOTrainer(RLTrainer):
    """PPO-RLHF: the `RLTrainer` preset with GAE, a critic and the KL in the reward.

    Args:
      policy: the policy `LM` ("lm" head with a separate `value_model`, or "lm+value"
        for a value head on the shared trunk).
      cfg: `PPOConfig` (mapped to the equal `RLConfig` by `rl_config_from_ppo`; `self.cfg`
        stays the `PPOConfig`, `self.rl_cfg` is the `RLConfig`).
      tx: the policy optimizer (e.g. `optimizer_from_config(cfg.optimizer)`).
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
