"""Decoder LMs (GPT-2, Llama family, Gemma 2/3, GPT-NeoX) in Flax NNX with scalar heads, HF loading and export.

Public API: :class:`ModelConfig`, :class:`LM`, :func:`from_config`,
:func:`from_pretrained`, :func:`save_pretrained`. An ``LM`` is a static, hashable
description (no weights); every constructor returns ``(lm, params)``.

Example:
  >>> from rlhf_jax.models import ModelConfig, from_config
  >>> policy, params = from_config(ModelConfig.tiny("gpt2", vocab_size=64), head="lm", seed=0)
  >>> rm, rm_params = policy.with_head("scalar", params, seed=1)   # reward model from the policy trunk
  >>> lora_policy, adapters = add_lora(policy, LoRAConfig(rank=4, alpha=8))   # see models.lora
"""
from rlhf_jax.models.config import ModelConfig, supported_model_types
from rlhf_jax.models.hf.peft import load_peft_adapter, save_peft_adapter
from rlhf_jax.models.hf.pretrained import from_pretrained, save_pretrained
from rlhf_jax.models.lm import HEADS, LM, from_config
from rlhf_jax.models.lora import LoRAConfig, add_lora

__all__ = ["HEADS", "LM", "LoRAConfig", "ModelConfig", "add_lora", "from_config", "from_pretrained",
           "load_peft_adapter", "save_peft_adapter", "save_pretrained", "supported_model_types"]
