"""Llama-family trunk as a Flax NNX module: RMSNorm, rotary positions, grouped-query
attention, SwiGLU MLP.

One module covers Llama 2/3 (incl. ``rope_scaling``), Mistral (sliding-window
attention), Qwen2/2.5 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm), switched by
:class:`ModelConfig` fields. Parameter names follow HF (``embed_tokens``,
``layers.self_attn.q_proj`` ...), with the layers stacked along a leading axis
(``layers.<i>`` in HF is slice ``i``, see :mod:`rlhf_jax.models.stack`); HF ``nn.Linear``
weights are ``[out, in]`` and are transposed on load. No dropout.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.attention import attention, write_kv
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import Dense, Embedding, RMSNorm, apply_rope, rope_cos_sin
from rlhf_jax.models.stack import scan_layers, stack_modules


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        d, hq, hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(rngs=rngs, std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Dense(d, hq * dh, use_bias=cfg.attention_bias, **kw)
        self.k_proj = Dense(d, hkv * dh, use_bias=cfg.attention_bias, **kw)
        self.v_proj = Dense(d, hkv * dh, use_bias=cfg.attention_bias, **kw)
        self.o_proj = Dense(hq * dh, d, use_bias=cfg.attention_out_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(dh, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = RMSNorm(dh, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        self.shape = (hq, hkv, dh)
        self.window = cfg.sliding_window

    def __call__(self, x, cos, sin, mask, layer_cache):
        b, t, _ = x.shape
        hq, hkv, dh = self.shape
        q = self.q_proj(x).reshape(b, t, hq, dh)
        k = self.k_proj(x).reshape(b, t, hkv, dh)
        v = self.v_proj(x).reshape(b, t, hkv, dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache = None
        if layer_cache is not None:
            cache, k, v = write_kv(layer_cache, k, v)
        out = attention(q, k, v, mask, scale=dh ** -0.5, window=self.window)
        return self.o_proj(out), cache


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=cfg.mlp_bias, rngs=rngs, std=cfg.initializer_range, dtype=dtype,
                  param_dtype=param_dtype)
        self.gate_proj = Dense(d, f, **kw)
        self.up_proj = Dense(d, f, **kw)
        self.down_proj = Dense(f, d, **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
        self.self_attn = LlamaAttention(cfg, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
        self.mlp = LlamaMLP(cfg, rngs=rngs, **kw)

    def __call__(self, x, cos, sin, mask, layer_cache):
        attn_out, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_cache)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


class LlamaModel(nnx.Module):
    """The Llama-family trunk: embeddings, blocks, final RMSNorm (``model.*`` in HF)."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                                      std=cfg.initializer_range, **kw)
        self.layers = stack_modules([LlamaBlock(cfg, rngs=rngs, **kw) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
        self.cfg = cfg

    def embed_table(self):
        """The token embedding ``[V, D]`` (tied LM head)."""
        return self.embed_tokens.embedding[...]

    def __call__(self, input_ids, positions, mask, cache, cache_index, *, remat="none"):
        """Hidden states ``[B, T, D]`` and the cache; ``mask`` is an ``AttentionMask``."""
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.cfg, positions)
        x, cache = scan_layers(self.layers, lambda block, h, lc: block(h, cos, sin, mask, lc),
                               x, cache, cache_index, remat=remat)
        return self.norm(x), cache
