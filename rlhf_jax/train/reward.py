"""Reward-model training: Bradley-Terry on preference pairs, evaluation, head normalisation.

- `make_reward_step(rm, tx, cfg)`: pure `(state, batch) -> (state, metrics)` over
  (chosen, rejected) pairs, with optional margin and reward centering, gradient
  accumulation over micro-batches.
- `evaluate_reward_model`: held-out accuracy / loss / score statistics.
- `normalize_reward_head`: shift (and scale) the scalar head so that scores on a
  reference set have mean 0 (and std `target_std`), as OpenAI's lm-human-preferences
  and the N+ recipe do after training.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.core import ops
from rlhf_jax.core.losses import bradley_terry_loss
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

__all__ = [
    "RewardConfig",
    "reward_init",
    "make_reward_step",
    "evaluate_reward_model",
    "normalize_reward_head",
]

_PAIR_KEYS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Hyper-parameters of Bradley-Terry reward-model training (seed and output folder: `RunOptions`)."""

    batch_size: int = hyper(16, "preference pairs per optimizer update (>= 1, at most the number of pairs)")
    num_epochs: int | None = hyper(
        1, "passes over the pairs (>= 1; about one is the N+ paper's advice: reward models overfit after; null: as "
           "many as the driver's max_steps needs)")
    grad_accum_steps: int = hyper(1, "micro-batches per update (divides batch_size; pairs weighted equally)")
    center_rewards_coef: float = hyper(
        0.0, "coefficient of the centering term coef * mean((chosen + rejected)^2) (>= 0; 0 disables it)")
    use_margin: bool = hyper(True, "use the rows' `margin` column when every row has one")
    optimizer: OptimizerConfig = hyper(help="optimizer", factory=lambda: OptimizerConfig(learning_rate=5e-5))

    def __post_init__(self):
        check_choices(self)
        check_positive_int(self, "batch_size", "grad_accum_steps")
        if self.num_epochs is not None:
            check_positive_int(self, "num_epochs")
        check_grad_accum(self.batch_size, self.grad_accum_steps)
        check(self.center_rewards_coef >= 0, f"`center_rewards_coef` must be >= 0, got {self.center_rewards_coef}")


def reward_init(rm, params, tx: optax.GradientTransformation, *, seed: int = 0) -> TrainState:
    """A fresh `TrainState` for reward-model training (see `init_train_state`); the model is unused."""
    del rm
    return init_train_state(params, tx, seed=seed)


def _check_pairs(batch):
    for key in _PAIR_KEYS:
        if key not in batch:
            raise ValueError(f"the preference batch needs key {key!r}; got {sorted(batch)}")
    ops.check_rank(batch["chosen_ids"], 2, "chosen_ids")
    ops.check_rank(batch["rejected_ids"], 2, "rejected_ids")
    ops.check_same_shape(batch["chosen_ids"], "chosen_ids", chosen_mask=batch["chosen_mask"])
    ops.check_same_shape(batch["rejected_ids"], "rejected_ids", rejected_mask=batch["rejected_mask"])
    if jnp.shape(batch["chosen_ids"])[0] != jnp.shape(batch["rejected_ids"])[0]:
        raise ValueError(
            f"`chosen_ids` and `rejected_ids` must have the same number of rows, got "
            f"{jnp.shape(batch['chosen_ids'])[0]} and {jnp.shape(batch['rejected_ids'])[0]}"
        )
    if jnp.shape(batch["chosen_ids"])[0] == 0:
        raise ValueError("the preference batch is empty (`chosen_ids` has no rows)")


def pair_scores(rm, params, batch):
    """Scores of the chosen and rejected sequences, `([B], [B])` float32.

    One forward over the stacked pairs when chosen and rejected have the same length.
    """
    chosen_ids, chosen_mask = batch["chosen_ids"], batch["chosen_mask"]
    rejected_ids, rejected_mask = batch["rejected_ids"], batch["rejected_mask"]
    b = jnp.shape(chosen_ids)[0]
    if jnp.shape(chosen_ids) == jnp.shape(rejected_ids):
        ids = jnp.concatenate([chosen_ids, rejected_ids], axis=0)
        mask = jnp.concatenate([chosen_mask, rejected_mask], axis=0)
        scores = jnp.asarray(rm.scores(params, ids, mask), jnp.float32)
        return scores[:b], scores[b:]
    chosen = jnp.asarray(rm.scores(params, chosen_ids, chosen_mask), jnp.float32)
    rejected = jnp.asarray(rm.scores(params, rejected_ids, rejected_mask), jnp.float32)
    return chosen, rejected


def _bt(chosen, rejected, margin, center_coef):
    return bradley_terry_loss(chosen, rejected, margin=margin, center_coef=center_coef)


def make_reward_step(rm, tx: optax.GradientTransformation, cfg: RewardConfig):
    """Build the pure reward-model step `(state, batch, frozen=None) -> (state, metrics)`.

    Loss: Bradley-Terry, `mean(-log_sigmoid(r_chosen - r_rejected - margin))` (+ the
    optional centering term), with `r = rm.scores(...)` read at each sequence's last
    valid token. A non-finite gradient skips the update (`skipped_nonfinite = 1`).

    LoRA: `state.params` holds the adapters and the new `score` head
    (`rlhf_jax.models.lora.partition(params, heads=("score",))`), `frozen` the base
    weights (an argument, never trained); the model runs on `combine(frozen, state.params)`.

    Args:
      rm: a scalar-head `LM` (closed over).
      tx: the optimizer.
      cfg: `RewardConfig`.

    Returns:
      `step(state, batch, frozen=None)` with batch = {"chosen_ids", "chosen_mask", "rejected_ids",
      "rejected_mask"} `[B, L]` (+ optional "margin" `[B]`). Metrics: loss, accuracy,
      chosen_score, rejected_score, score_gap, grad_norm, learning_rate, skipped_nonfinite.

    References:
      Bradley & Terry 1952; Ouyang et al. 2022, arXiv 2203.02155.
    """

    def loss_fn(params, micro, frozen):
        chosen, rejected = pair_scores(rm, combine(frozen, params), micro)
        margin = micro.get("margin") if cfg.use_margin else None
        loss, bt_aux = _bt(chosen, rejected, margin, cfg.center_rewards_coef)
        aux = {
            "accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)),
            "chosen_score": jnp.mean(chosen),
            "rejected_score": jnp.mean(rejected),
            "score_gap": jnp.mean(chosen - rejected),
        }
        del bt_aux
        return loss, (aux, jnp.asarray(jnp.shape(chosen)[0], jnp.float32))

    def step(state: TrainState, batch, frozen=None):
        _check_pairs(batch)
        keys = _PAIR_KEYS + (("margin",) if (cfg.use_margin and "margin" in batch) else ())
        batch = {k: batch[k] for k in keys}
        micro = split_micro_batches(batch, cfg.grad_accum_steps)
        loss, grads, aux, _ = accumulate_gradients(
            lambda p, m: loss_fn(p, m, frozen), state.params, micro, num_micro=cfg.grad_accum_steps
        )
        return apply_step(tx, state, loss, grads, aux)

    return step


def _scores(rm, params, ids, mask):
    return rm.scores(params, ids, mask)


# The reward model is static: jax.jit caches by its value (an `LM` is hashable).
_pair_scores_jit = jax.jit(pair_scores, static_argnums=0)
_scores_jit = jax.jit(_scores, static_argnums=0)


def evaluate_reward_model(rm, params, batch, *, batch_size: int | None = None) -> dict:
    """Held-out metrics of a reward model on preference pairs.

    Args:
      rm: scalar-head `LM`.
      params: its parameters.
      batch: the pair dict of `make_reward_step` (NumPy or jax arrays, any number of rows).
      batch_size: evaluate in chunks of this many pairs (None: all at once).

    Returns:
      dict of Python floats: accuracy (chosen scored strictly higher), loss (Bradley-Terry,
      no margin), score_mean, score_std (over chosen and rejected), chosen_score,
      rejected_score.
    """
    _check_pairs(batch)
    n = int(np.shape(batch["chosen_ids"])[0])
    size = n if batch_size is None else int(batch_size)
    chosen_all, rejected_all = [], []
    for start in range(0, n, size):
        chunk = {k: jnp.asarray(batch[k][start:start + size]) for k in _PAIR_KEYS}
        c, r = _pair_scores_jit(rm, params, chunk)
        chosen_all.append(np.asarray(c, np.float64))
        rejected_all.append(np.asarray(r, np.float64))
    chosen = np.concatenate(chosen_all)
    rejected = np.concatenate(rejected_all)
    diff = chosen - rejected
    both = np.concatenate([chosen, rejected])
    return {
        "accuracy": float(np.mean(chosen > rejected)),
        "loss": float(np.mean(np.logaddexp(0.0, -diff))),
        "score_mean": float(np.mean(both)),
        "score_std": float(np.std(both)),
        "chosen_score": float(np.mean(chosen)),
        "rejected_score": float(np.mean(rejected)),
    }


def normalize_reward_head(rm, params, ids, mask, *, target_std: float | None = None):
    """Shift (and scale) the scalar head so scores on `ids` have mean 0 (and std `target_std`).

    With scores `s = w . h + b` on the reference set (mean mu, std sigma), the new head is
    `w' = g w`, `b' = g (b - mu)` with `g = target_std / sigma` (g = 1 when `target_std`
    is None), so the new scores are `g (s - mu)`.

    Args:
      rm: scalar-head `LM`.
      params: its parameters (not modified).
      ids, mask: `[B, L]` reference sequences (e.g. SFT samples) and their mask.
      target_std: the wanted std of the scores, or None to only centre them.

    Returns:
      New params with the head's kernel and bias replaced.

    References:
      Ziegler et al. 2019, arXiv 1909.08593; Huang et al. 2024, arXiv 2403.17031.
    """
    ops.check_rank(ids, 2, "ids")
    ops.check_same_shape(ids, "ids", mask=mask)
    if np.shape(ids)[0] == 0:
        raise ValueError("`ids` is empty: normalising needs reference sequences")
    scores = np.asarray(_scores_jit(rm, params, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
    mu = float(np.mean(scores))
    gain = 1.0
    if target_std is not None:
        sigma = float(np.std(scores))
        if not sigma > 0:
            raise ValueError("the reference scores have zero spread; cannot scale to `target_std`")
        gain = float(target_std) / sigma
    kernel_path, bias_path = _find_scalar_head(params)
    return _set_head(params, kernel_path, bias_path, mu, gain)


def _find_scalar_head(params):
    """Paths of the scalar head's kernel `[D, 1]`/`[D]` and bias in `params`."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    candidates = []
    for path, leaf in flat:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        joined = "/".join(names).lower()
        if any(h in joined for h in ("score", "value_head", "scalar_head", "v_head")):
            candidates.append((path, names, leaf))
    kernel = [c for c in candidates if c[1][-1] in ("kernel", "weight", "w")]
    bias = [c for c in candidates if c[1][-1] in ("bias", "b")]
    if len(kernel) != 1 or len(bias) != 1:
        raise ValueError(
            "could not find exactly one scalar-head kernel and bias in `params` "
            f"(found kernels {[ '/'.join(c[1]) for c in kernel]}, biases {['/'.join(c[1]) for c in bias]})"
        )
    return kernel[0][0], bias[0][0]


def _set_head(params, kernel_path, bias_path, mu: float, gain: float):
    def fix(path, leaf):
        if path == kernel_path:
            return leaf * gain
        if path == bias_path:
            return (leaf - mu) * gain
        return leaf

    return jax.tree_util.tree_map_with_path(fix, params)
