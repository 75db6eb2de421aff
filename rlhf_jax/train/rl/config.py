"""`RLConfig`: the hyper-parameters of one RL iteration (rollout -> score -> update), in sections.

Sections (each a frozen dataclass that checks its own values and names the key in its error):

- `batch`: prompts per iteration, samples per prompt (`group_size`), minibatches, epochs,
  micro-batches, the row chunk of the no-gradient forwards.
- `sampling`: the rollout sampler.
- `advantages`: the advantage estimator (`gae`, `grpo`, `dr_grpo`, `rloo`, `reinforce_pp`,
  `reinforce_pp_baseline`) and its knobs.
- `loss`: the policy objective (clip, clip-higher, dual clip, token or sequence ratio,
  aggregation, TIS) and, with a critic, the value loss.
- `kl`: the KL penalty's placement (`in_reward`, `in_loss`, `none`), estimator and controller.
- `rewards`: what happens to a score before it becomes a reward (clip, missing-EOS and soft
  overlong penalties, overlong filtering, dynamic sampling, the non-finite guard).

`RLConfig.batch_size` (the number of prompts) is also readable at the top level, as the
drivers read it. Every field carries its help text in `metadata["help"]`.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from rlhf_jax.train.options import OptimizerConfig, check, hyper

__all__ = [
    "RLConfig",
    "RLBatchConfig",
    "RLSamplingConfig",
    "RLAdvantageConfig",
    "PolicyLossConfig",
    "RLKLConfig",
    "RLRewardConfig",
    "ESTIMATORS",
    "CRITIC_ESTIMATORS",
    "GROUP_ESTIMATORS",
]

ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
CRITIC_ESTIMATORS = ("gae",)
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _positive_int(obj, *names: str, minimum: int = 1) -> None:
    for name in names:
        value = getattr(obj, name)
        check(_is_int(value) and value >= minimum, f"`{name}` must be an int >= {minimum}, got {value!r}")


def _choice(obj, name: str, allowed) -> None:
    value = getattr(obj, name)
    check(value in allowed, f"`{name}` must be one of {list(allowed)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RLBatchConfig:
    """Batch semantics: `batch_size` prompts x `group_size` samples = the rows of the update."""

    batch_size: int = hyper(64, "prompts per iteration")
    group_size: int = hyper(1, "samples per prompt, G (rows i*G .. i*G+G-1 belong to prompt i; the prompt is "
                               "prefilled once and its KV cache shared by its G samples)")
    num_minibatches: int = hyper(4, "optimizer updates per epoch (minibatch = rows / num_minibatches)")
    ppo_epochs: int = hyper(4, "passes over the rows per iteration (a fresh permutation each)")
    grad_accum_steps: int = hyper(
        1, "micro-batches per minibatch (gradients accumulated, weighted by the loss normaliser); the rows "
           "(batch_size * group_size) must be divisible by num_minibatches * grad_accum_steps")
    forward_chunk_size: int | None = hyper(
        None, "rows per chunk of the reference / old-policy / value forwards (null: the micro-batch size); "
              "must divide the rows")
    share_prompt_forward: bool = hyper(
        False, "run each prompt through the trunk once per group in the reference, old-policy and training "
               "forwards (its KV cache shared by the group's G responses; same result, far fewer tokens when "
               "prompts are long next to responses); minibatches then hold whole groups, so group_size must "
               "divide the micro-batch and the forward chunk; no critic")

    def __post_init__(self):
        _positive_int(self, "batch_size", "group_size", "num_minibatches", "ppo_epochs", "grad_accum_steps")
        per = self.num_minibatches * self.grad_accum_steps
        check(self.rows % per == 0,
              f"`batch_size` * `group_size` ({self.batch_size} * {self.group_size} = {self.rows}) must be "
              f"divisible by `num_minibatches` * `grad_accum_steps` ({self.num_minibatches} * "
              f"{self.grad_accum_steps} = {per})")
        if self.forward_chunk_size is not None:
            _positive_int(self, "forward_chunk_size")
            check(self.rows % self.forward_chunk_size == 0,
                  f"`forward_chunk_size` ({self.forward_chunk_size}) must divide the rows "
                  f"(batch_size * group_size = {self.rows})")
        if self.share_prompt_forward:
            check(self.group_size >= 2, "`share_prompt_forward` shares a prompt between its samples: "
                                        f"`group_size` must be >= 2, got {self.group_size}")
            for name in ("micro_batch_size", "chunk_size"):
                value = getattr(self, name)
                check(value % self.group_size == 0,
                      f"`share_prompt_forward` keeps groups whole: the {name.replace('_', ' ')} ({value}) must be "
                      f"a multiple of `group_size` ({self.group_size})")

    @property
    def rows(self) -> int:
        """Sequences per iteration: `batch_size * group_size`."""
        return self.batch_size * self.group_size

    @property
    def minibatch_size(self) -> int:
        return self.rows // self.num_minibatches

    @property
    def micro_batch_size(self) -> int:
        return self.minibatch_size // self.grad_accum_steps

    @property
    def chunk_size(self) -> int:
        """Rows per chunk of the no-gradient forwards."""
        return self.forward_chunk_size if self.forward_chunk_size is not None else self.micro_batch_size


@dataclasses.dataclass(frozen=True)
class RLSamplingConfig:
    """The rollout sampler (the same temperature divides the logits in the training forward)."""

    max_new_tokens: int = hyper(32, "response length limit of the sampler (>= 1)")
    temperature: float = hyper(0.7, "sampling temperature (> 0; the training forward divides the logits by it)")
    top_k: int = hyper(0, "top-k sampling (0 = off)")
    top_p: float = hyper(1.0, "nucleus sampling, in (0, 1] (1 = off)")
    eos_token_id: int | None = hyper(None, "EOS id (null: none, fixed-length responses)")
    pad_token_id: int | None = hyper(None, "PAD id written after EOS (null: the tokenizer's from the CLI, 0 in "
                                           "library use)")

    def __post_init__(self):
        _positive_int(self, "max_new_tokens")
        check(self.temperature > 0, f"`temperature` must be > 0, got {self.temperature}")
        check(_is_int(self.top_k) and self.top_k >= 0, f"`top_k` must be an int >= 0, got {self.top_k!r}")
        check(0 < self.top_p <= 1, f"`top_p` must lie in (0, 1], got {self.top_p}")
        check(self.eos_token_id is None or (_is_int(self.eos_token_id) and self.eos_token_id >= 0),
              f"`eos_token_id` must be an int >= 0 or null, got {self.eos_token_id!r}")
        check(self.pad_token_id is None or (_is_int(self.pad_token_id) and self.pad_token_id >= 0),
              f"`pad_token_id` must be an int >= 0 or null, got {self.pad_token_id!r}")


@dataclasses.dataclass(frozen=True)
class RLAdvantageConfig:
    """The advantage estimator (a pure function picked by name, see `rl/estimators.py`)."""

    estimator: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = hyper(
        "gae", "gae (critic, PPO) | grpo (group mean / std) | dr_grpo (group mean only) | rloo (leave-one-out) | "
               "reinforce_pp (whitened returns-to-go) | reinforce_pp_baseline (minus the group mean first)")
    gamma: float = hyper(1.0, "discount of GAE and of REINFORCE++'s returns, in [0, 1]")
    lam: float = hyper(0.95, "GAE lambda, in [0, 1]")
    gae_method: Literal["auto", "scan", "associative"] = hyper("auto", "GAE implementation")
    whiten_advantages: bool = hyper(True, "gae: whiten the advantages over valid tokens")
    whiten_rewards: bool = hyper(False, "gae: whiten the shaped rewards without shifting the mean (OpenAI)")
    grpo_scale: Literal["group", "batch"] = hyper(
        "group", "grpo: divide the centred scores by the group's std or the batch's")
    eps: float = hyper(1e-6, "grpo: added to the std (> 0)")

    def __post_init__(self):
        _choice(self, "estimator", ESTIMATORS)
        _choice(self, "gae_method", ("auto", "scan", "associative"))
        _choice(self, "grpo_scale", ("group", "batch"))
        check(0 <= self.gamma <= 1, f"`gamma` must lie in [0, 1], got {self.gamma}")
        check(0 <= self.lam <= 1, f"`lam` must lie in [0, 1], got {self.lam}")
        check(self.eps > 0, f"`eps` must be > 0, got {self.eps}")

    @property
    def needs_critic(self) -> bool:
        return self.estimator in CRITIC_ESTIMATORS

    @property
    def needs_groups(self) -> bool:
        return self.estimator in GROUP_ESTIMATORS


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """The policy objective (clipped surrogate), the value loss with a critic, the entropy bonus."""

    clip_eps: float = hyper(0.2, "policy ratio clip, the lower one with clip_eps_high (> 0)")
    clip_eps_high: float | None = hyper(None, "DAPO's clip-higher upper range (null: clip_eps, symmetric)")
    dual_clip: float | None = hyper(None, "dual-clip constant c > 1 for negative advantages (null = off)")
    ratio: Literal["token", "sequence"] = hyper(
        "token", "token: PPO's per-token ratio | sequence: GSPO's exp(mean_t log ratio), one per sequence")
    loss_agg: LossAgg = hyper("token-mean", "token aggregation of every loss term (see rlhf_jax.aggregate)")
    norm_constant: float | None = hyper(None, "the constant of seq-mean-token-sum-norm (null: max_new_tokens)")
    value_clip_eps: float = hyper(0.2, "value clip around the old values (> 0; critic only)")
    vf_coef: float = hyper(0.1, "value-loss weight (>= 0; critic only)")
    entropy_coef: float = hyper(0.0, "entropy bonus weight (>= 0; loss -= coef * entropy)")
    tis: bool = hyper(False, "truncated importance sampling: weight the policy loss by "
                             "min(pi_train / pi_sampler, tis_cap) (sampler log-probs vs training log-probs)")
    tis_cap: float = hyper(2.0, "TIS truncation constant (> 0)")
    tis_level: Literal["token", "sequence"] = hyper("token", "TIS ratio per token or per sequence")

    def __post_init__(self):
        _choice(self, "ratio", ("token", "sequence"))
        _choice(self, "loss_agg", ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                   "seq-mean-token-sum-norm"))
        _choice(self, "tis_level", ("token", "sequence"))
        check(self.clip_eps > 0, f"`clip_eps` must be > 0, got {self.clip_eps}")
        check(self.clip_eps_high is None or self.clip_eps_high > 0,
              f"`clip_eps_high` must be > 0 or null, got {self.clip_eps_high}")
        check(self.dual_clip is None or self.dual_clip > 1, f"`dual_clip` must be > 1 or null, got {self.dual_clip}")
        check(self.value_clip_eps > 0, f"`value_clip_eps` must be > 0, got {self.value_clip_eps}")
        check(self.vf_coef >= 0, f"`vf_coef` must be >= 0, got {self.vf_coef}")
        check(self.entropy_coef >= 0, f"`entropy_coef` must be >= 0, got {self.entropy_coef}")
        check(self.norm_constant is None or self.norm_constant > 0,
              f"`norm_constant` must be > 0 or null, got {self.norm_constant}")
        check(self.tis_cap > 0, f"`tis_cap` must be > 0, got {self.tis_cap}")


@dataclasses.dataclass(frozen=True)
class RLKLConfig:
    """The KL penalty to the reference policy: where it goes, which estimator, its coefficient."""

    placement: Literal["in_reward", "in_loss", "none"] = hyper(
        "in_reward", "in_reward: -kl_coef * kl shaped into the rewards (detached; PPO, REINFORCE++) | in_loss: "
                     "+kl_coef * kl as a differentiated loss term (GRPO) | none: no reference forward at all")
    kl_coef: float = hyper(0.05, "initial (or fixed) KL coefficient (>= 0)")
    kl_estimator: Literal["k1", "k2", "k3"] = hyper(
        "k1", "k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d with d = logp - ref_logp")
    kl_target: float | None = hyper(
        None, "adaptive controller target (null = fixed coefficient), compared with the mean per-sequence KL sum")
    kl_horizon: int = hyper(10000, "horizon of the adaptive KL controller (>= 1)")

    def __post_init__(self):
        _choice(self, "placement", ("in_reward", "in_loss", "none"))
        _choice(self, "kl_estimator", ("k1", "k2", "k3"))
        check(self.kl_coef >= 0, f"`kl_coef` must be >= 0, got {self.kl_coef}")
        check(self.kl_target is None or self.kl_target > 0, f"`kl_target` must be > 0 or null, got {self.kl_target}")
        _positive_int(self, "kl_horizon")
        check(not (self.placement == "none" and self.kl_target is not None),
              "`kl_target` needs a KL penalty: set `placement` to in_reward or in_loss, or `kl_target` to null")


@dataclasses.dataclass(frozen=True)
class RLRewardConfig:
    """Score shaping, DAPO's data-side pieces and the guard against non-finite rewards."""

    reward_clip: float | None = hyper(None, "clip scores to [-c, c] (c > 0; null = off)")
    missing_eos_penalty: float | None = hyper(
        None, "subtracted from the score of responses that did not end with EOS (>= 0; null = off)")
    overlong_filter: bool = hyper(False, "DAPO: mask responses that hit max_new_tokens without EOS out of the loss")
    overlong_buffer: int = hyper(
        0, "DAPO soft overlong penalty: over the last L tokens before max_new_tokens the score falls linearly "
           "by up to overlong_penalty (0 = off)")
    overlong_penalty: float = hyper(1.0, "DAPO soft overlong penalty at max_new_tokens (>= 0)")
    dynamic_sampling: bool = hyper(
        False, "DAPO: drop groups whose scores are all equal and refill the batch from fresh prompts")
    dynamic_sampling_max_tries: int = hyper(4, "rollouts per iteration at most when refilling (>= 1)")
    max_stalled_iterations: int = hyper(
        5, "stop with TrainingStalledError after this many consecutive iterations with nothing to learn from "
           "(every score non-finite, or every update skipped for non-finite gradients)")

    def __post_init__(self):
        check(self.reward_clip is None or self.reward_clip > 0,
              f"`reward_clip` must be > 0 or null, got {self.reward_clip}")
        check(self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
              f"`missing_eos_penalty` must be >= 0 or null, got {self.missing_eos_penalty}")
        check(_is_int(self.overlong_buffer) and self.overlong_buffer >= 0,
              f"`overlong_buffer` must be an int >= 0, got {self.overlong_buffer!r}")
        check(self.overlong_penalty >= 0, f"`overlong_penalty` must be >= 0, got {self.overlong_penalty}")
        _positive_int(self, "dynamic_sampling_max_tries", "max_stalled_iterations")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Hyper-parameters of an RL iteration: `batch.batch_size` prompts, `batch.group_size` samples each."""

    batch: RLBatchConfig = hyper(help="batch semantics", factory=RLBatchConfig)
    sampling: RLSamplingConfig = hyper(help="the rollout sampler", factory=RLSamplingConfig)
    advantages: RLAdvantageConfig = hyper(help="the advantage estimator", factory=RLAdvantageConfig)
    loss: PolicyLossConfig = hyper(help="the policy objective and value loss", factory=PolicyLossConfig)
    kl: RLKLConfig = hyper(help="KL penalty to the reference", factory=RLKLConfig)
    rewards: RLRewardConfig = hyper(help="score shaping, DAPO data-side pieces, non-finite guard",
                                  factory=RLRewardConfig)
    optimizer: OptimizerConfig = hyper(help="policy optimizer (the CLI builds the trainer's from it)",
                                       factory=lambda: OptimizerConfig(learning_rate=1e-6))
    value_optimizer: OptimizerConfig | None = hyper(
        None, "optimizer of a separate value network (gae only; null: the same settings as `optimizer`)")
    seed: int = hyper(0, "PRNG seed of the state (library use; the drivers pass `RunOptions.seed`)")

    @property
    def value_optimizer_config(self) -> OptimizerConfig:
        """The value network's optimizer settings (`value_optimizer`, else `optimizer`)."""
        return self.value_optimizer if self.value_optimizer is not None else self.optimizer

    def __post_init__(self):
        est = self.advantages.estimator
        if est in GROUP_ESTIMATORS:
            minimum = 2
            check(self.batch.group_size >= minimum,
                  f"`advantages.estimator` {est!r} compares the samples of a prompt: `batch.group_size` must be "
                  f">= {minimum}, got {self.batch.group_size}")
        if self.rewards.dynamic_sampling:
            check(self.batch.group_size >= 2,
                  "`rewards.dynamic_sampling` drops groups of equal scores: `batch.group_size` must be >= 2")
        check(self.rewards.overlong_buffer <= self.sampling.max_new_tokens,
              f"`rewards.overlong_buffer` ({self.rewards.overlong_buffer}) must be <= `sampling.max_new_tokens` "
              f"({self.sampling.max_new_tokens})")
        check(_is_int(self.seed), f"`seed` must be an int, got {self.seed!r}")

    @property
    def batch_size(self) -> int:
        """Prompts per iteration (what the drivers read)."""
        return self.batch.batch_size
