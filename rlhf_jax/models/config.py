"""ModelConfig: one frozen description of a decoder LM, parsed from and written to HF config.json.

The fields are shared by every family; what a family reads from and writes to
``config.json``, and what it can build, are its hooks in the registry
(:mod:`rlhf_jax.models.registry`): ``"gpt2"`` (GPT-2), ``"llama"`` (Llama, Mistral, Qwen2,
Qwen3), ``"gpt_neox"`` (GPT-NeoX/Pythia), ``"gemma"`` (Gemma 2, Gemma 3 text).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import rlhf_jax.models.registry as registry

_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_LAYER_TYPES = ("full_attention", "sliding_attention")


def supported_model_types() -> tuple[str, ...]:
    """The HF ``model_type`` values this package can build."""
    return registry.supported_model_types()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only LM (hashable, so it can be a static jit argument).

    Fields left as ``None`` are resolved from the others in ``__post_init__``:
    ``num_kv_heads`` defaults to ``num_heads``, ``head_dim`` to ``hidden_size //
    num_heads``, ``intermediate_size`` to ``4 * hidden_size``.

    ``rope_scaling`` is stored as a tuple of ``(key, value)`` pairs so the config
    stays hashable; read it as a dict with :attr:`rope_scaling_dict`. Supported
    ``rope_type`` values: ``default``, ``linear``, ``llama3``, ``yarn``.

    Attention windows: ``sliding_window`` applies to every layer when ``layer_types`` is
    empty (Mistral), else to the layers marked ``"sliding_attention"`` (Gemma), which use
    the rope base ``rope_local_theta`` when it is set (Gemma 3; no rope scaling there).

    Family-specific fields: ``parallel_residual`` and ``partial_rotary_factor`` (GPT-NeoX),
    ``query_pre_attn_scalar`` (scores scaled by its ``-1/2`` power instead of
    ``head_dim``'s), ``attn_logit_softcap`` and ``final_logit_softcap`` (``cap *
    tanh(x / cap)`` on the attention scores and the LM logits, Gemma 2).
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
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    sliding_window: int | None = None
    layer_types: tuple = ()  # per layer "full_attention" / "sliding_attention"; () = uniform
    rope_local_theta: float | None = None
    partial_rotary_factor: float = 1.0
    parallel_residual: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None

    def __post_init__(self):
        family = registry.get_family(self.family)
        owner = registry.family_of_model_type(self.model_type)
        if owner.name != self.family:
            raise ValueError(f"model_type {self.model_type!r} belongs to family "
                             f"{owner.name!r}, not {self.family!r}")
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        if not isinstance(self.layer_types, tuple):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
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
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"{self.num_layers} layers")
            bad = sorted(set(self.layer_types) - set(_LAYER_TYPES))
            if bad:
                raise ValueError(f"layer_types {bad} are not supported; supported: {_LAYER_TYPES}")
        if self.sliding_window is not None and int(self.sliding_window) < 1:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        rope_type = self.rope_scaling_dict.get("rope_type", "default")
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; "
                             f"supported: {_ROPE_TYPES}")
        family.validate(self)

    # ------------------------------------------------------------------ helpers
    @property
    def rope_scaling_dict(self) -> dict:
        """``rope_scaling`` as a plain dict (empty for plain RoPE)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.rope_scaling}

    @property
    def rotary_dim(self) -> int:
        """How many leading dimensions of each head are rotated (``head_dim`` unless partial)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it attend through the sliding window?"""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        if not self.layer_types:
            return (True,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def attention_scale(self) -> float:
        """The multiplier of the attention scores."""
        if self.query_pre_attn_scalar is not None:
            return float(self.query_pre_attn_scalar) ** -0.5
        return self.head_dim ** -0.5

    @property
    def architectures(self) -> tuple[str, str]:
        """HF class names ``(causal LM, sequence classification)`` for this model type."""
        return registry.get_family(self.family).model_types[self.model_type]

    @classmethod
    def tiny(cls, family: str = "llama", vocab_size: int = 128, **overrides) -> "ModelConfig":
        """A small random-init config for tests and demos (2 layers, width 64).

        Args:
          family: any supported ``model_type`` (``"gpt2"``, ``"llama"``, ``"qwen2"`` turns
            on q/k/v bias, ``"qwen3"`` q/k norm, ``"gpt_neox"``, ``"gemma2"``,
            ``"gemma3_text"``...).
          vocab_size: vocabulary size.
          **overrides: any other field.

        Example:
          >>> ModelConfig.tiny("gpt2", 64, num_layers=1).hidden_size
          64
        """
        if family not in registry.supported_model_types():
            raise ValueError(f"tiny(): family must be one of {sorted(registry.supported_model_types())}, "
                             f"got {family!r}")
        fam = registry.family_of_model_type(family)
        base: dict[str, Any] = dict(family=fam.name, model_type=family, vocab_size=vocab_size,
                                    hidden_size=64, num_layers=2, num_heads=4,
                                    max_position_embeddings=512)
        base.update(fam.tiny(family))
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
        try:
            fam = registry.family_of_model_type(model_type)
        except ValueError as err:
            raise ValueError(f"config.json {err} (architectures={hf.get('architectures')})") from None
        common = dict(vocab_size=hf["vocab_size"], pad_token_id=_first(hf.get("pad_token_id")),
                      bos_token_id=_first(hf.get("bos_token_id")),
                      eos_token_id=_first(hf.get("eos_token_id")),
                      initializer_range=hf.get("initializer_range", 0.02))
        return cls(family=fam.name, model_type=model_type, **common, **fam.from_hf(hf, model_type))

    def to_hf_config(self, *, head: str = "lm", dtype: str = "float32") -> dict:
        """The HF ``config.json`` dict for this model.

        Args:
          head: ``"lm"`` writes ``*ForCausalLM``; ``"scalar"`` writes
            ``*ForSequenceClassification`` with one label.
          dtype: the stored weight dtype name (``"float32"``, ``"bfloat16"``...).
        """
        causal, classifier = self.architectures
        out: dict[str, Any] = {"architectures": [classifier if head == "scalar" else causal],
                               "model_type": self.model_type,
                               "vocab_size": self.vocab_size, "dtype": dtype,
                               "initializer_range": self.initializer_range,
                               "tie_word_embeddings": self.tie_word_embeddings,
                               "pad_token_id": self.pad_token_id,
                               "bos_token_id": self.bos_token_id,
                               "eos_token_id": self.eos_token_id}
        out.update(registry.get_family(self.family).to_hf(self))
        if head == "scalar":
            out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        return out


def hf_rope(hf: Mapping[str, Any]) -> tuple[float, dict]:
    """``(rope_theta, rope_scaling dict)`` from a config.json's rope keys.

    transformers 5 stores them in ``"rope_parameters"``, 4.x in ``"rope_theta"`` +
    ``"rope_scaling"``; plain RoPE gives an empty dict. ``partial_rotary_factor`` is left in
    the dict for the caller.
    """
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    for k, v in legacy.items():
        rope.setdefault(k, v)
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.pop("type", None)
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") == "default":
        rope = {k: v for k, v in rope.items() if k == "partial_rotary_factor"}
    return float(theta), rope


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
