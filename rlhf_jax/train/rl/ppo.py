"""PPO for RLHF: rollout, score, and one jitted update per iteration.

`PPOTrainer(policy, cfg, tx, ...)` owns three jitted phases:

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
import time
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from rlhf_jax.core import ops
from rlhf_jax.core.kl import kl_controller_init, kl_controller_update, kl_penalty
from rlhf_jax.train.options import OptimizerConfig, check, check_choices, check_positive_int, hyper
from rlhf_jax.train.rl.batch import PPOBatch, loss_weight, ppo_advantages, ppo_minibatch_loss
from rlhf_jax.train.state import (
    accumulate_gradients,
    guarded_apply,
    learning_rate_from_state,
    model_context_length,
    tree_all_finite,
)

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

    whiten_rewards: bool = hyper(False, "whiten the shaped rewards without shifting the mean (OpenAI)")
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
    """GAE and advantage whitening."""

    gamma: float = hyper(1.0, "GAE discount, in [0, 1]")
    lam: float = hyper(0.95, "GAE lambda, in [0, 1]")
    gae_method: Literal["auto", "scan", "associative"] = hyper("auto", "GAE implementation: auto, scan or associative")
    whiten_advantages: bool = hyper(True, "whiten the advantages over valid tokens")

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


@struct.dataclass
class PPOState:
    """Everything a PPO run carries between iterations (a pytree: checkpoint it whole).

    Attributes:
      params: policy params (with the value head when the trunk is shared).
      opt_state: optimizer state for `params`.
      value_params: separate value network params, or None (shared trunk).
      value_opt_state: its optimizer state, or None.
      kl_ctl: `KLControllerState` (current coefficient; adaptive or fixed).
      step: int32 scalar, iterations done.
      rng: PRNG key; each iteration splits it into rollout / update keys.
    """

    params: Any
    opt_state: Any
    value_params: Any
    value_opt_state: Any
    kl_ctl: Any
    step: jax.Array
    rng: jax.Array


_SAMPLING = ("policy", "max_new_tokens", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id")


def _rollout(params, prompt_ids, prompt_mask, key, *, policy, max_new_tokens, temperature, top_k, top_p,
             eos_token_id, pad_token_id):
    """Sample one response per prompt (the policy and the sampling settings are static)."""
    from rlhf_jax.rollout import generate  # imported late: the update does not need the sampler

    return generate(
        policy, params, prompt_ids, prompt_mask, key,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )


# One jitted sampler for every trainer: equal policies (an `LM` hashes by value) and equal
# settings share its compilation.
_rollout_jit = jax.jit(_rollout, static_argnames=_SAMPLING)


def _kl_coef_of(ctl):
    return jnp.asarray(ctl.kl_coef, jnp.float32)


class PPOTrainer:
    """PPO-RLHF trainer: `init` builds a `PPOState`, `iteration` runs one PPO iteration.

    Args:
      policy: the policy `LM` ("lm" head with a separate `value_model`, or "lm+value"
        for a value head on the shared trunk).
      cfg: `PPOConfig`.
      tx: the policy optimizer (e.g. `optimizer_from_config(cfg.optimizer)`).
      value_model: a scalar-head `LM` used as a separate value network (may be
        initialised from the reward model, as in the N+ paper), or None to use the
        policy's own value head (one loss: policy + vf_coef * value).
      value_tx: the value network's optimizer (default: `tx`).
      reward_model: a scalar-head `LM` whose `scores` on [prompt | response] is the
        reward (its params are passed to `iteration`).
      reward_fn: host function `(prompt_ids, prompt_mask, response_tokens, response_mask,
        prompt_index) -> np.ndarray [B]`, used instead of a reward model.

    A non-finite score skips the update: params, optimizer states and the KL
    controller are left unchanged, the rng still advances (the same way as in a normal
    iteration, so a run stays deterministic), and `metrics["skipped_nonfinite"]` is 1.
    Non-finite gradients likewise skip their minibatch's update.
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
    ):
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("give exactly one of `reward_model` and `reward_fn`")
        head = getattr(policy, "head", None)
        if value_model is None and head is not None and head != "lm+value":
            raise ValueError(
                f"`value_model` is None, so the policy must have head='lm+value' (a value head "
                f"on the shared trunk); got head={head!r}"
            )
        self.policy = policy
        self.cfg = cfg
        self.tx = tx
        self.value_model = value_model
        self.value_tx = value_tx if value_tx is not None else tx
        self.reward_model = reward_model
        self.reward_fn = reward_fn
        sampling = cfg.sampling
        self._sampling = dict(
            policy=policy, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p, eos_token_id=sampling.eos_token_id,
            pad_token_id=sampling.pad_token_id or 0,  # PAD None: 0 in library use
        )
        self._score_jit = jax.jit(self._score) if reward_model is not None else None
        self._update_jit = jax.jit(self._update)

    # -- state ------------------------------------------------------------------------

    def init(self, policy_params, value_params=None, *, seed: int = 0) -> PPOState:
        """A fresh `PPOState` (optimizer states, KL controller at `cfg.kl.kl_coef`, step 0).

        Args:
          policy_params: the policy's params (SFT weights; also the reference's).
          value_params: the separate value network's params (required when the trainer
            has a `value_model`; e.g. the reward model's params, N+), else None.
          seed: PRNG seed (the driver passes `RunOptions.seed`).
        """
        if self.value_model is not None and value_params is None:
            raise ValueError("the trainer has a `value_model`, so `value_params` is required")
        if self.value_model is None and value_params is not None:
            raise ValueError("`value_params` given but the trainer has no `value_model` (shared trunk)")
        return PPOState(
            params=policy_params,
            opt_state=self.tx.init(policy_params),
            value_params=value_params,
            value_opt_state=None if value_params is None else self.value_tx.init(value_params),
            kl_ctl=kl_controller_init(self.cfg.kl.kl_coef, target=self.cfg.kl.kl_target,
                                      horizon=self.cfg.kl.kl_horizon),
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key(seed),
        )

    # -- phases -----------------------------------------------------------------------

    def _score(self, reward_params, prompt_ids, prompt_mask, tokens, response_mask):
        ids = jnp.concatenate([prompt_ids, tokens], axis=1)
        mask = jnp.concatenate([jnp.asarray(prompt_mask, jnp.int32), jnp.asarray(response_mask, jnp.int32)], axis=1)
        return jnp.asarray(self.reward_model.scores(reward_params, ids, mask), jnp.float32)

    def _forward(self, params, value_params, input_ids, attention_mask, *, with_entropy):
        """Response log-probs (temperature-scaled), entropies and values `[B, N]`."""
        n = self.cfg.sampling.max_new_tokens
        p = jnp.shape(input_ids)[1] - n
        temperature = self.cfg.sampling.temperature
        # The value of response token t is that of the state before it (column P-1+t),
        # the same column whose logits predict the token.
        if self.value_model is None:
            # Shared trunk: one forward gives both heads.
            hidden, _ = self.policy.hidden_states(params, input_ids, attention_mask)
            hidden = hidden[:, p - 1 : p + n - 1]
            logits = self.policy.lm_head(params, hidden)
            targets = input_ids[:, p:]
            logprobs = ops.token_logprobs(logits, targets, temperature=temperature)
            entropy = ops.token_entropy(logits, temperature=temperature) if with_entropy else None
            values = self.policy.value_head(params, hidden)
        else:
            out = self.policy.response_logprobs(
                params, input_ids, attention_mask, n, temperature=temperature, with_entropy=with_entropy
            )
            logprobs, entropy = out if with_entropy else (out, None)
            full = self.value_model.values(value_params, input_ids, attention_mask)
            values = full[:, p - 1 : p + n - 1]
        return logprobs, entropy, jnp.asarray(values, jnp.float32)

    def _update(self, state: PPOState, prompt_ids, prompt_mask, rollout, scores, ref_params, key):
        cfg = self.cfg
        b = jnp.shape(prompt_ids)[0]
        mask = jnp.asarray(rollout.mask, jnp.float32)
        input_ids = jnp.concatenate([prompt_ids, rollout.tokens], axis=1)
        attention_mask = jnp.concatenate(
            [jnp.asarray(prompt_mask, jnp.int32), jnp.asarray(rollout.mask > 0, jnp.int32)], axis=1
        )
        scores = jnp.asarray(scores, jnp.float32)
        scores_finite = jnp.all(jnp.isfinite(scores))
        safe_scores = jnp.where(jnp.isfinite(scores), scores, 0.0)

        n = cfg.sampling.max_new_tokens
        ref_logprobs = self.policy.response_logprobs(
            ref_params, input_ids, attention_mask, n, temperature=cfg.sampling.temperature
        )
        old_logprobs, old_entropy, old_values = self._forward(
            state.params, state.value_params, input_ids, attention_mask, with_entropy=True
        )
        old_logprobs = jax.lax.stop_gradient(old_logprobs)
        kl_coef = _kl_coef_of(state.kl_ctl)
        adv = ppo_advantages(
            safe_scores, old_logprobs, ref_logprobs, old_values, mask,
            kl_coef=kl_coef, cfg=cfg, eos_mask=rollout.ended_with_eos,
        )
        data = PPOBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=mask,
            old_logprobs=old_logprobs,
            old_values=old_values,
            advantages=adv["advantages"],
            returns=adv["returns"],
        )

        shared = self.value_model is None

        def loss_fn(all_params, micro: PPOBatch):
            params, value_params = all_params
            logprobs, entropy, values = self._forward(
                params, value_params, micro.input_ids, micro.attention_mask, with_entropy=True
            )
            loss, aux = ppo_minibatch_loss(logprobs, values, entropy, micro, cfg=cfg)
            return loss, (aux, loss_weight(micro.response_mask, cfg.loss.loss_agg))

        def minibatch(carry, idx):
            params, opt_state, value_params, value_opt_state = carry
            micro = jax.tree.map(lambda x: x[idx], data)  # [A, micro, ...]
            loss, grads, aux, _ = accumulate_gradients(
                loss_fn, (params, value_params), micro, num_micro=cfg.batch.grad_accum_steps
            )
            g_policy, g_value = grads
            ok = scores_finite & tree_all_finite(g_policy) & tree_all_finite(g_value)
            params, opt_state, _ = guarded_apply(self.tx, g_policy, opt_state, params, ok=ok)
            if not shared:
                value_params, value_opt_state, _ = guarded_apply(
                    self.value_tx, g_value, value_opt_state, value_params, ok=ok
                )
            aux = dict(aux)
            aux["loss"] = loss
            aux["grad_norm"] = optax.global_norm(g_policy)
            if not shared:
                aux["value_grad_norm"] = optax.global_norm(g_value)
            aux["skipped_minibatch"] = 1.0 - ok.astype(jnp.float32)
            return (params, opt_state, value_params, value_opt_state), aux

        def epoch(carry, epoch_key):
            perm = jax.random.permutation(epoch_key, b)
            idx = perm.reshape(cfg.batch.num_minibatches, cfg.batch.grad_accum_steps, cfg.batch.micro_batch_size)
            return jax.lax.scan(minibatch, carry, idx)

        carry = (state.params, state.opt_state, state.value_params, state.value_opt_state)
        carry, mb_aux = jax.lax.scan(epoch, carry, jax.random.split(key, cfg.batch.ppo_epochs))
        params, opt_state, value_params, value_opt_state = carry

        # KL controller: measured mean per-sequence KL (configured estimator), n_steps = batch.
        kl_per_seq = jnp.sum(adv["kl"] * mask, axis=1)
        new_ctl = kl_controller_update(state.kl_ctl, jnp.mean(kl_per_seq), b)
        kl_ctl = jax.tree.map(lambda nw, old: jnp.where(scores_finite, nw, old), new_ctl, state.kl_ctl)

        k1 = kl_penalty(old_logprobs, ref_logprobs, estimator="k1")
        k3 = kl_penalty(old_logprobs, ref_logprobs, estimator="k3")
        finite_scores = jnp.where(jnp.isfinite(scores), scores, 0.0)
        n_finite = jnp.maximum(jnp.sum(jnp.isfinite(scores)), 1)
        score_mean = jnp.sum(finite_scores) / n_finite
        score_var = jnp.sum(jnp.where(jnp.isfinite(scores), (scores - score_mean) ** 2, 0.0)) / n_finite
        metrics = {
            "score_mean": score_mean,
            "score_std": jnp.sqrt(score_var),
            "kl_k1": jnp.mean(jnp.sum(k1 * mask, axis=1)),
            "kl_k3": jnp.mean(jnp.sum(k3 * mask, axis=1)),
            "kl_coef": kl_coef,
            "non_score_reward": jnp.mean(-kl_coef * kl_per_seq),
            "entropy_rollout": ops.masked_mean(old_entropy, mask),
            "logprob_sampling_diff": ops.masked_mean(jnp.abs(old_logprobs - rollout.logprobs), mask),
            "response_length": jnp.mean(jnp.sum(mask, axis=1)),
            "eos_fraction": jnp.mean(jnp.asarray(rollout.ended_with_eos, jnp.float32)),
            "returns_mean": ops.masked_mean(adv["returns"], mask),
            "advantages_mean": ops.masked_mean(adv["raw_advantages"], mask),
            "advantages_std": jnp.sqrt(ops.masked_var(adv["raw_advantages"], mask)),
            "values_mean": ops.masked_mean(old_values, mask),
            "skipped_nonfinite": 1.0 - scores_finite.astype(jnp.float32),
        }
        for name, value in mb_aux.items():
            metrics[name] = jnp.max(value) if name.endswith("_max") else jnp.mean(value)
        lr = learning_rate_from_state(opt_state)
        if lr is not None:
            metrics["learning_rate"] = lr
        new_state = state.replace(
            params=params,
            opt_state=opt_state,
            value_params=value_params,
            value_opt_state=value_opt_state,
            kl_ctl=kl_ctl,
            step=state.step + 1,
        )
        return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

    # -- public -----------------------------------------------------------------------

    def check_prompts(self, prompt_ids, prompt_mask) -> None:
        """Raise `ValueError` for a prompt batch this trainer cannot run."""
        ops.check_rank(prompt_ids, 2, "prompt_ids")
        ops.check_same_shape(prompt_ids, "prompt_ids", prompt_mask=prompt_mask)
        b, p = np.shape(prompt_ids)
        cfg = self.cfg
        if b == 0:
            raise ValueError("the prompt batch is empty (`prompt_ids` has no rows)")
        if b != cfg.batch.batch_size:
            raise ValueError(
                f"`prompt_ids` has {b} rows but `batch_size` is {cfg.batch.batch_size}; pass exactly "
                "`batch_size` prompts per iteration"
            )
        if p == 0:
            raise ValueError("`prompt_ids` has no columns: prompts need at least one token")
        ctx = model_context_length(self.policy)
        if ctx is not None and p + cfg.sampling.max_new_tokens > ctx:
            raise ValueError(
                f"prompt length {p} + `max_new_tokens` {cfg.sampling.max_new_tokens} = "
                f"{p + cfg.sampling.max_new_tokens} exceeds the model's context length {ctx}"
            )
        if hasattr(self.policy, "check_inputs"):  # token ids inside the vocabulary, 0/1 mask
            self.policy.check_inputs(np.asarray(prompt_ids), np.asarray(prompt_mask))

    def score(self, reward_params, prompt_ids, prompt_mask, rollout, prompt_index=None):
        """The score phase alone: the reward model's scores or the host `reward_fn`'s, `[B]` float32."""
        if self.reward_model is not None:
            return self._score_jit(reward_params, prompt_ids, prompt_mask, rollout.tokens, rollout.mask)
        host = jax.device_get((prompt_ids, prompt_mask, rollout.tokens, rollout.mask))
        scores = np.asarray(self.reward_fn(*host, prompt_index), np.float32)
        if scores.shape != (self.cfg.batch.batch_size,):
            raise ValueError(f"`reward_fn` must return shape ({self.cfg.batch.batch_size},), got {scores.shape}")
        return jnp.asarray(scores)

    def iteration(
        self,
        state: PPOState,
        prompt_ids,
        prompt_mask,
        *,
        ref_params,
        reward_params=None,
        prompt_index=None,
    ):
        """Run one PPO iteration: rollout, score, update.

        Args:
          state: `PPOState`.
          prompt_ids: `[batch_size, P]` int32, left-padded prompts.
          prompt_mask: `[batch_size, P]` 1 for real prompt tokens.
          ref_params: frozen reference policy params (never trained, no optimizer state).
          reward_params: the reward model's params (when the trainer has a reward model).
          prompt_index: `[batch_size]` data-set row indices, passed to `reward_fn`.

        Returns:
          `(state, metrics, rollout)`: the new state; a dict of float32 scalars (device
          arrays, plus host floats `time/rollout`, `time/score`, `time/update`,
          `time/iteration`, `tokens_per_s` = batch * (P + N) / iteration time, and
          `generated_tokens_per_s` = valid response tokens / rollout time); the `Rollout`.
        """
        self.check_prompts(prompt_ids, prompt_mask)
        if self.reward_model is not None and reward_params is None:
            raise ValueError("the trainer scores with a reward model: pass `reward_params`")
        if ref_params is None:
            raise ValueError("`ref_params` (the frozen reference policy) is required")
        prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
        prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
        rng, rollout_key, update_key = jax.random.split(state.rng, 3)
        state = state.replace(rng=rng)

        t0 = time.perf_counter()
        rollout = _rollout_jit(state.params, prompt_ids, prompt_mask, rollout_key, **self._sampling)
        jax.block_until_ready(rollout)
        t1 = time.perf_counter()
        scores = self.score(reward_params, prompt_ids, prompt_mask, rollout, prompt_index)
        jax.block_until_ready(scores)
        t2 = time.perf_counter()
        state, metrics = self._update_jit(state, prompt_ids, prompt_mask, rollout, scores, ref_params, update_key)
        jax.block_until_ready(metrics)
        t3 = time.perf_counter()
        metrics = dict(metrics)
        total = t3 - t0
        p = prompt_ids.shape[1]
        metrics["time/rollout"] = t1 - t0
        metrics["time/score"] = t2 - t1
        metrics["time/update"] = t3 - t2
        metrics["time/iteration"] = total
        metrics["tokens_per_s"] = self.cfg.batch.batch_size * (p + self.cfg.sampling.max_new_tokens) / max(total, 1e-9)
        metrics["generated_tokens_per_s"] = metrics["response_length"] * self.cfg.batch.batch_size / max(t1 - t0, 1e-9)
        return state, metrics, rollout
