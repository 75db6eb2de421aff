"""The per-batch math of one PPO iteration, free of models and sampling.

- `PPOBatch`: the aligned per-sequence arrays a minibatch reads.
- `ppo_advantages`: shaped rewards (KL penalty + score on the last valid token), optional
  reward whitening, GAE, advantage whitening.
- `ppo_minibatch_loss`: clipped policy loss + `vf_coef` x clipped value loss - entropy bonus.

Both are pure and jittable; `PPOTrainer` (train/ppo.py) wires them to the models, and the
TRL golden test calls them alone. `cfg` is a `PPOConfig` (any object with its fields).

References:
  Schulman et al. 2017, arXiv 1707.06347 (PPO); Schulman et al. 2015, arXiv 1506.02438
  (GAE); Ziegler et al. 2019, arXiv 1909.08593; Huang et al. 2024, arXiv 2403.17031.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.core import ops
from rlhf_jax.core.advantages import gae
from rlhf_jax.core.losses import aggregate, aggregation_weight, ppo_policy_loss, ppo_value_loss
from rlhf_jax.core.shaping import shaped_rewards

__all__ = ["PPOBatch", "ppo_advantages", "ppo_minibatch_loss", "loss_weight"]


class PPOBatch(NamedTuple):
    """The per-sequence arrays a PPO minibatch reads (all rows aligned).

    input_ids/attention_mask: `[B, P + N]` prompt | response; response_mask, old_logprobs,
    old_values, advantages, returns: `[B, N]`.
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    response_mask: jax.Array
    old_logprobs: jax.Array
    old_values: jax.Array
    advantages: jax.Array
    returns: jax.Array


def ppo_advantages(
    scores,
    logprobs,
    ref_logprobs,
    values,
    mask,
    *,
    kl_coef,
    cfg,
    eos_mask=None,
):
    """Shaped rewards, GAE and (optionally) whitened advantages of one PPO batch.

    rewards_t = -kl_coef * kl_t, plus the score (minus `missing_eos_penalty` when the
    response did not end with EOS; clipped to `reward_clip`) on the last valid token;
    rewards optionally whitened without a mean shift; then GAE with (gamma, lam), and
    advantages optionally whitened over valid tokens.

    Args:
      scores: `[B]` float.
      logprobs, ref_logprobs, values, mask: `[B, N]` over response tokens.
      kl_coef: scalar (may be traced: the controller's current value).
      cfg: `PPOConfig`.
      eos_mask: `[B]` bool, the response ended with EOS.

    Returns:
      dict with "rewards", "kl", "advantages" (whitened when configured),
      "raw_advantages", "returns", all `[B, N]` float32.
    """
    rewards, kl = shaped_rewards(
        scores,
        logprobs,
        ref_logprobs,
        mask,
        kl_coef=kl_coef,
        estimator=cfg.kl.kl_estimator,
        eos_mask=eos_mask,
        missing_eos_penalty=cfg.rewards.missing_eos_penalty,
        reward_clip=cfg.rewards.reward_clip,
    )
    if cfg.advantages.whiten_rewards:
        rewards = ops.masked_whiten(rewards, mask, shift_mean=False)
    gae_cfg = cfg.advantages
    advantages, returns = gae(rewards, values, mask, gamma=gae_cfg.gamma, lam=gae_cfg.lam, method=gae_cfg.gae_method)
    raw = advantages
    if cfg.advantages.whiten_advantages:
        advantages = ops.masked_whiten(advantages, mask)
    return {"rewards": rewards, "kl": kl, "advantages": advantages, "raw_advantages": raw, "returns": returns}


def loss_weight(mask, agg: str):
    """The normaliser of an aggregated loss, additive over rows (`aggregation_weight`):
    valid tokens for token-mean, non-empty rows for the seq-mean ones (as `aggregate`
    skips empty rows), all rows for seq-mean-token-sum-norm."""
    return aggregation_weight(mask, agg=agg)


def ppo_minibatch_loss(logprobs, values, entropy, batch: PPOBatch, *, cfg):
    """The PPO loss of one (micro-)batch given the new log-probs, values and entropies.

    loss = policy_loss + vf_coef * value_loss - entropy_coef * entropy, with the clipped
    surrogate (optionally dual-clipped) and the clipped value loss
    `0.5 * max((v - R)^2, (clip(v, v_old +- eps) - R)^2)`, all aggregated by
    `cfg.loss.loss_agg` over the valid response tokens.

    Args:
      logprobs, values, entropy: `[B, N]` from the current networks (entropy may be None).
      batch: the `PPOBatch` rows.
      cfg: `PPOConfig`.

    Returns:
      `(loss, aux)` with policy_loss, value_loss, entropy, clipfrac, approx_kl,
      ratio_mean, ratio_max, value_clipfrac.
    """
    mask = batch.response_mask
    pg_kwargs = dict(
        clip_eps=cfg.loss.clip_eps, agg=cfg.loss.loss_agg, norm_constant=cfg.loss.norm_constant,
        dual_clip=cfg.loss.dual_clip,
    )
    pg_loss, pg_aux = ppo_policy_loss(logprobs, batch.old_logprobs, batch.advantages, mask, **pg_kwargs)
    vf_loss, vf_aux = ppo_value_loss(
        values, batch.old_values, batch.returns, mask,
        clip_eps=cfg.loss.value_clip_eps, agg=cfg.loss.loss_agg, norm_constant=cfg.loss.norm_constant,
    )
    loss = pg_loss + cfg.loss.vf_coef * vf_loss
    if entropy is not None and cfg.loss.entropy_coef:
        ent = aggregate(entropy, mask, agg=cfg.loss.loss_agg, norm_constant=cfg.loss.norm_constant)
        loss = loss - cfg.loss.entropy_coef * ent
    elif entropy is not None:
        # Only a metric: no gradient through the softmax over the vocabulary.
        entropy = jax.lax.stop_gradient(entropy)
    aux = {
        "policy_loss": pg_loss,
        "value_loss": vf_loss,
        "entropy": ops.masked_mean(entropy, mask) if entropy is not None else jnp.zeros((), jnp.float32),
        "clipfrac": pg_aux["clipfrac"],
        "approx_kl": pg_aux["approx_kl"],
        "ratio_mean": pg_aux["ratio_mean"],
        "ratio_max": pg_aux["ratio_max"],
        "value_clipfrac": vf_aux["value_clipfrac"],
    }
    return loss, aux
