"""GPT-2 trunk as a Flax NNX module (learned positions, pre-LayerNorm blocks, GELU MLP).

Parameter names follow HF's GPT-2 (``wte``, ``wpe``, ``h.attn.c_attn`` ...), with the
blocks stacked along a leading layer axis (HF's ``h.<i>`` is slice ``i``, see
:mod:`rlhf_jax.models.stack`); GPT-2's Conv1D weights are already ``[in, out]``, our
``Dense`` layout.
No dropout: RL training needs it off.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.attention import attention, write_kv
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import Dense, Embedding, LayerNorm
from rlhf_jax.models.stack import scan_layers, stack_modules

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

    def __call__(self, x, mask, layer_cache):
        b, t, _ = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        cache = None
        if layer_cache is not None:
            cache, k, v = write_kv(layer_cache, k, v)
        out = attention(q, k, v, mask, scale=self.head_dim ** -0.5)
        return self.c_proj(out), cache


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

    def __call__(self, x, mask, layer_cache):
        attn_out, cache = self.attn(self.ln_1(x), mask, layer_cache)
        x = x + attn_out
        x = x + self.mlp(self.ln_2(x))
        return x, cache


class GPT2Model(nnx.Module):
    """The GPT-2 trunk: embeddings, blocks, final LayerNorm (``transformer.*`` in HF)."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.wte = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                             std=cfg.initializer_range, **kw)
        self.wpe = Embedding(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs,
                             std=0.01, **kw)
        self.h = stack_modules([GPT2Block(cfg, rngs=rngs, **kw) for _ in range(cfg.num_layers)])
        self.ln_f = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)

    def embed_table(self):
        """The token embedding ``[V, D]`` (tied LM head)."""
        return self.wte.embedding[...]

    def __call__(self, input_ids, positions, mask, cache, cache_index, *, remat="none"):
        """Hidden states ``[B, T, D]`` and the cache; ``mask`` is an ``AttentionMask``."""
        x = self.wte(input_ids) + self.wpe(positions)
        x, cache = scan_layers(self.h, lambda block, h, lc: block(h, mask, lc), x, cache,
                               cache_index, remat=remat)
        return self.ln_f(x), cache
