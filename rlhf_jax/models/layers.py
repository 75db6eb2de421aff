"""Building blocks shared by the family modules: activations, dense, embeddings, norms and
rotary embeddings (attention and the KV cache: :mod:`rlhf_jax.models.attention`; the layer
stack: :mod:`rlhf_jax.models.stack`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models.config import ModelConfig, rope_attention_factor

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def init_normal(rng, shape, std, dtype):
    """A parameter tensor drawn N(0, std^2) from the NumPy generator ``rng``.

    ``rng=None`` gives zeros: used under ``nnx.eval_shape`` to build an abstract
    model (no numbers drawn, nothing allocated). Initialising from NumPy avoids
    compiling one random-number kernel per tensor shape.
    """
    if rng is None or std == 0:
        return jnp.zeros(shape, dtype)
    return jnp.asarray((rng.standard_normal(shape) * std).astype(np.float32), dtype)


def _lead(v, x):
    """Reshape a ``[D]`` vector to broadcast against ``x`` ``[..., D]`` (rank promotion is off)."""
    return v.reshape((1,) * (x.ndim - 1) + v.shape)


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with ``kernel`` ``[in, out]`` (HF Conv1D layout).

    With a LoRA adapter (``lora_a`` ``[in, r]``, ``lora_b`` ``[r, out]`` and ``lora_scale``,
    attached by :func:`rlhf_jax.models.lora.attach`): ``y = x @ kernel + scale * (x @ A) @ B + bias``.

    ``rngs`` is a ``numpy.random.Generator`` (or None for an abstract model); the
    kernel is drawn N(0, std^2) (``std=0``: zeros), the bias is zero.
    """

    def __init__(self, in_features, out_features, *, use_bias, rngs, std=0.02,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.kernel = nnx.Param(init_normal(rngs, (in_features, out_features), std, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x):
        x = x.astype(self.dtype)
        y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(self.dtype))
        # A LoRA adapter (attached by rlhf_jax.models.lora): + scale * (x @ A) @ B, never
        # merged into the kernel here, so the frozen kernel gets no gradient and no copy.
        lora_a = getattr(self, "lora_a", None)
        if lora_a is not None:
            low = jnp.einsum("...i,ir->...r", x, lora_a[...].astype(self.dtype))
            y = y + self.lora_scale * jnp.einsum("...r,ro->...o", low, self.lora_b[...].astype(self.dtype))
        if self.bias is not None:
            y = y + _lead(self.bias[...].astype(self.dtype), y)
        return y


class Embedding(nnx.Module):
    """Token (or position) embedding table ``[num, dim]``."""

    def __init__(self, num, dim, *, rngs, std=0.02, dtype=jnp.float32, param_dtype=jnp.float32):
        self.embedding = nnx.Param(init_normal(rngs, (num, dim), std, param_dtype))
        self.dtype = dtype

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with statistics in float32."""

    def __init__(self, dim, *, eps, dtype=jnp.float32, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * _lead(self.scale[...].astype(jnp.float32), y) + _lead(self.bias[...].astype(jnp.float32), y)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm as in HF Llama: normalise in float32, cast, then scale."""

    def __init__(self, dim, *, eps, dtype=jnp.float32, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return _lead(self.scale[...].astype(self.dtype), y) * y.astype(self.dtype)


class OffsetRMSNorm(nnx.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + scale)`` all in float32, then cast; ``scale``
    starts at zero (the identity)."""

    def __init__(self, dim, *, eps, dtype=jnp.float32, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + _lead(self.scale[...].astype(jnp.float32), y))).astype(self.dtype)


# ------------------------------------------------------------------ rotary
def rope_inv_freq(config: ModelConfig, *, local: bool = False) -> np.ndarray:
    """Inverse frequencies ``[rotary_dim // 2]`` (float64 NumPy), with rope scaling applied.

    Types: ``default``; ``linear`` (divide by ``factor``); ``llama3`` (Llama 3.1:
    low frequencies divided by ``factor``, a smooth blend between
    ``low_freq_factor`` and ``high_freq_factor``); ``yarn`` (arXiv 2309.00071).
    ``local``: the sliding layers' rope (Gemma 3): base ``rope_local_theta``, no scaling.
    """
    dim = config.rotary_dim
    base = config.rope_local_theta if local else config.rope_theta
    inv = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rope = {} if local else config.rope_scaling_dict
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return inv
    factor = float(rope["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        old_ctx = float(rope["original_max_position_embeddings"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return np.where(medium, blended, scaled)
    if kind == "yarn":
        old_ctx = float(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
        beta_fast = float(rope.get("beta_fast") or 32)
        beta_slow = float(rope.get("beta_slow") or 1)

        def correction_dim(num_rotations):
            return dim * np.log(old_ctx / (num_rotations * 2 * np.pi)) / (2 * np.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if rope.get("truncate", True):
            lo, hi = np.floor(lo), np.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
        extrapolation_weight = 1 - ramp
        return (inv / factor) * (1 - extrapolation_weight) + inv * extrapolation_weight
    raise ValueError(f"rope_type {kind!r} is not supported")


def rope_cos_sin(config: ModelConfig, positions, *, local: bool = False):
    """cos and sin ``[B, T, rotary_dim]`` (float32) for integer ``positions`` ``[B, T]``."""
    inv = jnp.asarray(rope_inv_freq(config, local=local), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv[None, None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    scale = 1.0 if local else rope_attention_factor(config)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x, cos, sin):
    """Rotate ``x`` ``[B, T, H, Dh]`` (HF "rotate_half" layout), in float32.

    With ``cos``/``sin`` narrower than ``Dh`` (partial rotary, GPT-NeoX), only the first
    ``cos.shape[-1]`` dimensions of each head rotate; the rest pass through.
    """
    x32 = x.astype(jnp.float32)
    rot = cos.shape[-1]
    x_rot, x_pass = x32[..., :rot], x32[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    if x_pass.shape[-1]:
        out = jnp.concatenate([out, x_pass], axis=-1)
    return out.astype(x.dtype)


