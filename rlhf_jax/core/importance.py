"""Importance weights that correct for a sampler that is not exactly the trained policy.

A fast sampler (another kernel, another precision, vLLM) gives log-probs that differ a
little from the trainer's for the same tokens; the policy-gradient terms are then
re-weighted by truncated importance weights (TIS), detached from the graph.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rlhf_jax.core.ops import as_float, check_rank, check_same_shape, masked_sum

__all__ = ["TIS_LEVELS", "truncated_importance_weights"]

TIS_LEVELS = ("token", "sequence")


def truncated_importance_weights(train_logprobs, sampler_logprobs, mask, *, cap: float = 2.0, level: str = "token"):
    """Truncated importance weights `min(pi_train / pi_sampler, cap)`, stop-gradient.

    Equations, with `d_bt = train_logprobs_bt - sampler_logprobs_bt` on valid tokens:

    - `level="token"`:    `w_bt = min(exp(d_bt), cap)`;
    - `level="sequence"`: `w_bt = min(exp(sum_t m_bt d_bt), cap)`, the ratio of the whole
      sequence's probabilities (a product over its tokens), the same on every token of
      the row.

    Computed as `exp(min(d, log cap))`, so a large log-ratio never overflows. The weights
    multiply the per-token policy loss (`per_token * w`); they are constants for autodiff
    (`jax.lax.stop_gradient`) and 0 at padded positions.

    Args:
      train_logprobs: `[B, T]` log-probs of the sampled tokens under the trained policy
        (the "old" policy of the PPO step, computed by the trainer's forward).
      sampler_logprobs: `[B, T]` log-probs that the sampler reported for the same tokens.
      mask: `[B, T]` float or bool.
      cap: truncation constant `C > 0` (TIS uses 2; TRL's default cap is 3).
      level: `"token"` or `"sequence"`.

    Returns:
      `[B, T]` float32 weights in `[0, cap]`, 0 at padding.

    References:
      Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
      training" (TIS, blog note); Espeholt et al. 2018 (IMPALA, truncated importance
      sampling), arXiv 1802.01561.
    """
    check_rank(train_logprobs, 2, "train_logprobs")
    check_same_shape(train_logprobs, "train_logprobs", sampler_logprobs=sampler_logprobs, mask=mask)
    if level not in TIS_LEVELS:
        raise ValueError(f"`level` must be one of {TIS_LEVELS}, got {level!r}")
    if isinstance(cap, (int, float)) and not cap > 0:
        raise ValueError(f"`cap` must be > 0, got {cap}")
    valid = jnp.asarray(mask) > 0
    log_ratio = jnp.where(valid, as_float(train_logprobs) - as_float(sampler_logprobs), 0.0)
    if level == "sequence":
        seq = masked_sum(log_ratio, mask, axis=1).astype(log_ratio.dtype)
        log_ratio = jnp.broadcast_to(seq[:, None], log_ratio.shape)
    log_cap = math.log(cap) if isinstance(cap, (int, float)) else jnp.log(cap)
    weights = jnp.exp(jnp.minimum(log_ratio, log_cap))
    return jax.lax.stop_gradient(jnp.where(valid, weights, 0.0))
