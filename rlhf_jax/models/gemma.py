"""Gemma 2 and Gemma 3 (text) trunk as a Flax NNX module.

What sets Gemma apart from Llama: embeddings scaled by ``sqrt(hidden_size)`` (in the compute
dtype, as HF does), ``(1 + w)`` RMSNorms (zero-initialised) before *and after* attention and
the MLP, a GeGLU MLP (tanh-approximated GELU), scores scaled by ``query_pre_attn_scalar ** -0.5``,
sliding-window layers alternating with global ones, tied embeddings. Gemma 2 also soft-caps
the attention scores and the final logits (``cap * tanh(x / cap)``); Gemma 3 has per-head
q/k RMSNorms and a separate rope base for its sliding layers (``rope_local_base_freq``).

The layers are one scanned block, so what differs between layers (sliding or global, and
with it the rope table) is per-layer data of the scan: a bool per layer picks the window
and the rope (:func:`rlhf_jax.models.stack.scan_layers`'s ``per_layer``). Names follow HF
(``model.layers.<i>.pre_feedforward_layernorm`` ...), layers stacked. No dropout.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.attention import attention, write_kv
from rlhf_jax.models.config import ModelConfig, hf_rope
from rlhf_jax.models.layers import ACTIVATIONS, Dense, Embedding, OffsetRMSNorm, apply_rope, rope_cos_sin
from rlhf_jax.models.registry import Family, register
from rlhf_jax.models.stack import scan_layers, stack_modules


class GemmaAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        d, hq, hkv, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(rngs=rngs, std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Dense(d, hq * dh, use_bias=cfg.attention_bias, **kw)
        self.k_proj = Dense(d, hkv * dh, use_bias=cfg.attention_bias, **kw)
        self.v_proj = Dense(d, hkv * dh, use_bias=cfg.attention_bias, **kw)
        self.o_proj = Dense(hq * dh, d, use_bias=cfg.attention_bias, **kw)
        if cfg.qk_norm:
            self.q_norm = OffsetRMSNorm(dh, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.k_norm = OffsetRMSNorm(dh, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None
        self.shape = (hq, hkv, dh)
        self.scale = cfg.attention_scale
        self.softcap = cfg.attn_logit_softcap
        self.window = cfg.sliding_window

    def __call__(self, x, cos, sin, mask, layer_cache, sliding):
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
        out = attention(q, k, v, mask, scale=self.scale, window=self.window, sliding=sliding,
                        softcap=self.softcap)
        return self.o_proj(out), cache


class GemmaMLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=False, rngs=rngs, std=cfg.initializer_range, dtype=dtype,
                  param_dtype=param_dtype)
        self.gate_proj = Dense(d, f, **kw)
        self.up_proj = Dense(d, f, **kw)
        self.down_proj = Dense(f, d, **kw)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class GemmaBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        kw = dict(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
        d = cfg.hidden_size
        self.input_layernorm = OffsetRMSNorm(d, **kw)
        self.self_attn = GemmaAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_attention_layernorm = OffsetRMSNorm(d, **kw)
        self.pre_feedforward_layernorm = OffsetRMSNorm(d, **kw)
        self.mlp = GemmaMLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_feedforward_layernorm = OffsetRMSNorm(d, **kw)

    def __call__(self, x, cos, sin, mask, layer_cache, sliding):
        attn_out, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_cache, sliding)
        x = x + self.post_attention_layernorm(attn_out)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, cache


class GemmaModel(nnx.Module):
    """The Gemma 2 / 3 text trunk: scaled embeddings, blocks, final norm (``model.*`` in HF)."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                                      std=cfg.initializer_range, **kw)
        self.layers = stack_modules([GemmaBlock(cfg, rngs=rngs, **kw) for _ in range(cfg.num_layers)])
        self.norm = OffsetRMSNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
        self.cfg = cfg
        self.dtype = dtype

    def embed_table(self):
        """The token embedding ``[V, D]`` (tied LM head)."""
        return self.embed_tokens.embedding[...]

    def __call__(self, input_ids, positions, mask, cache, cache_index, *, remat="none"):
        """Hidden states ``[B, T, D]`` and the cache; ``mask`` is an ``AttentionMask``."""
        cfg = self.cfg
        x = self.embed_tokens(input_ids) * jnp.asarray(math.sqrt(cfg.hidden_size), self.dtype)
        sliding = cfg.sliding_layers
        cos, sin = rope_cos_sin(cfg, positions)
        if any(sliding) and cfg.rope_local_theta is not None:
            local_cos, local_sin = rope_cos_sin(cfg, positions, local=True)
        else:
            local_cos, local_sin = cos, sin
        if all(sliding) or not any(sliding):  # uniform layers: the window is static
            def apply(block, h, lc):
                c, s = (local_cos, local_sin) if all(sliding) else (cos, sin)
                return block(h, c, s, mask, lc, None)

            x, cache = scan_layers(self.layers, apply, x, cache, cache_index, remat=remat)
        else:
            def apply(block, h, lc, is_sliding):
                c = jnp.where(is_sliding, local_cos, cos)
                s = jnp.where(is_sliding, local_sin, sin)
                return block(h, c, s, mask, lc, is_sliding)

            x, cache = scan_layers(self.layers, apply, x, cache, cache_index, remat=remat,
                                   per_layer=jnp.asarray(sliding))
        return self.norm(x), cache


# ------------------------------------------------------------------ HF names and config.json
# (HF name without "model.", our path below "trunk", transpose): nn.Linear is [out, in].
HF_TABLE = [("embed_tokens.weight", "embed_tokens/embedding", False),
            ("norm.weight", "norm/scale", False)]
for _proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
    HF_TABLE += [(f"layers.{{i}}.self_attn.{_proj}.weight", f"layers/{{i}}/self_attn/{_proj}/kernel", True),
                 (f"layers.{{i}}.self_attn.{_proj}.bias", f"layers/{{i}}/self_attn/{_proj}/bias", False)]
for _proj in ("gate_proj", "up_proj", "down_proj"):
    HF_TABLE.append((f"layers.{{i}}.mlp.{_proj}.weight", f"layers/{{i}}/mlp/{_proj}/kernel", True))
for _norm in ("q_norm", "k_norm"):
    HF_TABLE.append((f"layers.{{i}}.self_attn.{_norm}.weight", f"layers/{{i}}/self_attn/{_norm}/scale", False))
for _norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
              "post_feedforward_layernorm"):
    HF_TABLE.append((f"layers.{{i}}.{_norm}.weight", f"layers/{{i}}/{_norm}/scale", False))
HF_TABLE = tuple(HF_TABLE)

_MODEL_TYPES = {"gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
                "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification")}
# layer i is global when (i + 1) % pattern == 0: Gemma 2 alternates, Gemma 3 has 5 local : 1 global
_DEFAULT_PATTERN = {"gemma2": 2, "gemma3_text": 6}


def _from_hf(hf: dict, model_type: str) -> dict:
    if hf.get("use_bidirectional_attention"):
        raise ValueError("Gemma use_bidirectional_attention=True (an encoder) is not supported")
    num_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if not layer_types:
        pattern = int(hf.get("sliding_window_pattern") or _DEFAULT_PATTERN[model_type])
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                       for i in range(num_layers)]
    params = hf.get("rope_parameters") or {}
    local_theta = None
    if model_type == "gemma3_text":
        # transformers 5: rope_parameters per layer type; 4.x: rope_theta (+ rope_scaling) for
        # the global layers, rope_local_base_freq for the sliding ones
        if "full_attention" in params or "sliding_attention" in params:
            full = dict(params.get("full_attention") or {})
            theta, rope = hf_rope({"rope_parameters": full})
            local = dict(params.get("sliding_attention") or {})
            if local.get("rope_type", "default") != "default":
                raise ValueError("Gemma 3: rope scaling on the sliding layers is not supported")
            local_theta = float(local.get("rope_theta", 10000.0))
        else:
            theta, rope = hf_rope({k: v for k, v in hf.items() if k != "rope_parameters"}
                                  | {"rope_theta": hf.get("rope_theta", 1_000_000.0)})
            local_theta = float(hf.get("rope_local_base_freq", 10000.0))
        attn_softcap = None  # HF's Gemma 3 attention ignores attn_logit_softcapping
    else:
        theta, rope = hf_rope(hf)
        attn_softcap = hf.get("attn_logit_softcapping", 50.0)  # HF's defaults where a key is absent
    rope.pop("partial_rotary_factor", None)
    num_heads = hf["num_attention_heads"]
    return dict(
        hidden_size=hf["hidden_size"], num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        rope_theta=theta, rope_scaling=rope, rope_local_theta=local_theta,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=bool(hf.get("attention_bias", False)),
        attention_out_bias=bool(hf.get("attention_bias", False)),
        qk_norm=model_type == "gemma3_text",
        sliding_window=hf.get("sliding_window", 4096), layer_types=tuple(layer_types),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        attn_logit_softcap=attn_softcap,
        final_logit_softcap=hf.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None))


def _to_hf(cfg: ModelConfig) -> dict:
    out = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
               num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
               head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
               max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
               hidden_activation=cfg.hidden_act, attention_bias=cfg.attention_bias,
               attention_dropout=0.0, sliding_window=cfg.sliding_window,
               layer_types=list(cfg.layer_types),
               query_pre_attn_scalar=cfg.query_pre_attn_scalar,
               final_logit_softcapping=cfg.final_logit_softcap)
    rope = {"rope_type": "default", **cfg.rope_scaling_dict, "rope_theta": cfg.rope_theta}
    if cfg.model_type == "gemma3_text":
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta}
        out.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
                   attn_logit_softcapping=None, use_bidirectional_attention=False,
                   # transformers 4.x reads these
                   rope_theta=cfg.rope_theta, rope_local_base_freq=cfg.rope_local_theta,
                   rope_scaling=cfg.rope_scaling_dict or None)
    else:
        out.update(rope_parameters=rope, attn_logit_softcapping=cfg.attn_logit_softcap,
                   rope_theta=cfg.rope_theta)
    return out


def _validate(cfg: ModelConfig) -> None:
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"Gemma activation {cfg.hidden_act!r} is not supported; "
                         f"supported: {sorted(ACTIVATIONS)}")
    if cfg.head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {cfg.head_dim}")
    if cfg.qk_norm != (cfg.model_type == "gemma3_text"):
        raise ValueError("Gemma: qk_norm is True exactly for model_type 'gemma3_text'")
    if cfg.model_type == "gemma3_text" and cfg.attn_logit_softcap is not None:
        raise ValueError("Gemma 3 has no attention soft-capping (HF ignores attn_logit_softcapping)")
    if cfg.parallel_residual or cfg.partial_rotary_factor != 1.0 or cfg.mlp_bias:
        raise ValueError("Gemma has no parallel residual, partial rotary or MLP bias")
    if cfg.attention_bias != cfg.attention_out_bias:
        raise ValueError("Gemma has one attention_bias for q/k/v and the output")
    if any(t == "sliding_attention" for t in cfg.layer_types) and cfg.sliding_window is None:
        raise ValueError("layer_types has sliding layers but sliding_window is None")


def _tiny(model_type: str) -> dict:
    base = dict(num_kv_heads=2, intermediate_size=128, norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                tie_word_embeddings=True, sliding_window=4, query_pre_attn_scalar=16,
                layer_types=("sliding_attention", "full_attention"))
    if model_type == "gemma2":
        base.update(attn_logit_softcap=50.0, final_logit_softcap=30.0)
    else:
        base.update(qk_norm=True, rope_theta=1_000_000.0, rope_local_theta=10_000.0)
    return base


FAMILY = register(Family(
    name="gemma", model_types=_MODEL_TYPES, trunk=GemmaModel, hf_table=HF_TABLE,
    hf_prefix="model.", embed_path="embed_tokens/embedding", from_hf=_from_hf, to_hf=_to_hf,
    validate=_validate, tiny=_tiny))
