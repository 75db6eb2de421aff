"""Masked reductions, token log-probabilities and shape checks.

The small building blocks that the rest of the array math (losses, GAE,
KL, rewards) is written in. Everything here is jittable and vmappable, works
on `[B, T]` arrays with an explicit right-padding `mask` (float or bool), and
never returns NaN for a fully masked input.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "as_float",
    "check_rank",
    "check_same_shape",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "token_logprobs",
    "token_entropy",
    "last_valid_index",
    "sequence_logprobs",
    "chunked_token_stats",
]


# ---------------------------------------------------------------------------
# Shape checks (run at trace time: shapes are static under jit).


def check_rank(x, rank: int | Sequence[int], name: str) -> None:
    """Raise `ValueError` naming `name` unless `x` has rank `rank` (or one of them)."""
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    ndim = jnp.ndim(x)
    if ndim not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"`{name}` must have rank {want}, got shape {jnp.shape(x)}")


def check_same_shape(reference, reference_name: str, **others) -> None:
    """Raise `ValueError` unless every keyword array has the shape of `reference`."""
    want = jnp.shape(reference)
    for name, x in others.items():
        if x is None:
            continue
        if jnp.shape(x) != want:
            raise ValueError(
                f"`{name}` must have the shape of `{reference_name}` {want}, got {jnp.shape(x)}"
            )


def as_float(x):
    """`x` as a float array of at least float32 precision (bfloat16 -> float32, float64 kept)."""
    x = jnp.asarray(x)
    dtype = jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return x.astype(dtype)


def _as_mask(mask, like, name: str = "mask"):
    """The mask as float32 with the shape of `like` (checked, never broadcast)."""
    if jnp.shape(mask) != jnp.shape(like):
        raise ValueError(
            f"`{name}` must have the shape of the data {jnp.shape(like)}, got {jnp.shape(mask)}"
        )
    return jnp.asarray(mask).astype(jnp.float32)


# ---------------------------------------------------------------------------
# Masked reductions.


def masked_sum(x, mask, *, axis=None):
    """Sum of `x` over the positions where `mask` is 1.

    Equation: `sum_i x_i * m_i` over `axis` (all axes when None).

    Args:
      x: array of any shape.
      mask: same shape as `x`; float or bool, 1 = valid.
      axis: axis or axes to reduce; None reduces everything.

    Returns:
      float32 array with `axis` reduced.
    """
    m = _as_mask(mask, x)
    # where() rather than x * m: padding may hold inf/NaN (e.g. log(0)).
    return jnp.sum(jnp.where(m > 0, as_float(x) * m, 0.0), axis=axis)


def masked_mean(x, mask, *, axis=None):
    """Mean of `x` over valid positions; 0 (not NaN) when nothing is valid.

    Equation: `sum_i x_i m_i / max(sum_i m_i, 1)`.

    Args:
      x: array of any shape, e.g. `[B, T]`.
      mask: same shape as `x`; float or bool.
      axis: axis or axes to reduce; None reduces everything.

    Returns:
      float32 array with `axis` reduced.
    """
    m = _as_mask(mask, x)
    count = jnp.sum(m, axis=axis)
    return masked_sum(x, m, axis=axis) / jnp.maximum(count, 1.0)


def masked_var(x, mask, *, axis=None, unbiased: bool = True):
    """Variance of `x` over valid positions; 0 when fewer than two are valid.

    Equation: `sum_i m_i (x_i - mu)^2 / (sum_i m_i - 1)` with `mu = masked_mean(x, mask)`
    (Bessel's correction when `unbiased`, as TRL and OpenAI's lm-human-preferences do).

    Args:
      x: array of any shape.
      mask: same shape as `x`.
      axis: axis or axes to reduce; None reduces everything.
      unbiased: divide by `n - 1` instead of `n`.

    Returns:
      float32 array with `axis` reduced.
    """
    m = _as_mask(mask, x)
    mean = masked_mean(x, m, axis=axis)
    if axis is not None:
        mean = jnp.expand_dims(mean, axis)
    centred = jnp.where(m > 0, as_float(x) - mean, 0.0)
    count = jnp.sum(m, axis=axis)
    denom = count - 1.0 if unbiased else count
    return jnp.sum(centred * centred * m, axis=axis) / jnp.maximum(denom, 1.0)


def masked_whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8):
    """Normalise `x` to unit variance (and zero mean) over the valid positions.

    Equation: `(x - mu) / sqrt(var + eps)`, then `+ mu` back when `shift_mean` is
    False (OpenAI whitens rewards without shifting them). Statistics over all valid
    positions of the batch; padded positions come back as 0.

    Args:
      x: array of any shape, e.g. `[B, T]` advantages.
      mask: same shape as `x`.
      shift_mean: subtract the mean (True) or keep it (False).
      eps: added to the variance.

    Returns:
      float32 array of the shape of `x`, zero where `mask` is 0. Finite for an
      all-masked input.

    References:
      Ziegler et al. 2019, arXiv 1909.08593; Huang et al. 2024, arXiv 2403.17031.
    """
    m = _as_mask(mask, x)
    xf = as_float(x)
    mean = masked_mean(xf, m)
    var = masked_var(xf, m)
    white = (xf - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return jnp.where(m > 0, white, 0.0)


def last_valid_index(mask):
    """Index of the last position where `mask` is 1, per row; -1 for an empty row.

    Works for any 0/1 mask (not only ones-then-zeros).

    Args:
      mask: `[B, T]` float or bool.

    Returns:
      `[B]` int32.
    """
    check_rank(mask, 2, "mask")
    t = jnp.shape(mask)[1]
    positions = jnp.arange(t, dtype=jnp.int32)
    return jnp.max(jnp.where(jnp.asarray(mask) > 0, positions[None, :], -1), axis=1).astype(jnp.int32)


def sequence_logprobs(token_logprobs, mask, *, average: bool = False):
    """Log-probability of each sequence from its per-token log-probs.

    Equation: `log p(y_b) = sum_t m_bt log p(y_bt)`, or with `average=True` the
    length-normalised `sum_t m_bt log p(y_bt) / max(sum_t m_bt, 1)` (SimPO; TRL's IPO).
    An empty row gives 0. Padded positions may hold anything (even -inf).

    Args:
      token_logprobs: `[B, T]` log-probs of the tokens (e.g. from `token_logprobs`).
      mask: `[B, T]` float or bool, 1 = a completion token.
      average: divide by the number of valid tokens.

    Returns:
      `[B]` float32 (differentiable in `token_logprobs`).

    References:
      Rafailov et al. 2023 (DPO, summed), arXiv 2305.18290; Meng et al. 2024 (SimPO,
      averaged), arXiv 2405.14734.
    """
    check_rank(token_logprobs, 2, "token_logprobs")
    check_same_shape(token_logprobs, "token_logprobs", mask=mask)
    if average:
        return masked_mean(token_logprobs, mask, axis=1)
    return masked_sum(token_logprobs, mask, axis=1)


# ---------------------------------------------------------------------------
# Token log-probabilities.


def _logits_and_peak(logits, temperature):
    """float32 logits and their max over the vocabulary (a constant for autodiff).

    Callers form `(logits - peak) / temperature` (every entry <= 0) inside each reduction:
    a positive temperature keeps the argmax, the max cancels in every quantity computed
    from the shifted logits, and keeping the expression next to its consumers lets XLA
    fuse it instead of materialising a shifted or scaled copy of the logits.
    """
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}")
    z = as_float(logits)
    return z, jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))


def token_logprobs(logits, tokens, *, temperature: float = 1.0):
    """Log-probability of `tokens` under `softmax(logits / temperature)`.

    Equation: `log p(y_t) = z_{t, y_t} - logsumexp_v z_{t, v}` with `z = logits / temperature`,
    computed in float32 from a gather and a `logsumexp` over `z - max(z)`, written so that
    XLA fuses it into reductions: no second `[B, T, V]` array (a log-softmax or a scaled
    copy of the logits) is materialised (tests/test_ops.py checks the compiled temp size).

    Args:
      logits: `[..., T, V]` any float dtype (bfloat16 is upcast to float32).
      tokens: `[..., T]` integer ids in `[0, V)`.
      temperature: sampling temperature (> 0); the training forward must divide by the
        same temperature as sampling did (Huang et al. 2024).

    Returns:
      `[..., T]` float32 log-probabilities.

    References:
      Huang et al. 2024, arXiv 2403.17031 (temperature in the training forward).
    """
    check_rank(logits, (2, 3), "logits")
    if jnp.shape(tokens) != jnp.shape(logits)[:-1]:
        raise ValueError(
            f"`tokens` must have shape {jnp.shape(logits)[:-1]} (logits without the vocab axis), "
            f"got {jnp.shape(tokens)}"
        )
    z, peak = _logits_and_peak(logits, temperature)
    inv_t = 1.0 / temperature
    lse = jnp.log(jnp.sum(jnp.exp((z - peak) * inv_t), axis=-1))
    picked = jnp.take_along_axis(z, jnp.asarray(tokens, jnp.int32)[..., None], axis=-1)[..., 0]
    return (picked - peak[..., 0]) * inv_t - lse


def token_entropy(logits, *, temperature: float = 1.0):
    """Entropy of `softmax(logits / temperature)` at each position.

    Equation: `H = -sum_v p_v log p_v` with `log p = z - logsumexp(z)`, `z = logits / temperature`,
    in float32, shifted by the max. At temperature 1 XLA fuses it into two reductions (no
    `[..., V]` temporary; tests/test_ops.py checks); at other temperatures XLA on CPU keeps
    one scaled copy of the logits.

    Args:
      logits: `[..., T, V]` any float dtype.
      temperature: > 0.

    Returns:
      `[..., T]` float32 entropies (nats).
    """
    check_rank(logits, (2, 3), "logits")
    z, peak = _logits_and_peak(logits, temperature)
    inv_t = 1.0 / temperature
    # Every term is taken relative to the max, so a peaked distribution's small entropy
    # is not lost to cancellation between two large numbers.
    lse = jnp.log(jnp.sum(jnp.exp((z - peak) * inv_t), axis=-1, keepdims=True))
    logp = z * inv_t - (peak * inv_t + lse)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def chunked_token_stats(hidden, tokens, logits_fn: Callable, *, chunk_size: int = 1024,
                        temperature: float = 1.0, with_entropy: bool = False,
                        with_accuracy: bool = False):
    """Per-token log-probs (and entropies, argmax hits) with the LM head applied in chunks.

    Equation: per position, `z = logits_fn(h) / temperature`, `log p(y) = z_y - logsumexp(z)`
    (as `token_logprobs`), `H = -sum_v p_v log p_v` (as `token_entropy`), and
    `correct = [argmax_v z_v == y]`. The `B * T` positions are flattened and cut into chunks
    of `chunk_size` tokens; a `lax.scan` runs the head on one chunk at a time under
    `jax.checkpoint`, so at most one chunk's `[chunk_size, V]` float32 logits exist, in the
    forward pass and in the backward pass (which recomputes them). The result equals the
    unchunked computation up to float rounding.

    Args:
      hidden: `[B, T, D]` hidden states (any float dtype).
      tokens: `[B, T]` integer targets in `[0, V)`.
      logits_fn: `[N, D] -> [N, V]` logits (e.g. the tied or untied LM head, closing over
        its parameters: they are differentiated as usual).
      chunk_size: tokens per chunk (>= 1); the last chunk is padded.
      temperature: > 0; logits are divided by it.
      with_entropy: also return `"entropy"`.
      with_accuracy: also return `"correct"` (float32 0/1).

    Returns:
      A dict of `[B, T]` float32 arrays: `"logprobs"`, and `"entropy"` / `"correct"` when
      asked for.
    """
    check_rank(hidden, 3, "hidden")
    check_rank(tokens, 2, "tokens")
    b, t, d = jnp.shape(hidden)
    if jnp.shape(tokens) != (b, t):
        raise ValueError(f"`tokens` must have shape {(b, t)} (hidden without D), got {jnp.shape(tokens)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}")
    n = b * t
    size = min(chunk_size, n)
    num_chunks = math.ceil(n / size)
    pad = num_chunks * size - n
    flat_h = jnp.reshape(hidden, (n, d))
    flat_y = jnp.reshape(jnp.asarray(tokens, jnp.int32), (n,))
    if pad:
        flat_h = jnp.pad(flat_h, ((0, pad), (0, 0)))
        flat_y = jnp.pad(flat_y, (0, pad))

    @jax.checkpoint
    def stats(h, y):
        logits = logits_fn(h)
        out = {"logprobs": token_logprobs(logits, y, temperature=temperature)}
        if with_entropy:
            out["entropy"] = token_entropy(logits, temperature=temperature)
        if with_accuracy:
            out["correct"] = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        return out

    _, out = jax.lax.scan(lambda carry, xs: (carry, stats(*xs)), None,
                          (flat_h.reshape(num_chunks, size, d), flat_y.reshape(num_chunks, size)))
    return {k: v.reshape(num_chunks * size)[:n].reshape(b, t) for k, v in out.items()}
