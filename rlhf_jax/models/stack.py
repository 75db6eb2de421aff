"""The decoder layers as one scanned block: stacked parameters, one ``lax.scan``, and
activation checkpointing per layer with a named policy.

Every per-layer parameter carries a leading layer axis ``[L, ...]``; the forward is one
``lax.scan`` whose body merges one block's graph with that layer's slice of the
parameters. The program holds the block once, so compile time is nearly flat in depth
(MaxText lays its decoders out the same way).

Remat policies (``remat=``), over ``jax.checkpoint_policies``; they only matter under
differentiation (a forward without a gradient is unchanged):

- ``"none"``: keep every intermediate for the backward pass (fastest, most memory).
- ``"full"``: keep only each layer's input; the backward recomputes the layer.
- ``"save_dots"``: keep every matmul output, attention score matrices included.
- ``"save_dots_no_batch"``: keep the projection outputs (matmuls without batch dimensions),
  recompute attention and the elementwise work.
- ``"save_attention"``: keep each layer's attention output, recompute the rest.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.attention import LayerCache

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def check_remat(remat: str) -> str:
    """``remat`` itself, or a ValueError naming the allowed policies."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
    return remat


def stack_modules(modules):
    """One module of the type of ``modules[0]`` whose parameters are stacked ``[L, ...]``.

    All modules must have the same structure (the layers of one trunk).
    """
    graphdef, _ = nnx.split(modules[0])
    states = [nnx.split(m)[1] for m in modules]
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


def scan_layers(layers, apply, x, cache=None, cache_index=None, *, remat: str = "none",
                per_layer=None):
    """Run ``x`` through the stacked ``layers`` in one ``lax.scan``.

    Args:
      layers: a module with stacked parameters (from :func:`stack_modules`).
      apply: ``apply(block, x, layer_cache) -> (x, cache)`` for one layer; ``layer_cache``
        is a :class:`LayerCache` or None.
      x: ``[B, T, D]`` the first layer's input.
      cache: the stacked KV cache ``{"k", "v"}`` ``[L, B, S, Hkv, Dh]``, or None.
      cache_index: first slot written (with a cache).
      remat: a key of :data:`REMAT_POLICIES`; applied per layer when there is no cache.
      per_layer: optional pytree of ``[L, ...]`` arrays, data that differs between layers
        (e.g. Gemma's sliding/global flag): layer ``i``'s slice is passed to ``apply`` as a
        fourth argument, ``apply(block, x, layer_cache, layer_data)``.

    Returns:
      ``(x, cache)`` after the last layer (cache None without one).
    """
    check_remat(remat)
    graphdef, state = nnx.split(layers)
    num_layers = jax.tree.leaves(state)[0].shape[0]
    index = None if cache is None else jnp.asarray(cache_index, jnp.int32)

    def body(carry, inputs):
        h, kv = carry
        layer_state, layer, data = inputs
        block = nnx.merge(graphdef, layer_state)
        layer_cache = None if kv is None else LayerCache(kv, layer, index)
        if per_layer is None:
            h, kv = apply(block, h, layer_cache)
        else:
            h, kv = apply(block, h, layer_cache, data)
        return (h, kv), None

    if cache is None and remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    xs = (state, jnp.arange(num_layers, dtype=jnp.int32), per_layer)
    (x, cache), _ = jax.lax.scan(body, (x, cache), xs)
    return x, cache
