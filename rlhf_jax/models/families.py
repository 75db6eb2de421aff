"""The built-in model families: importing this module registers them (see
:mod:`rlhf_jax.models.registry`). A new family's module is imported here."""
from __future__ import annotations

import rlhf_jax.models.gemma  # noqa: F401  (each family module registers its family)
import rlhf_jax.models.gpt2  # noqa: F401
import rlhf_jax.models.llama  # noqa: F401
import rlhf_jax.models.neox  # noqa: F401
from rlhf_jax.models.registry import Family, family_of_model_type, get_family, supported_model_types

__all__ = ["Family", "family_of_model_type", "get_family", "supported_model_types"]
