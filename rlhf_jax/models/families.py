"""The built-in model families: importing this module registers them (see
:mod:`rlhf_jax.models.registry`). A new family's module is imported here."""
from __future__ import annotations

from rlhf_jax.models import gemma, gpt2, llama, neox  # noqa: F401  (each registers its family)
from rlhf_jax.models.registry import Family, family_of_model_type, get_family, supported_model_types

__all__ = ["Family", "family_of_model_type", "get_family", "supported_model_types"]
