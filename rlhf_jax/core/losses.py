"""Losses for reward modelling, PPO (and its GRPO/DAPO/GSPO variants) and supervised fine-tuning.

Every loss returns `(loss, aux)`: a scalar and a dict of scalar metrics.
Per-token losses are reduced by `aggregate`, the one place where the four
loss aggregations of the length-bias debate live; `aggregation_weight` is the
matching normaliser, the weight a micro-batch's loss gets when gradients are
accumulated (so that 1 or k micro-batches give the same gradient).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.core.ops import as_float, check_rank, check_same_shape, masked_mean, masked_sum

__all__ = [
    "AGGREGATIONS",
    "POLICY_RATIOS",
    "aggregate",
    "aggregation_weight",
    "bradley_terry_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sft_loss",
]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
POLICY_RATIOS = ("token", "sequence")


def _check_2d(reference, reference_name, **others):
    check_rank(reference, 2, reference_name)
    check_same_shape(reference, reference_name, **others)


def aggregate(per_token, mask, *, agg: str = "token-mean", norm_constant=None):
    """Reduce a `[B, T]` per-token loss to a scalar with one of four aggregations.

    With `m` the mask, `n_b = sum_t m_bt` and `S` the set of rows with `n_b > 0`:

    - `"token-mean"`: `sum_bt l_bt m_bt / max(sum_b n_b, 1)`; every valid token
      weighs the same (PPO in TRL, OpenRLHF).
    - `"seq-mean-token-mean"`: `mean_{b in S} (sum_t l_bt m_bt / n_b)`; each sequence
      weighs the same, so tokens of long answers weigh less (original GRPO).
    - `"seq-mean-token-sum"`: `mean_{b in S} sum_t l_bt m_bt`.
    - `"seq-mean-token-sum-norm"`: `sum_b (sum_t l_bt m_bt / norm_constant) / B`
      (Dr. GRPO): a constant denominator, `norm_constant` defaulting to `T`, the padded
      length, and `B` all rows, so no term depends on a response's length.

    Rows without any valid token are left out of the `seq-mean-*` means (so padding
    rows added to fill a batch do not dilute the loss); everything is 0, not NaN,
    when nothing is valid.

    Args:
      per_token: `[B, T]` per-token loss.
      mask: `[B, T]` float or bool.
      agg: one of `AGGREGATIONS`.
      norm_constant: the constant of `"seq-mean-token-sum-norm"` (default `T`);
        ignored by the other modes.

    Returns:
      float scalar.

    References:
      Shao et al. 2024 (GRPO), arXiv 2402.03300; Liu et al. 2025 (Dr. GRPO),
      arXiv 2503.20783.
    """
    _check_2d(per_token, "per_token", mask=mask)
    if agg == "token-mean":
        return masked_mean(per_token, mask)
    seq_sum = masked_sum(per_token, mask, axis=1)
    counts = jnp.sum(jnp.asarray(mask).astype(seq_sum.dtype), axis=1)
    nonempty = (counts > 0).astype(seq_sum.dtype)
    if agg == "seq-mean-token-mean":
        per_seq = seq_sum / jnp.maximum(counts, 1.0)
    elif agg == "seq-mean-token-sum":
        per_seq = seq_sum
    elif agg == "seq-mean-token-sum-norm":
        constant = jnp.shape(per_token)[1] if norm_constant is None else norm_constant
        if isinstance(constant, (int, float)) and constant <= 0:
            raise ValueError(f"`norm_constant` must be > 0, got {constant}")
        return jnp.sum(seq_sum) / constant / jnp.shape(per_token)[0]
    else:
        raise ValueError(f"`agg` must be one of {AGGREGATIONS}, got {agg!r}")
    return jnp.sum(per_seq * nonempty) / jnp.maximum(jnp.sum(nonempty), 1.0)


def aggregation_weight(mask, *, agg: str = "token-mean"):
    """The denominator of `aggregate(., mask, agg=agg)`, up to a constant factor.

    A loss `L = sum_bt w_bt l_bt / N(mask)` split into micro-batches `k` with losses `L_k`
    (each normalised by its own `N_k`) is recovered as `L = sum_k N_k L_k / sum_k N_k`, and
    so is its gradient, exactly when `N` is additive over rows. This returns that `N`:

    - `"token-mean"`: the number of valid tokens `sum_bt m_bt`;
    - `"seq-mean-token-mean"`, `"seq-mean-token-sum"`: the number of rows with at least one
      valid token (`aggregate` leaves empty rows out of these means, so counting all rows
      would over-weight a micro-batch that holds padding rows);
    - `"seq-mean-token-sum-norm"`: all rows `B` (the constant `norm_constant` is the same
      in every micro-batch and cancels).

    Args:
      mask: `[B, T]` float or bool.
      agg: one of `AGGREGATIONS`.

    Returns:
      float32 scalar >= 0.
    """
    check_rank(mask, 2, "mask")
    m = jnp.asarray(mask) > 0
    if agg == "token-mean":
        return jnp.sum(m.astype(jnp.float32))
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return jnp.sum(jnp.any(m, axis=1).astype(jnp.float32))
    if agg == "seq-mean-token-sum-norm":
        return jnp.asarray(jnp.shape(mask)[0], jnp.float32)
    raise ValueError(f"`agg` must be one of {AGGREGATIONS}, got {agg!r}")


def bradley_terry_loss(chosen_rewards, rejected_rewards, *, margin=None, center_coef: float = 0.0):
    """Bradley-Terry pairwise loss of a reward model.

    Equation: `loss = mean_b -log sigmoid(r_c - r_r - margin) + center_coef * mean_b (r_c + r_r)^2`;
    the optional centering term (Eisenstein et al. 2023) keeps scores near zero.

    Args:
      chosen_rewards: `[B]` scores of the preferred responses.
      rejected_rewards: `[B]` scores of the other responses.
      margin: optional `[B]` (or scalar) required score gap (Llama 2's margin loss).
      center_coef: weight of the reward-centering term; 0 turns it off.

    Normalisation: a mean over pairs, so micro-batch losses weighted by their pair counts
    give the whole batch's loss and gradient.

    Returns:
      `(loss, aux)` with aux `accuracy` (`mean(r_c > r_r)`, ties count as wrong),
      `bt_loss` (without centering), `reward_margin` (`mean(r_c - r_r)`),
      `chosen_mean`, `rejected_mean`.

    References:
      Ouyang et al. 2022 (InstructGPT), arXiv 2203.02155; Touvron et al. 2023 (Llama 2),
      arXiv 2307.09288; Eisenstein et al. 2023, arXiv 2312.09244.
    """
    check_rank(chosen_rewards, 1, "chosen_rewards")
    check_same_shape(chosen_rewards, "chosen_rewards", rejected_rewards=rejected_rewards)
    chosen = as_float(chosen_rewards)
    rejected = as_float(rejected_rewards)
    diff = chosen - rejected
    if margin is not None:
        if jnp.ndim(margin) != 0:
            check_same_shape(chosen_rewards, "chosen_rewards", margin=margin)
        diff = diff - as_float(margin)
    bt = -jnp.mean(jax.nn.log_sigmoid(diff))
    loss = bt
    if center_coef:
        loss = loss + center_coef * jnp.mean(jnp.square(chosen + rejected))
    aux = {
        "accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)),
        "bt_loss": bt,
        "reward_margin": jnp.mean(chosen - rejected),
        "chosen_mean": jnp.mean(chosen),
        "rejected_mean": jnp.mean(rejected),
    }
    return loss, aux


def ppo_policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_eps: float = 0.2,
    clip_eps_high=None,
    agg: str = "token-mean",
    norm_constant=None,
    dual_clip=None,
    ratio: str = "token",
):
    """Clipped PPO surrogate loss, with DAPO's clip-higher, dual clip and GSPO's sequence ratio.

    Equation, with a ratio `rho` and advantage `A` per token:
    `l = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))`, `eps_low = clip_eps`,
    `eps_high = clip_eps_high` (DAPO's clip-higher; None = `clip_eps`, symmetric PPO).
    With `dual_clip = c > 1`, tokens with `A < 0` use `min(l, -c A)` (the loss of a token
    whose ratio exploded is bounded). The per-token loss is reduced by `aggregate(..., agg=agg)`.

    The ratio:

    - `ratio="token"`: `rho_bt = exp(logp_bt - old_logp_bt)` (PPO).
    - `ratio="sequence"`: GSPO's length-normalised sequence ratio
      `s_b = exp(mean_t (logp_bt - old_logp_bt))` over the valid tokens of row b, in the
      "GSPO-token" form of the paper (its eq. for GSPO-token):
      `rho_bt = sg[s_b] * exp(logp_bt - sg[logp_bt])`. Its value is `s_b` on every token, so
      the clip decision is one per sequence; its gradient is `s_b * grad logp_bt`. With an
      advantage that is constant over a row (GRPO-style) and any of the aggregations (each
      weighs the tokens of a row equally), this equals the gradient of GSPO's sequence
      objective `-A_b * s_b` exactly (`d s_b / d logp_bt = s_b / n_b`, summed over the
      row's `n_b` tokens); with per-token advantages it is GSPO-token. GSPO uses
      `agg="seq-mean-token-mean"` and a small clip range (the paper: 3e-4 / 4e-4).

    Normalisation: see `aggregate`; with micro-batch losses weighted by
    `aggregation_weight(mask, agg=agg)` the accumulated gradient equals the whole batch's.
    (The sequence ratio needs whole rows in a micro-batch, which row splits keep.)

    Args:
      logprobs: `[B, T]` log-probs of the sampled tokens under the current policy
        (differentiated).
      old_logprobs: `[B, T]` log-probs under the policy that sampled (constants).
      advantages: `[B, T]` (constants; whitened GAE advantages, or a sequence advantage
        broadcast over its tokens).
      mask: `[B, T]` float or bool, 1 = response token.
      clip_eps: the lower clip range `eps_low` (and the upper one when `clip_eps_high` is None).
      clip_eps_high: DAPO's `eps_high` (the paper: 0.28 with `clip_eps=0.2`); None = symmetric.
      agg: loss aggregation, see `aggregate`.
      norm_constant: for `agg="seq-mean-token-sum-norm"`.
      dual_clip: None, or the constant `c > 1` of dual-clip PPO.
      ratio: `"token"` or `"sequence"` (see above).

    Returns:
      `(loss, aux)`; aux (all masked means over valid tokens): `policy_loss` (= loss),
      `clipfrac` (fraction of tokens where the clipped term is the larger one),
      `clipfrac_low` / `clipfrac_high` (the part of `clipfrac` with `A < 0`, i.e. the ratio
      below `1 - eps_low`, and with `A > 0`, above `1 + eps_high`; they sum to `clipfrac`),
      `dual_clipfrac` (with dual_clip), `approx_kl` (Schulman's k3 estimate of
      KL(old || new) from the per-token log-ratio, `mean(rho - 1 - log rho)`,
      non-negative, whatever `ratio`), `ratio_mean`, `ratio_max` (of the ratio used,
      over valid tokens; 0 if none).

    References:
      Schulman et al. 2017 (PPO), arXiv 1707.06347; Ye et al. 2020 (dual clip),
      arXiv 1912.09729; Yu et al. 2025 (DAPO, clip-higher), arXiv 2503.14476;
      Zheng et al. 2025 (GSPO), arXiv 2507.18071; Liu et al. 2025 (Dr. GRPO),
      arXiv 2503.20783.
    """
    _check_2d(logprobs, "logprobs", old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if dual_clip is not None and isinstance(dual_clip, (int, float)) and dual_clip <= 1.0:
        raise ValueError(f"`dual_clip` must be > 1, got {dual_clip}")
    if ratio not in POLICY_RATIOS:
        raise ValueError(f"`ratio` must be one of {POLICY_RATIOS}, got {ratio!r}")
    if clip_eps_high is not None and isinstance(clip_eps_high, (int, float)) and clip_eps_high < 0:
        raise ValueError(f"`clip_eps_high` must be >= 0 (or None), got {clip_eps_high}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    valid = jnp.asarray(mask) > 0
    # Padding may hold garbage (even inf); keep it out of exp() and the gradient.
    logp = jnp.where(valid, as_float(logprobs), 0.0)
    log_ratio = jnp.where(valid, logp - jax.lax.stop_gradient(as_float(old_logprobs)), 0.0)
    adv = jnp.where(valid, jax.lax.stop_gradient(as_float(advantages)), 0.0)
    if ratio == "token":
        rho = jnp.exp(log_ratio)
    else:
        seq_log_ratio = jax.lax.stop_gradient(masked_mean(log_ratio, mask, axis=1))
        # value s_b on every token; gradient s_b * d logp_bt (GSPO-token).
        rho = jnp.exp(seq_log_ratio[:, None] + (logp - jax.lax.stop_gradient(logp)))
    unclipped = -adv * rho
    clipped = -adv * jnp.clip(rho, 1.0 - clip_eps, 1.0 + eps_high)
    per_token = jnp.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    dtype = per_token.dtype
    aux = {
        "clipfrac": masked_mean(clip_active.astype(dtype), mask),
        "clipfrac_low": masked_mean((clip_active & (adv < 0)).astype(dtype), mask),
        "clipfrac_high": masked_mean((clip_active & (adv > 0)).astype(dtype), mask),
    }
    if dual_clip is not None:
        bound = -dual_clip * adv
        dual_active = (adv < 0) & (per_token > bound)
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, bound), per_token)
        aux["dual_clipfrac"] = masked_mean(dual_active.astype(dtype), mask)
    loss = aggregate(per_token, mask, agg=agg, norm_constant=norm_constant)
    rho_sg = jax.lax.stop_gradient(rho)
    token_ratio_sg = jax.lax.stop_gradient(jnp.exp(log_ratio))
    log_ratio_sg = jax.lax.stop_gradient(log_ratio)
    aux.update(
        policy_loss=loss,
        approx_kl=masked_mean(token_ratio_sg - 1.0 - log_ratio_sg, mask),
        ratio_mean=masked_mean(rho_sg, mask),
        ratio_max=jnp.max(jnp.where(valid, rho_sg, 0.0)),
    )
    return loss, aux


def ppo_value_loss(
    values,
    old_values,
    returns,
    mask,
    *,
    clip_eps=0.2,
    agg: str = "token-mean",
    norm_constant=None,
):
    """Clipped value-function loss of PPO.

    Equation: `l = 0.5 * max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2)`
    per token; `clip_eps=None` gives `0.5 (v - R)^2`. The clip is written on `v` itself
    (as TRL's `torch.clamp(vpred, values - eps, values + eps)`), not as OpenAI's
    `v_old + clip(v - v_old, -eps, eps)`: the same in exact arithmetic, but in float32 the
    latter rounds `v_old + (v - v_old)` away from `v`, so in-range tokens were counted in
    `value_clipfrac` (0.1-0.3% too high).

    Normalisation: see `aggregate` and `aggregation_weight`.

    Args:
      values: `[B, T]` current value predictions (differentiated).
      old_values: `[B, T]` values at rollout time (constants).
      returns: `[B, T]` GAE returns (constants).
      mask: `[B, T]` float or bool.
      clip_eps: value clip range; None disables clipping.
      agg: loss aggregation, see `aggregate`.
      norm_constant: for `agg="seq-mean-token-sum-norm"`.

    Returns:
      `(loss, aux)`; aux: `value_loss` (= loss), `value_clipfrac` (fraction of valid
      tokens where the clipped term is the larger), `value_mean`, `value_mse`
      (unclipped `mean (v - R)^2`).

    References:
      Schulman et al. 2017, arXiv 1707.06347; Ziegler et al. 2019, arXiv 1909.08593;
      Huang et al. 2024, arXiv 2403.17031.
    """
    _check_2d(values, "values", old_values=old_values, returns=returns, mask=mask)
    valid = jnp.asarray(mask) > 0
    v = jnp.where(valid, as_float(values), 0.0)
    old = jnp.where(valid, jax.lax.stop_gradient(as_float(old_values)), 0.0)
    ret = jnp.where(valid, jax.lax.stop_gradient(as_float(returns)), 0.0)
    err_unclipped = jnp.square(v - ret)
    if clip_eps is None:
        per_token = 0.5 * err_unclipped
        clipfrac = jnp.zeros((), per_token.dtype)
    else:
        v_clipped = jnp.clip(v, old - clip_eps, old + clip_eps)
        err_clipped = jnp.square(v_clipped - ret)
        per_token = 0.5 * jnp.maximum(err_unclipped, err_clipped)
        clipfrac = masked_mean((err_clipped > err_unclipped).astype(per_token.dtype), mask)
    loss = aggregate(per_token, mask, agg=agg, norm_constant=norm_constant)
    aux = {
        "value_loss": loss,
        "value_clipfrac": clipfrac,
        "value_mean": masked_mean(jax.lax.stop_gradient(v), mask),
        "value_mse": masked_mean(jax.lax.stop_gradient(err_unclipped), mask),
    }
    return loss, aux


def sft_loss(logprobs, mask, *, agg: str = "token-mean", norm_constant=None):
    """Negative log-likelihood of the target tokens (supervised fine-tuning).

    Equation: `loss = aggregate(-log p(y_t), mask)`; with the default token-mean this
    is the usual cross-entropy per target token.

    Args:
      logprobs: `[B, T]` log-probs of the target tokens (e.g. from `token_logprobs`).
      mask: `[B, T]` float or bool, 1 = a token to predict.
      agg: loss aggregation, see `aggregate`.
      norm_constant: for `agg="seq-mean-token-sum-norm"`.

    Normalisation: see `aggregate`; the default token-mean divides by the number of
    target tokens, so micro-batch losses weighted by their token counts
    (`aggregation_weight`) give the whole batch's gradient.

    Returns:
      `(loss, aux)`; aux: `nll` (token-mean negative log-likelihood, whatever `agg`),
      `perplexity` (`exp(nll)`), `num_tokens`.
    """
    _check_2d(logprobs, "logprobs", mask=mask)
    valid = jnp.asarray(mask) > 0
    nll_tok = jnp.where(valid, -as_float(logprobs), 0.0)
    loss = aggregate(nll_tok, mask, agg=agg, norm_constant=norm_constant)
    nll = masked_mean(jax.lax.stop_gradient(nll_tok), mask)
    aux = {
        "nll": nll,
        "perplexity": jnp.exp(nll),
        "num_tokens": jnp.sum(valid.astype(jnp.float32)),
    }
    return loss, aux
