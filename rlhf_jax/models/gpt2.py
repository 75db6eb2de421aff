"""GPT-2 trunk as a Flax NNX module (learned positions, pre-LayerNorm blocks, GELU MLP).

Parameter names follow HF's GPT-2 (``wte``, ``wpe``, ``h.<i>.attn.c_attn`` ...);
GPT-2's Conv1D weights are already ``[in, out]``, our ``Dense`` layout.
No dropout: RL training needs it off.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import Dense, Embedding, LayerNorm, attend, update_cache

_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


class GPT2Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        d = cfg.hidden_size
        proj_std = cfg.initializer_range / math.sqrt(2 * cfg.num_layers)
        self.c_attn = Dense(d, 3 * d, use_bias=True, rngs=rngs, std=cfg.initializer_range,
                            dtype=dtype, param_dtype=param_dtype)
        self.c_proj = Dense(d, d, use_bias=True, rngs=rngs, std=proj_std, dtype=dtype,
                            param_dtype=param_dtype)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim

    def __call__(self, x, allowed, layer_cache, cache_index):
        b, t, _ = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        if layer_cache is not None:
            layer_cache = update_cache(layer_cache, k, v, cache_index)
            k, v = layer_cache["k"], layer_cache["v"]
        out = attend(q, k, v, allowed, scale=self.head_dim ** -0.5)
        return self.c_proj(out), layer_cache


class GPT2MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        proj_std = cfg.initializer_range / math.sqrt(2 * cfg.num_layers)
        self.c_fc = Dense(cfg.hidden_size, cfg.intermediate_size, use_bias=True, rngs=rngs,
                          std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype)
        self.c_proj = Dense(cfg.intermediate_size, cfg.hidden_size, use_bias=True, rngs=rngs,
                            std=proj_std, dtype=dtype, param_dtype=param_dtype)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return self.c_proj(_ACTIVATIONS[self.act](self.c_fc(x)))


class GPT2Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.ln_1 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
        self.attn = GPT2Attention(cfg, rngs=rngs, **kw)
        self.ln_2 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
        self.mlp = GPT2MLP(cfg, rngs=rngs, **kw)

    def __call__(self, x, allowed, layer_cache, cache_index):
        attn_out, layer_cache = self.attn(self.ln_1(x), allowed, layer_cache, cache_index)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, layer_cache


class GPT2Model(nnx.Module):
    """The GPT-2 trunk: embeddings, blocks, final LayerNorm (``transformer.*`` in HF)."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.wte = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                             std=cfg.initializer_range, **kw)
        self.wpe = Embedding(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs,
                             std=0.01, **kw)
        self.h = nnx.List([GPT2Block(cfg, rngs=rngs, **kw) for _ in range(cfg.num_layers)])
        self.ln_f = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)

    def embed_table(self):
        """The token embedding ``[V, D]`` (tied LM head)."""
        return self.wte.embedding[...]

    def __call__(self, input_ids, positions, allowed, cache, cache_index):
        x = self.wte(input_ids) + self.wpe(positions)
        new_cache = [] if cache is not None else None
        for i, block in enumerate(self.h):
            x, layer_cache = block(x, allowed, None if cache is None else cache[i], cache_index)
            if cache is not None:
                new_cache.append(layer_cache)
        return self.ln_f(x), new_cache
