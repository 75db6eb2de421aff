"""Direct preference optimisation: the config, the pure step and the reference pass.

- `DPOConfig`: beta, the loss (`sigmoid` DPO with label smoothing, `ipo`, `hinge`, or the
  reference-free `simpo`), batch and micro-batch sizes, the nested `OptimizerConfig`, and
  where the reference log-probs come from (`precompute`d once, or `on_the_fly`).
- `pair_logprobs`: the `[B]` sequence log-probs of the chosen and rejected completions.
- `make_dpo_step(lm, tx, cfg)`: pure `(state, batch, ref_params=None) -> (state, metrics)`
  with gradient accumulation over micro-batches (pairs weighted equally, so the update
  does not depend on how the batch is split over micro-batches or devices).
- `reference_logprobs`: one jitted pass of the frozen reference over the data, giving the
  `ref_chosen_logps` / `ref_rejected_logps` columns the step reads in `precompute` mode.

Batches are right-padded `[prompt | completion]` sequences, as `preference_examples` makes
them: `chosen_ids`, `chosen_mask` (attention), `chosen_loss_mask` (1 on completion tokens),
the same for `rejected_*`, and in `precompute` mode the two `[B]` reference columns.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.core import ops
from rlhf_jax.core.preference import dpo_loss, simpo_loss
from rlhf_jax.models.lora import combine, reference_lm
from rlhf_jax.train.options import OptimizerConfig, check, check_choices, check_positive_int, hyper
from rlhf_jax.train.state import (
    TrainState,
    accumulate_gradients,
    apply_step,
    check_grad_accum,
    init_train_state,
    split_micro_batches,
)

__all__ = [
    "DPOConfig",
    "DPO_PAIR_KEYS",
    "REF_KEYS",
    "dpo_init",
    "pair_logprobs",
    "dpo_loss_fn",
    "make_dpo_step",
    "dpo_reference_lm",
    "reference_logprobs",
]

DPO_PAIR_KEYS = ("chosen_ids", "chosen_mask", "chosen_loss_mask", "rejected_ids", "rejected_mask",
                 "rejected_loss_mask")
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")

DPOLossType = Literal["sigmoid", "ipo", "hinge", "simpo"]


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Hyper-parameters of DPO and its variants (the seed and output folder are `RunOptions`)."""

    beta: float = hyper(0.1, "inverse temperature of the implicit reward (> 0; IPO's tau; SimPO's reward scale, "
                             "where the paper uses 2.0-2.5)")
    loss_type: DPOLossType = hyper(
        "sigmoid", "sigmoid (DPO; with label_smoothing: conservative DPO), ipo, hinge (SLiC), or simpo "
                   "(reference-free, length-averaged log-probs)")
    label_smoothing: float = hyper(0.0, "assumed rate of flipped labels, in [0, 0.5) (sigmoid only)")
    simpo_gamma: float = hyper(0.5, "SimPO's target reward margin gamma (simpo only)")
    batch_size: int = hyper(16, "preference pairs per optimizer update (>= 1, at most the number of pairs)")
    num_epochs: int | None = hyper(
        1, "passes over the pairs (>= 1; a resumed run may extend it; null: as many as the driver's max_steps "
           "needs)")
    grad_accum_steps: int = hyper(1, "micro-batches per update (divides batch_size; pairs weighted equally)")
    reference: Literal["precompute", "on_the_fly"] = hyper(
        "precompute", "reference log-probs: precompute (one pass of the frozen reference before training, kept "
                      "in the run folder) or on_the_fly (a reference forward in every step)")
    ref_batch_size: int | None = hyper(None, "pairs per batch of the precomputing pass (null: batch_size)")
    optimizer: OptimizerConfig = hyper(help="optimizer", factory=lambda: OptimizerConfig(learning_rate=1e-6))

    def __post_init__(self):
        check_choices(self)
        check(self.beta > 0, f"`beta` must be > 0, got {self.beta}")
        check(0.0 <= self.label_smoothing < 0.5, f"`label_smoothing` must lie in [0, 0.5), got {self.label_smoothing}")
        check(self.label_smoothing == 0.0 or self.loss_type == "sigmoid",
              f"`label_smoothing` applies only to loss_type sigmoid, not {self.loss_type}")
        check_positive_int(self, "batch_size", "grad_accum_steps")
        if self.num_epochs is not None:
            check_positive_int(self, "num_epochs")
        if self.ref_batch_size is not None:
            check_positive_int(self, "ref_batch_size")
        check_grad_accum(self.batch_size, self.grad_accum_steps)

    @property
    def needs_reference(self) -> bool:
        """SimPO has no reference model."""
        return self.loss_type != "simpo"

    @property
    def average_logprobs(self) -> bool:
        """IPO (as TRL computes it) and SimPO use length-averaged sequence log-probs; DPO sums."""
        return self.loss_type in ("ipo", "simpo")


def dpo_init(lm, params, tx: optax.GradientTransformation, *, seed: int = 0) -> TrainState:
    """A fresh `TrainState` for DPO (see `init_train_state`); the model is unused."""
    del lm
    return init_train_state(params, tx, seed=seed)


def _completion_logprobs(lm, params, ids, attention_mask, loss_mask, *, average: bool):
    """`[B]` summed (or averaged) log-probs of the completion tokens of right-padded sequences."""
    attn = jnp.asarray(attention_mask, jnp.float32)
    mask = (jnp.asarray(loss_mask, jnp.float32) * attn)[:, 1:]
    hidden, _ = lm.hidden_states(params, ids, attention_mask)
    # position t predicts token t + 1
    logits = lm.lm_head(params, hidden[:, :-1])
    logprobs = ops.token_logprobs(logits, ids[:, 1:])
    return ops.sequence_logprobs(logprobs, mask, average=average)


def _check_pairs(batch):
    for key in DPO_PAIR_KEYS:
        if key not in batch:
            raise ValueError(f"the DPO batch needs key {key!r} (preference_examples makes it); got {sorted(batch)}")
    for side in ("chosen", "rejected"):
        ids = batch[f"{side}_ids"]
        ops.check_rank(ids, 2, f"{side}_ids")
        ops.check_same_shape(ids, f"{side}_ids", **{f"{side}_mask": batch[f"{side}_mask"],
                                                    f"{side}_loss_mask": batch[f"{side}_loss_mask"]})
    if jnp.shape(batch["chosen_ids"])[0] != jnp.shape(batch["rejected_ids"])[0]:
        raise ValueError(f"`chosen_ids` and `rejected_ids` must have the same number of rows, got "
                         f"{jnp.shape(batch['chosen_ids'])[0]} and {jnp.shape(batch['rejected_ids'])[0]}")


def pair_logprobs(lm, params, batch, *, average: bool = False):
    """Sequence log-probs of the chosen and rejected completions, `([B], [B])` float32.

    `log pi(y | x) = sum_t m_t log pi(y_t | x, y_<t)` over the completion tokens
    (`*_loss_mask`), or its length average with `average=True`. One forward over the
    stacked pairs when both sides have the same length.
    """
    b = jnp.shape(batch["chosen_ids"])[0]
    sides = [(batch[f"{s}_ids"], batch[f"{s}_mask"], batch[f"{s}_loss_mask"]) for s in ("chosen", "rejected")]
    if jnp.shape(sides[0][0]) == jnp.shape(sides[1][0]):
        ids, attn, loss_mask = (jnp.concatenate([c, r], axis=0) for c, r in zip(*sides))
        logps = _completion_logprobs(lm, params, ids, attn, loss_mask, average=average)
        return logps[:b], logps[b:]
    chosen, rejected = (_completion_logprobs(lm, params, *side, average=average) for side in sides)
    return chosen, rejected


def dpo_reference_lm(lm):
    """The model the reference log-probs come from: `lm` itself, or for a LoRA `lm` its base
    without adapters (`lora.reference_lm`), which runs on the frozen base weights."""
    return reference_lm(lm) if getattr(lm, "lora", None) is not None else lm


def dpo_loss_fn(lm, params, batch, cfg: DPOConfig, *, ref_params=None):
    """The DPO-family loss of one (micro-)batch of pairs, for `accumulate_gradients`.

    The reference log-probs are `ref_params`' (a forward of the frozen reference, no
    gradient; with a LoRA `lm`, of its base `dpo_reference_lm(lm)` on the frozen base
    weights) when given, else the batch's `ref_chosen_logps` / `ref_rejected_logps`.

    Returns:
      `(loss, (aux, weight))`: the mean over pairs of `dpo_loss` / `simpo_loss`; aux has
      rewards_chosen, rewards_rejected, accuracy, margin (from the loss's aux) and the
      policy's mean sequence log-probs logps_chosen, logps_rejected; weight = the number
      of pairs.
    """
    chosen, rejected = pair_logprobs(lm, params, batch, average=cfg.average_logprobs)
    if cfg.loss_type == "simpo":
        loss, loss_aux = simpo_loss(chosen, rejected, beta=cfg.beta, gamma=cfg.simpo_gamma)
    else:
        if ref_params is not None:
            ref_chosen, ref_rejected = jax.lax.stop_gradient(
                pair_logprobs(dpo_reference_lm(lm), ref_params, batch, average=cfg.average_logprobs))
        else:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        loss, loss_aux = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=cfg.beta,
                                  loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
    aux = {k: loss_aux[k] for k in ("rewards_chosen", "rewards_rejected", "accuracy", "margin")}
    aux["logps_chosen"] = jnp.mean(jax.lax.stop_gradient(chosen))
    aux["logps_rejected"] = jnp.mean(jax.lax.stop_gradient(rejected))
    return loss, (aux, jnp.asarray(jnp.shape(chosen)[0], jnp.float32))


def make_dpo_step(lm, tx: optax.GradientTransformation, cfg: DPOConfig):
    """Build the pure DPO step `(state, batch, ref_params=None, frozen=None) -> (state, metrics)`.

    One call is one optimizer update over the `B` pairs of `batch` (B divisible by
    `cfg.grad_accum_steps`). The loss is a mean over pairs, and micro-batches are weighted
    by their pair counts (`accumulate_gradients`), so the update is that of the whole
    batch whatever the number of micro-batches or devices. A non-finite gradient skips
    the update (`skipped_nonfinite = 1`).

    The reference: with `cfg.reference == "precompute"` the batch carries
    `ref_chosen_logps` / `ref_rejected_logps` (`reference_logprobs`); with
    `"on_the_fly"` pass the frozen reference's `ref_params` (an argument, never
    differentiated, no optimizer state). SimPO needs neither.

    LoRA: `state.params` holds the adapters and `frozen` the base weights (an argument: no
    optimizer state, never differentiated); the policy runs on `combine(frozen,
    state.params)`, and the reference is the base without adapters on those same weights
    (one copy): with `"on_the_fly"` give `frozen` alone (`ref_params` defaults to it), with
    `"precompute"` the columns come from `reference_logprobs(dpo_reference_lm(lm), frozen, ...)`.

    Args:
      lm: the `LM` (closed over, static).
      tx: the optimizer.
      cfg: `DPOConfig`.

    Returns:
      `step(state, batch, ref_params=None, frozen=None)`; jit it with `donate_argnums=0`. Metrics
      (float32 scalars): loss, rewards_chosen, rewards_rejected, accuracy, margin,
      logps_chosen, logps_rejected, grad_norm, learning_rate, skipped_nonfinite.

    References:
      Rafailov et al. 2023 (DPO), arXiv 2305.18290; Azar et al. 2023 (IPO), arXiv
      2310.12036; Meng et al. 2024 (SimPO), arXiv 2405.14734.
    """

    lora = getattr(lm, "lora", None) is not None

    def step(state: TrainState, batch, ref_params=None, frozen=None):
        _check_pairs(batch)
        if lora and frozen is None:
            raise ValueError("a LoRA DPO step needs the frozen base weights (`frozen`)")
        if lora and ref_params is None and cfg.reference == "on_the_fly":
            ref_params = frozen  # the reference is the base under the adapters
        keys = DPO_PAIR_KEYS
        if cfg.needs_reference and ref_params is None:
            missing = [k for k in REF_KEYS if k not in batch]
            if missing:
                raise ValueError(f"the DPO step needs the reference log-probs: batch keys {missing} "
                                 "(reference_logprobs) or `ref_params` (reference: on_the_fly)")
            keys = keys + REF_KEYS
        batch = {k: batch[k] for k in keys}
        micro = split_micro_batches(batch, cfg.grad_accum_steps)

        def loss_fn(params, micro_batch):
            return dpo_loss_fn(lm, combine(frozen, params), micro_batch, cfg, ref_params=ref_params)

        loss, grads, aux, _ = accumulate_gradients(loss_fn, state.params, micro, num_micro=cfg.grad_accum_steps)
        return apply_step(tx, state, loss, grads, aux)

    return step


def _pair_logprobs_jit(lm, params, batch, average):
    return pair_logprobs(lm, params, batch, average=average)


# The model is static: jax.jit caches by its value (an `LM` is hashable).
_pair_logprobs_jitted = jax.jit(_pair_logprobs_jit, static_argnums=(0, 3))


def reference_logprobs(lm, ref_params, data, *, batch_size: int, average: bool = False,
                       place=None) -> dict[str, np.ndarray]:
    """The frozen reference's sequence log-probs of every pair: one jitted pass over `data`.

    The data is cut into chunks of `batch_size` pairs (the last one padded with empty
    rows, so the pass compiles once).

    Args:
      lm: the `LM`.
      ref_params: the reference's parameters.
      data: the pair arrays (`DPO_PAIR_KEYS`, `[N, L]`).
      batch_size: pairs per forward.
      average: length-averaged log-probs (IPO / SimPO) instead of sums.
      place: optional `place(chunk) -> chunk` putting a chunk on the devices (a mesh).

    Returns:
      `{"ref_chosen_logps": [N], "ref_rejected_logps": [N]}` float32 NumPy arrays.
    """
    from rlhf_jax.data.padding import pad_rows

    n = int(np.shape(data["chosen_ids"])[0])
    chosen, rejected = [], []
    for start in range(0, n, batch_size):
        chunk = {k: np.asarray(data[k][start:start + batch_size]) for k in DPO_PAIR_KEYS}
        rows = chunk["chosen_ids"].shape[0]
        chunk, _ = pad_rows(chunk, batch_size)
        if place is not None:
            chunk = place(chunk)
        c, r = _pair_logprobs_jitted(lm, ref_params, chunk, bool(average))
        chosen.append(np.asarray(c, np.float32)[:rows])
        rejected.append(np.asarray(r, np.float32)[:rows])
    return {"ref_chosen_logps": np.concatenate(chosen), "ref_rejected_logps": np.concatenate(rejected)}
