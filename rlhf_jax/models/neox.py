"""GPT-NeoX / Pythia trunk as a Flax NNX module: LayerNorm with bias, fused QKV, partial
rotary positions, parallel residual.

One block is ``x + attn(ln_1(x)) + mlp(ln_2(x))`` with ``parallel_residual`` (Pythia,
NeoX-20B), else the sequential ``h = x + attn(ln_1(x)); h + mlp(ln_2(h))``. The fused
``query_key_value`` projection keeps NeoX's layout: its output is ``[H, 3, Dh]`` per token
(each head's q, k, v side by side), so the HF weight loads as it is (transposed to our
``[in, out]``). Rotary positions turn the first ``partial_rotary_factor * Dh`` dimensions
of each head (``rotary_pct``, 0.25 in Pythia). The LM head is HF's untied ``embed_out``.
Names follow HF (``gpt_neox.embed_in``, ``gpt_neox.layers.<i>.attention.query_key_value``
...), the layers stacked along a leading axis. No dropout.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.attention import attention, write_kv
from rlhf_jax.models.config import ModelConfig, hf_rope
from rlhf_jax.models.layers import ACTIVATIONS, Dense, Embedding, LayerNorm, apply_rope, rope_cos_sin
from rlhf_jax.models.registry import Family, register
from rlhf_jax.models.stack import scan_layers, stack_modules


class NeoXAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        d = cfg.hidden_size
        kw = dict(rngs=rngs, std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype)
        self.query_key_value = Dense(d, 3 * d, use_bias=cfg.attention_bias, **kw)
        self.dense = Dense(d, d, use_bias=cfg.attention_bias, **kw)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim

    def __call__(self, x, cos, sin, mask, layer_cache):
        b, t, _ = x.shape
        h, dh = self.num_heads, self.head_dim
        qkv = self.query_key_value(x).reshape(b, t, h, 3 * dh)
        q, k, v = qkv[..., :dh], qkv[..., dh:2 * dh], qkv[..., 2 * dh:]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache = None
        if layer_cache is not None:
            cache, k, v = write_kv(layer_cache, k, v)
        out = attention(q, k, v, mask, scale=dh ** -0.5)
        return self.dense(out), cache


class NeoXMLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        kw = dict(use_bias=True, rngs=rngs, std=cfg.initializer_range, dtype=dtype,
                  param_dtype=param_dtype)
        self.dense_h_to_4h = Dense(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.dense_4h_to_h = Dense(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return self.dense_4h_to_h(ACTIVATIONS[self.act](self.dense_h_to_4h(x)))


class NeoXBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
        self.attention = NeoXAttention(cfg, rngs=rngs, **kw)
        self.mlp = NeoXMLP(cfg, rngs=rngs, **kw)
        self.parallel = cfg.parallel_residual

    def __call__(self, x, cos, sin, mask, layer_cache):
        attn_out, cache = self.attention(self.input_layernorm(x), cos, sin, mask, layer_cache)
        if self.parallel:
            return x + attn_out + self.mlp(self.post_attention_layernorm(x)), cache
        h = x + attn_out
        return h + self.mlp(self.post_attention_layernorm(h)), cache


class NeoXModel(nnx.Module):
    """The GPT-NeoX trunk: embeddings, blocks, final LayerNorm (``gpt_neox.*`` in HF)."""

    def __init__(self, cfg: ModelConfig, *, rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_in = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                                  std=cfg.initializer_range, **kw)
        self.layers = stack_modules([NeoXBlock(cfg, rngs=rngs, **kw) for _ in range(cfg.num_layers)])
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, **kw)
        self.cfg = cfg

    def embed_table(self):
        """The token embedding ``[V, D]`` (tied LM head)."""
        return self.embed_in.embedding[...]

    def __call__(self, input_ids, positions, mask, cache, cache_index, *, remat="none"):
        """Hidden states ``[B, T, D]`` and the cache; ``mask`` is an ``AttentionMask``."""
        x = self.embed_in(input_ids)
        cos, sin = rope_cos_sin(self.cfg, positions)
        x, cache = scan_layers(self.layers, lambda block, h, lc: block(h, cos, sin, mask, lc),
                               x, cache, cache_index, remat=remat)
        return self.final_layer_norm(x), cache


# ------------------------------------------------------------------ HF names and config.json
# (HF name without "gpt_neox.", our path below "trunk", transpose): nn.Linear is [out, in].
HF_TABLE = [("embed_in.weight", "embed_in/embedding", False),
            ("final_layer_norm.weight", "final_layer_norm/scale", False),
            ("final_layer_norm.bias", "final_layer_norm/bias", False)]
for _norm in ("input_layernorm", "post_attention_layernorm"):
    HF_TABLE += [(f"layers.{{i}}.{_norm}.weight", f"layers/{{i}}/{_norm}/scale", False),
                 (f"layers.{{i}}.{_norm}.bias", f"layers/{{i}}/{_norm}/bias", False)]
for _proj in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
    _ours = _proj.replace(".", "/")
    HF_TABLE += [(f"layers.{{i}}.{_proj}.weight", f"layers/{{i}}/{_ours}/kernel", True),
                 (f"layers.{{i}}.{_proj}.bias", f"layers/{{i}}/{_ours}/bias", False)]
HF_TABLE = tuple(HF_TABLE)
# transformers 4.x and the hub name the untied head embed_out (5.x renames it lm_head on load)
_HEAD_ROWS = (("embed_out.weight", "lm_head/kernel", True),)


def _from_hf(hf: dict, model_type: str) -> dict:
    theta, rope = hf_rope(hf)
    if "rotary_emb_base" in hf and not hf.get("rope_parameters"):
        theta = float(hf["rotary_emb_base"])
    partial = float(rope.pop("partial_rotary_factor", hf.get("rotary_pct", 0.25)))
    num_heads = hf["num_attention_heads"]
    return dict(hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                num_heads=num_heads, intermediate_size=hf["intermediate_size"],
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                norm_eps=hf.get("layer_norm_eps", 1e-5), hidden_act=hf.get("hidden_act", "gelu"),
                rope_theta=theta, rope_scaling=rope, partial_rotary_factor=partial,
                parallel_residual=bool(hf.get("use_parallel_residual", True)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", True)),
                attention_out_bias=bool(hf.get("attention_bias", True)), mlp_bias=True)


def _to_hf(cfg: ModelConfig) -> dict:
    rope = {"rope_type": "default", **cfg.rope_scaling_dict, "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.partial_rotary_factor}
    return dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                max_position_embeddings=cfg.max_position_embeddings, layer_norm_eps=cfg.norm_eps,
                hidden_act=cfg.hidden_act, use_parallel_residual=cfg.parallel_residual,
                attention_bias=cfg.attention_bias, rope_parameters=rope,
                # transformers 4.x reads these
                rotary_pct=cfg.partial_rotary_factor, rotary_emb_base=cfg.rope_theta,
                rope_scaling=cfg.rope_scaling_dict or None,
                attention_dropout=0.0, hidden_dropout=0.0)


def _validate(cfg: ModelConfig) -> None:
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"GPT-NeoX activation {cfg.hidden_act!r} is not supported; "
                         f"supported: {sorted(ACTIVATIONS)}")
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size or cfg.num_kv_heads != cfg.num_heads:
        raise ValueError("GPT-NeoX needs head_dim * num_heads == hidden_size and no grouped-query attention")
    if cfg.rotary_dim % 2:
        raise ValueError(f"rotary embeddings need an even rotary_dim, got {cfg.rotary_dim}")
    if cfg.attention_bias != cfg.attention_out_bias or not cfg.mlp_bias:
        raise ValueError("GPT-NeoX has one attention_bias for qkv and the output, and MLP biases")
    if cfg.sliding_window is not None or cfg.layer_types or cfg.qk_norm:
        raise ValueError("GPT-NeoX has no sliding window or q/k norm")


def _tiny(model_type: str) -> dict:
    return dict(norm_eps=1e-5, hidden_act="gelu", partial_rotary_factor=0.25, parallel_residual=True,
                attention_bias=True, attention_out_bias=True, mlp_bias=True)


FAMILY = register(Family(
    name="gpt_neox", model_types={"gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification")},
    trunk=NeoXModel, hf_table=HF_TABLE, hf_prefix="gpt_neox.", embed_path="embed_in/embedding",
    from_hf=_from_hf, to_hf=_to_hf, validate=_validate, tiny=_tiny, hf_head_rows=_HEAD_ROWS))
