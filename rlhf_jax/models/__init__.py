"""Decoder LMs (GPT-2, Llama family) in Flax NNX with scalar heads, HF loading and export.

Public API: :class:`ModelConfig`, :class:`LM`, :func:`from_config`,
:func:`from_pretrained`, :func:`save_pretrained`.
"""
from rlhf_jax.models.config import ModelConfig, supported_model_types
from rlhf_jax.models.lm import HEADS, LM, from_config

__all__ = ["HEADS", "LM", "ModelConfig", "from_config", "supported_model_types"]

try:  # hub.py may not exist yet while it is being written
    from rlhf_jax.models.hub import from_pretrained, save_pretrained  # noqa: F401
    __all__ += ["from_pretrained", "save_pretrained"]
except ImportError:  # pragma: no cover
    pass
