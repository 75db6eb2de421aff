"""ModelConfig: one frozen description of a decoder LM, parsed from and written to HF config.json.

Two families share it: ``"gpt2"`` (learned positions, LayerNorm, GELU MLP, Conv1D
projections) and ``"llama"`` (rotary positions, RMSNorm, SwiGLU, grouped-query
attention), the latter covering the HF ``model_type`` values ``llama``, ``mistral``,
``qwen2`` (q/k/v bias) and ``qwen3`` (per-head q/k RMSNorm).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

# HF model_type -> our family.
_FAMILY_OF_MODEL_TYPE = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
}
# HF architecture class prefix per model_type.
_ARCH_PREFIX = {
    "gpt2": "GPT2",
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
}
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish")
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def supported_model_types() -> tuple[str, ...]:
    """The HF ``model_type`` values this package can build."""
    return tuple(_FAMILY_OF_MODEL_TYPE)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only LM (hashable, so it can be a static jit argument).

    Fields left as ``None`` are resolved from the others in ``__post_init__``:
    ``num_kv_heads`` defaults to ``num_heads``, ``head_dim`` to ``hidden_size //
    num_heads``, ``intermediate_size`` to ``4 * hidden_size``.

    ``rope_scaling`` is stored as a tuple of ``(key, value)`` pairs so the config
    stays hashable; read it as a dict with :attr:`rope_scaling_dict`. Supported
    ``rope_type`` values: ``default``, ``linear``, ``llama3``, ``yarn``.
    ``sliding_window`` is recorded for export but not applied (full attention).
    """

    family: str = "llama"
    model_type: str = "llama"
    vocab_size: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int = 512
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    attention_out_bias: bool = False  # bias on the output projection
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    sliding_window: int | None = None

    def __post_init__(self):
        if self.family not in ("gpt2", "llama"):
            raise ValueError(f"ModelConfig.family must be 'gpt2' or 'llama', got {self.family!r}")
        if self.model_type not in _FAMILY_OF_MODEL_TYPE:
            raise ValueError(
                f"ModelConfig.model_type {self.model_type!r} is not supported; "
                f"supported: {sorted(_FAMILY_OF_MODEL_TYPE)}")
        if _FAMILY_OF_MODEL_TYPE[self.model_type] != self.family:
            raise ValueError(f"model_type {self.model_type!r} belongs to family "
                             f"{_FAMILY_OF_MODEL_TYPE[self.model_type]!r}, not {self.family!r}")
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                                 f"num_heads {self.num_heads}; give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        if self.family == "gpt2":
            if self.hidden_act not in _GPT2_ACTIVATIONS:
                raise ValueError(f"GPT-2 activation {self.hidden_act!r} is not supported; "
                                 f"supported: {_GPT2_ACTIVATIONS}")
            if self.head_dim * self.num_heads != self.hidden_size:
                raise ValueError("GPT-2 needs head_dim * num_heads == hidden_size")
            if self.num_kv_heads != self.num_heads:
                raise ValueError("GPT-2 has no grouped-query attention: num_kv_heads must equal num_heads")
        else:
            if self.hidden_act not in ("silu", "swish"):
                raise ValueError(f"Llama-family activation {self.hidden_act!r} is not supported "
                                 "(only 'silu')")
            if self.head_dim % 2:
                raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
            rope_type = self.rope_scaling_dict.get("rope_type", "default")
            if rope_type not in _ROPE_TYPES:
                raise ValueError(f"rope_scaling type {rope_type!r} is not supported; "
                                 f"supported: {_ROPE_TYPES}")

    # ------------------------------------------------------------------ helpers
    @property
    def rope_scaling_dict(self) -> dict:
        """``rope_scaling`` as a plain dict (empty for plain RoPE)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.rope_scaling}

    @property
    def architecture_prefix(self) -> str:
        """The HF class-name prefix, e.g. ``"Qwen2"`` for ``Qwen2ForCausalLM``."""
        return _ARCH_PREFIX[self.model_type]

    @classmethod
    def tiny(cls, family: str = "llama", vocab_size: int = 128, **overrides) -> "ModelConfig":
        """A small random-init config for tests and demos (2 layers, width 64).

        Args:
          family: ``"gpt2"`` or ``"llama"``; any supported ``model_type`` works too
            (``"qwen2"`` turns on q/k/v bias, ``"qwen3"`` q/k norm).
          vocab_size: vocabulary size.
          **overrides: any other field.

        Example:
          >>> ModelConfig.tiny("gpt2", 64, num_layers=1).hidden_size
          64
        """
        model_type = family
        if family not in _FAMILY_OF_MODEL_TYPE:
            raise ValueError(f"tiny(): family must be one of {sorted(_FAMILY_OF_MODEL_TYPE)}, "
                             f"got {family!r}")
        fam = _FAMILY_OF_MODEL_TYPE[family]
        base: dict[str, Any] = dict(family=fam, model_type=model_type, vocab_size=vocab_size,
                                    hidden_size=64, num_layers=2, num_heads=4,
                                    max_position_embeddings=512)
        if fam == "gpt2":
            base.update(norm_eps=1e-5, hidden_act="gelu_new", tie_word_embeddings=True,
                        attention_bias=True, attention_out_bias=True, mlp_bias=True)
        else:
            base.update(num_kv_heads=2, intermediate_size=128, norm_eps=1e-6, hidden_act="silu",
                        tie_word_embeddings=True)
            if model_type == "qwen2":
                base.update(attention_bias=True)
            if model_type == "qwen3":
                base.update(qk_norm=True)
        base.update(overrides)
        return cls(**base)

    # ------------------------------------------------------------ HF interop
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Parse an HF ``config.json`` dict (transformers 4.x or 5.x layout).

        Raises:
          ValueError: for an unsupported ``model_type`` or an unsupported feature,
            naming it.
        """
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type not in _FAMILY_OF_MODEL_TYPE:
            raise ValueError(f"config.json model_type {model_type!r} is not supported; "
                             f"supported: {sorted(_FAMILY_OF_MODEL_TYPE)} "
                             f"(architectures={hf.get('architectures')})")
        common = dict(vocab_size=hf["vocab_size"], pad_token_id=_first(hf.get("pad_token_id")),
                      bos_token_id=_first(hf.get("bos_token_id")),
                      eos_token_id=_first(hf.get("eos_token_id")),
                      initializer_range=hf.get("initializer_range", 0.02))
        if model_type == "gpt2":
            if hf.get("scale_attn_by_inverse_layer_idx"):
                raise ValueError("GPT-2 config key scale_attn_by_inverse_layer_idx=True is not supported")
            if hf.get("scale_attn_weights", True) is False:
                raise ValueError("GPT-2 config key scale_attn_weights=False is not supported")
            n_embd = hf["n_embd"]
            return cls(family="gpt2", model_type="gpt2", hidden_size=n_embd,
                       num_layers=hf["n_layer"], num_heads=hf["n_head"],
                       intermediate_size=hf.get("n_inner") or 4 * n_embd,
                       max_position_embeddings=hf["n_positions"],
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       hidden_act=hf.get("activation_function", "gelu_new"),
                       tie_word_embeddings=hf.get("tie_word_embeddings", True),
                       attention_bias=True, attention_out_bias=True, mlp_bias=True, **common)
        # Llama family. transformers 5 stores rope settings in "rope_parameters";
        # 4.x in "rope_theta" + "rope_scaling".
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        for k, v in legacy.items():
            rope.setdefault(k, v)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.pop("type", None)
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") == "default":
            rope = {}
        if hf.get("partial_rotary_factor", 1.0) != 1.0 or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        num_heads = hf["num_attention_heads"]
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            family="llama", model_type=model_type, hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6), hidden_act=hf.get("hidden_act", "silu"),
            rope_theta=float(theta), rope_scaling=_freeze(rope),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2/2.5 always have q/k/v bias (no config key); Llama's attention_bias
            # covers q/k/v/o; Qwen3's covers q/k/v/o too.
            attention_bias=True if model_type == "qwen2" else attention_bias,
            attention_out_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", model_type == "mistral") else None,
            **common)

    def to_hf_config(self, *, head: str = "lm", dtype: str = "float32") -> dict:
        """The HF ``config.json`` dict for this model.

        Args:
          head: ``"lm"`` writes ``*ForCausalLM``; ``"scalar"`` writes
            ``*ForSequenceClassification`` with one label.
          dtype: the stored weight dtype name (``"float32"``, ``"bfloat16"``...).
        """
        if head == "scalar":
            arch = self.architecture_prefix + "ForSequenceClassification"
        elif self.family == "gpt2":
            arch = "GPT2LMHeadModel"
        else:
            arch = self.architecture_prefix + "ForCausalLM"
        out: dict[str, Any] = {"architectures": [arch], "model_type": self.model_type,
                               "vocab_size": self.vocab_size, "dtype": dtype,
                               "initializer_range": self.initializer_range,
                               "tie_word_embeddings": self.tie_word_embeddings,
                               "pad_token_id": self.pad_token_id,
                               "bos_token_id": self.bos_token_id,
                               "eos_token_id": self.eos_token_id}
        if self.family == "gpt2":
            out.update(n_embd=self.hidden_size, n_layer=self.num_layers, n_head=self.num_heads,
                       n_inner=self.intermediate_size, n_positions=self.max_position_embeddings,
                       layer_norm_epsilon=self.norm_eps, activation_function=self.hidden_act,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        else:
            if self.model_type == "qwen2" and not (self.attention_bias and not self.attention_out_bias):
                raise ValueError("qwen2 export needs attention_bias=True, attention_out_bias=False")
            if self.model_type != "qwen2" and self.attention_bias != self.attention_out_bias:
                raise ValueError(f"{self.model_type} export needs attention_bias == attention_out_bias")
            if self.qk_norm != (self.model_type == "qwen3"):
                raise ValueError("qk_norm must be True exactly for model_type 'qwen3'")
            rope = {"rope_type": "default", **self.rope_scaling_dict, "rope_theta": self.rope_theta}
            out.update(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                       num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                       head_dim=self.head_dim, intermediate_size=self.intermediate_size,
                       max_position_embeddings=self.max_position_embeddings,
                       rms_norm_eps=self.norm_eps, hidden_act=self.hidden_act,
                       rope_parameters=rope, attention_dropout=0.0,
                       # transformers 4.x / vLLM read these legacy keys; 5.x reads rope_parameters
                       rope_theta=self.rope_theta,
                       rope_scaling=self.rope_scaling_dict or None)
            if self.model_type != "qwen2":
                out["attention_bias"] = self.attention_bias
            if self.model_type in ("llama",):
                out["mlp_bias"] = self.mlp_bias
            if self.model_type in ("qwen2", "qwen3", "mistral"):
                out["sliding_window"] = self.sliding_window
                if self.model_type != "mistral":
                    out["use_sliding_window"] = self.sliding_window is not None
        if head == "scalar":
            out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        return out


def _first(value):
    """HF sometimes stores a list of eos ids; we keep the first."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _freeze(mapping: Mapping) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in mapping.items()))


def rope_attention_factor(config: ModelConfig) -> float:
    """The cos/sin multiplier used by YaRN (1.0 for the other rope types)."""
    rope = config.rope_scaling_dict
    if rope.get("rope_type") != "yarn":
        return 1.0
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    factor = float(rope["factor"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.get("mscale") and rope.get("mscale_all_dim"):
        return mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
    return mscale(factor)
