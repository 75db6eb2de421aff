"""Per-token RLHF rewards: a KL penalty on every token plus the score on the last one."""
from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.core.kl import kl_penalty
from rlhf_jax.core.ops import as_float, check_rank, check_same_shape, last_valid_index

__all__ = ["shaped_rewards"]


def shaped_rewards(
    scores,
    logprobs,
    ref_logprobs,
    mask,
    *,
    kl_coef,
    estimator: str = "k1",
    eos_mask=None,
    missing_eos_penalty=None,
    reward_clip=None,
):
    """KL-shaped per-token rewards of RLHF.

    Equation: `kl_bt = kl_penalty(logp, ref_logp)_bt * m_bt`,
    `rewards_bt = -kl_coef * kl_bt + [t = last valid index of row b] * s_b`, where the score
    `s_b` is first clipped to `[-reward_clip, reward_clip]` (when given) and then lowered by
    `missing_eos_penalty` for rows whose response never emitted EOS (TRL's semantics;
    OpenAI used a replacement score of -1 instead). A row with no valid token gets no score.

    Args:
      scores: `[B]` sequence-level scores (reward model or verifier).
      logprobs: `[B, T]` policy log-probs of the response tokens.
      ref_logprobs: `[B, T]` reference log-probs.
      mask: `[B, T]` float or bool, ones then zeros.
      kl_coef: KL coefficient (float or scalar array, e.g. `KLControllerState.kl_coef`).
      estimator: KL estimator, see `kl_penalty`.
      eos_mask: optional `[B]` bool, True where the response ended with EOS.
      missing_eos_penalty: optional float subtracted from the score of rows with
        `eos_mask` False (requires `eos_mask`).
      reward_clip: optional float c > 0; scores are clipped to `[-c, c]`.

    Returns:
      `(rewards, kl)`, both `[B, T]` float32, zero at padded positions; `kl` is the
      masked per-token estimate (before `-kl_coef`), for logging and controllers.

    References:
      Ziegler et al. 2019, arXiv 1909.08593; Ouyang et al. 2022, arXiv 2203.02155;
      Huang et al. 2024, arXiv 2403.17031.
    """
    check_rank(logprobs, 2, "logprobs")
    check_same_shape(logprobs, "logprobs", ref_logprobs=ref_logprobs, mask=mask)
    check_rank(scores, 1, "scores")
    batch = jnp.shape(logprobs)[0]
    if jnp.shape(scores) != (batch,):
        raise ValueError(f"`scores` must have shape ({batch},), got {jnp.shape(scores)}")
    if jnp.ndim(kl_coef) != 0:
        raise ValueError(f"`kl_coef` must be a scalar, got shape {jnp.shape(kl_coef)}")
    if missing_eos_penalty is not None and eos_mask is None:
        raise ValueError("`missing_eos_penalty` needs `eos_mask` (which rows ended with EOS)")
    if eos_mask is not None and jnp.shape(eos_mask) != (batch,):
        raise ValueError(f"`eos_mask` must have shape ({batch},), got {jnp.shape(eos_mask)}")
    if reward_clip is not None and isinstance(reward_clip, (int, float)) and reward_clip <= 0:
        raise ValueError(f"`reward_clip` must be > 0, got {reward_clip}")

    valid = jnp.asarray(mask) > 0
    kl = jnp.where(valid, kl_penalty(logprobs, ref_logprobs, estimator=estimator), 0.0)
    s = as_float(scores)
    if reward_clip is not None:
        s = jnp.clip(s, -reward_clip, reward_clip)
    if missing_eos_penalty is not None:
        s = jnp.where(jnp.asarray(eos_mask).astype(bool), s, s - missing_eos_penalty)
    last = last_valid_index(mask)
    positions = jnp.arange(jnp.shape(logprobs)[1], dtype=jnp.int32)
    at_last = positions[None, :] == last[:, None]  # all False for an empty row (last = -1)
    rewards = -jnp.asarray(kl_coef, kl.dtype) * kl + jnp.where(at_last, s[:, None], 0.0)
    return rewards, kl
