"""Generalised advantage estimation over masked, right-padded sequences.

Two exact implementations of the same recursion: a `lax.scan` backwards in
time (fastest on CPU) and a `lax.associative_scan` (log-depth, fastest on
GPU/TPU). `method="auto"` picks by backend at trace time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.core.ops import as_float, check_rank, check_same_shape

__all__ = ["gae", "GAE_METHODS"]

GAE_METHODS = ("auto", "scan", "associative")


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
