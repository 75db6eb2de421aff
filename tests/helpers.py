"""Test helpers (not a test module): nested trainer configs from flat keyword lists.

`ppo_config(batch_size=8, kl_coef=0.1, learning_rate=1e-3, ...)` puts every keyword
into the `PPOConfig` section that has it, so a test can name just what it changes.
"""
from __future__ import annotations

import dataclasses

from rlhf_jax.train import OptimizerConfig, PPOConfig


def _route(cls, kwargs: dict) -> dict:
    """`{section: {field: value}}` for the nested dataclass sections of `cls`."""
    owners = {}
    for f in dataclasses.fields(cls):
        section = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(section):
            for g in dataclasses.fields(section):
                owners.setdefault(g.name, f.name)
    out: dict = {}
    for key, value in kwargs.items():
        if key in owners:
            out.setdefault(owners[key], {})[key] = value
        else:
            out[key] = value
    return out


def ppo_config(**kwargs) -> PPOConfig:
    """A `PPOConfig` from flat keywords (`value_learning_rate` sets `value_optimizer.learning_rate`)."""
    value_lr = kwargs.pop("value_learning_rate", None)
    routed = _route(PPOConfig, kwargs)
    defaults = PPOConfig()
    sections = {name: dataclasses.replace(getattr(defaults, name), **values) if isinstance(values, dict) else values
                for name, values in routed.items()}
    if value_lr is not None:
        sections["value_optimizer"] = dataclasses.replace(sections.get("optimizer", defaults.optimizer),
                                                          learning_rate=value_lr)
    return PPOConfig(**sections)


def optimizer(**kwargs) -> OptimizerConfig:
    return OptimizerConfig(**kwargs)
