"""rlhf_jax: pure-JAX, functional RLHF for language models.

The array math of `rlhf_jax.core` (PPO/SFT/reward and preference losses, GAE and the
critic-free advantage estimators, importance weights, KL, shaped rewards, masked ops,
pass@k) is re-exported here and imports no models. `rlhf_jax.generate` and
`rlhf_jax.Rollout` are loaded lazily from `rlhf_jax.rollout` on first use,
so math users never pay for (or depend on) the model code.
"""
from rlhf_jax.core.advantages import (
    gae,
    group_advantages,
    reinforce_pp_advantages,
    returns_to_go,
    rloo_advantages,
)
from rlhf_jax.core.importance import truncated_importance_weights
from rlhf_jax.core.kl import KLControllerState, kl_controller_init, kl_controller_update, kl_penalty
from rlhf_jax.core.losses import (
    aggregate,
    aggregation_weight,
    bradley_terry_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
)
from rlhf_jax.core.ops import (
    last_valid_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_logprobs,
    token_entropy,
    token_logprobs,
)
from rlhf_jax.core.passk import pass_at_k, pass_at_k_bootstrap, pass_at_k_curve
from rlhf_jax.core.preference import dpo_loss, simpo_loss
from rlhf_jax.core.shaping import shaped_rewards

__version__ = "0.2.0"

_LAZY = {"generate": "rlhf_jax.rollout", "Rollout": "rlhf_jax.rollout"}

__all__ = [
    "KLControllerState",
    "Rollout",
    "aggregate",
    "aggregation_weight",
    "bradley_terry_loss",
    "dpo_loss",
    "gae",
    "generate",
    "group_advantages",
    "kl_controller_init",
    "kl_controller_update",
    "kl_penalty",
    "last_valid_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pass_at_k",
    "pass_at_k_bootstrap",
    "pass_at_k_curve",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reinforce_pp_advantages",
    "returns_to_go",
    "rloo_advantages",
    "sequence_logprobs",
    "sft_loss",
    "shaped_rewards",
    "simpo_loss",
    "token_entropy",
    "token_logprobs",
    "truncated_importance_weights",
]


def __getattr__(name):
    # PEP 562: import the sampler (and with it the models) only when asked for.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rlhf_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
