"""The RL trainer: rollout -> score -> update, with the estimator and objective picked by name.

`RLTrainer(policy, cfg, tx, ...)` owns three jitted phases:

1. rollout: `rlhf_jax.generate` on the `batch.batch_size` prompts with
   `num_samples=batch.group_size` (each prompt prefilled once, its KV cache shared by its G
   samples; rows i*G .. i*G+G-1 are prompt i's);
2. score: a reward model's `scores` on [prompt | response] (on device), or a host `reward_fn`
   (NumPy in, NumPy out), called with the prompts repeated per sample;
3. update: reference log-probs (only when the KL is used), old log-probs and, with a critic,
   values, each forward over row chunks (`lax.map`, `batch.chunk_size` rows at a time);
   the estimator `ESTIMATORS[advantages.estimator]` over the whole batch; then
   `ppo_epochs x num_minibatches (x grad_accum_steps micro-batches)` updates of
   `policy_objective` as nested `lax.scan`s over `jax.random.permutation`s; then the KL
   controller.

A critic (the policy's value head on a shared trunk, or a separate `value_model`) exists
only where the estimator needs one (`gae`).

Non-finite scores: those rows are masked out of the update (`reward/nonfinite_rows` counts
them); only when no row is left is the whole update skipped (`skipped_nonfinite` = 1).
Non-finite gradients skip their minibatch's update (`skipped_minibatch`). Either way the rng
advances as in a normal iteration, so a run stays deterministic.

Sharding: `trainer.with_mesh(mesh)` is the same trainer with every phase jitted with explicit
`in_shardings` / `out_shardings` on `mesh` (`phase_shardings`): params, optimizer states and
the frozen reference / reward weights by the `param_shardings` rules (FSDP over "fsdp",
tensor-parallel over "tensor"), prompts, rollout and scores split along their rows over
("data", "fsdp"), PRNG keys and metrics replicated. The update donates its state and
returns it in the layout it came in, so iterations neither move nor recompile it. Inside the
update, the rows a minibatch gathers (and each chunk of the no-gradient forwards) are
constrained to stay split over ("data", "fsdp") (`sharding.constrain_rows`; on the trainer's
mesh, or without `with_mesh` on a context mesh from `jax.set_mesh`): without it the SPMD
partitioner replicates the gathered rows and every device computes the whole minibatch.

Loss normalisation: each micro-batch's loss is normalised by its own
`aggregation_weight(mask, agg=loss_agg)` and the micro-batch gradients are averaged with
those weights, so a minibatch's gradient does not depend on how it is split into
micro-batches or devices (tests/test_rl_invariance.py).
"""
from __future__ import annotations

import copy
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from rlhf_jax.core import ops
from rlhf_jax.core.importance import truncated_importance_weights
from rlhf_jax.core.kl import kl_controller_init, kl_controller_update, kl_penalty
from rlhf_jax.models.lora import combine, reference_lm
from rlhf_jax.models.shared_prompt import grouped_response_logprobs
from rlhf_jax.train.rl.config import RLConfig
from rlhf_jax.train.rl.estimators import ESTIMATORS, fill_nonfinite, shape_scores
from rlhf_jax.train.rl.objectives import RLBatch, loss_weight, policy_objective
from rlhf_jax.train.sharding import FSDP_AXIS, batch_sharding, constrain_rows, param_shardings, replicated
from rlhf_jax.train.state import (
    accumulate_gradients,
    guarded_apply,
    learning_rate_from_state,
    model_context_length,
    tree_all_finite,
)

__all__ = ["RLState", "RLTrainer"]


@struct.dataclass
class RLState:
    """Everything an RL run carries between iterations (a pytree: checkpoint it whole).

    Attributes:
      params: policy params (with the value head when the critic shares the trunk).
      opt_state: optimizer state for `params`.
      value_params: separate value network params, or None.
      value_opt_state: its optimizer state, or None.
      kl_ctl: `KLControllerState` (current coefficient; adaptive or fixed).
      step: int32 scalar, iterations done.
      rng: PRNG key; each iteration splits it into rollout / update keys.
    """

    params: Any
    opt_state: Any
    value_params: Any
    value_opt_state: Any
    kl_ctl: Any
    step: jax.Array
    rng: jax.Array


_SAMPLING = ("policy", "max_new_tokens", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
             "num_samples")


def _rollout(params, prompt_ids, prompt_mask, key, *, policy, max_new_tokens, temperature, top_k, top_p,
             eos_token_id, pad_token_id, num_samples):
    """Sample `num_samples` responses per prompt (the policy and the sampling settings are static)."""
    from rlhf_jax.rollout import generate  # imported late: the update does not need the sampler

    return generate(
        policy, params, prompt_ids, prompt_mask, key,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, num_samples=num_samples,
    )


# One jitted sampler for every trainer: equal policies (an `LM` hashes by value) and equal
# settings share its compilation.
_rollout_jit = jax.jit(_rollout, static_argnames=_SAMPLING)


def _put(tree, shardings):
    """`tree` with every device array not laid out as in `shardings` moved there (host arrays
    stay as they are: `jit` places them); a leaf already in place is not copied."""
    def move(x, sharding):
        if isinstance(x, jax.Array) and not x.sharding.is_equivalent_to(sharding, x.ndim):
            return jax.device_put(x, sharding)
        return x

    return jax.tree.map(move, tree, shardings)


def _chunked(fn, arrays, chunk: int, mesh=None):
    """`fn(*arrays)` computed over row chunks of `chunk` rows (`lax.map`), concatenated; on a mesh
    (`mesh`, else the context mesh) each chunk's rows stay split over the batch axes."""
    rows = jnp.shape(arrays[0])[0]
    if chunk >= rows:
        return fn(*arrays)
    xs = tuple(jnp.reshape(a, (rows // chunk, chunk) + jnp.shape(a)[1:]) for a in arrays)
    xs = constrain_rows(xs, axis=1, mesh=mesh)
    out = jax.lax.map(lambda x: fn(*x), xs)
    return jax.tree.map(lambda y: jnp.reshape(y, (rows,) + jnp.shape(y)[2:]), out)


class RLTrainer:
    """RL trainer: `init` builds an `RLState`, `iteration` runs rollout, score and update.

    Args:
      policy: the policy `LM` ("lm"; "lm+value" for a critic on the shared trunk).
      cfg: `RLConfig`.
      tx: the policy optimizer.
      value_model: a scalar-head `LM` used as a separate critic (only for `gae`), or None.
      value_tx: the critic's optimizer (default: `tx`).
      reward_model: a scalar-head `LM` whose `scores` on [prompt | response] is the reward.
      reward_fn: host function `(prompt_ids, prompt_mask, response_tokens, response_mask,
        prompt_index) -> np.ndarray [rows]` used instead of a reward model; it sees the
        prompts and their data-set indices repeated `group_size` times (row i*G + j is
        sample j of prompt i).
      reward_source: a name of the reward for messages (e.g. "reward.function=mod:fn").
    """

    def __init__(
        self,
        policy,
        cfg: RLConfig,
        tx: optax.GradientTransformation,
        *,
        value_model=None,
        value_tx: optax.GradientTransformation | None = None,
        reward_model=None,
        reward_fn: Callable | None = None,
        reward_source: str | None = None,
    ):
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("give exactly one of `reward_model` and `reward_fn`")
        head = getattr(policy, "head", None)
        critic = cfg.advantages.needs_critic
        if critic and value_model is None and head is not None and head != "lm+value":
            raise ValueError(
                f"`advantages.estimator` {cfg.advantages.estimator!r} needs a critic: give a `value_model`, or a "
                f"policy with head='lm+value' (a value head on the shared trunk); got head={head!r}"
            )
        if not critic and value_model is not None:
            raise ValueError(
                f"`advantages.estimator` {cfg.advantages.estimator!r} has no critic: do not pass a `value_model`"
            )
        # LoRA: the trained params are the adapters (+ value head); `ref_params` is the frozen
        # base they sit on and, without adapters, the reference policy (one copy of the weights).
        self.lora = getattr(policy, "lora", None) is not None
        if getattr(value_model, "lora", None) is not None:
            raise ValueError("a LoRA `value_model` is not supported: use a full value model or a LoRA "
                             "policy with head='lm+value'")
        if cfg.batch.share_prompt_forward and critic:
            raise ValueError("`batch.share_prompt_forward` is for critic-free estimators (the values of a "
                             f"critic are not computed on the shared prompt); got {cfg.advantages.estimator!r}")
        self.policy = policy
        self.reference = reference_lm(policy) if self.lora else policy
        self.rl_cfg = cfg
        self.tx = tx
        self.critic = critic
        self.value_model = value_model
        self.value_tx = value_tx if value_tx is not None else tx
        self.reward_model = reward_model
        self.reward_fn = reward_fn
        if reward_source is None:
            reward_source = "the reward model" if reward_model is not None else getattr(
                reward_fn, "__qualname__", type(reward_fn).__name__)
        self.reward_source = reward_source
        s = cfg.sampling
        self._sampling = dict(
            policy=policy, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
            top_p=s.top_p, eos_token_id=s.eos_token_id, pad_token_id=0 if s.pad_token_id is None else s.pad_token_id,
            num_samples=cfg.batch.group_size,
        )
        self._score_jit = jax.jit(self._score) if reward_model is not None else None
        # The update donates its state (params, optimizer states): `init` copies the params
        # it is given, so the caller's arrays (often also the reference's) stay alive.
        self._update_jit = jax.jit(self._update, donate_argnums=0)
        self._gradient_jit = jax.jit(self._gradient)
        self.mesh = None
        self.fsdp = False
        self._sharded_jits: dict = {}

    def with_mesh(self, mesh, *, fsdp: bool | None = None) -> "RLTrainer":
        """This trainer with its phases jitted for `mesh` (a copy: `self` is unchanged).

        Args:
          mesh: a `make_mesh` mesh, or None for the unsharded trainer.
          fsdp: FSDP-shard params and states over the "fsdp" axis (default: when it is > 1).
        """
        other = copy.copy(self)
        other.mesh = mesh
        other.fsdp = False if mesh is None else (mesh.shape[FSDP_AXIS] > 1 if fsdp is None else bool(fsdp))
        other._sharded_jits = {}
        return other

    def param_shardings(self, tree):
        """The `param_shardings` of `tree` on the trainer's mesh (None for None)."""
        return None if tree is None else param_shardings(tree, self.mesh, fsdp=self.fsdp)

    def _batch_shardings(self):
        """(replicated, rows of rank 1, rows of rank 2, the `Rollout`'s) on the mesh."""
        from rlhf_jax.rollout import Rollout

        if self.mesh is None:
            raise ValueError("the trainer has no mesh: use `trainer.with_mesh(mesh)`")
        rows1, rows2 = batch_sharding(self.mesh, 1), batch_sharding(self.mesh, 2)
        return replicated(self.mesh), rows1, rows2, Rollout(tokens=rows2, logprobs=rows2, mask=rows2,
                                                            ended_with_eos=rows1)

    def phase_shardings(self, state, ref_params=None, reward_params=None) -> dict:
        """`{phase: (in_shardings, out_shardings)}` of "rollout", "update" and, with a reward
        model, "score" on the trainer's mesh, for these (concrete or abstract) trees.

        The argument order is that of the phases: rollout `(policy_params, prompt_ids,
        prompt_mask, key)` (with LoRA the policy params are `combine(ref_params,
        state.params)`), score `(reward_params, prompt_ids, prompt_mask, tokens,
        response_mask)`, update `(state, prompt_ids, prompt_mask, rollout, scores,
        ref_params, key)` (prompts repeated per sample).
        """
        rep, rows1, rows2, rollout = self._batch_shardings()
        state_sh = self.param_shardings(state)
        policy_sh = self.param_shardings(self._policy_params(state.params, ref_params))
        out = {"rollout": ((policy_sh, rows2, rows2, rep), rollout),
               "update": ((state_sh, rows2, rows2, rollout, rows1, self.param_shardings(ref_params), rep),
                          (state_sh, rep))}
        if self.reward_model is not None:
            out["score"] = ((self.param_shardings(reward_params), rows2, rows2, rows2, rows2), rows1)
        return out

    def _on_mesh(self, name, fn, args, in_shardings, out_shardings, donate_argnums=()):
        """`fn(*args)` jitted with these shardings (one compilation per layout), the arguments
        moved into `in_shardings` first where they are not laid out so."""
        leaves, tree = jax.tree.flatten(in_shardings)
        key = (name, tree, tuple(leaves))
        jitted = self._sharded_jits.get(key)
        if jitted is None:
            jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                             donate_argnums=donate_argnums)
            self._sharded_jits[key] = jitted
        return jitted(*_put(tuple(args), in_shardings))

    def _repeat(self, x):
        """Each prompt row repeated `group_size` times (rows i*G .. i*G+G-1 are prompt i's)."""
        g = self.rl_cfg.batch.group_size
        x = jnp.asarray(x, jnp.int32)
        if self.mesh is None:
            return jnp.repeat(x, g, axis=0) if g > 1 else x
        rows = batch_sharding(self.mesh, 2)
        return self._on_mesh("repeat", functools.partial(jnp.repeat, repeats=g, axis=0), (x,), (rows,), rows)

    @property
    def cfg(self):
        return self.rl_cfg

    # -- state ------------------------------------------------------------------------

    def init(self, policy_params, value_params=None, *, seed: int | None = None) -> RLState:
        """A fresh `RLState` (optimizer states, KL controller at `kl.kl_coef`, step 0).

        Args:
          policy_params: the policy's params (SFT weights; also the reference's).
          value_params: the separate critic's params (required with a `value_model`), else None.
          seed: PRNG seed (default `cfg.seed`).
        """
        if self.value_model is not None and value_params is None:
            raise ValueError("the trainer has a `value_model`, so `value_params` is required")
        if self.value_model is None and value_params is not None:
            raise ValueError("`value_params` given but the trainer has no `value_model`")
        cfg = self.rl_cfg
        seed = cfg.seed if seed is None else seed
        policy_params = jax.tree.map(jnp.copy, policy_params)
        if value_params is not None:
            value_params = jax.tree.map(jnp.copy, value_params)
        return RLState(
            params=policy_params,
            opt_state=self.tx.init(policy_params),
            value_params=value_params,
            value_opt_state=None if value_params is None else self.value_tx.init(value_params),
            kl_ctl=kl_controller_init(cfg.kl.kl_coef, target=cfg.kl.kl_target, horizon=cfg.kl.kl_horizon),
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key(seed),
        )

    # -- phases -----------------------------------------------------------------------

    def _policy_params(self, params, ref_params):
        """The params the policy runs on: LoRA's trained part over the frozen base, or `params`."""
        return combine(ref_params, params) if self.lora else params

    def _score(self, reward_params, prompt_ids, prompt_mask, tokens, response_mask):
        ids = jnp.concatenate([prompt_ids, tokens], axis=1)
        mask = jnp.concatenate([jnp.asarray(prompt_mask, jnp.int32), jnp.asarray(response_mask, jnp.int32)], axis=1)
        return jnp.asarray(self.reward_model.scores(reward_params, ids, mask), jnp.float32)

    def _response_logprobs(self, lm, params, input_ids, attention_mask, *, with_entropy=False):
        """`lm.response_logprobs` at the sampling temperature; with `batch.share_prompt_forward`,
        each group's prompt runs through the trunk once (rows come in whole groups)."""
        cfg = self.rl_cfg
        n, temperature = cfg.sampling.max_new_tokens, cfg.sampling.temperature
        if cfg.batch.share_prompt_forward:
            return grouped_response_logprobs(lm, params, input_ids, attention_mask, n, cfg.batch.group_size,
                                             temperature=temperature, with_entropy=with_entropy)
        return lm.response_logprobs(params, input_ids, attention_mask, n, temperature=temperature,
                                    with_entropy=with_entropy)

    def _forward(self, params, value_params, input_ids, attention_mask, *, with_entropy, with_values):
        """Response log-probs (temperature-scaled), entropies and values `[B, N]` (None when absent)."""
        n = self.rl_cfg.sampling.max_new_tokens
        p = jnp.shape(input_ids)[1] - n
        temperature = self.rl_cfg.sampling.temperature
        values = None
        # The value of response token t is that of the state before it (column P-1+t),
        # the same column whose logits predict the token.
        if with_values and self.value_model is None:
            hidden, _ = self.policy.hidden_states(params, input_ids, attention_mask)
            hidden = hidden[:, p - 1 : p + n - 1]
            # the LM head over token chunks: no [B, N, V] float32 logits
            stats = self.policy.token_stats(params, hidden, input_ids[:, p:], temperature=temperature,
                                            with_entropy=with_entropy)
            logprobs, entropy = stats["logprobs"], stats.get("entropy")
            values = jnp.asarray(self.policy.value_head(params, hidden), jnp.float32)
        else:
            out = self._response_logprobs(self.policy, params, input_ids, attention_mask, with_entropy=with_entropy)
            logprobs, entropy = out if with_entropy else (out, None)
            if with_values:
                full = self.value_model.values(value_params, input_ids, attention_mask)
                values = jnp.asarray(full[:, p - 1 : p + n - 1], jnp.float32)
        return logprobs, entropy, values

    def _prepare(self, state: RLState, prompt_ids, prompt_mask, rollout, scores, ref_params):
        """The no-gradient part of the update: forwards, estimator, the `RLBatch` and statistics."""
        cfg = self.rl_cfg
        chunk = cfg.batch.chunk_size
        valid = jnp.asarray(rollout.mask, jnp.float32)
        input_ids = jnp.concatenate([prompt_ids, rollout.tokens], axis=1)
        attention_mask = jnp.concatenate(
            [jnp.asarray(prompt_mask, jnp.int32), jnp.asarray(rollout.mask > 0, jnp.int32)], axis=1
        )
        scores = jnp.asarray(scores, jnp.float32)
        finite = jnp.isfinite(scores)
        mask = valid * finite[:, None].astype(jnp.float32)
        if cfg.rewards.overlong_filter and cfg.sampling.eos_token_id is not None:
            truncated = ~jnp.asarray(rollout.ended_with_eos, bool)
            mask = mask * (~truncated)[:, None].astype(jnp.float32)
        else:
            truncated = jnp.zeros(jnp.shape(scores), bool)

        policy_params = self._policy_params(state.params, ref_params)
        use_ref = cfg.kl.placement != "none"
        if use_ref:
            ref_logprobs = _chunked(
                lambda i, m: self._response_logprobs(self.reference, ref_params, i, m),
                (input_ids, attention_mask), chunk, self.mesh)
            ref_logprobs = jax.lax.stop_gradient(ref_logprobs)
        else:
            ref_logprobs = None
        old_logprobs, old_entropy, old_values = _chunked(
            lambda i, m: self._forward(policy_params, state.value_params, i, m, with_entropy=True,
                                       with_values=self.critic),
            (input_ids, attention_mask), chunk, self.mesh)
        old_logprobs = jax.lax.stop_gradient(old_logprobs)
        kl_coef = jnp.asarray(state.kl_ctl.kl_coef, jnp.float32)
        shaped = shape_scores(fill_nonfinite(scores, finite, cfg.batch.group_size), valid,
                              rollout.ended_with_eos, cfg)
        est = ESTIMATORS[cfg.advantages.estimator]({
            "scores": shaped, "logprobs": old_logprobs, "ref_logprobs": ref_logprobs,
            "values": old_values, "mask": mask, "kl_coef": kl_coef,
        }, cfg)
        zeros = jnp.zeros_like(mask)
        if cfg.loss.tis:
            tis = truncated_importance_weights(old_logprobs, rollout.logprobs, mask, cap=cfg.loss.tis_cap,
                                               level=cfg.loss.tis_level)
        else:
            tis = jnp.ones_like(mask)
        data = RLBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=mask,
            old_logprobs=old_logprobs,
            old_values=old_values if old_values is not None else zeros,
            advantages=est["advantages"],
            returns=est["returns"],
            ref_logprobs=ref_logprobs if (ref_logprobs is not None and cfg.kl.placement == "in_loss") else zeros,
            tis_weights=tis,
        )
        info = dict(scores=scores, finite=finite, valid=valid, mask=mask, truncated=truncated, shaped=shaped,
                    ref_logprobs=ref_logprobs, old_entropy=old_entropy, old_values=old_values, est=est,
                    kl_coef=kl_coef, tis=tis)
        return data, info

    def _loss_fn(self, kl_coef, ref_params):
        cfg = self.rl_cfg

        def loss_fn(all_params, micro: RLBatch):
            params, value_params = all_params
            logprobs, entropy, values = self._forward(
                self._policy_params(params, ref_params), value_params, micro.input_ids, micro.attention_mask,
                with_entropy=True, with_values=self.critic,
            )
            loss, aux = policy_objective(logprobs, entropy, values, micro, cfg=cfg, kl_coef=kl_coef,
                                         critic=self.critic)
            return loss, (aux, loss_weight(micro.response_mask, cfg))

        return loss_fn

    def _gradient(self, state: RLState, prompt_ids, prompt_mask, rollout, scores, ref_params):
        """The loss and gradient of one update on all rows in order, as `grad_accum_steps` micro-batches.

        For tests and diagnostics (loss-normalisation invariance): the same loss and weights
        as a minibatch of `_update`, over the whole batch.
        """
        data, info = self._prepare(state, prompt_ids, prompt_mask, rollout, scores, ref_params)
        k = self.rl_cfg.batch.grad_accum_steps
        micro = jax.tree.map(lambda x: jnp.reshape(x, (k, x.shape[0] // k) + x.shape[1:]), data)
        loss, grads, aux, _ = accumulate_gradients(
            self._loss_fn(info["kl_coef"], ref_params), (state.params, state.value_params), micro, num_micro=k)
        return loss, grads

    def _update(self, state: RLState, prompt_ids, prompt_mask, rollout, scores, ref_params, key):
        cfg = self.rl_cfg
        bc = cfg.batch
        rows = jnp.shape(prompt_ids)[0]
        data, info = self._prepare(state, prompt_ids, prompt_mask, rollout, scores, ref_params)
        finite, mask, valid = info["finite"], info["mask"], info["valid"]
        any_finite = jnp.any(finite)
        loss_fn = self._loss_fn(info["kl_coef"], ref_params)
        separate = self.value_model is not None

        def minibatch(carry, idx):
            params, opt_state, value_params, value_opt_state = carry
            # [A, micro, ...]; on a mesh, each micro-batch's rows stay split over the devices
            micro = constrain_rows(jax.tree.map(lambda x: x[idx], data), axis=1, mesh=self.mesh)
            loss, grads, aux, _ = accumulate_gradients(
                loss_fn, (params, value_params), micro, num_micro=bc.grad_accum_steps
            )
            g_policy, g_value = grads
            ok = any_finite & tree_all_finite(g_policy) & tree_all_finite(g_value)
            params, opt_state, _ = guarded_apply(self.tx, g_policy, opt_state, params, ok=ok)
            if separate:
                value_params, value_opt_state, _ = guarded_apply(
                    self.value_tx, g_value, value_opt_state, value_params, ok=ok
                )
            aux = dict(aux)
            aux["loss"] = loss
            aux["grad_norm"] = optax.global_norm(g_policy)
            if separate:
                aux["value_grad_norm"] = optax.global_norm(g_value)
            aux["skipped_minibatch"] = 1.0 - ok.astype(jnp.float32)
            aux["skipped_nonfinite_grad"] = (any_finite & ~ok).astype(jnp.float32)
            return (params, opt_state, value_params, value_opt_state), aux

        def epoch(carry, epoch_key):
            if bc.share_prompt_forward:  # whole groups, in a random order
                g = bc.group_size
                groups = jax.random.permutation(epoch_key, rows // g)
                perm = (groups[:, None] * g + jnp.arange(g)[None, :]).reshape(-1)
            else:
                perm = jax.random.permutation(epoch_key, rows)
            idx = perm.reshape(bc.num_minibatches, bc.grad_accum_steps, bc.micro_batch_size)
            return jax.lax.scan(minibatch, carry, idx)

        carry = (state.params, state.opt_state, state.value_params, state.value_opt_state)
        carry, mb_aux = jax.lax.scan(epoch, carry, jax.random.split(key, bc.ppo_epochs))
        params, opt_state, value_params, value_opt_state = carry

        est = info["est"]
        kl_coef = info["kl_coef"]
        old_logprobs = data.old_logprobs
        kl_per_seq = jnp.sum(est["kl"] * mask, axis=1)
        n_rows = jnp.maximum(jnp.sum(jnp.any(mask > 0, axis=1)), 1)
        kl_seq_mean = jnp.sum(kl_per_seq) / n_rows
        if cfg.kl.placement != "none":
            new_ctl = kl_controller_update(state.kl_ctl, kl_seq_mean, rows)
            kl_ctl = jax.tree.map(lambda nw, old: jnp.where(any_finite, nw, old), new_ctl, state.kl_ctl)
            ref_lp = info["ref_logprobs"]
            k1 = jnp.sum(kl_penalty(old_logprobs, ref_lp, estimator="k1") * valid, axis=1)
            k3 = jnp.sum(kl_penalty(old_logprobs, ref_lp, estimator="k3") * valid, axis=1)
        else:
            kl_ctl = state.kl_ctl
            k1 = k3 = jnp.zeros((rows,), jnp.float32)

        scores = info["scores"]
        n_finite = jnp.maximum(jnp.sum(finite), 1)
        score_mean = jnp.sum(jnp.where(finite, scores, 0.0)) / n_finite
        score_var = jnp.sum(jnp.where(finite, (scores - score_mean) ** 2, 0.0)) / n_finite
        groups = info["shaped"].reshape(-1, bc.group_size)
        metrics = {
            "score_mean": score_mean,
            "score_std": jnp.sqrt(score_var),
            "kl_k1": jnp.mean(k1),
            "kl_k3": jnp.mean(k3),
            "kl_coef": kl_coef,
            "non_score_reward": jnp.mean(-kl_coef * kl_per_seq) if cfg.kl.placement == "in_reward"
            else jnp.zeros((), jnp.float32),
            "entropy_rollout": ops.masked_mean(info["old_entropy"], valid),
            "logprob_sampling_diff": ops.masked_mean(jnp.abs(old_logprobs - rollout.logprobs), valid),
            "response_length": jnp.mean(jnp.sum(valid, axis=1)),
            "eos_fraction": jnp.mean(jnp.asarray(rollout.ended_with_eos, jnp.float32)),
            "returns_mean": ops.masked_mean(est["returns"], mask),
            "advantages_mean": ops.masked_mean(est["raw_advantages"], mask),
            "advantages_std": jnp.sqrt(ops.masked_var(est["raw_advantages"], mask)),
            "skipped_nonfinite": 1.0 - any_finite.astype(jnp.float32),
            "reward/nonfinite_rows": jnp.sum(~finite).astype(jnp.float32),
            "reward/shaped_mean": jnp.mean(info["shaped"]),
            "overlong_fraction": jnp.mean(info["truncated"].astype(jnp.float32)),
            "loss_rows": jnp.sum(jnp.any(mask > 0, axis=1)).astype(jnp.float32),
            "groups_all_equal": jnp.sum(jnp.all(groups == groups[:, :1], axis=1)).astype(jnp.float32)
            if bc.group_size > 1 else jnp.zeros((), jnp.float32),
        }
        if self.critic:
            metrics["values_mean"] = ops.masked_mean(info["old_values"], mask)
        if cfg.loss.tis:
            metrics["tis_weight_mean"] = ops.masked_mean(info["tis"], mask)
        for name, value in mb_aux.items():
            metrics[name] = jnp.max(value) if name.endswith("_max") else jnp.mean(value)
        lr = learning_rate_from_state(opt_state)
        if lr is not None:
            metrics["learning_rate"] = lr
        new_state = state.replace(
            params=params,
            opt_state=opt_state,
            value_params=value_params,
            value_opt_state=value_opt_state,
            kl_ctl=kl_ctl,
            step=state.step + 1,
        )
        return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

    # -- public -----------------------------------------------------------------------

    def check_prompts(self, prompt_ids, prompt_mask) -> None:
        """Raise `ValueError` for a prompt batch this trainer cannot run."""
        ops.check_rank(prompt_ids, 2, "prompt_ids")
        ops.check_same_shape(prompt_ids, "prompt_ids", prompt_mask=prompt_mask)
        b, p = np.shape(prompt_ids)
        cfg = self.rl_cfg
        if b == 0:
            raise ValueError("the prompt batch is empty (`prompt_ids` has no rows)")
        if b != cfg.batch.batch_size:
            raise ValueError(
                f"`prompt_ids` has {b} rows but `batch_size` is {cfg.batch.batch_size}; pass exactly "
                "`batch_size` prompts per iteration"
            )
        if p == 0:
            raise ValueError("`prompt_ids` has no columns: prompts need at least one token")
        ctx = model_context_length(self.policy)
        n = cfg.sampling.max_new_tokens
        if ctx is not None and p + n > ctx:
            raise ValueError(
                f"prompt length {p} + `max_new_tokens` {n} = {p + n} exceeds the model's context length {ctx}"
            )
        spread = any(isinstance(x, jax.Array) and not x.is_fully_addressable
                     for x in (prompt_ids, prompt_mask))
        if hasattr(self.policy, "check_inputs") and not spread:  # token ids inside the vocabulary, 0/1 mask
            # (a batch spread over processes was checked on the host before it was placed)
            self.policy.check_inputs(np.asarray(prompt_ids), np.asarray(prompt_mask))

    def rollout(self, params, prompt_ids, prompt_mask, key):
        """The rollout phase alone: `group_size` samples per prompt (rows grouped per prompt).

        `params` are the policy's full params (with LoRA: `combine(ref_params, state.params)`).
        """
        prompt_ids, prompt_mask = jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
        if self.mesh is None:
            return _rollout_jit(params, prompt_ids, prompt_mask, key, **self._sampling)
        rep, _, rows2, rollout = self._batch_shardings()
        return self._on_mesh("rollout", functools.partial(_rollout, **self._sampling),
                             (params, prompt_ids, prompt_mask, key),
                             (self.param_shardings(params), rows2, rows2, rep), rollout)

    def score(self, reward_params, prompt_ids, prompt_mask, rollout, prompt_index=None):
        """The score phase alone, on the prompts repeated per sample: `[rows]` float32."""
        rows = self.rl_cfg.batch.rows
        g = self.rl_cfg.batch.group_size
        ids, mask = self._repeat(prompt_ids), self._repeat(prompt_mask)
        if self.reward_model is not None:
            if self.mesh is None:
                return self._score_jit(reward_params, ids, mask, rollout.tokens, rollout.mask)
            _, rows1, rows2, _ = self._batch_shardings()
            return self._on_mesh("score", self._score, (reward_params, ids, mask, rollout.tokens, rollout.mask),
                                 (self.param_shardings(reward_params), rows2, rows2, rows2, rows2), rows1)
        host = jax.device_get((ids, mask, rollout.tokens, rollout.mask))
        index = None if prompt_index is None else np.repeat(np.asarray(prompt_index), g, axis=0)
        scores = np.asarray(self.reward_fn(*host, index), np.float32)
        if scores.shape != (rows,):
            raise ValueError(f"`reward_fn` must return shape ({rows},), got {scores.shape}")
        return jnp.asarray(scores)

    def _dynamic_sampling(self, params, prompt_ids, prompt_mask, prompt_index, rollout, scores, key,
                          reward_params, more_prompts):
        """DAPO's dynamic sampling: keep the groups whose scores are not all equal, refill from fresh prompts.

        A group is informative when its finite scores are not all equal (a group of equal
        scores has zero group-relative advantage and teaches nothing). Up to
        `dynamic_sampling_max_tries` rollouts (the first one included) are drawn, each on a
        fresh batch from `more_prompts(try_index) -> (prompt_ids, prompt_mask, prompt_index)`;
        when the tries run out, the batch is completed with uninformative groups (zero
        advantage), so the update keeps its fixed shape. Host-side (one device-to-host copy
        of the scores per try).

        Returns the prompts, prompt indices, rollout and scores of the kept groups and metrics.
        """
        cfg = self.rl_cfg
        b, g = cfg.batch.batch_size, cfg.batch.group_size
        kept, spare = [], []
        tries, informative_total = 0, 0

        def collect(ids, mask, index, ro, sc):
            nonlocal informative_total
            host = jax.device_get((ro, sc))
            r, s = host
            s = np.asarray(s).reshape(b, g)
            for i in range(b):
                finite = s[i][np.isfinite(s[i])]
                rows = slice(i * g, (i + 1) * g)
                item = (np.asarray(ids)[i], np.asarray(mask)[i], None if index is None else np.asarray(index)[i],
                        jax.tree.map(lambda x: np.asarray(x)[rows], r), s[i])
                if finite.size >= 2 and finite.max() > finite.min():
                    kept.append(item)
                    informative_total += 1
                else:
                    spare.append(item)

        collect(prompt_ids, prompt_mask, prompt_index, rollout, scores)
        tries = 1
        max_tries = cfg.rewards.dynamic_sampling_max_tries
        while len(kept) < b and tries < max_tries and more_prompts is not None:
            ids, mask, index = more_prompts(tries)
            self.check_prompts(ids, mask)
            ro = self.rollout(params, ids, mask, jax.random.fold_in(key, tries))
            sc = self.score(reward_params, ids, mask, ro, index)
            tries += 1
            collect(ids, mask, index, ro, sc)
        filled = max(0, b - len(kept))
        chosen = (kept + spare)[:b]
        ids = np.stack([c[0] for c in chosen])
        mask = np.stack([c[1] for c in chosen])
        index = None if prompt_index is None else np.stack([c[2] for c in chosen])
        ro = jax.tree.map(lambda *xs: jnp.asarray(np.concatenate(xs, axis=0)), *[c[3] for c in chosen])
        sc = jnp.asarray(np.concatenate([c[4] for c in chosen]), jnp.float32)
        metrics = {"dynamic_sampling/tries": float(tries),
                   "dynamic_sampling/informative_groups": float(informative_total),
                   "dynamic_sampling/filled_groups": float(filled)}
        return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), index, ro, sc, metrics

    def gradient(self, state: RLState, prompt_ids, prompt_mask, rollout, scores, *, ref_params):
        """`(loss, (policy_grads, value_grads))` of one update on every row (see `_gradient`)."""
        ids = jnp.repeat(jnp.asarray(prompt_ids, jnp.int32), self.rl_cfg.batch.group_size, axis=0)
        mask = jnp.repeat(jnp.asarray(prompt_mask, jnp.int32), self.rl_cfg.batch.group_size, axis=0)
        return self._gradient_jit(state, ids, mask, rollout, scores, ref_params)

    def iteration(
        self,
        state: RLState,
        prompt_ids,
        prompt_mask,
        *,
        ref_params=None,
        reward_params=None,
        prompt_index=None,
        more_prompts=None,
    ):
        """Run one iteration: rollout, score, update.

        Args:
          state: `RLState`.
          prompt_ids: `[batch_size, P]` int32, left-padded prompts.
          prompt_mask: `[batch_size, P]` 1 for real prompt tokens.
          ref_params: frozen reference policy params (required unless `kl.placement` is "none");
            with a LoRA policy, the frozen base (always required): the policy runs on
            `combine(ref_params, state.params)`, the reference is `lora.reference_lm(policy)`.
          reward_params: the reward model's params (when the trainer has a reward model).
          prompt_index: `[batch_size]` data-set row indices, passed (repeated) to `reward_fn`.
          more_prompts: with `rewards.dynamic_sampling`, `more_prompts(try_index) ->
            (prompt_ids, prompt_mask, prompt_index)`, a fresh batch of `batch_size` prompts
            to refill from (None: complete the batch with uninformative groups).

        Returns:
          `(state, metrics, rollout)`: the new state; a dict of float32 scalars (device arrays,
          plus host floats `time/rollout`, `time/score`, `time/update`, `time/iteration`,
          `tokens_per_s` = rows * (P + N) / iteration time, `generated_tokens_per_s`); the
          `Rollout` (`batch_size * group_size` rows).
        """
        self.check_prompts(prompt_ids, prompt_mask)
        cfg = self.rl_cfg
        if self.reward_model is not None and reward_params is None:
            raise ValueError("the trainer scores with a reward model: pass `reward_params`")
        if ref_params is None and (cfg.kl.placement != "none" or self.lora):
            raise ValueError("`ref_params` (the frozen reference policy; with LoRA, the frozen base) "
                             "is required")
        prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
        prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
        rng, rollout_key, update_key = jax.random.split(state.rng, 3)
        state = state.replace(rng=rng)

        t0 = time.perf_counter()
        policy_params = self._policy_params(state.params, ref_params)  # LoRA: adapters over the base
        rollout = self.rollout(policy_params, prompt_ids, prompt_mask, rollout_key)
        jax.block_until_ready(rollout)
        t1 = time.perf_counter()
        scores = self.score(reward_params, prompt_ids, prompt_mask, rollout, prompt_index)
        extra = {}
        if cfg.rewards.dynamic_sampling:
            prompt_ids, prompt_mask, prompt_index, rollout, scores, extra = self._dynamic_sampling(
                policy_params, prompt_ids, prompt_mask, prompt_index, rollout, scores, rollout_key, reward_params,
                more_prompts)
        jax.block_until_ready(scores)
        t2 = time.perf_counter()
        ids, mask = self._repeat(prompt_ids), self._repeat(prompt_mask)
        args = (state, ids, mask, rollout, scores, ref_params, update_key)
        if self.mesh is None:
            state, metrics = self._update_jit(*args)
        else:
            in_sh, out_sh = self.phase_shardings(state, ref_params)["update"]
            state, metrics = self._on_mesh("update", self._update, args, in_sh, out_sh, donate_argnums=0)
        jax.block_until_ready(metrics)
        t3 = time.perf_counter()
        metrics = dict(metrics)
        metrics.update(extra)
        total = t3 - t0
        p = prompt_ids.shape[1]
        rows = cfg.batch.rows
        metrics["time/rollout"] = t1 - t0
        metrics["time/score"] = t2 - t1
        metrics["time/update"] = t3 - t2
        metrics["time/iteration"] = total
        metrics["tokens_per_s"] = rows * (p + cfg.sampling.max_new_tokens) / max(total, 1e-9)
        metrics["generated_tokens_per_s"] = metrics["response_length"] * rows / max(t1 - t0, 1e-9)
        return state, metrics, rollout
