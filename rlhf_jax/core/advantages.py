"""Advantage estimators: GAE (with a critic) and the critic-free ones.

- `gae`: generalised advantage estimation over masked, right-padded sequences. Two exact
  implementations of the same recursion: a `lax.scan` backwards in time (fastest on CPU)
  and a `lax.associative_scan` (log-depth, fastest on GPU/TPU); `method="auto"` picks by
  backend at trace time.
- `group_advantages` (GRPO, Dr. GRPO) and `rloo_advantages`: one scalar per sequence from
  the scores of its group. A group is `group_size` consecutive rows: prompt i's samples are
  rows `i*G .. i*G + G - 1`.
- `returns_to_go` and `reinforce_pp_advantages` (REINFORCE++ and its group-baseline variant):
  per-token discounted returns of shaped rewards, whitened over the batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.core.ops import as_float, check_rank, check_same_shape, last_valid_index, masked_whiten

__all__ = [
    "GAE_METHODS",
    "GROUP_SCALES",
    "REINFORCE_PP_BASELINES",
    "gae",
    "group_advantages",
    "reinforce_pp_advantages",
    "returns_to_go",
    "rloo_advantages",
]

GAE_METHODS = ("auto", "scan", "associative")
GROUP_SCALES = ("group", "batch", "none")
REINFORCE_PP_BASELINES = (None, "group")


def _gae_scan(deltas, discounts):
    """A_t = delta_t + c_t * A_{t+1}, A_T = 0, as a reverse scan over time ([B, T] in)."""

    def step(next_adv, inputs):
        delta, c = inputs
        adv = delta + c * next_adv
        return adv, adv

    init = jnp.zeros(deltas.shape[:1], deltas.dtype)
    _, adv_t = jax.lax.scan(step, init, (deltas.T, discounts.T), reverse=True)
    return adv_t.T


def _gae_associative(deltas, discounts):
    """The same recursion as a parallel scan over affine maps x -> d + c x.

    Each time step is the affine map f_t(x) = delta_t + c_t x and A_t = f_t(f_{t+1}(...f_{T-1}(0))).
    Composition is associative: f_t after g = (c_t c_g, delta_t + c_t d_g).
    """

    def compose(later, earlier):
        # With reverse=True, jax combines the accumulated suffix (`later`, times > t)
        # with the element at t (`earlier`); the result is earlier o later.
        c_later, d_later = later
        c_earlier, d_earlier = earlier
        return c_earlier * c_later, d_earlier + c_earlier * d_later

    _, adv = jax.lax.associative_scan(compose, (discounts, deltas), reverse=True, axis=1)
    return adv


def _default_method() -> str:
    return "associative" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "scan"


def gae(rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95, method: str = "auto"):
    """Generalised advantage estimation with a response mask.

    With `m_t = mask[:, t]`, `m_T = 0`, `V_T = 0`:

        delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}

    `advantages = A * mask`, `returns = (A + V) * mask`. The episode ends after the last
    valid token (no bootstrap from padding). Rewards and values at padded positions are
    ignored (they may hold anything finite or not).

    Args:
      rewards: `[B, T]` per-token rewards (e.g. from `shaped_rewards`).
      values: `[B, T]` value estimates V(s_t).
      mask: `[B, T]` float or bool, ones then zeros.
      gamma: discount.
      lam: GAE lambda.
      method: `"scan"` (sequential `lax.scan`), `"associative"` (`lax.associative_scan`,
        log-depth) or `"auto"`: associative on GPU/TPU, scan on CPU (measured faster
        there, see benchmarks/RESULTS.md).

    Returns:
      `(advantages, returns)`, each `[B, T]` float32 (float64 under x64 inputs),
      zero at padded positions.

    References:
      Schulman et al. 2016 (GAE), arXiv 1506.02438; Ziegler et al. 2019, arXiv 1909.08593.

    >>> import jax.numpy as jnp
    >>> adv, ret = gae(jnp.array([[0.0, 1.0, 0.0]]), jnp.zeros((1, 3)),
    ...                jnp.array([[1.0, 1.0, 0.0]]), gamma=1.0, lam=1.0)
    >>> adv.tolist()
    [[1.0, 1.0, 0.0]]
    """
    check_rank(rewards, 2, "rewards")
    check_same_shape(rewards, "rewards", values=values, mask=mask)
    if method == "auto":
        method = _default_method()
    if method not in ("scan", "associative"):
        raise ValueError(f"`method` must be one of {GAE_METHODS}, got {method!r}")
    valid = jnp.asarray(mask) > 0
    r = jnp.where(valid, as_float(rewards), 0.0)
    v = jnp.where(valid, as_float(values), 0.0)
    dtype = jnp.promote_types(r.dtype, v.dtype)
    r, v = r.astype(dtype), v.astype(dtype)
    m = valid.astype(dtype)
    zero_col = jnp.zeros_like(v[:, :1])
    next_values = jnp.concatenate([v[:, 1:], zero_col], axis=1)
    next_mask = jnp.concatenate([m[:, 1:], zero_col], axis=1)
    deltas = r + gamma * next_mask * next_values - v
    discounts = (gamma * lam) * next_mask
    if method == "scan":
        adv = _gae_scan(deltas, discounts)
    else:
        adv = _gae_associative(deltas, discounts)
    advantages = adv * m
    returns = (adv + v) * m
    return advantages, returns


# ---------------------------------------------------------------------------
# Critic-free estimators.


def _grouped_scores(scores, group_size, name: str = "scores"):
    """`scores` `[B]` as float `[B // G, G]`, with clear errors for a bad group size."""
    check_rank(scores, 1, name)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"`group_size` must be a positive int, got {group_size!r}")
    batch = jnp.shape(scores)[0]
    if batch % group_size:
        raise ValueError(
            f"`group_size` ({group_size}) must divide the number of rows of `{name}` ({batch})"
        )
    return as_float(scores).reshape(batch // group_size, group_size)


def _centred(grouped):
    """`s - mean_group(s)`, exactly 0 in a group whose scores are all equal.

    Without the guard, `sum(s) / G` may round away from the common value and leave
    `~1e-8` residues that a division by `std + eps` would blow up to `~1e-2`.
    """
    mean = jnp.mean(grouped, axis=1, keepdims=True)
    constant = jnp.max(grouped, axis=1, keepdims=True) == jnp.min(grouped, axis=1, keepdims=True)
    return jnp.where(constant, 0.0, grouped - mean)


def group_advantages(scores, *, group_size: int, scale: str = "group", eps: float = 1e-6):
    """GRPO's group-relative advantage of each sequence (and Dr. GRPO's unscaled one).

    With `s_i` the score of sample i of a group of `G` samples of one prompt:

        A_i = (s_i - mean_group(s)) / (std + eps)

    where `std` is, by `scale`: `"group"` the group's standard deviation (GRPO), `"batch"`
    the standard deviation of all `B` scores of the batch (TRL's `scale_rewards="batch"`),
    `"none"` no division at all, `A_i = s_i - mean_group(s)` (Dr. GRPO).

    The std is the unbiased one (divides by `n - 1`; `n = G` or `B`), as `torch.std` in TRL's
    GRPOTrainer and veRL, so that advantages match those trainers number for number (the
    biased one would make them `sqrt(G / (G - 1))` larger, 7% at G = 8) and as `masked_var`
    does here. With `n = 1` the std is taken as 0. A group whose scores are all equal gets
    advantage exactly 0 (no learning signal; DAPO's dynamic sampling drops such groups).
    The advantage is one number per sequence: broadcast it over the response tokens
    (`A[:, None] * mask`).

    Normalisation: the statistics are over the whole batch of groups, so compute the
    advantages once per batch (before splitting into micro-batches); the policy loss then
    aggregates them as in `ppo_policy_loss` (GRPO: `agg="seq-mean-token-mean"`; Dr. GRPO:
    `agg="seq-mean-token-sum-norm"` with a fixed `norm_constant`).

    Args:
      scores: `[B]` sequence scores (reward model or verifier), `B = num_prompts * G`,
        rows of one prompt consecutive.
      group_size: `G`, samples per prompt; must divide `B`.
      scale: `"group"`, `"batch"` or `"none"`.
      eps: added to the std (ignored with `"none"`).

    Returns:
      `[B]` float32 advantages.

    References:
      Shao et al. 2024 (DeepSeekMath, GRPO), arXiv 2402.03300; Liu et al. 2025
      (Dr. GRPO), arXiv 2503.20783.

    >>> group_advantages(jnp.array([1.0, 0.0, 2.0, 2.0]), group_size=2, scale="none").tolist()
    [0.5, -0.5, 0.0, 0.0]
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"`scale` must be one of {GROUP_SCALES}, got {scale!r}")
    grouped = _grouped_scores(scores, group_size)
    centred = _centred(grouped)
    batch = jnp.shape(scores)[0]
    if scale == "none":
        return centred.reshape(batch)
    if scale == "group":
        sq = jnp.sum(jnp.square(centred), axis=1, keepdims=True)
        std = jnp.sqrt(sq / max(group_size - 1, 1))
    else:
        flat = grouped.reshape(batch)
        sq = jnp.sum(jnp.square(flat - jnp.mean(flat)))
        std = jnp.sqrt(sq / max(batch - 1, 1))
    return (centred / (std + eps)).reshape(batch)


def rloo_advantages(scores, *, group_size: int):
    """REINFORCE leave-one-out advantage: each score minus the mean of the others in its group.

    Equation: `A_i = s_i - (1 / (G - 1)) sum_{j != i} s_j = G / (G - 1) (s_i - mean_group(s))`,
    computed in the second form (no cancellation between two group sums); 0 exactly for
    a group whose scores are all equal. The baseline of sample i does not depend on
    sample i, so the estimator is unbiased. Broadcast over the response tokens.

    Normalisation: as `group_advantages` (compute once per batch, then aggregate the loss).

    Args:
      scores: `[B]` sequence scores, groups of `G` consecutive rows.
      group_size: `G >= 2` (a single sample has no others); must divide `B`.

    Returns:
      `[B]` float32 advantages.

    References:
      Ahmadian et al. 2024 (Back to Basics: RLOO), arXiv 2402.14740; Kool et al. 2019,
      "Buy 4 REINFORCE samples, get a baseline for free!".

    >>> rloo_advantages(jnp.array([1.0, 0.0, 2.0]), group_size=3).tolist()
    [0.0, -1.5, 1.5]
    """
    grouped = _grouped_scores(scores, group_size)
    if group_size < 2:
        raise ValueError(f"`group_size` must be >= 2 for leave-one-out, got {group_size}")
    centred = _centred(grouped)
    return (centred * (group_size / (group_size - 1))).reshape(jnp.shape(scores)[0])


def returns_to_go(rewards, mask, *, gamma: float = 1.0):
    """Discounted returns-to-go of per-token rewards, per row, inside the mask.

    Equation: `G_t = r_t + gamma * m_{t+1} * G_{t+1}`, `G_T = 0`, as a reverse `lax.scan`
    (GAE's recursion with no values and `lambda = 1`). Rewards at padded positions are
    ignored; the output is 0 there.

    Args:
      rewards: `[B, T]` per-token rewards (e.g. from `shaped_rewards`).
      mask: `[B, T]` float or bool, ones then zeros.
      gamma: discount.

    Returns:
      `[B, T]` float32 (float64 under x64 inputs).

    References:
      Williams 1992 (REINFORCE); Hu 2025 (REINFORCE++), arXiv 2501.03262.
    """
    check_rank(rewards, 2, "rewards")
    check_same_shape(rewards, "rewards", mask=mask)
    valid = jnp.asarray(mask) > 0
    r = jnp.where(valid, as_float(rewards), 0.0)
    m = valid.astype(r.dtype)
    next_mask = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
    return _gae_scan(r, gamma * next_mask) * m


def reinforce_pp_advantages(
    rewards,
    mask,
    *,
    gamma: float = 1.0,
    baseline=None,
    scores=None,
    group_size=None,
    eps: float = 1e-8,
):
    """REINFORCE++ advantages: whitened returns-to-go of KL-shaped token rewards.

    With `r_bt` the shaped rewards (the score on the last valid token, `-kl_coef * kl`
    on every token, as `shaped_rewards` builds them):

        baseline=None:     G_bt = returns_to_go(r)_bt
        baseline="group":  G_bt = returns_to_go(r - [t = last_b] * mean_group(s))_bt
        A = masked_whiten(G, mask)   (mean and unbiased std over all valid tokens of the batch)

    The group baseline is subtracted from the score where it was placed, so it is
    discounted like the score (`gamma^(last_b - t)`); it is the REINFORCE++-baseline variant
    (OpenRLHF's `reinforce_baseline`, which subtracts the group mean from the reward before
    shaping). `scores` must be the very scores that `rewards` carries on the last valid
    token (after any clipping or missing-EOS penalty). OpenRLHF whitens with the biased
    std (divides by n); ours divides by n - 1 (a factor `sqrt(n / (n - 1))`, negligible at
    batch scale).

    Normalisation: the whitening statistics are over the whole batch, so compute the
    advantages once per batch, before splitting it into micro-batches; the policy loss then
    aggregates (token-mean in REINFORCE++).

    Args:
      rewards: `[B, T]` KL-shaped per-token rewards.
      mask: `[B, T]` float or bool, ones then zeros.
      gamma: discount of the returns.
      baseline: None or `"group"`.
      scores: `[B]` sequence scores; required with, and only with, `baseline="group"`.
      group_size: `G`; required with, and only with, `baseline="group"`; must divide `B`.
      eps: added to the variance when whitening.

    Returns:
      `[B, T]` float32 advantages, 0 at padded positions; finite when everything is
      padding or all returns are equal.

    References:
      Hu 2025 (REINFORCE++), arXiv 2501.03262; Ziegler et al. 2019, arXiv 1909.08593.
    """
    check_rank(rewards, 2, "rewards")
    check_same_shape(rewards, "rewards", mask=mask)
    if baseline not in REINFORCE_PP_BASELINES:
        raise ValueError(f"`baseline` must be one of {REINFORCE_PP_BASELINES}, got {baseline!r}")
    r = as_float(rewards)
    if baseline is None:
        if scores is not None or group_size is not None:
            raise ValueError("`scores` and `group_size` are only used with `baseline='group'`")
    else:
        if scores is None or group_size is None:
            raise ValueError("`baseline='group'` needs `scores` ([B]) and `group_size`")
        batch = jnp.shape(rewards)[0]
        if jnp.shape(scores) != (batch,):
            raise ValueError(f"`scores` must have shape ({batch},), got {jnp.shape(scores)}")
        grouped = _grouped_scores(scores, group_size)
        group_mean = jnp.broadcast_to(jnp.mean(grouped, axis=1, keepdims=True), grouped.shape).reshape(batch)
        positions = jnp.arange(jnp.shape(rewards)[1], dtype=jnp.int32)
        at_last = positions[None, :] == last_valid_index(mask)[:, None]
        r = r - jnp.where(at_last, group_mean[:, None].astype(r.dtype), 0.0)
    returns = returns_to_go(r, mask, gamma=gamma)
    return masked_whiten(returns, mask, eps=eps)
