"""`rlhf-jax plan`: will this config fit, how long will it compile, how many FLOPs?

    rlhf-jax plan --config FILE [key=value ...] [--devices N] [--device-memory GIB] [--json]
                  [--model-config DIR]

Reads the run config like the training command would (the command comes from
`--command`, else the file name: `sft*`, `reward*`, `dpo*`, `ppo*`, `rl*` or an RL
algorithm's name such as `grpo*`, `rloo*`, `dapo*`), but needs only each model folder's
`config.json` (no weights, no tokenizer, no data): a folder without one takes
`--model-config` (a folder with a `config.json`, e.g. `configs/models/qwen2.5-0.5b`)
instead. A `lora:` section plans the LoRA run: only the adapters (and new heads) train,
the base is stored in `model.frozen_dtype` and is also the reference. The phases are compiled abstractly on the
configured mesh by `rlhf_jax.train.plan`; when fewer than N devices exist the
command runs itself again with N simulated host devices (XLA's device count is
fixed when JAX starts). With `--json` the last stdout line is one JSON object:

    {"devices": N, "device_memory_bytes": M, "fits": bool,
     "phases": {NAME: {"peak_bytes_per_device": int, "compile_s": float, "flops": float}},
     "trainable_params": int, "frozen_params": int, "state_bytes_per_device": int,
     "frozen_bytes_per_device": int, "lora": null | {"rank", "alpha", "targets", "adapted",
     "layers", "base_params", "heads", "base_dtype"}}

Phases: `step` for sft, reward and dpo; `rollout`, `score` (only with a reward model) and
`update` for ppo and rl.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from rlhf_jax.cli.config import COMMAND_CONFIGS, ConfigError, load_config

__all__ = ["add_plan_parser", "run_plan", "PLANNED_COMMANDS"]

PLANNED_COMMANDS = ("sft", "reward", "dpo", "ppo", "rl")
_CHILD_ENV = "RLHF_JAX_PLAN_CHILD"


def add_plan_parser(sub):
    p = sub.add_parser("plan", help="compile every phase of a run abstractly: memory per device, compile time, "
                                    "FLOPs, and whether it fits",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.yaml", required=True, help="the run's YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for the run itself")
    p.add_argument("--command", dest="plan_command", choices=PLANNED_COMMANDS,
                   help="the run's command (default: from the file name)")
    p.add_argument("--devices", type=int, help="devices to plan for (default: the mesh's fsdp x tensor x data)")
    p.add_argument("--device-memory", dest="device_memory", type=float, default=80.0, metavar="GIB",
                   help="memory per device in GiB (default 80)")
    p.add_argument("--model-config", dest="model_config", metavar="DIR",
                   help="a folder with config.json for every model folder that has none")
    p.add_argument("--json", action="store_true", help="end with one JSON line (schema above)")
    return p


def _command_of(path: str) -> str:
    from rlhf_jax.train.rl.presets import ALGORITHMS

    name = os.path.basename(path).lower()
    for cmd in PLANNED_COMMANDS:
        if name.startswith(cmd):
            return cmd
    # an RL recipe is named after its algorithm (grpo_gsm8k_qwen05b.yaml); the longest name first
    for algorithm in sorted(ALGORITHMS, key=len, reverse=True):
        if name.startswith(algorithm):
            return "rl"
    raise ConfigError(f"cannot tell the command of {path} from its name; pass --command "
                      + "|".join(PLANNED_COMMANDS))


def _mesh_section(cfg):
    mesh = getattr(cfg, "mesh", None)
    if mesh is None and hasattr(cfg, "run"):
        mesh = getattr(cfg.run, "mesh", None)
    return mesh


def _wanted_devices(args, mesh_cfg) -> int:
    if args.devices is not None:
        if args.devices < 1:
            raise ConfigError(f"--devices must be >= 1, got {args.devices}")
        return args.devices
    inner = mesh_cfg.fsdp * getattr(mesh_cfg, "tensor", 1)
    return inner * (1 if mesh_cfg.data == -1 else mesh_cfg.data)


def _hf_config(path, random_init, fallback, what):
    if random_init is not None:
        return dict(random_init)
    for folder in (path, fallback):
        if folder and os.path.isfile(os.path.join(folder, "config.json")):
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                return json.load(f)
    raise ConfigError(f"{what}: no config.json in {path!r}; pass --model-config DIR (e.g. configs/models/...)")


def _lm(hf_config, model_cfg, head, *, param_dtype=None, lora=None):
    """The static `LM` of a config.json (with `lora`, a `LoRASection`, its adapters attached)."""
    from rlhf_jax.cli.commands import _dtype
    from rlhf_jax.models import LM, ModelConfig

    lm = LM(ModelConfig.from_hf_config(hf_config), head, dtype=_dtype(model_cfg.dtype),
            param_dtype=_dtype(param_dtype or model_cfg.param_dtype), remat=getattr(model_cfg, "remat", "none"),
            lora=None if lora is None else lora.to_lora_config())
    if lora is not None:
        try:
            lm.abstract_params()
        except ValueError as e:  # the targets match no projection of this family
            raise ConfigError(f"`lora.targets`: {e}") from None
    return lm


def _frozen_dtype(cfg):
    """The storage dtype of the frozen weights (`model.frozen_dtype`): the RL reference and
    reward model, and with `lora:` the base."""
    from rlhf_jax.cli.commands import _dtype

    return _dtype(cfg.model.frozen_dtype)


def _optimizer(opt):
    """The optax transformation of an `OptimizerConfig` (a schedule without a length gets one:
    planning compiles, and the schedule's length changes no shape)."""
    from rlhf_jax.train.state import optimizer_from_config

    return optimizer_from_config(opt, total_steps=(opt.warmup_steps or 0) + 1000)


def _seq_len(data, key):
    """The padded length of the longest row: the smallest bucket that holds `data.<key>` tokens."""
    limit = int(getattr(data, key))
    fitting = [b for b in (getattr(data, "buckets", None) or ()) if b >= limit]
    return min(fitting) if fitting else limit


def run_plan(args, argv) -> int:
    """Run `rlhf-jax plan` with parsed `args` (`argv`: the original arguments, for a re-run)."""
    command = args.plan_command or _command_of(args.config)
    cfg = load_config(args.config, args.overrides, COMMAND_CONFIGS[command])
    mesh_cfg = _mesh_section(cfg)
    n = _wanted_devices(args, mesh_cfg)
    import jax

    if jax.device_count() < n:
        if os.environ.get(_CHILD_ENV):
            raise ConfigError(f"{n} devices wanted, {jax.device_count()} available even when simulated")
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
        env["JAX_PLATFORMS"] = "cpu"
        env[_CHILD_ENV] = "1"
        return subprocess.call([sys.executable, "-m", "rlhf_jax.cli", "plan", *argv], env=env)

    from rlhf_jax.train import plan as planner
    from rlhf_jax.train.sharding import make_mesh

    tensor = getattr(mesh_cfg, "tensor", 1)
    inner = mesh_cfg.fsdp * tensor
    if n % inner:
        raise ConfigError(f"`mesh.fsdp` x `mesh.tensor` = {inner} does not divide the {n} devices")
    data = n // inner if mesh_cfg.data == -1 else mesh_cfg.data
    if data * inner != n:
        raise ConfigError(f"a {data} x {mesh_cfg.fsdp} x {tensor} mesh is not {n} devices (--devices)")
    mesh = make_mesh(data=data, fsdp=mesh_cfg.fsdp, tensor=tensor, devices=jax.devices()[:n])
    memory = int(args.device_memory * planner.GIB)
    model_cfg = cfg.model
    policy_config = _hf_config(model_cfg.path, model_cfg.random_init, args.model_config, "model.path")
    title = f"rlhf-jax plan: {command} {args.config} on a {data} x {mesh_cfg.fsdp} x {tensor} mesh " \
            f"(data x fsdp x tensor), {jax.devices()[0].platform}"
    lora = getattr(cfg, "lora", None)
    if lora is not None:
        title += f"; LoRA r={lora.rank}"
    frozen = _frozen_dtype(cfg) if lora is not None else None  # full fine-tuning freezes nothing here
    if command in ("sft", "reward", "dpo"):
        model = _lm(policy_config, model_cfg, "scalar" if command == "reward" else "lm", lora=lora)
        common = dict(seq_len=_seq_len(cfg.data, "max_length"), mesh=mesh, device_memory_bytes=memory,
                      frozen_dtype=frozen)
        tx = _optimizer(cfg.train.optimizer)
        if command == "sft":
            result = planner.plan_sft(model, cfg.train, tx, **common)
        elif command == "reward":
            result = planner.plan_reward(model, cfg.train, tx, **common)
        else:
            reference = None
            if cfg.reference is not None:
                reference = _lm(_hf_config(cfg.reference, None, args.model_config, "reference"), model_cfg, "lm")
            result = planner.plan_dpo(model, cfg.train, tx, reference=reference, **common)
    else:
        result = _plan_rl(command, cfg, policy_config, args, mesh, memory, planner)
    print(planner.format_plan(result, title=title), flush=True)
    if args.json:
        print(json.dumps(result.to_json()), flush=True)
    return 0


def _plan_rl(command, cfg, policy_config, args, mesh, memory, planner):
    """The trainer `rlhf-jax ppo` / `rlhf-jax rl` would build (a critic only where the estimator
    needs one), planned."""
    from rlhf_jax.train.rl.ppo import PPOTrainer
    from rlhf_jax.train.rl.trainer import RLTrainer

    model_cfg = cfg.model
    frozen = _frozen_dtype(cfg)
    lora = getattr(cfg, "lora", None)
    critic = command == "ppo" or cfg.train.advantages.needs_critic
    shared = critic and cfg.value_model is None
    policy = _lm(policy_config, model_cfg, "lm+value" if shared else "lm", lora=lora)
    reference = None
    if cfg.reference is not None:
        reference = _lm(_hf_config(cfg.reference, None, args.model_config, "reference"), model_cfg, policy.head)
    value_model = value_tx = None
    if critic and not shared:
        path = cfg.reward.model_path if cfg.value_model == "reward_model" else cfg.value_model
        value_model = _lm(_hf_config(path, None, args.model_config, "value_model"), model_cfg, "scalar")
        value_tx = _optimizer(cfg.train.value_optimizer_config)
    reward_model = reward_fn = None
    if cfg.reward.model_path is not None:
        reward_model = _lm(_hf_config(cfg.reward.model_path, None, args.model_config, "reward.model_path"),
                           model_cfg, "scalar")
    else:
        reward_fn = _no_reward  # a host function: no compiled score phase
    sampling = cfg.train.sampling
    eos = sampling.eos_token_id
    if eos is None:
        eos = policy_config.get("eos_token_id") or 0
        eos = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
    train = dataclasses.replace(cfg.train, sampling=dataclasses.replace(sampling, eos_token_id=eos))
    trainer = (PPOTrainer if command == "ppo" else RLTrainer)(
        policy, train, _optimizer(train.optimizer), value_model=value_model, value_tx=value_tx,
        reward_model=reward_model, reward_fn=reward_fn)
    return planner.plan_ppo(trainer, prompt_len=_seq_len(cfg.data, "max_prompt_length"), mesh=mesh,
                            device_memory_bytes=memory, frozen_dtype=frozen, reference=reference)


def _no_reward(*_):  # pragma: no cover - never called: planning compiles, it does not run
    raise RuntimeError("planning does not score")
