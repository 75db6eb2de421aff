"""The policy objective of the RL trainer: a pure function of log-probs, advantages and the batch.

    loss = policy_loss                          (clipped surrogate: clip_eps, clip_eps_high,
                                                 dual_clip, ratio token | sequence; TIS weights)
         + kl_coef * aggregate(kl(logp, ref))   (only with kl.placement == "in_loss")
         + vf_coef * value_loss                 (only with a critic)
         - entropy_coef * aggregate(entropy)

Every term is aggregated by `cfg.loss.loss_agg` over the same mask, so one normaliser
(`aggregation_weight(mask, agg=...)`) makes the micro-batch gradients add up to the
batch's (see `RLTrainer`).

TIS: with `w_bt = min(pi_train / pi_sampler, C)` (stop-gradient, >= 0) the per-token policy
loss `max(-A rho, -A clip(rho))` becomes `w * max(...) = max(-(wA) rho, -(wA) clip(rho))`, so
the weights are folded into the advantages that `ppo_policy_loss` reads.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.core import ops
from rlhf_jax.core.kl import kl_penalty
from rlhf_jax.core.losses import aggregate, aggregation_weight, ppo_policy_loss, ppo_value_loss

__all__ = ["RLBatch", "policy_objective", "loss_weight", "OBJECTIVES"]


class RLBatch(NamedTuple):
    """The aligned per-row arrays a minibatch reads.

    input_ids/attention_mask: `[B, P + N]`; response_mask (the loss mask), old_logprobs,
    old_values, advantages, returns, ref_logprobs, tis_weights: `[B, N]` (old_values and
    returns are zeros without a critic, ref_logprobs zeros unless the KL is in the loss,
    tis_weights ones without TIS).
    """

    input_ids: jax.Array
    attention_mask: jax.Array
    response_mask: jax.Array
    old_logprobs: jax.Array
    old_values: jax.Array
    advantages: jax.Array
    returns: jax.Array
    ref_logprobs: jax.Array
    tis_weights: jax.Array


def loss_weight(mask, cfg):
    """The normaliser of a micro-batch's loss (additive over rows; see `aggregation_weight`)."""
    return aggregation_weight(mask, agg=cfg.loss.loss_agg)


def policy_objective(logprobs, entropy, values, batch: RLBatch, *, cfg, kl_coef, critic: bool):
    """The loss of one (micro-)batch and its metrics.

    Args:
      logprobs, entropy: `[B, N]` from the current policy (entropy may be None).
      values: `[B, N]` from the critic, or None.
      batch: the `RLBatch` rows.
      cfg: `RLConfig`.
      kl_coef: the current KL coefficient (scalar, may be traced).
      critic: whether the value loss is part of the objective.

    Returns:
      `(loss, aux)` with policy_loss, value_loss, kl_loss, entropy, clipfrac, clipfrac_low,
      clipfrac_high, approx_kl, ratio_mean, ratio_max, value_clipfrac.
    """
    lc = cfg.loss
    mask = batch.response_mask
    agg = dict(agg=lc.loss_agg, norm_constant=lc.norm_constant)
    adv = batch.advantages * batch.tis_weights if lc.tis else batch.advantages
    pg_loss, pg_aux = ppo_policy_loss(
        logprobs, batch.old_logprobs, adv, mask,
        clip_eps=lc.clip_eps, clip_eps_high=lc.clip_eps_high, dual_clip=lc.dual_clip, ratio=lc.ratio, **agg,
    )
    loss = pg_loss
    zero = jnp.zeros((), jnp.float32)
    kl_loss = zero
    if cfg.kl.placement == "in_loss":
        valid = jnp.asarray(mask) > 0
        kl = jnp.where(valid, kl_penalty(logprobs, jnp.where(valid, batch.ref_logprobs, 0.0),
                                         estimator=cfg.kl.kl_estimator), 0.0)
        kl_loss = aggregate(kl, mask, **agg)
        loss = loss + kl_coef * kl_loss
    vf_loss, vf_clipfrac = zero, zero
    if critic:
        vf_loss, vf_aux = ppo_value_loss(values, batch.old_values, batch.returns, mask,
                                         clip_eps=lc.value_clip_eps, **agg)
        vf_clipfrac = vf_aux["value_clipfrac"]
        loss = loss + lc.vf_coef * vf_loss
    if entropy is not None and lc.entropy_coef:
        loss = loss - lc.entropy_coef * aggregate(entropy, mask, **agg)
    elif entropy is not None:
        entropy = jax.lax.stop_gradient(entropy)  # a metric only: no gradient through the softmax
    aux = {
        "policy_loss": pg_loss,
        "value_loss": vf_loss,
        "kl_loss": kl_loss,
        "entropy": ops.masked_mean(entropy, mask) if entropy is not None else zero,
        "clipfrac": pg_aux["clipfrac"],
        "clipfrac_low": pg_aux["clipfrac_low"],
        "clipfrac_high": pg_aux["clipfrac_high"],
        "approx_kl": pg_aux["approx_kl"],
        "ratio_mean": pg_aux["ratio_mean"],
        "ratio_max": pg_aux["ratio_max"],
        "value_clipfrac": vf_clipfrac,
    }
    return loss, aux


OBJECTIVES = {"clipped": policy_objective}
