"""Offline preference losses on sequence log-probs: DPO (sigmoid, IPO, hinge) and SimPO.

Inputs are `[B]` sequence log-probs of the chosen and rejected completions of `B` pairs
(`sequence_logprobs`: summed for DPO, length-averaged for SimPO and TRL's IPO). Each loss
is a mean over pairs, so micro-batch losses weighted by their pair counts give the whole
batch's loss and gradient.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.core.ops import as_float, check_rank, check_same_shape

__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "simpo_loss"]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def _check_pairs(first, first_name, **others):
    check_rank(first, 1, first_name)
    check_same_shape(first, first_name, **others)


def _check_beta(beta):
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"`beta` must be > 0, got {beta}")


def _pair_metrics(chosen_rewards, rejected_rewards):
    chosen = jax.lax.stop_gradient(chosen_rewards)
    rejected = jax.lax.stop_gradient(rejected_rewards)
    return {
        "rewards_chosen": jnp.mean(chosen),
        "rewards_rejected": jnp.mean(rejected),
        "accuracy": jnp.mean((chosen > rejected).astype(chosen.dtype)),
        "margin": jnp.mean(chosen - rejected),
    }


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
):
    """Direct preference optimisation and two of its variants.

    With `h_b = (pi_c - ref_c) - (pi_r - ref_r)` (log-ratio of chosen minus rejected) and
    label smoothing `e`, the per-pair loss is, by `loss_type`:

    - `"sigmoid"` (DPO; with `e > 0` conservative DPO):
      `-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)`;
    - `"ipo"`: `(h - 1 / (2 beta))^2` (TRL feeds it length-averaged log-probs);
    - `"hinge"` (SLiC / RSO): `max(0, 1 - beta h)`;

    and `loss = mean_b l_b`. The implicit rewards are `beta (pi_c - ref_c)` and
    `beta (pi_r - ref_r)`. These are TRL DPOTrainer's definitions (its loss, `rewards/chosen`,
    `rewards/rejected`, `rewards/accuracies`, `rewards/margins`).

    Normalisation: a mean over pairs; weight micro-batches by their number of pairs.

    Args:
      policy_chosen_logps: `[B]` summed log-probs of the chosen completions under the
        policy (differentiated).
      policy_rejected_logps: `[B]` the same for the rejected completions.
      ref_chosen_logps: `[B]` under the frozen reference (constants).
      ref_rejected_logps: `[B]` likewise.
      beta: inverse temperature (> 0); for IPO the regulariser tau.
      loss_type: `"sigmoid"`, `"ipo"` or `"hinge"`.
      label_smoothing: `e` in `[0, 0.5)`, the assumed rate of flipped labels; only with
        `"sigmoid"`.

    Returns:
      `(loss, aux)`; aux: `rewards_chosen`, `rewards_rejected` (means of the implicit
      rewards), `accuracy` (`mean(reward_c > reward_r)`, ties count as wrong), `margin`
      (`mean(reward_c - reward_r)`), `dpo_loss` (= loss).

    References:
      Rafailov et al. 2023 (DPO), arXiv 2305.18290; Mitchell 2023, "A note on DPO with
      noisy preferences" (conservative DPO); Azar et al. 2023 (IPO), arXiv 2310.12036;
      Zhao et al. 2023 (SLiC-HF), arXiv 2305.10425; Liu et al. 2023 (RSO), arXiv 2309.06657.
    """
    _check_pairs(
        policy_chosen_logps,
        "policy_chosen_logps",
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"`loss_type` must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    _check_beta(beta)
    if isinstance(label_smoothing, (int, float)):
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"`label_smoothing` must be in [0, 0.5), got {label_smoothing}")
        if label_smoothing and loss_type != "sigmoid":
            raise ValueError(f"`label_smoothing` applies only to loss_type='sigmoid', not {loss_type!r}")
    chosen_logratio = as_float(policy_chosen_logps) - jax.lax.stop_gradient(as_float(ref_chosen_logps))
    rejected_logratio = as_float(policy_rejected_logps) - jax.lax.stop_gradient(as_float(ref_rejected_logps))
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(
            -beta * h
        )
    elif loss_type == "ipo":
        per_pair = jnp.square(h - 1.0 / (2.0 * beta))
    else:
        per_pair = jax.nn.relu(1.0 - beta * h)
    loss = jnp.mean(per_pair)
    aux = _pair_metrics(beta * chosen_logratio, beta * rejected_logratio)
    aux["dpo_loss"] = loss
    return loss, aux


def simpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta: float = 2.0, gamma: float = 0.5):
    """SimPO: a reference-free margin loss on length-averaged log-probs.

    Equation, with `a_c`, `a_r` the length-averaged log-probs
    (`sequence_logprobs(..., average=True)`):
    `loss = mean_b -log sigmoid(beta (a_c - a_r) - gamma)`; `gamma` is the target reward
    margin, in reward units (the paper's gamma; TRL's CPO trainer writes it as
    `gamma_beta_ratio = gamma / beta`).

    Normalisation: a mean over pairs; weight micro-batches by their number of pairs.

    Args:
      policy_chosen_logps: `[B]` length-averaged log-probs of the chosen completions
        (differentiated).
      policy_rejected_logps: `[B]` likewise for the rejected ones.
      beta: reward scale (> 0; the paper uses 2.0-2.5).
      gamma: target reward margin (the paper: 0.5-1.6).

    Returns:
      `(loss, aux)`; aux: `rewards_chosen` (`mean beta a_c`), `rewards_rejected`,
      `accuracy`, `margin` (as in `dpo_loss`), `simpo_loss` (= loss).

    References:
      Meng et al. 2024 (SimPO), arXiv 2405.14734.
    """
    _check_pairs(policy_chosen_logps, "policy_chosen_logps", policy_rejected_logps=policy_rejected_logps)
    _check_beta(beta)
    chosen = beta * as_float(policy_chosen_logps)
    rejected = beta * as_float(policy_rejected_logps)
    loss = -jnp.mean(jax.nn.log_sigmoid(chosen - rejected - gamma))
    aux = _pair_metrics(chosen, rejected)
    aux["simpo_loss"] = loss
    return loss, aux
