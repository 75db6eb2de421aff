"""KL estimators between the policy and the reference, and the KL-coefficient controllers.

The controller state is a pytree of arrays, so the adaptive coefficient can be
updated inside `jit`, `lax.scan` or `fori_loop` (a Python float would be frozen
at trace time) and is checkpointed with the rest of the train state.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.core.ops import as_float, check_same_shape

__all__ = [
    "KL_ESTIMATORS",
    "kl_penalty",
    "KLControllerState",
    "kl_controller_init",
    "kl_controller_update",
]

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs, ref_logprobs, *, estimator: str = "k1"):
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    With `d = logprobs - ref_logprobs`:

    - `"k1"`: `d` (unbiased, high variance, can be negative per token);
    - `"k2"`: `d^2 / 2` (biased, low variance, non-negative);
    - `"k3"`: `exp(-d) - 1 + d` (unbiased, non-negative, lower variance than k1).

    Args:
      logprobs: `[...]` log-probs of the sampled tokens under the policy.
      ref_logprobs: same shape, under the reference policy.
      estimator: `"k1"`, `"k2"` or `"k3"`.

    Returns:
      Array of the input shape (float32 or wider). Not masked: multiply by the mask.

    References:
      Schulman 2020, "Approximating KL divergence" (blog note); Ziegler et al. 2019,
      arXiv 1909.08593.
    """
    check_same_shape(logprobs, "logprobs", ref_logprobs=ref_logprobs)
    d = as_float(logprobs) - as_float(ref_logprobs)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * jnp.square(d)
    if estimator == "k3":
        return jnp.expm1(-d) + d
    raise ValueError(f"`estimator` must be one of {KL_ESTIMATORS}, got {estimator!r}")


@flax.struct.dataclass
class KLControllerState:
    """State of a KL-coefficient controller (a pytree of scalar arrays).

    Attributes:
      kl_coef: current coefficient beta.
      target: target KL (0 for a fixed controller).
      horizon: adaptation horizon in samples.
      adaptive: bool array; False = fixed coefficient.
    """

    kl_coef: jax.Array
    target: jax.Array
    horizon: jax.Array
    adaptive: jax.Array


def kl_controller_init(kl_coef: float, *, target=None, horizon=10000) -> KLControllerState:
    """A fixed (`target=None`) or adaptive KL controller.

    Args:
      kl_coef: initial coefficient (>= 0).
      target: target KL per sequence for the adaptive rule; None = fixed coefficient.
      horizon: number of samples over which the coefficient adapts (> 0).

    Returns:
      `KLControllerState` of float32 / bool scalar arrays (same structure in both modes).

    References:
      Ziegler et al. 2019, arXiv 1909.08593.
    """
    if isinstance(kl_coef, (int, float)) and kl_coef < 0:
        raise ValueError(f"`kl_coef` must be >= 0, got {kl_coef}")
    if isinstance(horizon, (int, float)) and horizon <= 0:
        raise ValueError(f"`horizon` must be > 0, got {horizon}")
    if target is not None and isinstance(target, (int, float)) and target <= 0:
        raise ValueError(f"`target` must be > 0 (or None for a fixed coefficient), got {target}")
    return KLControllerState(
        kl_coef=jnp.asarray(kl_coef, jnp.float32),
        target=jnp.asarray(0.0 if target is None else target, jnp.float32),
        horizon=jnp.asarray(horizon, jnp.float32),
        adaptive=jnp.asarray(target is not None),
    )


def kl_controller_update(state: KLControllerState, current_kl, n_steps) -> KLControllerState:
    """One controller update after observing `current_kl` over `n_steps` samples.

    Adaptive rule (Ziegler et al. 2019):
    `e = clip(current_kl / target - 1, -0.2, 0.2)`, `kl_coef <- kl_coef * (1 + e * n_steps / horizon)`.
    A fixed controller returns the state unchanged. Jittable; `current_kl` and
    `n_steps` may be traced.

    Args:
      state: a `KLControllerState`.
      current_kl: scalar, the measured KL (e.g. mean over the batch of the per-sequence sum).
      n_steps: scalar, number of samples this measurement covers (e.g. the batch size).

    Returns:
      The new `KLControllerState`.

    References:
      Ziegler et al. 2019, arXiv 1909.08593.
    """
    if jnp.ndim(current_kl) != 0:
        raise ValueError(f"`current_kl` must be a scalar, got shape {jnp.shape(current_kl)}")
    if jnp.ndim(n_steps) != 0:
        raise ValueError(f"`n_steps` must be a scalar, got shape {jnp.shape(n_steps)}")
    safe_target = jnp.where(state.adaptive, state.target, 1.0)
    error = jnp.clip(jnp.asarray(current_kl, jnp.float32) / safe_target - 1.0, -0.2, 0.2)
    mult = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / state.horizon
    new_coef = jnp.where(state.adaptive, state.kl_coef * mult, state.kl_coef)
    return state.replace(kl_coef=new_coef.astype(state.kl_coef.dtype))
