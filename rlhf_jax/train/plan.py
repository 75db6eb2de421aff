"""Plan a run before it starts: compile every phase abstractly and read its memory.

No weights, no data: each phase of a trainer is jitted with the input and output
shardings it runs with, lowered on ``jax.ShapeDtypeStruct`` arguments and compiled
(``jax.jit(f, in_shardings, out_shardings).lower(...).compile()``); XLA's
``memory_analysis()`` of the compiled program gives its bytes per device. Phases:

- ``sft``, ``reward``: ``step`` (one optimizer update on one batch, state donated).
- ``ppo``: ``rollout`` (sampling with the KV cache), ``score`` (reward-model forward),
  ``update`` (reference / old-policy / value forwards, GAE, epochs x minibatches).

Peak bytes per device of a phase = the compiled program's arguments + outputs - the
donated (aliased) bytes + its temporaries, plus the bytes of every array that stays
resident on the device during the phase without being one of its arguments (e.g. the
optimizer state during the rollout; the reference and reward weights during the update).

FLOPs are analytic (model FLOPs: a remat recomputation is not counted). With ``P`` the
matmul parameters of the trunk per token, ``P = L (D (H + 2 Hkv) Dh + H Dh D + 3 D F)``
(Llama; GPT-2: ``L (12 D^2)``), the head ``2 D V`` per token it is applied to, and
attention ``2 L H Dh S`` per token over a context of ``S`` (causal: half of ``4 L H Dh S``):

- a forward over ``T`` tokens (context ``S``) costs ``T (2 P + 2 L H Dh S) + 2 D V T_head``;
  training (forward + backward) is three forwards;
- ``step`` (SFT): ``3 fwd(B T, head on B T)``; (reward): ``3 fwd(2 B T, no LM head)``;
- ``rollout``: ``fwd(B P_len) + N fwd(B, context P_len + N/2)`` with the head on ``B N``;
- ``score``: ``fwd(B (P_len + N))`` of the reward model;
- ``update``: reference + old policy + old values forwards (``3 fwd(B (P_len + N))``, the
  head on ``B N``) plus ``epochs x (3 fwd_policy + 3 fwd_value)`` over the batch.

Nothing here reads a clock except the compile timer, and nothing does I/O.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.train.sharding import (
    FSDP_AXIS,
    batch_sharding,
    mesh_batch_size,
    param_shardings,
    replicated,
)

__all__ = ["PhasePlan", "RunPlan", "plan_sft", "plan_reward", "plan_ppo", "tree_bytes_per_device",
           "forward_flops", "format_plan", "advise", "GIB"]

GIB = 1024 ** 3


@dataclasses.dataclass
class PhasePlan:
    """One compiled phase: bytes per device (peak and its parts), compile seconds, FLOPs."""

    name: str
    peak_bytes_per_device: int
    compile_s: float
    flops: float
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    resident_bytes: int = 0  # resident arrays that are not arguments of the phase


@dataclasses.dataclass
class RunPlan:
    """All phases of a run on `devices` devices of `device_memory_bytes` each."""

    devices: int
    device_memory_bytes: int
    phases: list
    state_bytes_per_device: int = 0
    frozen_bytes_per_device: int = 0
    advice: list = dataclasses.field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(p.peak_bytes_per_device <= self.device_memory_bytes for p in self.phases)

    def to_json(self) -> dict:
        """The schema of ``rlhf-jax plan --json``."""
        return {"devices": int(self.devices), "device_memory_bytes": int(self.device_memory_bytes),
                "fits": bool(self.fits),
                "phases": {p.name: {"peak_bytes_per_device": int(p.peak_bytes_per_device),
                                    "compile_s": float(round(p.compile_s, 3)), "flops": float(p.flops)}
                           for p in self.phases}}


# --------------------------------------------------------------------------- helpers


def tree_bytes_per_device(tree) -> int:
    """Bytes of the largest per-device shard set of `tree` (leaves with a `.sharding`)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        sharding = getattr(leaf, "sharding", None)
        local = sharding.shard_shape(shape) if sharding is not None else shape
        dtype = leaf.dtype
        itemsize = 8 if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype).itemsize
        total += int(np.prod(local, dtype=np.int64)) * itemsize
    return total


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _sharded_abstract(abstract, mesh, fsdp):
    sh = param_shardings(abstract, mesh, fsdp=fsdp)
    return _with_shardings(abstract, sh), sh


def _batch_abstract(shapes: dict, mesh):
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
            for k, (shape, dtype) in shapes.items()}


def _compile(name, fn, args, *, in_shardings, out_shardings, donate_argnums=(), flops=0.0,
             resident_bytes=0) -> PhasePlan:
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    arg = int(getattr(mem, "argument_size_in_bytes", 0))
    out = int(getattr(mem, "output_size_in_bytes", 0))
    alias = int(getattr(mem, "alias_size_in_bytes", 0))
    temp = int(getattr(mem, "temp_size_in_bytes", 0))
    peak = arg + out - alias + temp + int(resident_bytes)
    return PhasePlan(name, peak, seconds, float(flops), arg, out, alias, temp, int(resident_bytes))


def _trunk_matmul_params(cfg) -> tuple[int, int]:
    """(matmul parameters of the trunk, attention width H * Dh)."""
    d, layers = cfg.hidden_size, cfg.num_layers
    h, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    f = cfg.intermediate_size
    if cfg.family == "gpt2":
        per_layer = d * 3 * h * dh + h * dh * d + 2 * d * f
    else:
        per_layer = d * (h + 2 * hkv) * dh + h * dh * d + 3 * d * f
    return layers * per_layer, h * dh


def forward_flops(cfg, tokens: float, context: float, head_tokens: float, *, lm_head: bool = True) -> float:
    """Analytic forward FLOPs (see the module docstring): ``tokens`` through the trunk with
    attention over ``context`` positions, the LM head on ``head_tokens``."""
    p, width = _trunk_matmul_params(cfg)
    trunk = tokens * (2.0 * p + 2.0 * cfg.num_layers * width * context)
    head = 2.0 * cfg.hidden_size * cfg.vocab_size * head_tokens if lm_head else 2.0 * cfg.hidden_size * tokens
    return trunk + head


def _check_batch(batch, mesh, name="batch_size"):
    n = mesh_batch_size(mesh)
    if batch % n:
        raise ValueError(f"`{name}` ({batch}) is not divisible by the mesh's {n} batch shards (data x fsdp)")


def _fsdp(mesh, fsdp):
    return mesh.shape[FSDP_AXIS] > 1 if fsdp is None else fsdp


# --------------------------------------------------------------------------- supervised


def _plan_supervised(name, model, cfg, tx, init_fn, make_step, batch_shapes, mesh, fsdp, flops):
    fsdp = _fsdp(mesh, fsdp)
    abstract_state = jax.eval_shape(lambda p: init_fn(model, p, tx, seed=0), model.abstract_params())
    state, state_sh = _sharded_abstract(abstract_state, mesh, fsdp)
    batch = _batch_abstract(batch_shapes, mesh)
    batch_sh = jax.tree.map(lambda a: a.sharding, batch)
    step = make_step(model, tx, cfg)
    return _compile(name, step, (state, batch), in_shardings=(state_sh, batch_sh),
                    out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,), flops=flops), \
        tree_bytes_per_device(state)


def plan_sft(lm, cfg, tx, *, seq_len: int, mesh, fsdp: bool | None = None, device_memory_bytes: int) -> RunPlan:
    """Plan an SFT run: the ``step`` phase at ``[cfg.batch_size, seq_len]``."""
    from rlhf_jax.train.sft import make_sft_step, sft_init

    b, t = int(cfg.batch_size), int(seq_len)
    _check_batch(b, mesh)
    shapes = {k: ((b, t), jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    flops = 3.0 * forward_flops(lm.config, b * t, t / 2, b * t)
    phase, state_bytes = _plan_supervised("step", lm, cfg, tx, sft_init, make_sft_step, shapes, mesh, fsdp, flops)
    plan = RunPlan(int(mesh.devices.size), int(device_memory_bytes), [phase], state_bytes_per_device=state_bytes)
    plan.advice = advise(plan, lm=lm, cfg=cfg, mesh=mesh, kind="sft")
    return plan


def plan_reward(rm, cfg, tx, *, seq_len: int, mesh, fsdp: bool | None = None, device_memory_bytes: int) -> RunPlan:
    """Plan a reward-model run: the ``step`` phase on ``cfg.batch_size`` pairs of ``seq_len`` tokens."""
    from rlhf_jax.train.reward import make_reward_step, reward_init

    b, t = int(cfg.batch_size), int(seq_len)
    _check_batch(b, mesh)
    shapes = {k: ((b, t), jnp.int32) for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")}
    flops = 3.0 * forward_flops(rm.config, 2 * b * t, t / 2, 0, lm_head=False)
    phase, state_bytes = _plan_supervised("step", rm, cfg, tx, reward_init, make_reward_step, shapes, mesh, fsdp,
                                          flops)
    plan = RunPlan(int(mesh.devices.size), int(device_memory_bytes), [phase], state_bytes_per_device=state_bytes)
    plan.advice = advise(plan, lm=rm, cfg=cfg, mesh=mesh, kind="reward")
    return plan


# --------------------------------------------------------------------------- PPO


def _cast(abstract, dtype):
    if dtype is None:
        return abstract
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype))
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, abstract)


def plan_ppo(trainer, *, prompt_len: int, mesh, fsdp: bool | None = None, device_memory_bytes: int,
             frozen_dtype=None, reference=None) -> RunPlan:
    """Plan an RL run of `trainer` (a `PPOTrainer` or any `RLTrainer`): ``rollout``, ``score``
    (with a reward model), ``update``.

    Args:
      trainer: the trainer (its policy, value and reward `LM`s and its `rl_cfg`; the rollout
        samples `batch.group_size` responses per prompt).
      prompt_len: the padded prompt length P.
      mesh: the mesh; fsdp: FSDP-shard params and states (default: the mesh's fsdp axis > 1).
      device_memory_bytes: the device memory the plan is checked against.
      frozen_dtype: storage dtype of the reference and reward weights (None: as the LM's
        param_dtype).
      reference: the reference `LM` (default the policy).
    """
    from rlhf_jax.train.rl.trainer import _rollout

    rl = trainer.rl_cfg
    fsdp = _fsdp(mesh, fsdp)
    b, p, n = int(rl.batch.batch_size), int(prompt_len), int(rl.sampling.max_new_tokens)
    rows = b * int(rl.batch.group_size)
    _check_batch(b, mesh)
    policy = trainer.policy
    policy_params = policy.abstract_params()
    value_params = None if trainer.value_model is None else trainer.value_model.abstract_params()
    abstract_state = jax.eval_shape(lambda pp, vp: trainer.init(pp, vp, seed=0), policy_params, value_params)
    state, state_sh = _sharded_abstract(abstract_state, mesh, fsdp)
    ref, ref_sh = _sharded_abstract(_cast((reference or policy).abstract_params(), frozen_dtype), mesh, fsdp)
    rm = rm_sh = None
    if trainer.reward_model is not None:
        rm, rm_sh = _sharded_abstract(_cast(trainer.reward_model.abstract_params(), frozen_dtype), mesh, fsdp)
    state_bytes = tree_bytes_per_device(state)
    ref_bytes = tree_bytes_per_device(ref)
    rm_bytes = 0 if rm is None else tree_bytes_per_device(rm)
    prompts = _batch_abstract({"ids": ((b, p), jnp.int32), "mask": ((b, p), jnp.int32)}, mesh)
    # score and update see the prompts repeated once per sample: `rows` of them
    row_prompts = _batch_abstract({"ids": ((rows, p), jnp.int32), "mask": ((rows, p), jnp.int32)}, mesh)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated(mesh))
    bsh = lambda a: batch_sharding(mesh, a.ndim)  # noqa: E731

    sampling = dict(trainer._sampling)
    rollout_fn = lambda params, ids, mask, k: _rollout(params, ids, mask, k, **sampling)  # noqa: E731
    abstract_rollout = jax.eval_shape(rollout_fn, state.params, prompts["ids"], prompts["mask"], key)
    rollout_sh = jax.tree.map(bsh, abstract_rollout)
    rollout = _with_shardings(abstract_rollout, rollout_sh)
    params_bytes = tree_bytes_per_device(state.params)
    phases = []
    cfg_p = policy.config
    flops = forward_flops(cfg_p, b * p, p / 2, b) + n * forward_flops(cfg_p, rows, p + n / 2, rows)
    phases.append(_compile(
        "rollout", rollout_fn, (state.params, prompts["ids"], prompts["mask"], key),
        in_shardings=(state_sh.params, prompts["ids"].sharding, prompts["mask"].sharding, replicated(mesh)),
        out_shardings=rollout_sh, flops=flops,
        resident_bytes=state_bytes - params_bytes + ref_bytes + rm_bytes))

    scores_sh = batch_sharding(mesh, 1)
    if trainer.reward_model is not None:
        flops = forward_flops(trainer.reward_model.config, rows * (p + n), (p + n) / 2, 0, lm_head=False)
        phases.append(_compile(
            "score", trainer._score, (rm, row_prompts["ids"], row_prompts["mask"], rollout.tokens, rollout.mask),
            in_shardings=(rm_sh, row_prompts["ids"].sharding, row_prompts["mask"].sharding, rollout_sh.tokens,
                          rollout_sh.mask),
            out_shardings=scores_sh, flops=flops, resident_bytes=state_bytes + ref_bytes))
    scores = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=scores_sh)

    t = p + n
    value_cfg = cfg_p if trainer.value_model is None else trainer.value_model.config
    fwd_policy = forward_flops(cfg_p, rows * t, t / 2, rows * n)
    fwd_value = 0.0 if trainer.value_model is None else forward_flops(value_cfg, rows * t, t / 2, 0, lm_head=False)
    flops = 2 * fwd_policy + fwd_value + rl.batch.ppo_epochs * 3.0 * (fwd_policy + fwd_value)
    phases.append(_compile(
        "update", trainer._update, (state, row_prompts["ids"], row_prompts["mask"], rollout, scores, ref, key),
        in_shardings=(state_sh, row_prompts["ids"].sharding, row_prompts["mask"].sharding, rollout_sh, scores_sh,
                      ref_sh,
                      replicated(mesh)),
        out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,), flops=flops, resident_bytes=rm_bytes))
    plan = RunPlan(int(mesh.devices.size), int(device_memory_bytes), phases, state_bytes_per_device=state_bytes,
                   frozen_bytes_per_device=ref_bytes + rm_bytes)
    plan.advice = advise(plan, lm=policy, cfg=rl.batch, mesh=mesh, kind="ppo", frozen_dtype=frozen_dtype)
    return plan


# --------------------------------------------------------------------------- advice


def advise(plan: RunPlan, *, lm, cfg, mesh, kind: str, frozen_dtype=None) -> list[str]:
    """What to change when `plan` does not fit (empty when it fits), most effective first."""
    if plan.fits:
        return []
    worst = max(plan.phases, key=lambda ph: ph.peak_bytes_per_device)
    over = worst.peak_bytes_per_device - plan.device_memory_bytes
    tips = [f"phase `{worst.name}` needs {worst.peak_bytes_per_device / GIB:.1f} GiB per device, "
            f"{over / GIB:.1f} GiB over the {plan.device_memory_bytes / GIB:.1f} GiB available "
            f"(temporaries {worst.temp_bytes / GIB:.1f} GiB, arguments {worst.argument_bytes / GIB:.1f} GiB, "
            f"resident {worst.resident_bytes / GIB:.1f} GiB)"]
    if getattr(lm, "remat", "none") == "none" and worst.name in ("step", "update"):
        tips.append("model.remat=full (recompute each layer in the backward pass: activations shrink "
                    "to one layer input per layer)")
    accum = int(getattr(cfg, "grad_accum_steps", 1))
    if worst.name in ("step", "update") and worst.temp_bytes > over:
        tips.append(f"train.grad_accum_steps={2 * accum} (halves the micro-batch, and with it the activations)")
    devices = int(mesh.devices.size)
    if mesh.shape[FSDP_AXIS] < devices:
        tips.append(f"mesh.fsdp={devices} (shard params, gradients and Adam states over all {devices} devices)")
    if plan.state_bytes_per_device > over and getattr(cfg, "mu_dtype", None) is None:
        tips.append("train.mu_dtype=bfloat16 (halves Adam's first moment)")
    if kind == "ppo" and (frozen_dtype is None or jnp.dtype(frozen_dtype).itemsize > 2):
        tips.append("model.frozen_dtype=bfloat16 (the reference and reward weights at half size)")
    if devices == 1:
        tips.append("more devices: --devices N with mesh.fsdp=N")
    tips.append("a smaller train.batch_size or shorter sequences")
    return tips


def format_plan(plan: RunPlan, *, title: str = "") -> str:
    """A human-readable table of `plan`."""
    lines = []
    if title:
        lines.append(title)
    lines.append(f"devices: {plan.devices}, memory per device: {plan.device_memory_bytes / GIB:.1f} GiB; "
                 f"train state {plan.state_bytes_per_device / GIB:.2f} GiB per device"
                 + (f", frozen weights {plan.frozen_bytes_per_device / GIB:.2f} GiB" if plan.frozen_bytes_per_device
                    else ""))
    lines.append(f"{'phase':<9}{'peak GiB/dev':>14}{'temp GiB':>10}{'compile s':>11}{'TFLOP':>10}  fits")
    for ph in plan.phases:
        fits = "yes" if ph.peak_bytes_per_device <= plan.device_memory_bytes else "NO"
        lines.append(f"{ph.name:<9}{ph.peak_bytes_per_device / GIB:>14.2f}{ph.temp_bytes / GIB:>10.2f}"
                     f"{ph.compile_s:>11.1f}{ph.flops / 1e12:>10.1f}  {fits}")
    lines.append("fits: " + ("yes" if plan.fits else "no"))
    for tip in plan.advice:
        lines.append("  - " + tip)
    return "\n".join(lines)

