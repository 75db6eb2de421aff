"""The registry of model families: what each family contributes, looked up by name or HF
``model_type``.

A family is one module (``gpt2``, ``llama``, ``neox``, ``gemma``) that defines its trunk, its
HF weight-name table and its ``config.json`` hooks, and registers one :class:`Family` at
import (:mod:`rlhf_jax.models.families` imports the built-in ones). Everything else reads the
registry: :class:`~rlhf_jax.models.config.ModelConfig` parses, validates and exports through
the hooks, :class:`~rlhf_jax.models.lm.Network` builds ``trunk``, the HF loader and exporter
map names through ``hf_table``. This module imports nothing of ours (it sits below the
config and the trunks).

Adding a family: write its module (trunk, table, hooks, one ``register(Family(...))``) and
import it in :mod:`rlhf_jax.models.families`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True)
class Family:
    """What one model family contributes.

    Attributes:
      name: our family name (``ModelConfig.family``).
      model_types: HF ``model_type`` -> ``(causal-LM architecture, sequence-classification
        architecture)`` class names, e.g. ``{"qwen2": ("Qwen2ForCausalLM",
        "Qwen2ForSequenceClassification")}``.
      trunk: the NNX trunk class, ``trunk(cfg, rngs=..., dtype=..., param_dtype=...)``, with
        ``embed_table()`` and ``__call__(input_ids, positions, mask, cache, cache_index, *,
        remat)``.
      hf_table: rows ``(HF name without the trunk prefix, our path below "trunk", transpose)``;
        ``{i}`` marks a per-layer tensor (stacked on our side).
      hf_prefix: the trunk prefix of HF names in a causal-LM checkpoint (``"model."``).
      embed_path: our path below ``trunk`` of the token embedding (tied LM head).
      from_hf: ``from_hf(hf_config_dict, model_type) -> dict`` of ModelConfig fields (the
        common ones, vocabulary and special tokens, are parsed by the caller).
      to_hf: ``to_hf(cfg) -> dict`` of the family's config.json keys.
      validate: ``validate(cfg)`` raises ValueError for what the family cannot build.
      tiny: ``tiny(model_type) -> dict`` of ModelConfig fields for a small test model.
      hf_head_rows: extra head rows ``(HF name, our path, transpose)`` tried before the
        shared ones (e.g. GPT-NeoX's ``embed_out.weight``); the first row naming a path is
        the one written on export.
    """

    name: str
    model_types: Mapping[str, tuple[str, str]]
    trunk: Any
    hf_table: tuple
    hf_prefix: str
    embed_path: str
    from_hf: Callable[[dict, str], dict]
    to_hf: Callable[[Any], dict]
    validate: Callable[[Any], None]
    tiny: Callable[[str], dict]
    hf_head_rows: tuple = ()


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` (an error if its name or one of its model types is taken)."""
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    for model_type in family.model_types:
        if model_type in _model_types():
            raise ValueError(f"model_type {model_type!r} already belongs to family "
                             f"{_model_types()[model_type].name!r}")
    _FAMILIES[family.name] = family
    return family


def _model_types() -> dict[str, Family]:
    return {mt: fam for fam in _FAMILIES.values() for mt in fam.model_types}


def get_family(name: str) -> Family:
    """The family called ``name``, or a ValueError naming the registered ones."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"model family {name!r} is not supported; supported: "
                         f"{sorted(_FAMILIES)}") from None


def family_of_model_type(model_type) -> Family:
    """The family that builds HF ``model_type``, or a ValueError naming the supported ones."""
    types = _model_types()
    if model_type not in types:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(types)}")
    return types[model_type]


def supported_model_types() -> tuple[str, ...]:
    """The HF ``model_type`` values of the registered families."""
    return tuple(_model_types())
