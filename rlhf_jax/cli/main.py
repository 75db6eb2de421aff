"""The `rlhf-jax` command line: sft, reward, ppo, eval, export and demo.

    rlhf-jax sft    --config configs/tiny/sft.yaml    [key=value ...] [--overwrite]
    rlhf-jax reward --config configs/tiny/reward.yaml [key=value ...]
    rlhf-jax ppo    --config configs/tiny/ppo.yaml    [key=value ...]
    rlhf-jax eval   --config configs/tiny/eval.yaml   [key=value ...]
    rlhf-jax export --config configs/tiny/export.yaml [key=value ...]
    rlhf-jax demo   [--output_dir DIR] [--seed N] [--quick] [--overwrite]

Each command reads its config class from `rlhf_jax.cli.config`, validates all of
it, loads the tokenizer and the data (so a bad key or a bad row fails before
any model is built), prints the resolved config and writes it into
`output_dir` together with the run's checkpoints, `metrics.jsonl`,
TensorBoard events and, for the training commands, the final model in HF
format under `output_dir/hf/`.

A run folder belongs to one config: running again with the same config
resumes from the newest checkpoint; a different config is refused unless
`--overwrite` (which deletes the old run). User errors (bad config, bad
data, bad paths) end with a one-line message and exit status 2, never a
traceback.

The stages themselves (data -> model -> driver -> export) live in
`rlhf_jax.cli.commands`; this module parses arguments, guards run folders and turns
user errors into messages. Set `RLHF_JAX_DEBUG=1` to get tracebacks instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time

from rlhf_jax.cli.commands import RunError
from rlhf_jax.cli.config import COMMAND_CONFIGS, ConfigError, config_hash, dump_config, field_help, load_config
from rlhf_jax.data.datasets import DataError

__all__ = ["main", "build_parser"]

_DESCRIPTIONS = {
    "sft": "supervised fine-tuning on prompt/completion or messages rows; writes output_dir/hf (*ForCausalLM)",
    "reward": "train a Bradley-Terry reward model on prompt/chosen/rejected rows; writes output_dir/hf "
              "(*ForSequenceClassification)",
    "ppo": "PPO against a reward model or a reward function, with a frozen reference; writes output_dir/hf",
    "eval": "pass@k (k = 1..n, bootstrap CIs) of models on a prompt set with a verifier; writes eval.json "
            "and pass_at_k.png",
    "export": "write a run's newest checkpoint as an HF folder (config.json, model.safetensors, tokenizer)",
    "demo": "the offline RLVR + RLHF demo (no downloads): report.md, report.json and plots",
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
        prog="rlhf-jax", description="Pure-JAX RLHF: SFT, reward models, PPO, pass@k evaluation.")
    parser.add_argument("--version", action="version", version=f"rlhf-jax {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{sft,reward,ppo,eval,export,plan,demo}")
    sub.required = True
    for name, cls in COMMAND_CONFIGS.items():
        p = sub.add_parser(name, help=_DESCRIPTIONS[name], description=_DESCRIPTIONS[name],
                           epilog=_options_epilog(cls), formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", metavar="FILE.yaml", help="the YAML config (omit to start from the defaults)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. train.learning_rate=1e-5 data.max_length=256")
        p.add_argument("--overwrite", action="store_true",
                       help="delete an existing run in output_dir whose config differs (default: refuse)")
        p.add_argument("--dry_run", action="store_true",
                       help="validate the config, print it resolved, and stop before touching data or models")
    from rlhf_jax.cli.plan import add_plan_parser

    add_plan_parser(sub)
    p = sub.add_parser("demo", help=_DESCRIPTIONS["demo"], description=_DESCRIPTIONS["demo"])
    p.add_argument("--output_dir", default="demo_output", help="where the report goes (default: demo_output)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything in the demo (default: 0)")
    p.add_argument("--quick", action="store_true", help="a reduced, faster demo (for tests)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output_dir")
    return parser


# --------------------------------------------------------------------------- entry point


def main(argv=None) -> int:
    """Run `rlhf-jax` with `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "plan":
            from rlhf_jax.cli.plan import run_plan

            return run_plan(args, argv[argv.index("plan") + 1:])
        cfg = load_config(args.config, args.overrides, COMMAND_CONFIGS[args.command])
        print(f"# rlhf-jax {args.command}: resolved config (hash {config_hash(cfg)})")
        print(dump_config(cfg), end="", flush=True)
        if args.dry_run:
            return 0
        from rlhf_jax.cli import commands as pipeline

        run = getattr(pipeline, f"run_{args.command}")
        start = time.perf_counter()
        result = run(cfg, overwrite=args.overwrite)
        print(f"rlhf-jax {args.command}: done in {time.perf_counter() - start:.1f} s -> {result}", flush=True)
        return 0
    except (ConfigError, DataError, RunError) as e:
        if os.environ.get("RLHF_JAX_DEBUG"):
            raise
        print(f"rlhf-jax {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as e:
        # Bad inputs discovered while loading models, tokenizers or reward functions.
        if os.environ.get("RLHF_JAX_DEBUG"):
            raise
        message = " ".join(str(e).split())
        print(f"rlhf-jax {args.command}: error: {type(e).__name__}: {message}", file=sys.stderr)
        return 2


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


if __name__ == "__main__":
    sys.exit(main())
