"""The unbiased pass@k estimator, its curve over k, and a bootstrap interval.

Evaluation-side code: `pass_at_k` works on NumPy (float64) or JAX arrays (it is
traceable for a static `k`); the curve and the bootstrap are host-side NumPy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["pass_at_k", "pass_at_k_curve", "pass_at_k_bootstrap"]


def _is_jax(*xs) -> bool:
    return any(isinstance(x, jax.Array) for x in xs)


def _check_counts(n, c) -> tuple[np.ndarray, np.ndarray]:
    n = np.asarray(n)
    c = np.asarray(c)
    if not (np.issubdtype(n.dtype, np.integer) or np.all(np.mod(n, 1) == 0)):
        raise ValueError("`n` must hold whole numbers of samples")
    if not (np.issubdtype(c.dtype, np.integer) or np.all(np.mod(c, 1) == 0)):
        raise ValueError("`c` must hold whole numbers of correct samples")
    if np.any(n < 1):
        raise ValueError(f"`n` must be >= 1, got min {n.min()}")
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("`c` must satisfy 0 <= c <= n for every problem")
    return n, c


def pass_at_k(n, c, k: int):
    """Unbiased pass@k per problem from `c` correct answers among `n` samples.

    Equation: `pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{j=0}^{k-1} (1 - c / (n - j))`.
    The product of factors in `[0, 1]` is stable for n in the thousands (no factorials);
    a factor is clamped at 0 once `n - c - j <= 0`, so the result is exactly 1.0 when
    `n - c < k`.

    Args:
      n: int or array of samples per problem (broadcast against `c`).
      c: int or array of correct samples per problem, `0 <= c <= n`.
      k: a Python int, `1 <= k <= min(n)`.

    Returns:
      Array of the broadcast shape of `n` and `c`: float64 NumPy for NumPy/Python inputs;
      a JAX array (float32 unless x64) when `n` or `c` is a JAX array. JAX inputs are
      traceable; their range is checked only when concrete (a traced `n < k` gives NaN).

    Raises:
      ValueError: `k > n`, `k < 1`, `c` outside `[0, n]`.

    References:
      Chen et al. 2021 (Codex), arXiv 2107.03374.

    >>> round(float(pass_at_k(10, 3, 1)), 12)
    0.3
    >>> pass_at_k([10, 10], [3, 9], 2).round(4).tolist()
    [0.5333, 1.0]
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise ValueError(f"`k` must be a Python int, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}")
    if _is_jax(n, c):
        xp = jnp
        concrete = not any(isinstance(x, jax.core.Tracer) for x in (n, c))
        if concrete:
            n_np, _ = _check_counts(n, c)
            if np.any(k > n_np):
                raise ValueError(f"`k` ({k}) must be <= n (min n = {n_np.min()})")
        n = jnp.asarray(n)
        c = jnp.asarray(c)
        ftype = jnp.promote_types(jnp.float32, jnp.result_type(float))
        n, c = n.astype(ftype), c.astype(ftype)
    else:
        xp = np
        n, c = _check_counts(n, c)
        if np.any(k > n):
            raise ValueError(f"`k` ({k}) must be <= n (min n = {n.min()})")
        n = n.astype(np.float64)
        c = c.astype(np.float64)
    n, c = xp.broadcast_arrays(n, c)
    j = xp.arange(k, dtype=n.dtype).reshape((1,) * n.ndim + (k,))
    remaining = n[..., None] - j  # n - j, >= 1 for j < k <= n
    factors = xp.clip(1.0 - c[..., None] / remaining, 0.0, 1.0)
    result = 1.0 - xp.prod(factors, axis=-1)
    if xp is jnp:
        result = jnp.where(k > n, jnp.nan, result)
    return result


def _per_problem_curve(n, c, ks) -> np.ndarray:
    """`[P, len(ks)]` pass@k per problem, from one cumulative product over j."""
    n, c = _check_counts(n, c)
    n, c = np.broadcast_arrays(np.atleast_1d(n), np.atleast_1d(c))
    ks = np.asarray(ks, dtype=np.int64)
    if ks.ndim != 1 or ks.size == 0:
        raise ValueError("`ks` must be a non-empty 1-D sequence of ints")
    if np.any(ks < 1) or np.any(ks > n.min()):
        raise ValueError(f"every k in `ks` must satisfy 1 <= k <= min(n) = {n.min()}, got {ks.tolist()}")
    kmax = int(ks.max())
    n = n.astype(np.float64)[:, None]
    c = c.astype(np.float64)[:, None]
    j = np.arange(kmax, dtype=np.float64)[None, :]
    ratio = np.cumprod(np.clip(1.0 - c / (n - j), 0.0, 1.0), axis=1)  # C(n-c,k)/C(n,k), k=1..kmax
    return 1.0 - ratio[:, ks - 1]


def pass_at_k_curve(n, c) -> np.ndarray:
    """Mean pass@k over problems for every k = 1..n.

    Equation: `curve[k-1] = mean_p pass_at_k(n_p, c_p, k)`, computed for all k at once
    from the running product `prod_{j<k} (1 - c / (n - j))`.

    Args:
      n: int, or `[P]` ints (the curve stops at `min(n)`).
      c: `[P]` correct counts.

    Returns:
      `[min(n)]` float64 NumPy array; entry `k - 1` is mean pass@k.

    References:
      Chen et al. 2021, arXiv 2107.03374; Yue et al. 2025, arXiv 2504.13837.
    """
    n_np = np.asarray(n)
    kmax = int(n_np.min())
    return _per_problem_curve(n_np, np.asarray(c), np.arange(1, kmax + 1)).mean(axis=0)


def pass_at_k_bootstrap(n, c, ks, *, num_samples: int = 1000, confidence: float = 0.95, seed: int = 0):
    """Mean pass@k with a percentile-bootstrap confidence interval over problems.

    Problems are resampled with replacement `num_samples` times; the interval is the
    `(1 - confidence) / 2` and `(1 + confidence) / 2` quantiles of the resampled means.

    Args:
      n: int or `[P]` samples per problem.
      c: `[P]` correct counts.
      ks: int or sequence of ints.
      num_samples: bootstrap resamples.
      confidence: interval level in (0, 1).
      seed: NumPy random seed (the result is deterministic given the seed).

    Returns:
      `(mean, lower, upper)`, each a float64 array `[len(ks)]` (mean over the original
      problems, not the resamples).

    References:
      Chen et al. 2021, arXiv 2107.03374; Efron & Tibshirani 1993 (bootstrap).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}")
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}")
    ks = np.atleast_1d(np.asarray(ks))
    per_problem = _per_problem_curve(np.asarray(n), np.asarray(c), ks)  # [P, K]
    num_problems = per_problem.shape[0]
    rng = np.random.default_rng(seed)
    # Multinomial counts are the same resampling as drawing indices, but cost [S, P], not [S, P, K].
    counts = rng.multinomial(num_problems, np.full(num_problems, 1.0 / num_problems), size=num_samples)
    means = counts @ per_problem / num_problems  # [S, K]
    alpha = (1.0 - confidence) / 2.0
    lower = np.quantile(means, alpha, axis=0)
    upper = np.quantile(means, 1.0 - alpha, axis=0)
    return per_problem.mean(axis=0), lower, upper
