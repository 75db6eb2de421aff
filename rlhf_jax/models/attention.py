"""Causal self-attention over (padded) slots through ``jax.nn.dot_product_attention``, and
the stacked KV cache.

Two forms of the mask, chosen by the caller (:class:`AttentionMask`):

- **packed** (training and scoring forwards, no cache): the caller moves each row's real
  tokens to the front, in order (:func:`pack_order`), so that a row is ``lengths[b]`` real
  tokens followed by padding. Causal attention over the packed slots with
  ``key_value_seq_lengths`` is then exactly the masked attention over the original slots,
  whatever the padding (left, right, both, or holes): the real tokens keep their order and
  their positions, padding keys are never seen. Nothing of shape ``[B, T, S]`` is built, and
  on a GPU with bf16/f16 inputs the fused cuDNN kernel (flash attention) applies, with the
  causal mask, the lengths and the sliding window handled inside the kernel.
- **explicit** (the KV-cache prefill and decode): a boolean ``[B, T, S]`` over cache
  slots. Left-padded prompts sit in the cache as they are; a decode step has ``T = 1``, so
  the mask is small. This form runs the XLA implementation everywhere (cuDNN would turn
  the mask into a materialised bias).

Padding query rows are junk but finite: in the packed form their output is 0 (a row with
no real token attends to slot 0 before the zeroing), in the explicit form a row with no
allowed key averages all keys uniformly.

Grouped-query attention passes the ``Hkv`` key/value heads as they are (the API groups the
query heads; KV heads are never repeated).

Implementation choice: the environment variable ``RLHF_JAX_ATTENTION`` is read when a
forward is traced: ``auto`` (default: for the packed form, cuDNN on a GPU with bf16/f16
inputs, falling back to XLA when cuDNN rejects the shapes at trace time; on a TPU the Pallas
splash-attention kernel where :func:`splash_unsupported` finds nothing against it, else
XLA), ``xla``, ``cudnn`` or ``splash`` (no fallback: errors surface; on a backend other than
TPU the splash kernel runs in Pallas' interpret mode, slowly: for tests).

The splash kernel (``rlhf_jax.models.splash``) gets the packed form as segment ids under a
static causal mask; see there for the shapes it takes and how it runs on a mesh.

Sliding-window attention (Mistral, Gemma): a query at position ``p`` sees keys at positions
``p - window + 1 .. p`` (HF's convention: ``q - k < window``), over positions in the packed
form and over cache slots in the explicit form (the same thing for left-padded prompts).
Where only some layers slide (Gemma's sliding/global alternation), the layer scan passes a
traced per-layer flag ``sliding``: the packed form picks one of the two attentions with
``lax.cond``, the explicit form one of two precomputed masks (``allowed`` / ``local``).

Soft-capped scores (Gemma 2, ``softcap * tanh(s / softcap)`` before the mask) are not in
``jax.nn.dot_product_attention``'s API: they run an XLA implementation of ours over an
explicit mask (scores materialised, recomputed in the backward pass).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from rlhf_jax.models.splash import context_mesh, splash_attention, splash_unsupported

ATTENTION_ENV = "RLHF_JAX_ATTENTION"
_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_FUSED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class AttentionMask(NamedTuple):
    """Which keys each query sees; exactly one field is set.

    Attributes:
      lengths: ``[B]`` int32, packed form: slots ``0 .. lengths[b] - 1`` hold real tokens;
        query slot ``i`` sees key slots ``j <= i`` with ``j < lengths[b]``.
      allowed: ``[B, T, S]`` bool, explicit form: query ``i`` sees key slot ``j`` iff True.
      local: ``[B, T, S]`` bool, explicit form only, optional: the sliding-window mask of the
        layers that slide when others do not (``allowed`` is then the full causal one).
    """

    lengths: jax.Array | None = None
    allowed: jax.Array | None = None
    local: jax.Array | None = None


# --------------------------------------------------------------- positions and masks
def slot_positions(attention_mask, cache_index, length):
    """Position ids ``[B, T]`` of the ``T`` tokens written at ``cache_index``.

    Positions count real tokens: ``cumsum(mask) - 1`` over all slots, so left
    padding does not shift them; padding slots get 0.
    """
    mask = attention_mask.astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    if cache_index is None:
        return pos
    return jax.lax.dynamic_slice_in_dim(pos, cache_index, length, axis=1)


def pack_order(attention_mask):
    """The permutation that moves each row's real tokens to the front, in order.

    Args:
      attention_mask: ``[B, T]`` (1 = real token), any 0/1 pattern.

    Returns:
      ``(order, inverse, lengths)``: ``x_packed = take_along_axis(x, order, 1)`` puts the
      real tokens first, ``take_along_axis(x_packed, inverse, 1)`` undoes it (both
      ``[B, T]`` int32); ``lengths`` ``[B]`` int32 counts the real tokens.
    """
    real = (attention_mask > 0).astype(jnp.int32)
    order = jnp.argsort(1 - real, axis=1, stable=True).astype(jnp.int32)
    inverse = jnp.argsort(order, axis=1).astype(jnp.int32)
    return order, inverse, jnp.sum(real, axis=1).astype(jnp.int32)


def cache_allowed(attention_mask, cache_index, length, *, window=None):
    """Explicit mask ``[B, T, S]`` for ``T`` queries written at ``cache_index`` into ``S`` slots.

    Query slot ``i`` may see key slot ``j`` iff ``j <= i``, ``mask[b, j]`` is 1 and, with a
    sliding ``window``, ``i - j < window``.
    """
    num_slots = attention_mask.shape[1]
    query_slot = cache_index + jnp.arange(length, dtype=jnp.int32)
    key_slot = jnp.arange(num_slots, dtype=jnp.int32)
    seen = key_slot[None, :] <= query_slot[:, None]
    if window is not None:
        seen = seen & (query_slot[:, None] - key_slot[None, :] < window)
    return seen[None, :, :] & (attention_mask[:, None, :] > 0)


# ------------------------------------------------------------------------ attention
def _choice() -> str:
    choice = os.environ.get(ATTENTION_ENV, "auto").lower()
    if choice not in _IMPLEMENTATIONS:
        raise ValueError(f"{ATTENTION_ENV} must be one of {_IMPLEMENTATIONS}, got {choice!r}")
    return choice


def _implementation(dtype, *, backend: str | None = None) -> str | None:
    """The packed form's implementation: "cudnn", "splash", or None (XLA)."""
    choice = _choice()
    if choice == "xla":
        return None
    if choice in ("cudnn", "splash"):
        return choice
    backend = jax.default_backend() if backend is None else backend
    if backend == "tpu":
        return "splash"
    return "cudnn" if backend == "gpu" and jnp.dtype(dtype) in _FUSED_DTYPES else None


def _packed(q, k, v, lengths, *, scale, window):
    kwargs = dict(scale=scale, is_causal=True, query_seq_lengths=lengths,
                  # a row without real tokens sees slot 0: no query row is fully masked
                  key_value_seq_lengths=jnp.maximum(lengths, 1),
                  local_window_size=None if window is None else (int(window) - 1, 0))
    implementation = _implementation(q.dtype)
    if implementation == "splash":
        mesh = context_mesh()
        forced = _choice() == "splash"
        reason = splash_unsupported(q.shape, k.shape, mesh=mesh, device_count=1 if forced else None)
        if reason is None:
            return splash_attention(q, k, v, lengths, scale=scale, window=window, mesh=mesh)
        if forced:
            raise ValueError(f"{ATTENTION_ENV}=splash: {reason}")
        # the shapes (or an unpartitionable multi-device run) say no: XLA below
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
        except (NotImplementedError, ValueError, RuntimeError):
            if os.environ.get(ATTENTION_ENV, "auto").lower() == "cudnn":
                raise
            # the shapes or the installed cuDNN say no: XLA below

    # XLA materialises the [B, H, T, S] scores; as in flash attention, the backward pass
    # recomputes them from q, k, v instead of keeping them (a few [B, T, H, Dh] residuals
    # per layer instead of several [B, H, T, S] ones), whatever the layer remat policy.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def xla(q, k, v, lengths):
        return jax.nn.dot_product_attention(q, k, v, **{**kwargs, "query_seq_lengths": lengths,
                                                         "key_value_seq_lengths": jnp.maximum(lengths, 1)})

    return xla(q, k, v, lengths)


def _softcapped(q, k, v, allowed, *, scale, softcap):
    """``softmax(mask(softcap * tanh(scale * q k^T / softcap))) v`` with an explicit
    ``allowed`` ``[B, T, S]``; grouped-query; scores in float32."""
    b, t, hq, dh = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, hq, dh)


def _packed_allowed(lengths, t, window):
    """The explicit ``[B, T, T]`` mask of the packed form (causal, real keys, window)."""
    i = jnp.arange(t, dtype=jnp.int32)
    seen = i[None, :] <= i[:, None]
    if window is not None:
        seen = seen & (i[:, None] - i[None, :] < window)
    return seen[None] & (i[None, None, :] < jnp.maximum(lengths, 1)[:, None, None])


def attention(q, k, v, mask: AttentionMask, *, scale: float, window: int | None = None,
              sliding=None, softcap: float | None = None):
    """Scaled dot-product attention, grouped-query, with the mask in one of two forms.

    Equation: ``softmax(scale * q k^T + mask) v`` per head (with ``softcap``: the scores
    become ``softcap * tanh(scores / softcap)`` before the mask); query head ``h`` uses KV
    head ``h // (Hq / Hkv)``. Scores and softmax in float32.

    Args:
      q: ``[B, T, Hq, Dh]``; k, v: ``[B, S, Hkv, Dh]`` with ``Hq % Hkv == 0`` (cast to q's
        dtype: a cache may be stored in another one).
      mask: :class:`AttentionMask` (packed ``lengths`` or explicit ``allowed``).
      scale: multiplier of the scores (usually ``Dh ** -0.5``).
      window: sliding-window size, or None. Packed form: applied here. Explicit form: the
        mask already holds it (in ``allowed``, or in ``local`` when ``sliding`` is given).
      sliding: None (the window, if any, applies), or a traced bool scalar: does this
        layer use the window (per-layer data of the layer scan)?
      softcap: soft cap of the scores (Gemma 2), or None.

    Returns:
      ``[B, T, Hq * Dh]`` in q's dtype, named ``"attention_out"`` for remat policies.
    """
    b, t, hq, dh = q.shape
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if (mask.lengths is None) == (mask.allowed is None):
        raise ValueError("AttentionMask needs exactly one of `lengths` and `allowed`")
    if sliding is not None and window is None:
        raise ValueError("attention: `sliding` needs a `window`")
    if mask.allowed is not None:
        allowed = mask.allowed
        if sliding is not None:
            if mask.local is None:
                raise ValueError("attention: a per-layer `sliding` flag needs the mask's `local` form")
            allowed = jnp.where(sliding, mask.local, mask.allowed)
        if softcap is not None:
            out = _softcapped(q, k, v, allowed, scale=scale, softcap=softcap)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], scale=scale)
    else:
        def packed(w):
            if softcap is None:
                return _packed(q, k, v, mask.lengths, scale=scale, window=w)
            body = functools.partial(jax.checkpoint, prevent_cse=False)(
                lambda q, k, v, lengths: _softcapped(q, k, v, _packed_allowed(lengths, t, w),
                                                     scale=scale, softcap=softcap))
            return body(q, k, v, mask.lengths)

        if sliding is None:
            out = packed(window)
        else:
            out = jax.lax.cond(sliding, lambda: packed(window), lambda: packed(None))
    return checkpoint_name(out.reshape(b, t, hq * dh), "attention_out")


# ------------------------------------------------------------------------- KV cache
class LayerCache(NamedTuple):
    """One layer's view of the stacked cache inside the layer scan.

    Attributes:
      cache: ``{"k", "v"}`` ``[L, B, S, Hkv, Dh]`` for all layers (carried through the scan,
        updated in place).
      layer: int32 scalar, this layer's index.
      index: int32 scalar, the first slot the current tokens are written to.
    """

    cache: dict
    layer: jax.Array
    index: jax.Array


def init_kv_cache(num_layers, batch_size, num_slots, num_kv_heads, head_dim, dtype) -> dict:
    """A zero cache ``{"k", "v"}``, each ``[L, B, S, Hkv, Dh]``."""
    shape = (num_layers, batch_size, num_slots, num_kv_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def write_kv(layer_cache: LayerCache, k, v):
    """Write ``k``, ``v`` ``[B, T, Hkv, Dh]`` into this layer's slots ``index ..``.

    Only the new entries are written (the cache is a scan carry, so XLA updates it in
    place); this layer's full ``[B, S, Hkv, Dh]`` keys and values are read back.

    Returns:
      ``(cache, k_all, v_all)``.
    """
    cache, layer, index = layer_cache
    zero = jnp.zeros((), jnp.int32)
    start = (layer.astype(jnp.int32), zero, jnp.asarray(index, jnp.int32), zero, zero)
    new = {}
    for name, x in (("k", k), ("v", v)):
        new[name] = jax.lax.dynamic_update_slice(cache[name], x[None].astype(cache[name].dtype), start)
    k_all = jax.lax.dynamic_index_in_dim(new["k"], layer, axis=0, keepdims=False)
    v_all = jax.lax.dynamic_index_in_dim(new["v"], layer, axis=0, keepdims=False)
    return new, k_all, v_all
