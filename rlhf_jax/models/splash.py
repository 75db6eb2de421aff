"""Attention on TPU through the Pallas splash-attention kernel
(``jax.experimental.pallas.ops.tpu.splash_attention``), for the packed form of
``rlhf_jax.models.attention`` (each row's real tokens first, ``lengths[b]`` of them).

Padding becomes segment ids (1 on a row's real slots, 0 on padding: a query sees only keys of
its own segment) under a static causal mask (a ``LocalMask`` with a sliding window); one kernel
per (slots, heads, window), ``vmap``-ed over the batch; padding query rows are zeroed as in the
XLA path. The kernel takes self-attention over ``T`` slots with ``T`` a multiple of 128 (blocks
of 512, 256 or 128 slots) and ``Hq`` a multiple of ``Hkv`` (grouped-query heads are passed as
they are). XLA cannot partition a Pallas call, so on more than one device it runs only under a
context mesh (``jax.set_mesh``), inside ``shard_map`` over the batch axes ("data", "fsdp") and
the heads ("tensor"). Off TPU it runs in Pallas' interpret mode (slow: for tests).

Tested on CPU in interpret mode only; the compiled TPU kernel is untested here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["splash_attention", "splash_unsupported", "splash_block_size", "splash_segment_ids", "context_mesh"]

_SPLASH_BLOCKS = (512, 256, 128)  # block sizes tried, largest first (multiples of the 128 lanes)
_BATCH_AXES = ("data", "fsdp")
_HEAD_AXIS = "tensor"


def splash_block_size(num_slots: int) -> int | None:
    """The splash kernel's block size for ``num_slots`` query and key slots (None: none fits)."""
    return next((b for b in _SPLASH_BLOCKS if num_slots % b == 0), None)


def context_mesh():
    """The mesh set with ``jax.set_mesh`` (an abstract one inside ``jit``), or None."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def splash_unsupported(q_shape, k_shape, *, mesh=None, device_count: int | None = None) -> str | None:
    """Why the splash kernel cannot run the packed form at these shapes (None: it can).

    Args:
      q_shape: ``(B, T, Hq, Dh)``; k_shape: ``(B, S, Hkv, Dh)``.
      mesh: the context mesh (or None); device_count: devices in the run (default all).
    """
    _, t, hq, _ = q_shape
    s, hkv = k_shape[1], k_shape[2]
    if t != s:
        return f"{t} query slots against {s} key slots (the packed form is self-attention)"
    if splash_block_size(t) is None:
        return f"{t} slots is not a multiple of the kernel's {_SPLASH_BLOCKS[-1]}-slot blocks"
    if hq % hkv:
        return f"{hq} query heads are not a multiple of the {hkv} key/value heads"
    devices = jax.device_count() if device_count is None else device_count
    if mesh is None and devices > 1:
        return (f"{devices} devices and no context mesh (jax.set_mesh): XLA cannot partition the kernel, "
                "and shard_map needs the mesh")
    return None


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_slots: int, num_heads: int, window: int | None, interpret: bool):
    """One splash-attention kernel (causal, or a causal sliding window) for ``num_heads`` query heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (num_slots, num_slots)
    one = (masks.CausalMask(shape) if window is None
           else masks.LocalMask(shape, window_size=(int(window) - 1, 0), offset=0))
    block = splash_block_size(num_slots)
    sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # built eagerly even when first asked for inside a trace: the kernel keeps its block tables
    # as arrays, and a cached kernel must not hold tracers
    with jax.ensure_compile_time_eval():
        return kernel.make_splash_mha(masks.MultiHeadMask([one] * num_heads), block_sizes=sizes, head_shards=1,
                                      q_seq_shards=1, interpret=interpret)


def splash_segment_ids(lengths, num_slots: int):
    """``[B, T]`` int32 segment ids of the packed form: 1 on each row's real slots
    ``0 .. max(lengths[b], 1) - 1`` (a row with no real token keeps slot 0, as the XLA path
    does), 0 on padding; a query sees only keys of its own segment."""
    slots = jnp.arange(num_slots, dtype=jnp.int32)
    return (slots[None, :] < jnp.maximum(lengths, 1)[:, None]).astype(jnp.int32)


def splash_attention(q, k, v, lengths, *, scale: float, window: int | None = None, mesh=None):
    """Causal self-attention of the packed form through the splash kernel.

    Args:
      q: ``[B, T, Hq, Dh]``; k, v: ``[B, T, Hkv, Dh]`` (each row's ``lengths[b]`` real tokens
        first); lengths: ``[B]`` int32.
      scale: multiplier of the scores; window: sliding-window size, or None.
      mesh: the context mesh (``context_mesh()``): with more than one device the kernel runs
        inside ``shard_map`` over its batch and head axes.

    Returns:
      ``[B, T, Hq, Dh]`` in q's dtype; padding query rows are zeros (as in the XLA path).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, t, hq, dh = q.shape
    interpret = jax.default_backend() != "tpu"

    def local(q, k, v, lengths):
        # [B, T, H, Dh] -> [B, H, T, Dh]: the kernel takes one row's heads at a time
        heads = q.shape[2]
        kern = _splash_kernel(t, heads, None if window is None else int(window), interpret)
        segments = splash_segment_ids(lengths, t)
        qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in ((q * scale).astype(q.dtype), k, v))
        out = jax.vmap(lambda q1, k1, v1, s1: kern(q1, k1, v1, segment_ids=SegmentIds(q=s1, kv=s1)))(
            qh, kh, vh, segments)
        real = (jnp.arange(t, dtype=jnp.int32)[None, :] < lengths[:, None]).astype(out.dtype)
        return jnp.swapaxes(out, 1, 2) * real[:, :, None, None]

    if mesh is None or mesh.size == 1:
        return local(q, k, v, lengths)
    from jax.sharding import PartitionSpec

    batch = tuple(a for a in _BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1) or None
    tensor = mesh.shape.get(_HEAD_AXIS, 1) if _HEAD_AXIS in mesh.axis_names else 1
    heads = _HEAD_AXIS if tensor > 1 and hq % tensor == 0 and k.shape[2] % tensor == 0 else None
    spec = PartitionSpec(batch, None, heads, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, PartitionSpec(batch)), out_specs=spec,
                         check_vma=False)(q, k, v, lengths)
