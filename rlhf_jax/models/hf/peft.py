"""LoRA adapters out to a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads onto the HF
base model, and back in.

PEFT's key names (peft 0.x, the adapter name removed as ``save_pretrained`` does):
``base_model.model.<HF module>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight``
``[out, r]``, where ``<HF module>`` is the projection's HF name without ``.weight``
(``model.layers.3.self_attn.q_proj``, ``transformer.h.3.attn.c_attn``). Ours are
``lora_a`` ``[L, in, r]`` and ``lora_b`` ``[L, r, out]``: unstacked and transposed. GPT-2's
Conv1D projections get the same A/B layout in PEFT (``fan_in_fan_out`` only changes how
PEFT merges), and the config says ``fan_in_fan_out: true`` for them as PEFT expects.

For merged weights instead, ``save_pretrained`` folds the adapters into the kernels
(:func:`rlhf_jax.models.lora.merge_adapters`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.hf.pretrained import _flatten, _table, _to_hf, read_safetensors, write_safetensors
from rlhf_jax.models.lora import LoRAConfig, adapter_paths, split_adapters

__all__ = ["save_peft_adapter", "load_peft_adapter", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _hf_module(rows, ours: str, layer: int) -> str:
    """The HF module name of our adapted projection ``ours`` (a path without a leaf) in ``layer``."""
    name, _, stacked = _to_hf(rows, ours + "/kernel", layer)
    if name is None or not stacked or not name.endswith(".weight"):
        raise ValueError(f"adapted projection {ours!r} has no per-layer HF name")
    return name[: -len(".weight")]


def save_peft_adapter(lm, params, out_dir, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of a LoRA ``lm`` as a PEFT adapter folder.

    Args:
      lm: an ``LM`` with ``lm.lora`` set.
      params: its params (``combine(base, adapters)``) or the adapters alone.
      out_dir: created if needed.
      base_model_name_or_path: recorded in the config (PEFT reads it only when the base
        model is not given).

    Returns:
      the folder.
    """
    cfg: LoRAConfig | None = lm.lora
    if cfg is None:
        raise ValueError("lm has no LoRA config (lm.lora is None): nothing to export")
    out = Path(os.fspath(out_dir))
    out.mkdir(parents=True, exist_ok=True)
    adapters, _ = split_adapters(params)
    flat = _flatten(adapters)
    rows = _table(lm.config.family)
    tensors = {}
    modules = set()
    for ours in adapter_paths(adapters):
        a = np.asarray(jax.device_get(flat[ours + "/lora_a"]), np.float32)  # [L, in, r]
        b = np.asarray(jax.device_get(flat[ours + "/lora_b"]), np.float32)  # [L, r, out]
        modules.add(ours.rsplit("/", 1)[-1])
        for layer in range(a.shape[0]):
            hf = _PREFIX + _hf_module(rows, ours, layer)
            tensors[hf + ".lora_A.weight"] = np.ascontiguousarray(a[layer].T)
            tensors[hf + ".lora_B.weight"] = np.ascontiguousarray(b[layer].T)
    if not tensors:
        raise ValueError("params hold no adapters (no lora_a / lora_b leaves)")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "use_rslora": cfg.use_rslora,
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": lm.config.family == "gpt2",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    write_safetensors(out / ADAPTER_WEIGHTS, tensors)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def load_peft_adapter(lm, folder):
    """``(lora_lm, adapters)`` from a PEFT LoRA folder, for the base ``lm``.

    Reads ``r``, ``lora_alpha`` and ``use_rslora`` from ``adapter_config.json``; the targets
    are the modules the weights file holds adapters for. Every tensor's shape is checked
    and a missing or unknown one is an error that names it.
    """
    import dataclasses

    from rlhf_jax.models.lora import init_adapters

    folder = Path(os.fspath(folder))
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder}: peft_type {config.get('peft_type')!r}, only LORA is supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{folder}: per-module rank_pattern / alpha_pattern are not supported")
    arrays = dict(read_safetensors(folder / ADAPTER_WEIGHTS))
    modules = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in arrays if ".lora_A." in n})
    if not modules:
        raise ValueError(f"{folder}: {ADAPTER_WEIGHTS} holds no lora_A tensors")
    cfg = LoRAConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=tuple(modules),
                     use_rslora=bool(config.get("use_rslora", False)))
    lora_lm = dataclasses.replace(lm.base, lora=cfg)
    template = _flatten(init_adapters(lora_lm, seed=0))
    rows = _table(lm.config.family)
    by_name = {}
    for ours in {p.rsplit("/", 1)[0] for p in template}:
        for layer in range(lm.config.num_layers):
            hf = _PREFIX + _hf_module(rows, ours, layer)
            by_name[hf + ".lora_A.weight"] = (ours + "/lora_a", layer)
            by_name[hf + ".lora_B.weight"] = (ours + "/lora_b", layer)
    buffers = {p: np.zeros(v.shape, np.float32) for p, v in template.items()}
    seen = set()
    for name, array in arrays.items():
        key = name.replace(".default.weight", ".weight")
        if key not in by_name:
            raise ValueError(f"{folder}: adapter tensor {name!r} has no place in this model")
        ours, layer = by_name[key]
        want = buffers[ours].shape[1:]
        if tuple(array.T.shape) != tuple(want):
            raise ValueError(f"adapter tensor {name!r}: shape {array.shape}, expected {want[::-1]}")
        buffers[ours][layer] = np.asarray(array, np.float32).T
        seen.add(key)
    missing = sorted(set(by_name) - seen)
    if missing:
        raise ValueError(f"{folder}: missing adapter tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    tree: dict = {}
    for path, value in buffers.items():
        node = tree
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = jnp.asarray(value)
    return lora_lm, tree
