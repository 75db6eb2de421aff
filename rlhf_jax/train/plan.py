"""Plan a run before it starts: compile every phase abstractly and read its memory.

No weights, no data: each phase of a trainer is jitted with the input and output
shardings it runs with, lowered on ``jax.ShapeDtypeStruct`` arguments and compiled
(``jax.jit(f, in_shardings, out_shardings).lower(...).compile()``); XLA's
``memory_analysis()`` of the compiled program gives its bytes per device. Phases:

- ``sft``, ``reward``, ``dpo``: ``step`` (one optimizer update on one batch, state donated).
- ``ppo`` and every `RLTrainer` estimator: ``rollout`` (sampling with the KV cache,
  ``group_size`` samples per prompt), ``score`` (reward-model forward; absent with a host
  reward function), ``update`` (reference / old-policy / value forwards, the estimator,
  epochs x minibatches). The RL phases are compiled with the trainer's own
  `RLTrainer.phase_shardings`, the layout they run with.

LoRA (``lm.lora`` set): the trained pytree is the adapters plus the new heads
(`rlhf_jax.models.lora.trained_heads`: a reward model's ``score``, a shared-trunk
``value_head``), so only they have gradients and Adam moments; the frozen base is an
argument of every phase, stored in ``frozen_dtype`` when one is given, and is also the
reference policy (no second copy).

Peak bytes per device of a phase = the compiled program's arguments + outputs - the
donated (aliased) bytes + its temporaries, plus the bytes of every array that stays
resident on the device during the phase without being one of its arguments (e.g. the
optimizer state during the rollout; the reference and reward weights during the update).

FLOPs are analytic (model FLOPs: a remat recomputation is not counted). With ``P`` the
matmul parameters of the trunk per token, ``P = L (D (H + 2 Hkv) Dh + H Dh D + 3 D F)``
(Llama; GPT-2: ``L (12 D^2)``), the head ``2 D V`` per token it is applied to, and
attention ``2 L H Dh S`` per token over a context of ``S`` (causal: half of ``4 L H Dh S``):

- a forward over ``T`` tokens (context ``S``) costs ``T (2 P + 2 L H Dh S) + 2 D V T_head``;
  training (forward + backward) is three forwards; with a frozen LoRA base two forwards
  plus the attention once more (no weight gradients of the base; the adapters' own
  ``2 r (in + out)`` per token are not counted);
- ``step`` (SFT): ``train(B T, head on B T)``; (reward): ``train(2 B T, no LM head)``;
  (DPO): ``train(2 B T, head on 2 B T)`` plus, with ``reference: on_the_fly``, a reference
  ``fwd(2 B T)`` (the ``precompute`` pass runs once before training, not per step);
- ``rollout``: ``fwd(B P_len) + N fwd(B G, context P_len + N/2)`` with the head on ``B G N``;
- ``score``: ``fwd(B G (P_len + N))`` of the reward model;
- ``update``: reference + old policy + old values forwards (``fwd(R (P_len + N))`` each,
  ``R = B G`` rows, the head on ``R N``; no reference forward without a KL, no value
  forward without a critic) plus ``epochs x (train_policy + train_value)`` over the rows.

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

__all__ = ["PhasePlan", "RunPlan", "plan_sft", "plan_reward", "plan_dpo", "plan_ppo", "tree_bytes_per_device",
           "forward_flops", "training_flops", "format_plan", "advise", "GIB"]

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
    trainable_params: int = 0  # scalars with gradients and optimizer state
    frozen_params: int = 0     # scalars of the frozen networks (reference, reward model, LoRA base)
    lora: dict | None = None   # rank, alpha, targets, adapted projections, base dtype

    @property
    def fits(self) -> bool:
        return all(p.peak_bytes_per_device <= self.device_memory_bytes for p in self.phases)

    def to_json(self) -> dict:
        """The schema of ``rlhf-jax plan --json``."""
        return {"devices": int(self.devices), "device_memory_bytes": int(self.device_memory_bytes),
                "fits": bool(self.fits),
                "phases": {p.name: {"peak_bytes_per_device": int(p.peak_bytes_per_device),
                                    "compile_s": float(round(p.compile_s, 3)), "flops": float(p.flops)}
                           for p in self.phases},
                "trainable_params": int(self.trainable_params), "frozen_params": int(self.frozen_params),
                "state_bytes_per_device": int(self.state_bytes_per_device),
                "frozen_bytes_per_device": int(self.frozen_bytes_per_device),
                "lora": None if self.lora is None else dict(self.lora)}


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


def _num_params(*trees) -> int:
    return int(sum(int(np.prod(leaf.shape, dtype=np.int64)) for tree in trees if tree is not None
                   for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)))


def _cast(abstract, dtype):
    if dtype is None:
        return abstract
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype))
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, abstract)


def _trainable_and_frozen(model, frozen_dtype):
    """``(trainable, frozen)`` abstract params: the whole model and None, or for a LoRA model
    the adapters + new heads and the base (in ``frozen_dtype`` when given)."""
    abstract = model.abstract_params()
    if getattr(model, "lora", None) is None:
        return abstract, None
    from rlhf_jax.models.lora import partition, trained_heads

    trainable, frozen = partition(abstract, heads=trained_heads(model))
    return trainable, _cast(frozen, frozen_dtype)


def _lora_info(model, trainable, frozen) -> dict | None:
    if getattr(model, "lora", None) is None:
        return None
    from rlhf_jax.models.lora import adapter_paths, trained_heads

    dtypes = sorted({str(leaf.dtype) for leaf in jax.tree.leaves(frozen) if jnp.issubdtype(leaf.dtype, jnp.floating)})
    return {"rank": int(model.lora.rank), "alpha": float(model.lora.alpha), "targets": model.lora.pattern,
            "adapted": adapter_paths(trainable), "layers": int(model.config.num_layers),
            "base_params": _num_params(frozen),
            "heads": list(trained_heads(model)),
            "base_dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes)}


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


def training_flops(cfg, tokens: float, context: float, head_tokens: float, *, lm_head: bool = True,
                   frozen_base: bool = False) -> float:
    """Analytic forward + backward FLOPs: three forwards, or with a frozen (LoRA) base two
    forwards plus the attention once more (see the module docstring)."""
    fwd = forward_flops(cfg, tokens, context, head_tokens, lm_head=lm_head)
    if not frozen_base:
        return 3.0 * fwd
    _, width = _trunk_matmul_params(cfg)
    return 2.0 * fwd + tokens * 2.0 * cfg.num_layers * width * context


def _check_batch(batch, mesh, name="batch_size"):
    n = mesh_batch_size(mesh)
    if batch % n:
        raise ValueError(f"`{name}` ({batch}) is not divisible by the mesh's {n} batch shards (data x fsdp)")


def _fsdp(mesh, fsdp):
    return mesh.shape[FSDP_AXIS] > 1 if fsdp is None else fsdp


# --------------------------------------------------------------------------- supervised


def _plan_supervised(kind, model, cfg, tx, init_fn, make_step, batch_shapes, mesh, fsdp, flops, *,
                     frozen_dtype=None, extra_args=None) -> RunPlan:
    """The ``step`` phase of an offline trainer: ``step(state, batch, *args)`` with the state
    donated, `args` = ``extra_args(frozen)`` (default ``(frozen,)``: LoRA's base or None)."""
    fsdp = _fsdp(mesh, fsdp)
    trainable, frozen = _trainable_and_frozen(model, frozen_dtype)
    abstract_state = jax.eval_shape(lambda p: init_fn(model, p, tx, seed=0), trainable)
    state, state_sh = _sharded_abstract(abstract_state, mesh, fsdp)
    batch = _batch_abstract(batch_shapes, mesh)
    batch_sh = jax.tree.map(lambda a: a.sharding, batch)
    args = (frozen,) if extra_args is None else tuple(extra_args(frozen))
    placed = [(None, None) if a is None else _sharded_abstract(a, mesh, fsdp) for a in args]
    step = make_step(model, tx, cfg)
    phase = _compile("step", step, (state, batch, *[a for a, _ in placed]),
                     in_shardings=(state_sh, batch_sh, *[sh for _, sh in placed]),
                     out_shardings=(state_sh, replicated(mesh)), donate_argnums=(0,), flops=flops)
    frozen_trees = [a for a, _ in placed if a is not None]
    plan = RunPlan(int(mesh.devices.size), 0, [phase], state_bytes_per_device=tree_bytes_per_device(state),
                   frozen_bytes_per_device=sum(tree_bytes_per_device(a) for a in frozen_trees),
                   trainable_params=_num_params(trainable), frozen_params=_num_params(*frozen_trees),
                   lora=_lora_info(model, trainable, frozen))
    return plan


def _finish(plan: RunPlan, device_memory_bytes: int, **advice) -> RunPlan:
    plan.device_memory_bytes = int(device_memory_bytes)
    plan.advice = advise(plan, **advice)
    return plan


def plan_sft(lm, cfg, tx, *, seq_len: int, mesh, fsdp: bool | None = None, device_memory_bytes: int,
             frozen_dtype=None) -> RunPlan:
    """Plan an SFT run: the ``step`` phase at ``[cfg.batch_size, seq_len]``.

    With a LoRA `lm` only the adapters train; the base is stored in `frozen_dtype` (None: as
    the LM's `param_dtype`).
    """
    from rlhf_jax.train.sft import make_sft_step, sft_init

    b, t = int(cfg.batch_size), int(seq_len)
    _check_batch(b, mesh)
    shapes = {k: ((b, t), jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    lora = getattr(lm, "lora", None) is not None
    flops = training_flops(lm.config, b * t, t / 2, b * t, frozen_base=lora)
    plan = _plan_supervised("sft", lm, cfg, tx, sft_init, make_sft_step, shapes, mesh, fsdp, flops,
                            frozen_dtype=frozen_dtype)
    return _finish(plan, device_memory_bytes, lm=lm, cfg=cfg, mesh=mesh, kind="sft", frozen_dtype=frozen_dtype)


def plan_reward(rm, cfg, tx, *, seq_len: int, mesh, fsdp: bool | None = None, device_memory_bytes: int,
                frozen_dtype=None) -> RunPlan:
    """Plan a reward-model run: the ``step`` phase on ``cfg.batch_size`` pairs of ``seq_len`` tokens
    (LoRA: the adapters and the score head train)."""
    from rlhf_jax.train.reward import make_reward_step, reward_init

    b, t = int(cfg.batch_size), int(seq_len)
    _check_batch(b, mesh)
    shapes = {k: ((b, t), jnp.int32) for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")}
    lora = getattr(rm, "lora", None) is not None
    flops = training_flops(rm.config, 2 * b * t, t / 2, 0, lm_head=False, frozen_base=lora)
    plan = _plan_supervised("reward", rm, cfg, tx, reward_init, make_reward_step, shapes, mesh, fsdp, flops,
                            frozen_dtype=frozen_dtype)
    return _finish(plan, device_memory_bytes, lm=rm, cfg=cfg, mesh=mesh, kind="reward", frozen_dtype=frozen_dtype)


def plan_dpo(lm, cfg, tx, *, seq_len: int, mesh, fsdp: bool | None = None, device_memory_bytes: int,
             frozen_dtype=None, reference=None) -> RunPlan:
    """Plan a DPO run (`DPOConfig` `cfg`): the ``step`` phase on ``cfg.batch_size`` pairs of
    ``seq_len`` tokens.

    The reference: ``precompute`` puts two ``[B]`` columns in the batch (the pass that makes
    them runs once, before training); ``on_the_fly`` makes the reference's weights an
    argument of the step (`reference`, default `lm`, stored in `frozen_dtype`). With a LoRA
    `lm` the frozen base is both the policy's base and the reference (one copy).
    """
    from rlhf_jax.train.dpo import DPO_PAIR_KEYS, REF_KEYS, dpo_init, make_dpo_step

    b, t = int(cfg.batch_size), int(seq_len)
    _check_batch(b, mesh)
    shapes = {k: ((b, t), jnp.int32) for k in DPO_PAIR_KEYS}
    precompute = cfg.needs_reference and cfg.reference == "precompute"
    on_the_fly = cfg.needs_reference and cfg.reference == "on_the_fly"
    if precompute:
        shapes.update({k: ((b,), jnp.float32) for k in REF_KEYS})
    lora = getattr(lm, "lora", None) is not None
    flops = training_flops(lm.config, 2 * b * t, t / 2, 2 * b * t, frozen_base=lora)
    if on_the_fly:
        flops += forward_flops(lm.config, 2 * b * t, t / 2, 2 * b * t)

    def extra_args(frozen):
        if lora:
            return (None, frozen)  # (ref_params, frozen): the reference runs on the base
        if on_the_fly:
            return (_cast((reference or lm).abstract_params(), frozen_dtype),)
        return ()

    plan = _plan_supervised("dpo", lm, cfg, tx, dpo_init, make_dpo_step, shapes, mesh, fsdp, flops,
                            frozen_dtype=frozen_dtype, extra_args=extra_args)
    return _finish(plan, device_memory_bytes, lm=lm, cfg=cfg, mesh=mesh, kind="dpo", frozen_dtype=frozen_dtype)


# --------------------------------------------------------------------------- RL


def plan_ppo(trainer, *, prompt_len: int, mesh, fsdp: bool | None = None, device_memory_bytes: int,
             frozen_dtype=None, reference=None) -> RunPlan:
    """Plan an RL run of `trainer` (a `PPOTrainer` or any `RLTrainer`): ``rollout``, ``score``
    (with a reward model), ``update``, each compiled with `trainer.phase_shardings` on `mesh`.

    Args:
      trainer: the trainer (its policy, value and reward `LM`s and its `rl_cfg`; the rollout
        samples `batch.group_size` responses per prompt; a critic only where the estimator
        needs one). With a LoRA policy the trained state holds the adapters (and a
        shared-trunk value head) and the frozen base is the reference.
      prompt_len: the padded prompt length P.
      mesh: the mesh; fsdp: FSDP-shard params and states (default: the mesh's fsdp axis > 1).
      device_memory_bytes: the device memory the plan is checked against.
      frozen_dtype: storage dtype of the reference (LoRA: the base) and reward weights (None:
        as the LM's param_dtype).
      reference: the reference `LM` (default the policy; unused with LoRA).
    """
    import functools

    from rlhf_jax.train.rl.trainer import _rollout

    rl = trainer.rl_cfg
    fsdp = _fsdp(mesh, fsdp)
    sharded = trainer.with_mesh(mesh, fsdp=fsdp)
    b, p, n = int(rl.batch.batch_size), int(prompt_len), int(rl.sampling.max_new_tokens)
    rows = b * int(rl.batch.group_size)
    _check_batch(b, mesh)
    policy = trainer.policy
    lora = bool(trainer.lora)
    init_params, ref_abstract = _trainable_and_frozen(policy, frozen_dtype)
    if not lora:
        ref_abstract = _cast((reference or policy).abstract_params(), frozen_dtype)
    value_params = None if trainer.value_model is None else trainer.value_model.abstract_params()
    abstract_state = jax.eval_shape(lambda pp, vp: trainer.init(pp, vp, seed=0), init_params, value_params)
    rm_abstract = None
    if trainer.reward_model is not None:
        rm_abstract = _cast(trainer.reward_model.abstract_params(), frozen_dtype)
    shardings = sharded.phase_shardings(abstract_state, ref_abstract, rm_abstract)
    state = _with_shardings(abstract_state, shardings["update"][0][0])
    ref = _with_shardings(ref_abstract, shardings["update"][0][5])
    state_bytes, ref_bytes = tree_bytes_per_device(state), tree_bytes_per_device(ref)
    rm_bytes = 0
    rep = replicated(mesh)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    prompts = _batch_abstract({"ids": ((b, p), jnp.int32), "mask": ((b, p), jnp.int32)}, mesh)
    # score and update see the prompts repeated once per sample: `rows` of them
    row_prompts = _batch_abstract({"ids": ((rows, p), jnp.int32), "mask": ((rows, p), jnp.int32)}, mesh)

    rollout_in, rollout_out = shardings["rollout"]
    rollout_params = _with_shardings(trainer._policy_params(abstract_state.params, ref_abstract), rollout_in[0])
    rollout_fn = functools.partial(_rollout, **trainer._sampling)
    rollout = _with_shardings(jax.eval_shape(rollout_fn, rollout_params, prompts["ids"], prompts["mask"], key),
                              rollout_out)
    phases = []
    cfg_p = policy.config
    flops = forward_flops(cfg_p, b * p, p / 2, b) + n * forward_flops(cfg_p, rows, p + n / 2, rows)
    if trainer.reward_model is not None:
        rm = _with_shardings(rm_abstract, shardings["score"][0][0])
        rm_bytes = tree_bytes_per_device(rm)
    phases.append(_compile(
        "rollout", rollout_fn, (rollout_params, prompts["ids"], prompts["mask"], key),
        in_shardings=rollout_in, out_shardings=rollout_out, flops=flops,
        resident_bytes=state_bytes + ref_bytes + rm_bytes - tree_bytes_per_device(rollout_params)))

    scores_sh = batch_sharding(mesh, 1)
    if trainer.reward_model is not None:
        flops = forward_flops(trainer.reward_model.config, rows * (p + n), (p + n) / 2, 0, lm_head=False)
        score_in, score_out = shardings["score"]
        phases.append(_compile(
            "score", trainer._score, (rm, row_prompts["ids"], row_prompts["mask"], rollout.tokens, rollout.mask),
            in_shardings=score_in, out_shardings=score_out, flops=flops, resident_bytes=state_bytes + ref_bytes))
    scores = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=scores_sh)

    t = p + n
    fwd_policy = forward_flops(cfg_p, rows * t, t / 2, rows * n)
    train_policy = training_flops(cfg_p, rows * t, t / 2, rows * n, frozen_base=lora)
    fwd_value = train_value = 0.0
    if trainer.value_model is not None:
        value_cfg = trainer.value_model.config
        fwd_value = forward_flops(value_cfg, rows * t, t / 2, 0, lm_head=False)
        train_value = 3.0 * fwd_value
    use_ref = rl.kl.placement != "none"
    flops = (2 if use_ref else 1) * fwd_policy + fwd_value + rl.batch.ppo_epochs * (train_policy + train_value)
    update_in, update_out = shardings["update"]
    phases.append(_compile(
        "update", trainer._update, (state, row_prompts["ids"], row_prompts["mask"], rollout, scores, ref, key),
        in_shardings=update_in, out_shardings=update_out, donate_argnums=(0,), flops=flops,
        resident_bytes=rm_bytes))
    trainable = [abstract_state.params, abstract_state.value_params]
    plan = RunPlan(int(mesh.devices.size), int(device_memory_bytes), phases, state_bytes_per_device=state_bytes,
                   frozen_bytes_per_device=ref_bytes + rm_bytes, trainable_params=_num_params(*trainable),
                   frozen_params=_num_params(ref_abstract, rm_abstract),
                   lora=_lora_info(policy, abstract_state.params, ref_abstract) if lora else None)
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
    lora = getattr(lm, "lora", None) is not None
    if not lora and plan.state_bytes_per_device > over:
        tips.append("lora.rank=16 (a `lora:` section: gradients and Adam states for the adapters only, the "
                    "base frozen in model.frozen_dtype and shared with the reference)")
    if plan.state_bytes_per_device > over and getattr(cfg, "mu_dtype", None) is None:
        tips.append("train.mu_dtype=bfloat16 (halves Adam's first moment)")
    wide = frozen_dtype is None or jnp.dtype(frozen_dtype).itemsize > 2
    if kind == "ppo" and wide:
        tips.append("model.frozen_dtype=bfloat16 (the reference and reward weights at half size)")
    elif lora and wide:
        tips.append("model.frozen_dtype=bfloat16 (the frozen base at half size)")
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
    if plan.trainable_params:
        trained = f"trainable: {plan.trainable_params / 1e6:.2f} M params (with gradients and optimizer state)"
        if plan.lora is not None:
            lora = plan.lora
            heads = f" + heads {', '.join(lora['heads'])}" if lora["heads"] else ""
            trained += (f" = LoRA r={lora['rank']} alpha={lora['alpha']:g} on {len(lora['adapted'])} projections"
                        f" x {lora['layers']} layers"
                        f"{heads}; frozen base {lora['base_params'] / 1e6:.2f} M params in {lora['base_dtype']}"
                        " (also the reference)")
            others = plan.frozen_params - lora["base_params"]
            if others:
                trained += f", other frozen networks {others / 1e6:.2f} M params"
        elif plan.frozen_params:
            trained += f"; frozen: {plan.frozen_params / 1e6:.2f} M params"
        lines.append(trained)
    lines.append(f"{'phase':<9}{'peak GiB/dev':>14}{'temp GiB':>10}{'compile s':>11}{'TFLOP':>10}  fits")
    for ph in plan.phases:
        fits = "yes" if ph.peak_bytes_per_device <= plan.device_memory_bytes else "NO"
        lines.append(f"{ph.name:<9}{ph.peak_bytes_per_device / GIB:>14.2f}{ph.temp_bytes / GIB:>10.2f}"
                     f"{ph.compile_s:>11.1f}{ph.flops / 1e12:>10.1f}  {fits}")
    lines.append("fits: " + ("yes" if plan.fits else "no"))
    for tip in plan.advice:
        lines.append("  - " + tip)
    return "\n".join(lines)

