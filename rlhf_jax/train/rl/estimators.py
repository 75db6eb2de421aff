"""Advantage estimators: pure functions `(batch, cfg) -> dict`, picked by name from `ESTIMATORS`.

`batch` is a plain dict of arrays of one iteration (all rows, before any micro-batch split,
since every estimator normalises over the whole batch):

- "scores" `[B]` float32: the shaped sequence scores (`shape_scores`), finite (the trainer
  fills non-finite rows, see `fill_nonfinite`);
- "logprobs" `[B, N]`: old-policy log-probs of the sampled tokens;
- "ref_logprobs" `[B, N]` or None (no reference forward when the KL placement is "none");
- "values" `[B, N]` or None (critic values; "gae" only);
- "mask" `[B, N]`: 1 on the response tokens that enter the loss;
- "kl_coef": scalar, the KL controller's current coefficient.

`cfg` is an `RLConfig`. Each estimator returns {"advantages", "raw_advantages", "returns",
"kl"}, all `[B, N]` float32 and 0 off the mask ("returns" is the value target, zeros
without a critic; "kl" the per-token KL estimate of `cfg.kl.kl_estimator`, zeros without a
reference). With `cfg.kl.placement == "in_reward"` the KL enters the reward: `-kl_coef *
kl_t` per token (gae, reinforce_pp*) or `-kl_coef * sum_t kl_t` on the sequence score
(grpo, dr_grpo, rloo, as TRL's RLOO does).

Rows of a group are `group_size` consecutive rows.
"""
from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.core import ops
from rlhf_jax.core.advantages import gae as gae_fn
from rlhf_jax.core.advantages import group_advantages, reinforce_pp_advantages, rloo_advantages
from rlhf_jax.core.kl import kl_penalty
from rlhf_jax.core.shaping import shaped_rewards

__all__ = ["ESTIMATORS", "shape_scores", "fill_nonfinite", "token_kl",
           "gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]


def shape_scores(scores, mask, eos_mask, cfg):
    """Scores after clipping, the missing-EOS penalty and DAPO's soft overlong penalty.

    Order: clip to `[-reward_clip, reward_clip]`; minus `missing_eos_penalty` where the
    response did not end with EOS; minus the soft overlong penalty (DAPO, arXiv 2503.14476,
    eq. 13): with `L` = `overlong_buffer`, `N` = `max_new_tokens` and `|y|` the response
    length, `penalty = overlong_penalty * clip((|y| - (N - L)) / L, 0, 1)` (0 up to `N - L`
    tokens, rising linearly to `overlong_penalty` at `N`).
    """
    r = cfg.rewards
    s = jnp.asarray(scores, jnp.float32)
    if r.reward_clip is not None:
        s = jnp.clip(s, -r.reward_clip, r.reward_clip)
    if r.missing_eos_penalty is not None:
        s = jnp.where(jnp.asarray(eos_mask, bool), s, s - r.missing_eos_penalty)
    if r.overlong_buffer > 0:
        n, buf = cfg.sampling.max_new_tokens, r.overlong_buffer
        length = jnp.sum(jnp.asarray(mask, jnp.float32), axis=1)
        s = s - r.overlong_penalty * jnp.clip((length - (n - buf)) / buf, 0.0, 1.0)
    return s


def fill_nonfinite(scores, finite, group_size: int):
    """Scores with each non-finite entry replaced by the mean of its group's finite ones (0 if none).

    The filled rows are masked out of the loss by the trainer; filling with the group mean
    keeps them from moving the group's centring (their centred score is 0).
    """
    s = jnp.where(finite, scores, 0.0)
    g = s.reshape(-1, group_size)
    f = finite.reshape(-1, group_size).astype(jnp.float32)
    mean = jnp.sum(g, axis=1, keepdims=True) / jnp.maximum(jnp.sum(f, axis=1, keepdims=True), 1.0)
    return jnp.where(f > 0, g, mean).reshape(-1)


def token_kl(batch, cfg):
    """Per-token KL estimate `[B, N]` (0 off the mask; zeros without a reference)."""
    mask = batch["mask"]
    if batch.get("ref_logprobs") is None:
        return jnp.zeros_like(jnp.asarray(mask, jnp.float32))
    kl = kl_penalty(batch["logprobs"], batch["ref_logprobs"], estimator=cfg.kl.kl_estimator)
    return jnp.where(jnp.asarray(mask) > 0, kl, 0.0)


def _reward_kl_coef(batch, cfg):
    return batch["kl_coef"] if cfg.kl.placement == "in_reward" else jnp.zeros((), jnp.float32)


def _token_rewards(batch, cfg):
    """KL-shaped per-token rewards (the score on the last valid token) and the KL."""
    kl = token_kl(batch, cfg)
    ref = batch["ref_logprobs"] if batch.get("ref_logprobs") is not None else batch["logprobs"]
    rewards, _ = shaped_rewards(batch["scores"], batch["logprobs"], ref, batch["mask"],
                                kl_coef=_reward_kl_coef(batch, cfg), estimator=cfg.kl.kl_estimator)
    return rewards, kl


def _sequence_result(seq_adv, kl, batch):
    mask = jnp.asarray(batch["mask"], jnp.float32)
    adv = seq_adv[:, None] * mask
    return {"advantages": adv, "raw_advantages": adv, "returns": jnp.zeros_like(mask), "kl": kl}


def _kl_shaped_scores(batch, cfg):
    kl = token_kl(batch, cfg)
    s = batch["scores"] - _reward_kl_coef(batch, cfg) * jnp.sum(kl, axis=1)
    return s, kl


def gae(batch, cfg):
    """PPO's estimator: KL-shaped token rewards, optional reward whitening, GAE with the critic's
    values (gamma, lam), advantages optionally whitened over valid tokens (Schulman et al. 2015,
    arXiv 1506.02438; Ziegler et al. 2019, arXiv 1909.08593)."""
    a = cfg.advantages
    mask = batch["mask"]
    rewards, kl = _token_rewards(batch, cfg)
    if a.whiten_rewards:
        rewards = ops.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae_fn(rewards, batch["values"], mask, gamma=a.gamma, lam=a.lam, method=a.gae_method)
    raw = advantages
    if a.whiten_advantages:
        advantages = ops.masked_whiten(advantages, mask)
    return {"advantages": advantages, "raw_advantages": raw, "returns": returns, "kl": kl}


def grpo(batch, cfg):
    """GRPO: `(s_i - mean_group s) / (std + eps)`, broadcast over the tokens (arXiv 2402.03300)."""
    s, kl = _kl_shaped_scores(batch, cfg)
    adv = group_advantages(s, group_size=cfg.batch.group_size, scale=cfg.advantages.grpo_scale,
                           eps=cfg.advantages.eps)
    return _sequence_result(adv, kl, batch)


def dr_grpo(batch, cfg):
    """Dr. GRPO: `s_i - mean_group s`, no std division (arXiv 2503.20783)."""
    s, kl = _kl_shaped_scores(batch, cfg)
    return _sequence_result(group_advantages(s, group_size=cfg.batch.group_size, scale="none"), kl, batch)


def rloo(batch, cfg):
    """RLOO: `s_i - mean_{j != i} s_j` (arXiv 2402.14740)."""
    s, kl = _kl_shaped_scores(batch, cfg)
    return _sequence_result(rloo_advantages(s, group_size=cfg.batch.group_size), kl, batch)


def _reinforce(batch, cfg, baseline):
    rewards, kl = _token_rewards(batch, cfg)
    kwargs = {}
    if baseline is not None:
        kwargs = dict(scores=batch["scores"], group_size=cfg.batch.group_size)
    adv = reinforce_pp_advantages(rewards, batch["mask"], gamma=cfg.advantages.gamma, baseline=baseline, **kwargs)
    mask = jnp.asarray(batch["mask"], jnp.float32)
    return {"advantages": adv, "raw_advantages": adv, "returns": jnp.zeros_like(mask), "kl": kl}


def reinforce_pp(batch, cfg):
    """REINFORCE++: whitened returns-to-go of the KL-shaped token rewards (arXiv 2501.03262)."""
    return _reinforce(batch, cfg, None)


def reinforce_pp_baseline(batch, cfg):
    """REINFORCE++-baseline: the group mean score subtracted before the returns (arXiv 2501.03262)."""
    return _reinforce(batch, cfg, "group")


ESTIMATORS = {
    "gae": gae,
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
    "reinforce_pp_baseline": reinforce_pp_baseline,
}
