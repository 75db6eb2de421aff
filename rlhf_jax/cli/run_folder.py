"""Run folders: one folder per run, tied to one config.

A run folder holds `run.json` (`command`, `config_hash`, `config`) and
`resolved_config.yaml` next to what the drivers write (checkpoints/,
metrics.jsonl, TensorBoard events) and the final hf/ export.
`prepare_output_dir` claims a folder for a run: the same command and config
resume, a different config is refused unless `overwrite` (which deletes the
old run), and a folder that is not a run is never deleted. `read_run` reads
a finished or running run back (for `rlhf-jax export` and `eval`).
"""
from __future__ import annotations

import json
import os
import shutil

from rlhf_jax.cli.config import COMMAND_CONFIGS, ConfigError, config_hash, dump_config, from_dict, to_dict
from rlhf_jax.errors import RunError

__all__ = ["RunError", "CONFIG_FILE", "RUN_FILE", "prepare_output_dir", "read_run"]

CONFIG_FILE = "resolved_config.yaml"
RUN_FILE = "run.json"


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changed_keys(old: dict, new: dict) -> list[str]:
    a, b = _flat(old), _flat(new)
    return sorted(k for k in set(a) | set(b) if k != "output_dir" and a.get(k) != b.get(k))


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def prepare_output_dir(command: str, cfg, *, overwrite: bool) -> bool:
    """Create or check `cfg.output_dir` and write the resolved config into it.

    Returns:
      True when the folder holds an earlier run of the same command and config
      (the driver then resumes from its newest checkpoint).

    Raises:
      RunError: the folder holds a run with another config (without
        `overwrite`), or files that are not an rlhf-jax run (never deleted).
    """
    out = cfg.output_dir
    run_path = os.path.join(out, RUN_FILE)
    digest = config_hash(cfg)
    resume = False
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(run_path):
            raise RunError(f"output_dir {out} is not empty and holds no rlhf-jax run ({RUN_FILE} missing); "
                           "choose another output_dir (nothing was deleted)")
        with open(run_path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("command") == command and previous.get("config_hash") == digest:
            resume = True
        elif not overwrite:
            changed = _changed_keys(previous.get("config", {}), to_dict(cfg))
            what = (f"changed keys: {', '.join(changed[:6])}" if previous.get("command") == command
                    else f"it is a `{previous.get('command')}` run")
            raise RunError(f"output_dir {out} holds a run with a different config ({what}); pass --overwrite "
                           "to replace it, or choose another output_dir")
        elif _is_main_process():
            shutil.rmtree(out)
    elif os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"output_dir {out} exists and is not a folder")
    if not _is_main_process():
        return resume  # on several hosts, process 0 writes the run files
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(f"# rlhf-jax {command}, config hash {digest}\n")
        f.write(dump_config(cfg))
    with open(run_path, "w", encoding="utf-8") as f:
        json.dump({"command": command, "config_hash": digest, "config": to_dict(cfg)}, f, indent=1)
    return resume


def read_run(run_dir: str) -> tuple[str, object]:
    """`(command, config)` of an existing training run folder."""
    run_path = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(run_path):
        raise RunError(f"{run_dir} is not an rlhf-jax run folder ({RUN_FILE} missing)")
    with open(run_path, encoding="utf-8") as f:
        info = json.load(f)
    command = info.get("command")
    if command not in ("sft", "reward", "ppo"):
        raise RunError(f"{run_path}: this is an `rlhf-jax {command}` run, which has no trained model to export")
    try:
        cfg = from_dict(COMMAND_CONFIGS[command], info["config"])
    except ConfigError as e:
        raise RunError(f"{run_path}: the stored config no longer loads ({e})") from None
    return command, cfg
