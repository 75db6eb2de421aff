"""GPT-2 trunk as a Flax NNX module (learned positions, pre-LayerNorm blocks, GELU MLP).

Parameter names follow HF's GPT-2 (``wte``, ``wpe``, ``h.attn.c_attn`` ...), with the
blocks stacked along a leading layer axis (HF's ``h.<i>`` is slice ``i``, see
:mod:`rlhf_jax.models.stack`); GPT-2's Conv1D weights are already ``[in, out]``, our
``Dense`` layout.
No dropout: RL training needs it off.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.attention import attention, write_kv
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import ACTIVATIONS, Dense, Embedding, LayerNorm
from rlhf_jax.models.registry import Family, register
from rlhf_jax.models.stack import scan_layers, stack_modules


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
        return self.c_proj(ACTIVATIONS[self.act](self.c_fc(x)))


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


# ------------------------------------------------------------------ HF names and config.json
# (HF name without "transformer.", our path below "trunk", transpose): Conv1D is [in, out].
HF_TABLE = (
    ("wte.weight", "wte/embedding", False),
    ("wpe.weight", "wpe/embedding", False),
    ("h.{i}.ln_1.weight", "h/{i}/ln_1/scale", False),
    ("h.{i}.ln_1.bias", "h/{i}/ln_1/bias", False),
    ("h.{i}.attn.c_attn.weight", "h/{i}/attn/c_attn/kernel", False),
    ("h.{i}.attn.c_attn.bias", "h/{i}/attn/c_attn/bias", False),
    ("h.{i}.attn.c_proj.weight", "h/{i}/attn/c_proj/kernel", False),
    ("h.{i}.attn.c_proj.bias", "h/{i}/attn/c_proj/bias", False),
    ("h.{i}.ln_2.weight", "h/{i}/ln_2/scale", False),
    ("h.{i}.ln_2.bias", "h/{i}/ln_2/bias", False),
    ("h.{i}.mlp.c_fc.weight", "h/{i}/mlp/c_fc/kernel", False),
    ("h.{i}.mlp.c_fc.bias", "h/{i}/mlp/c_fc/bias", False),
    ("h.{i}.mlp.c_proj.weight", "h/{i}/mlp/c_proj/kernel", False),
    ("h.{i}.mlp.c_proj.bias", "h/{i}/mlp/c_proj/bias", False),
    ("ln_f.weight", "ln_f/scale", False),
    ("ln_f.bias", "ln_f/bias", False),
)
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish")


def _from_hf(hf: dict, model_type: str) -> dict:
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("GPT-2 config key scale_attn_by_inverse_layer_idx=True is not supported")
    if hf.get("scale_attn_weights", True) is False:
        raise ValueError("GPT-2 config key scale_attn_weights=False is not supported")
    n_embd = hf["n_embd"]
    return dict(hidden_size=n_embd, num_layers=hf["n_layer"], num_heads=hf["n_head"],
                intermediate_size=hf.get("n_inner") or 4 * n_embd,
                max_position_embeddings=hf["n_positions"],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                hidden_act=hf.get("activation_function", "gelu_new"),
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                attention_bias=True, attention_out_bias=True, mlp_bias=True)


def _to_hf(cfg: ModelConfig) -> dict:
    return dict(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                n_inner=cfg.intermediate_size, n_positions=cfg.max_position_embeddings,
                layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.hidden_act,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _validate(cfg: ModelConfig) -> None:
    if cfg.hidden_act not in _GPT2_ACTIVATIONS:
        raise ValueError(f"GPT-2 activation {cfg.hidden_act!r} is not supported; "
                         f"supported: {_GPT2_ACTIVATIONS}")
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ValueError("GPT-2 needs head_dim * num_heads == hidden_size")
    if cfg.num_kv_heads != cfg.num_heads:
        raise ValueError("GPT-2 has no grouped-query attention: num_kv_heads must equal num_heads")


def _tiny(model_type: str) -> dict:
    return dict(norm_eps=1e-5, hidden_act="gelu_new", tie_word_embeddings=True,
                attention_bias=True, attention_out_bias=True, mlp_bias=True)


FAMILY = register(Family(
    name="gpt2", model_types={"gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification")},
    trunk=GPT2Model, hf_table=HF_TABLE, hf_prefix="transformer.", embed_path="wte/embedding",
    from_hf=_from_hf, to_hf=_to_hf, validate=_validate, tiny=_tiny))
