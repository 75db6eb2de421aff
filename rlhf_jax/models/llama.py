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
from rlhf_jax.models.config import ModelConfig, hf_rope
from rlhf_jax.models.layers import Dense, Embedding, RMSNorm, apply_rope, rope_cos_sin
from rlhf_jax.models.registry import Family, register
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


# ------------------------------------------------------------------ HF names and config.json
# (HF name without "model.", our path below "trunk", transpose): nn.Linear is [out, in].
HF_TABLE = [("embed_tokens.weight", "embed_tokens/embedding", False),
            ("norm.weight", "norm/scale", False)]
for _proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
    HF_TABLE += [(f"layers.{{i}}.self_attn.{_proj}.weight", f"layers/{{i}}/self_attn/{_proj}/kernel", True),
                 (f"layers.{{i}}.self_attn.{_proj}.bias", f"layers/{{i}}/self_attn/{_proj}/bias", False)]
for _proj in ("gate_proj", "up_proj", "down_proj"):
    HF_TABLE += [(f"layers.{{i}}.mlp.{_proj}.weight", f"layers/{{i}}/mlp/{_proj}/kernel", True),
                 (f"layers.{{i}}.mlp.{_proj}.bias", f"layers/{{i}}/mlp/{_proj}/bias", False)]
for _norm in ("q_norm", "k_norm"):
    HF_TABLE.append((f"layers.{{i}}.self_attn.{_norm}.weight", f"layers/{{i}}/self_attn/{_norm}/scale", False))
for _norm in ("input_layernorm", "post_attention_layernorm"):
    HF_TABLE.append((f"layers.{{i}}.{_norm}.weight", f"layers/{{i}}/{_norm}/scale", False))
HF_TABLE = tuple(HF_TABLE)

_MODEL_TYPES = {name: (f"{prefix}ForCausalLM", f"{prefix}ForSequenceClassification")
                for name, prefix in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"),
                                     ("qwen3", "Qwen3"))}


def _from_hf(hf: dict, model_type: str) -> dict:
    theta, rope = hf_rope(hf)
    if hf.get("partial_rotary_factor", 1.0) != 1.0 or rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    num_heads = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    return dict(
        hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6), hidden_act=hf.get("hidden_act", "silu"),
        rope_theta=theta, rope_scaling=rope,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # Qwen2/2.5 always have q/k/v bias (no config key); Llama's attention_bias
        # covers q/k/v/o; Qwen3's covers q/k/v/o too.
        attention_bias=True if model_type == "qwen2" else attention_bias,
        attention_out_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", model_type == "mistral") else None)


def _to_hf(cfg: ModelConfig) -> dict:
    if cfg.model_type == "qwen2" and not (cfg.attention_bias and not cfg.attention_out_bias):
        raise ValueError("qwen2 export needs attention_bias=True, attention_out_bias=False")
    if cfg.model_type != "qwen2" and cfg.attention_bias != cfg.attention_out_bias:
        raise ValueError(f"{cfg.model_type} export needs attention_bias == attention_out_bias")
    if cfg.qk_norm != (cfg.model_type == "qwen3"):
        raise ValueError("qk_norm must be True exactly for model_type 'qwen3'")
    rope = {"rope_type": "default", **cfg.rope_scaling_dict, "rope_theta": cfg.rope_theta}
    out = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
               num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
               head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
               max_position_embeddings=cfg.max_position_embeddings,
               rms_norm_eps=cfg.norm_eps, hidden_act=cfg.hidden_act,
               rope_parameters=rope, attention_dropout=0.0,
               # transformers 4.x / vLLM read these legacy keys; 5.x reads rope_parameters
               rope_theta=cfg.rope_theta,
               rope_scaling=cfg.rope_scaling_dict or None)
    if cfg.model_type != "qwen2":
        out["attention_bias"] = cfg.attention_bias
    if cfg.model_type in ("llama",):
        out["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type in ("qwen2", "qwen3", "mistral"):
        out["sliding_window"] = cfg.sliding_window
        if cfg.model_type != "mistral":
            out["use_sliding_window"] = cfg.sliding_window is not None
    return out


def _validate(cfg: ModelConfig) -> None:
    if cfg.hidden_act not in ("silu", "swish"):
        raise ValueError(f"Llama-family activation {cfg.hidden_act!r} is not supported "
                         "(only 'silu')")
    if cfg.head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {cfg.head_dim}")
    if cfg.layer_types or cfg.partial_rotary_factor != 1.0 or cfg.parallel_residual:
        raise ValueError("the Llama family has no per-layer attention types, partial rotary "
                         "or parallel residual")


def _tiny(model_type: str) -> dict:
    return dict(num_kv_heads=2, intermediate_size=128, norm_eps=1e-6, hidden_act="silu",
                tie_word_embeddings=True, attention_bias=model_type == "qwen2",
                qk_norm=model_type == "qwen3")


FAMILY = register(Family(
    name="llama", model_types=_MODEL_TYPES, trunk=LlamaModel, hf_table=HF_TABLE,
    hf_prefix="model.", embed_path="embed_tokens/embedding", from_hf=_from_hf, to_hf=_to_hf,
    validate=_validate, tiny=_tiny))
