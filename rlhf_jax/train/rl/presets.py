"""Algorithm presets of `RLConfig`: PPO, GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO, GSPO.

A preset is a nested dict of section defaults; `rl_config(algorithm, overrides)` lays the
user's nested overrides (e.g. a YAML `train:` section) over it and builds the `RLConfig`
(every section validates its keys and values). `rl_config_from_ppo` maps a `PPOConfig` to
the equivalent `RLConfig` (the PPO preset: `gae`, a critic, the KL in the reward).

| algorithm | estimator | KL | loss | other |
|---|---|---|---|---|
| ppo | gae (critic) | in_reward, k1 | token-mean | |
| grpo | grpo | in_loss, k3, 0.04 | seq-mean-token-mean | G = 8, 1 epoch |
| dr_grpo | dr_grpo | none | seq-mean-token-sum-norm | G = 8 |
| rloo | rloo | in_reward, k1 | token-mean | G = 4 |
| reinforce_pp | reinforce_pp | in_reward, k2 | token-mean | |
| reinforce_pp_baseline | reinforce_pp_baseline | in_reward, k2 | token-mean | G = 4 |
| dapo | grpo | none | token-mean | clip 0.2 / 0.28, dynamic sampling, overlong filter |
| gspo | grpo | none | seq-mean-token-mean | sequence ratio, clip 3e-4 / 4e-4 |
"""
from __future__ import annotations

import copy
import dataclasses

from rlhf_jax.errors import ConfigError
from rlhf_jax.train.options import OptimizerConfig
from rlhf_jax.train.rl.config import (
    PolicyLossConfig,
    RLAdvantageConfig,
    RLBatchConfig,
    RLConfig,
    RLKLConfig,
    RLRewardConfig,
    RLSamplingConfig,
)

__all__ = ["PRESETS", "ALGORITHMS", "rl_config", "rl_config_from_ppo", "preset_train_section", "SECTIONS"]

SECTIONS = {
    "batch": RLBatchConfig,
    "sampling": RLSamplingConfig,
    "advantages": RLAdvantageConfig,
    "loss": PolicyLossConfig,
    "kl": RLKLConfig,
    "rewards": RLRewardConfig,
    "optimizer": OptimizerConfig,
    "value_optimizer": OptimizerConfig,
}

_GROUP = {"batch": {"num_minibatches": 1, "ppo_epochs": 1}}

PRESETS: dict[str, dict] = {
    "ppo": {"advantages": {"estimator": "gae"}, "kl": {"placement": "in_reward", "kl_estimator": "k1"}},
    "grpo": {
        "batch": {"group_size": 8, **_GROUP["batch"]},
        "advantages": {"estimator": "grpo"},
        "kl": {"placement": "in_loss", "kl_estimator": "k3", "kl_coef": 0.04},
        "loss": {"loss_agg": "seq-mean-token-mean"},
    },
    "dr_grpo": {
        "batch": {"group_size": 8, **_GROUP["batch"]},
        "advantages": {"estimator": "dr_grpo"},
        "kl": {"placement": "none"},
        "loss": {"loss_agg": "seq-mean-token-sum-norm"},
    },
    "rloo": {
        "batch": {"group_size": 4, **_GROUP["batch"]},
        "advantages": {"estimator": "rloo"},
        "kl": {"placement": "in_reward", "kl_estimator": "k1"},
    },
    "reinforce_pp": {
        "advantages": {"estimator": "reinforce_pp"},
        "kl": {"placement": "in_reward", "kl_estimator": "k2"},
    },
    "reinforce_pp_baseline": {
        "batch": {"group_size": 4},
        "advantages": {"estimator": "reinforce_pp_baseline"},
        "kl": {"placement": "in_reward", "kl_estimator": "k2"},
    },
    "dapo": {
        "batch": {"group_size": 8, **_GROUP["batch"]},
        "advantages": {"estimator": "grpo"},
        "kl": {"placement": "none"},
        "loss": {"loss_agg": "token-mean", "clip_eps": 0.2, "clip_eps_high": 0.28},
        "rewards": {"dynamic_sampling": True, "overlong_filter": True},
    },
    "gspo": {
        "batch": {"group_size": 8, **_GROUP["batch"]},
        "advantages": {"estimator": "grpo"},
        "kl": {"placement": "none"},
        "loss": {"ratio": "sequence", "clip_eps": 3e-4, "clip_eps_high": 4e-4, "loss_agg": "seq-mean-token-mean"},
    },
}
ALGORITHMS = tuple(PRESETS)


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def preset_train_section(algorithm: str, overrides: dict) -> dict:
    """The nested `train:` mapping of `algorithm`'s preset with `overrides` laid over it (for the CLI)."""
    if algorithm not in PRESETS:
        raise ConfigError(f"`algorithm` must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    return _merge(PRESETS[algorithm], dict(overrides), "train.")


def rl_config(algorithm: str = "ppo", overrides: dict | None = None, *, prefix: str = "") -> RLConfig:
    """The `RLConfig` of `algorithm`'s preset with the nested `overrides` laid over it.

    Args:
      algorithm: one of `ALGORITHMS`.
      overrides: `{section: {key: value}}` (sections of `SECTIONS`) and top-level `seed`.
      prefix: dotted prefix of the keys in error messages (e.g. "train.").

    Raises:
      ConfigError naming the key for an unknown algorithm, section or key, or a bad value.
    """
    if algorithm not in PRESETS:
        raise ConfigError(f"`{prefix}algorithm` must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    merged = _merge(PRESETS[algorithm], dict(overrides or {}), prefix)
    kwargs = {}
    for key, value in merged.items():
        if key == "seed":
            kwargs["seed"] = value
            continue
        if key not in SECTIONS:
            raise ConfigError(f"unknown key `{prefix}{key}`; the sections are {sorted(SECTIONS)} (and `seed`)")
        cls = SECTIONS[key]
        if value is None and key == "value_optimizer":
            kwargs[key] = None
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"`{prefix}{key}` must be a mapping of {cls.__name__} keys, got {value!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        for name in value:
            if name not in names:
                raise ConfigError(f"unknown key `{prefix}{key}.{name}`; {key} has {sorted(names)}")
        try:
            kwargs[key] = cls(**value)
        except ConfigError as e:
            raise ConfigError(f"{prefix}{key}: {e}") from None
    return RLConfig(**kwargs)


def rl_config_from_ppo(c) -> RLConfig:
    """The `RLConfig` equal to a `PPOConfig` (GAE with a critic, the KL in the reward, one sample per
    prompt). The optimizers are not part of it (the trainer takes them); the seed comes from the
    driver (`RunOptions.seed`, passed to `init`)."""
    b, s, a, lo, k, r = c.batch, c.sampling, c.advantages, c.loss, c.kl, c.rewards
    return RLConfig(
        batch=RLBatchConfig(batch_size=b.batch_size, group_size=1, num_minibatches=b.num_minibatches,
                            ppo_epochs=b.ppo_epochs, grad_accum_steps=b.grad_accum_steps),
        sampling=RLSamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                  top_p=s.top_p, eos_token_id=s.eos_token_id,
                                  pad_token_id=0 if s.pad_token_id is None else s.pad_token_id),
        advantages=RLAdvantageConfig(estimator="gae", gamma=a.gamma, lam=a.lam, gae_method=a.gae_method,
                                     whiten_advantages=a.whiten_advantages, whiten_rewards=a.whiten_rewards),
        loss=PolicyLossConfig(clip_eps=lo.clip_eps, dual_clip=lo.dual_clip, ratio="token", loss_agg=lo.loss_agg,
                              norm_constant=lo.norm_constant, value_clip_eps=lo.value_clip_eps, vf_coef=lo.vf_coef,
                              entropy_coef=lo.entropy_coef),
        kl=RLKLConfig(placement="in_reward", kl_coef=k.kl_coef, kl_estimator=k.kl_estimator, kl_target=k.kl_target,
                      kl_horizon=k.kl_horizon),
        rewards=RLRewardConfig(reward_clip=r.reward_clip, missing_eos_penalty=r.missing_eos_penalty),
        optimizer=c.optimizer,
        value_optimizer=c.value_optimizer,
    )
