"""Supervised fine-tuning: next-token cross-entropy on completion tokens only.

`make_sft_step(lm, tx, cfg)` returns a pure `(state, batch) -> (state, metrics)` step
with gradient accumulation over micro-batches (an explicit `lax.scan`); `sft_init`
builds its `TrainState`; `evaluate_sft` gives the held-out loss and token accuracy.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.core import ops
from rlhf_jax.core.losses import aggregation_weight, sft_loss
from rlhf_jax.models.lora import combine
from rlhf_jax.train.options import OptimizerConfig, check, check_choices, check_positive_int, hyper
from rlhf_jax.train.state import (
    TrainState,
    accumulate_gradients,
    apply_step,
    check_grad_accum,
    init_train_state,
    split_micro_batches,
)

__all__ = ["SFTConfig", "sft_init", "make_sft_step", "sft_loss_fn", "evaluate_sft"]

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Hyper-parameters of supervised fine-tuning (the seed and output folder are `RunOptions`)."""

    batch_size: int = hyper(16, "sequences per optimizer update (>= 1, at most the number of rows)")
    num_epochs: int | None = hyper(
        1, "passes over the data (>= 1; a resumed run may extend it; null: as many as the driver's max_steps needs)")
    grad_accum_steps: int = hyper(
        1, "micro-batches per update (divides batch_size); gradients weighted by each micro-batch's share of "
           "the loss normaliser, so the update equals the full-batch one")
    loss_agg: LossAgg = hyper("token-mean", "loss aggregation over completion tokens (see rlhf_jax.aggregate)")
    norm_constant: float | None = hyper(None, "the constant of seq-mean-token-sum-norm (null: the length)")
    optimizer: OptimizerConfig = hyper(help="optimizer", factory=OptimizerConfig)

    def __post_init__(self):
        check_choices(self)
        check_positive_int(self, "batch_size", "grad_accum_steps")
        if self.num_epochs is not None:
            check_positive_int(self, "num_epochs")
        check_grad_accum(self.batch_size, self.grad_accum_steps)
        check(self.norm_constant is None or self.norm_constant > 0,
              f"`norm_constant` must be > 0 or null, got {self.norm_constant}")


def sft_init(lm, params, tx: optax.GradientTransformation, *, seed: int = 0) -> TrainState:
    """A fresh `TrainState` for SFT (see `init_train_state`); the model is unused."""
    del lm
    return init_train_state(params, tx, seed=seed)


def _loss_weight(mask, agg: str):
    """The normaliser of an aggregated loss over `mask`, additive over rows (`aggregation_weight`)."""
    return aggregation_weight(mask, agg=agg)


def sft_loss_fn(lm, params, batch, *, agg: str = "token-mean", norm_constant=None):
    """Next-token cross-entropy over the completion tokens of one batch.

    Position t predicts token t+1; a prediction counts where `loss_mask[:, t+1]` and
    `attention_mask[:, t+1]` are 1 (completion tokens), so prompt tokens and padding
    never contribute.

    Args:
      lm: the `LM`.
      params: its parameters.
      batch: {"input_ids" [B, L] int32, "attention_mask" [B, L], "loss_mask" [B, L]}.
      agg, norm_constant: see `rlhf_jax.aggregate`.

    Returns:
      `(loss, (aux, weight))`: aux has "nll" (the token-mean negative log-likelihood)
      and "token_accuracy" (argmax = target); weight is the loss's normaliser.
    """
    ids = batch["input_ids"]
    attn = batch["attention_mask"]
    loss_mask = batch["loss_mask"]
    ops.check_rank(ids, 2, "input_ids")
    ops.check_same_shape(ids, "input_ids", attention_mask=attn, loss_mask=loss_mask)
    hidden, _ = lm.hidden_states(params, ids, attn)
    mask = (jnp.asarray(loss_mask, jnp.float32) * jnp.asarray(attn, jnp.float32))[:, 1:]
    # The LM head runs in chunks of tokens (log-prob and argmax hit in one pass): no
    # [B, L, V] float32 logits exist.
    stats = lm.token_stats(params, hidden[:, :-1], ids[:, 1:], with_accuracy=True)
    loss, loss_aux = sft_loss(stats["logprobs"], mask, agg=agg, norm_constant=norm_constant)
    correct = stats["correct"]
    aux = {"nll": loss_aux["nll"], "token_accuracy": ops.masked_mean(correct, mask)}
    return loss, (aux, _loss_weight(mask, agg))


def make_sft_step(lm, tx: optax.GradientTransformation, cfg: SFTConfig):
    """Build the pure SFT step `(state, batch, frozen=None) -> (state, metrics)`.

    One call is one optimizer update over `batch` (`[B, L]` arrays, B divisible by
    `cfg.grad_accum_steps`), its gradient accumulated over micro-batches in a `lax.scan`.
    A non-finite gradient skips the update (params and optimizer state unchanged,
    `metrics["skipped_nonfinite"] = 1`).

    LoRA: `state.params` holds only the trained part (the adapters) and `frozen` the
    rest (the base weights, an argument: no optimizer state, never differentiated); the
    model runs on `rlhf_jax.models.lora.combine(frozen, state.params)`. Without LoRA,
    `frozen` is None and `state.params` is the whole model.

    Args:
      lm: the `LM` (closed over, static).
      tx: the optimizer.
      cfg: `SFTConfig`.

    Returns:
      `step(state, batch, frozen=None)`; jit it (`jax.jit(step, donate_argnums=0)`). `metrics` are
      float32 scalars: loss, nll, token_accuracy, grad_norm, tokens, learning_rate,
      skipped_nonfinite.
    """

    def step(state: TrainState, batch, frozen=None):
        def loss_fn(params, micro):
            return sft_loss_fn(lm, combine(frozen, params), micro, agg=cfg.loss_agg,
                               norm_constant=cfg.norm_constant)

        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
        micro = split_micro_batches(batch, cfg.grad_accum_steps)
        loss, grads, aux, _ = accumulate_gradients(
            loss_fn, state.params, micro, num_micro=cfg.grad_accum_steps
        )
        tokens = jnp.sum(
            (jnp.asarray(batch["loss_mask"], jnp.float32) * jnp.asarray(batch["attention_mask"], jnp.float32))[:, 1:]
        )
        return apply_step(tx, state, loss, grads, aux, tokens=tokens)

    return step


def _eval_sums(lm, params, batch):
    """Summed completion-token NLL, correct argmax predictions and token count of one chunk."""
    loss, (aux, weight) = sft_loss_fn(lm, params, batch, agg="token-mean")
    del loss
    return aux["nll"] * weight, aux["token_accuracy"] * weight, weight


_eval_sums_jit = jax.jit(_eval_sums, static_argnames=("lm",))


def evaluate_sft(lm, params, data, *, batch_size: int | None = None) -> dict:
    """Held-out next-token loss and accuracy over every completion token of `data`.

    Args:
      lm: the `LM`.
      params: its parameters.
      data: {"input_ids", "attention_mask", "loss_mask"} `[N, L]` arrays.
      batch_size: rows per forward (None: all at once); a last, shorter chunk compiles once more.

    Returns:
      dict of Python floats: `loss` (token-mean NLL over all completion tokens),
      `token_accuracy`, `tokens` (how many completion tokens were scored).
    """
    n = int(np.shape(data["input_ids"])[0])
    size = n if batch_size is None else max(int(batch_size), 1)
    nll = correct = tokens = 0.0
    for start in range(0, n, size):
        chunk = {k: jnp.asarray(data[k][start:start + size]) for k in ("input_ids", "attention_mask", "loss_mask")}
        a, b, c = jax.device_get(_eval_sums_jit(lm, params, chunk))
        nll, correct, tokens = nll + float(a), correct + float(b), tokens + float(c)
    denominator = max(tokens, 1.0)
    return {"loss": nll / denominator, "token_accuracy": correct / denominator, "tokens": tokens}
