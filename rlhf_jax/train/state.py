"""Train states, the optimizer factory and the helpers every step shares.

- `TrainState`: the explicit pytree a supervised step (SFT, reward model) carries.
- `make_optimizer`: AdamW with warm-up + decay, gradient clipping, and a learning
  rate that can be read back from the optimizer state (for the metrics).
- `accumulate_gradients`: gradient accumulation as an explicit `lax.scan` over
  micro-batches, weighted so that the result equals one big batch.
- `guarded_apply`: an optimizer update that is skipped (params and optimizer state
  unchanged) when the gradients are not finite.
- `check_vocab`, `model_context_length`: input checks with clear errors.

Nothing here reads a clock or does I/O.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlhf_jax.train.options import OptimizerConfig

__all__ = [
    "TrainState",
    "OptimizerConfig",
    "make_optimizer",
    "optimizer_from_config",
    "learning_rate_from_state",
    "accumulate_gradients",
    "split_micro_batches",
    "guarded_apply",
    "apply_step",
    "tree_all_finite",
    "check_vocab",
    "model_context_length",
]

_SCHEDULES = ("cosine", "linear", "constant")


@struct.dataclass
class TrainState:
    """State of a supervised step (SFT or reward model).

    Attributes:
      params: the trained parameter pytree.
      opt_state: the optax state of `tx` for `params`.
      step: int32 scalar, number of optimizer updates applied so far.
      rng: PRNG key; every random draw of the step comes from it, so a resumed run
        continues exactly.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def init_train_state(params, tx: optax.GradientTransformation, *, seed: int = 0) -> TrainState:
    """A fresh `TrainState`: `params`, `tx.init(params)`, step 0, a PRNG key from `seed`."""
    return TrainState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key(seed),
    )


def make_optimizer(
    learning_rate: float,
    *,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    end_learning_rate_ratio: float = 0.0,
    mu_dtype=None,
) -> optax.GradientTransformation:
    """AdamW with linear warm-up, then cosine / linear decay (or constant), and clipping.

    The schedule: `lr(t) = learning_rate * t / warmup_steps` for `t < warmup_steps`, then
    decays from `learning_rate` to `end_learning_rate_ratio * learning_rate` at
    `total_steps` (cosine or linear), or stays constant. Weight decay is applied to
    matrices only (ndim >= 2), not to biases and norm scales. Gradients are clipped to a
    global norm of `max_grad_norm` before Adam (None: no clipping). The learning rate is
    injected (`optax.inject_hyperparams`) so `learning_rate_from_state` can read it.

    Args:
      learning_rate: peak learning rate (> 0).
      warmup_steps: linear warm-up length in optimizer updates (>= 0).
      total_steps: length of the whole schedule in updates; required for "cosine" and
        "linear" decay.
      schedule: "cosine", "linear" or "constant".
      weight_decay: decoupled weight decay coefficient (AdamW).
      max_grad_norm: global-norm clip; None or <= 0 disables it.
      b1, b2, eps: Adam moments and epsilon.
      end_learning_rate_ratio: final learning rate as a fraction of the peak.
      mu_dtype: storage dtype of Adam's first moment (e.g. ``"bfloat16"`` halves it);
        None = the parameters' dtype. The second moment stays in the parameters' dtype.

    Returns:
      An `optax.GradientTransformation`.

    References:
      Loshchilov & Hutter, AdamW, arXiv 1711.05101.
    """
    if not learning_rate > 0:
        raise ValueError(f"`learning_rate` must be > 0, got {learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps}")
    if schedule not in _SCHEDULES:
        raise ValueError(f"`schedule` must be one of {_SCHEDULES}, got {schedule!r}")
    end_lr = learning_rate * end_learning_rate_ratio
    if schedule == "constant":
        decay = optax.constant_schedule(learning_rate)
    else:
        if total_steps is None:
            raise ValueError(f"`total_steps` is required for schedule={schedule!r}")
        if total_steps <= warmup_steps:
            raise ValueError(
                f"`total_steps` ({total_steps}) must be larger than `warmup_steps` ({warmup_steps})"
            )
        n = total_steps - warmup_steps
        if schedule == "cosine":
            decay = optax.cosine_decay_schedule(learning_rate, n, alpha=end_learning_rate_ratio)
        else:
            decay = optax.linear_schedule(learning_rate, end_lr, n)
    if warmup_steps > 0:
        warm = optax.linear_schedule(0.0, learning_rate, warmup_steps)
        lr_schedule = optax.join_schedules([warm, decay], [warmup_steps])
    else:
        lr_schedule = decay

    def decay_mask(params):
        return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)

    adam = optax.inject_hyperparams(optax.adamw, static_args=("mask", "mu_dtype"))(
        learning_rate=lr_schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask,
        mu_dtype=None if mu_dtype is None else jnp.dtype(mu_dtype),
    )
    if max_grad_norm is None or max_grad_norm <= 0:
        return adam
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adam)


def optimizer_from_config(opt: OptimizerConfig, *, total_steps: int | None = None) -> optax.GradientTransformation:
    """`make_optimizer` from an `OptimizerConfig`.

    Args:
      opt: the optimizer settings.
      total_steps: the schedule length to use when `opt.total_steps` is None (the run
        length, which a driver knows); ignored for a constant schedule.
    """
    if not isinstance(opt, OptimizerConfig):
        raise TypeError(f"`opt` must be an OptimizerConfig, got {type(opt).__name__}")
    return make_optimizer(
        opt.learning_rate,
        warmup_steps=opt.warmup_steps,
        total_steps=opt.total_steps if opt.total_steps is not None else total_steps,
        schedule=opt.schedule,
        weight_decay=opt.weight_decay,
        max_grad_norm=opt.max_grad_norm,
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        end_learning_rate_ratio=opt.end_learning_rate_ratio,
        mu_dtype=opt.mu_dtype,
    )


def learning_rate_from_state(opt_state) -> jax.Array | None:
    """The learning rate of the last update, read from an injected-hyper-parameter state.

    Returns None when `opt_state` holds no `optax.inject_hyperparams` state with a
    `learning_rate` (an optimizer not built by `make_optimizer`).
    """
    is_inject = lambda x: isinstance(x, tuple) and isinstance(getattr(x, "hyperparams", None), dict)  # noqa: E731
    for leaf in jax.tree.leaves(opt_state, is_leaf=is_inject):
        if is_inject(leaf) and "learning_rate" in leaf.hyperparams:
            return jnp.asarray(leaf.hyperparams["learning_rate"], jnp.float32)
    return None


def tree_all_finite(tree) -> jax.Array:
    """Scalar bool: every element of every floating leaf of `tree` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack(leaves))


def check_grad_accum(batch_size: int, grad_accum_steps: int) -> None:
    """Errors naming the keys unless `grad_accum_steps >= 1` divides `batch_size`."""
    if grad_accum_steps < 1:
        raise ValueError(f"`grad_accum_steps` must be >= 1, got {grad_accum_steps}")
    if batch_size % grad_accum_steps:
        raise ValueError(
            f"`batch_size` ({batch_size}) must be divisible by `grad_accum_steps` "
            f"({grad_accum_steps})"
        )


def split_micro_batches(batch, num_micro: int, *, name: str = "batch"):
    """Reshape every `[B, ...]` leaf of `batch` to `[num_micro, B // num_micro, ...]`.

    Raises `ValueError` naming `grad_accum_steps` when B is not divisible.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError(f"`{name}` is empty")
    b = jnp.shape(leaves[0])[0]
    if b == 0:
        raise ValueError(f"`{name}` has no rows")
    if b % num_micro:
        raise ValueError(
            f"the {name} size {b} is not divisible by `grad_accum_steps` ({num_micro})"
        )
    return jax.tree.map(lambda x: jnp.reshape(x, (num_micro, b // num_micro) + jnp.shape(x)[1:]), batch)


def accumulate_gradients(loss_fn: Callable, params, micro_batches, *, num_micro: int):
    """Gradients of a loss over a batch, accumulated over micro-batches in a `lax.scan`.

    `loss_fn(params, micro_batch) -> (loss, (aux, weight))` where `loss` is the loss of
    the micro-batch normalised by its own `weight` (e.g. its valid-token count for a
    token-mean loss, its row count for a per-sequence mean). The accumulated gradient
    and loss are the weight-averaged ones,

        g = sum_i w_i g_i / sum_i w_i,

    which equal the gradient of the whole batch's loss (exactly so for a token-mean over
    all valid tokens, however they fall across micro-batches). `aux` scalars are
    weight-averaged the same way, except keys ending in "_max", which take the maximum.

    Args:
      loss_fn: as above; `aux` a dict of scalars, `weight` a float scalar >= 0.
      params: parameter pytree (the differentiated argument).
      micro_batches: pytree whose leaves have a leading `[num_micro, ...]` axis.
      num_micro: number of micro-batches (static).

    Returns:
      `(loss, grads, aux, total_weight)`.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        one = jax.tree.map(lambda x: x[0], micro_batches)
        (loss, (aux, weight)), grads = grad_fn(params, one)
        return loss, grads, aux, jnp.asarray(weight, jnp.float32)

    def body(carry, micro):
        g_sum, l_sum, a_sum, w_sum = carry
        (loss, (aux, weight)), grads = grad_fn(params, micro)
        weight = jnp.asarray(weight, jnp.float32)
        g_sum = jax.tree.map(lambda s, g: s + weight * g, g_sum, grads)
        a_sum = {
            k: jnp.maximum(a_sum[k], aux[k]) if k.endswith("_max") else a_sum[k] + weight * aux[k]
            for k in a_sum
        }
        return (g_sum, l_sum + weight * loss, a_sum, w_sum + weight), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    aux_shape = jax.eval_shape(lambda p, m: loss_fn(p, m)[1][0], params, first)
    zeros_aux = {
        k: jnp.full(s.shape, -jnp.inf if k.endswith("_max") else 0.0, jnp.float32)
        for k, s in aux_shape.items()
    }
    zeros_g = jax.tree.map(jnp.zeros_like, params)
    init = (zeros_g, jnp.zeros((), jnp.float32), zeros_aux, jnp.zeros((), jnp.float32))
    (g_sum, l_sum, a_sum, w_sum), _ = jax.lax.scan(body, init, micro_batches)
    denom = jnp.maximum(w_sum, 1e-12)
    grads = jax.tree.map(lambda g: g / denom, g_sum)
    aux = {k: a if k.endswith("_max") else a / denom for k, a in a_sum.items()}
    return l_sum / denom, grads, aux, w_sum


def guarded_apply(tx: optax.GradientTransformation, grads, opt_state, params, *, ok=None):
    """Apply one optimizer update unless the gradients (or `ok`) say not to.

    When any gradient is non-finite, or `ok` is False, the returned params and optimizer
    state are the inputs unchanged, so a NaN never reaches the weights. The choice is a
    `lax.cond` on one scalar (a per-leaf `where` would make XLA copy the finiteness
    reduction into every parameter's fusion, multiplying compile time).

    Returns:
      `(params, opt_state, applied)` with `applied` a scalar bool.
    """
    finite = tree_all_finite(grads)
    applied = finite if ok is None else jnp.logical_and(finite, ok)

    def apply(operands):
        grads, opt_state, params = operands
        updates, new_opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    def skip(operands):
        _, opt_state, params = operands
        return params, opt_state

    new_params, new_opt_state = jax.lax.cond(applied, apply, skip, (grads, opt_state, params))
    return new_params, new_opt_state, applied


def apply_step(tx: optax.GradientTransformation, state, loss, grads, aux: dict, **extra):
    """One supervised update from accumulated gradients: `(new_state, float32 metrics)`.

    The step shared by SFT, reward-model and DPO training: `guarded_apply` (a non-finite
    gradient leaves params and optimizer state unchanged), then the metrics every such step
    logs: `loss`, the loss's `aux`, `grad_norm`, `skipped_nonfinite`, `learning_rate` (when
    the optimizer exposes it) and any `extra` scalars.
    """
    params, opt_state, applied = guarded_apply(tx, grads, state.opt_state, state.params)
    metrics = {
        "loss": loss,
        **aux,
        "grad_norm": optax.global_norm(grads),
        **extra,
        "skipped_nonfinite": 1.0 - applied.astype(jnp.float32),
    }
    lr = learning_rate_from_state(opt_state)
    if lr is not None:
        metrics["learning_rate"] = lr
    new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)


def model_context_length(lm) -> int | None:
    """The maximum sequence length of `lm`'s config, or None when it has none (RoPE)."""
    cfg = getattr(lm, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "context_length"):
        value = getattr(cfg, name, None)
        if value:
            return int(value)
    return None


def check_vocab(tokenizer, lm) -> None:
    """Raise `ValueError` when the tokenizer has more tokens than the model's embedding.

    A tokenizer smaller than the embedding is fine (models often pad the vocabulary).

    Args:
      tokenizer: anything with `len()` (a transformers tokenizer) or a `vocab_size`.
      lm: an `LM` (its `config.vocab_size` is the embedding size).
    """
    try:
        n_tok = len(tokenizer)
    except TypeError:
        n_tok = int(tokenizer.vocab_size)
    n_emb = int(lm.config.vocab_size)
    if n_tok > n_emb:
        raise ValueError(
            f"the tokenizer has {n_tok} tokens but the model's embedding has only {n_emb} "
            "rows (config.vocab_size): ids >= {n_emb} would index past it; resize the "
            "embedding or use the matching tokenizer".replace("{n_emb}", str(n_emb))
        )
