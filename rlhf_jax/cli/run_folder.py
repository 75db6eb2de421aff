"""Run folders: one folder per run, tied to one config, used by one process at a time.

A run folder holds `run.json` (`command`, `config_hash`, `config`) and
`resolved_config.yaml` next to what the drivers write (checkpoints/,
metrics.jsonl, TensorBoard events) and the final hf/ export.

`claim_run_folder` claims a folder for a run, after the config and the data
were validated:

- it takes an exclusive lock (`fcntl.flock` on `.rlhf_jax.lock`, which holds
  the owner's pid) for as long as the run lives: a second process exits at
  once with `RunLockedError` naming the folder and that pid;
- the same command and config resume; a config that differs only in keys that
  do not change the math of the steps done (`RESUMABLE_KEYS`: the run length,
  logging and checkpoint settings) resumes too, and is written as the new
  config; any other difference is refused, naming each differing key;
- `overwrite=True` moves the old run aside into `.replaced/` and removes it
  only when the new run calls `commit_overwrite` (after its first checkpoint);
  any failure before that puts the old run back (on exit from the `with`
  block, or, after a kill, when the folder is next claimed). A new run that
  fails before its first checkpoint leaves no run behind either, so the
  corrected command is not refused as "a different config";
- a folder that is not a run is never touched.

`read_run` reads a finished or running run back (for `rlhf-jax export` and `eval`).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil

from rlhf_jax.cli.config import (
    COMMAND_CONFIGS,
    RESUMABLE_KEYS,
    ConfigError,
    config_hash,
    dump_config,
    from_dict,
    to_dict,
)
from rlhf_jax.cli.yaml_config import flat_dict
from rlhf_jax.errors import RunError, RunLockedError

__all__ = ["RunError", "RunLockedError", "CONFIG_FILE", "RUN_FILE", "LOCK_FILE", "RunFolder", "claim_run_folder",
           "read_run", "config_changes"]

CONFIG_FILE = "resolved_config.yaml"
RUN_FILE = "run.json"
LOCK_FILE = ".rlhf_jax.lock"
REPLACED_DIR = ".replaced"
_OURS = (LOCK_FILE, REPLACED_DIR)


def config_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts (where the run is written aside)."""
    a, b = flat_dict(old), flat_dict(new)
    missing = object()
    return sorted(k for k in set(a) | set(b)
                  if k not in ("output_dir", "run.output_dir") and a.get(k, missing) != b.get(k, missing))


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def _describe(key: str, old: dict, new: dict) -> str:
    a, b = flat_dict(old), flat_dict(new)
    return f"{key} ({a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r})"


class RunFolder:
    """A claimed run folder; holds the lock until `close` (use it as a context manager).

    Attributes:
      path: the folder.
      resume: it holds an earlier run of this config (the driver resumes from its checkpoints).
    """

    def __init__(self, path: str, lock_fd: int | None, resume: bool, replaced: bool):
        self.path = path
        self.resume = resume
        self._lock_fd = lock_fd
        self._replaced = replaced
        self._fresh = False  # no run was here: a failure before the first checkpoint clears the folder
        self._created = False  # the folder itself was made by this claim

    @property
    def replaced_dir(self) -> str:
        return os.path.join(self.path, REPLACED_DIR)

    def commit_overwrite(self, *_ignored) -> None:
        """The new run is established (first checkpoint on disk): delete the run it replaced."""
        if self._replaced:
            shutil.rmtree(self.replaced_dir, ignore_errors=True)
            self._replaced = False
        self._fresh = False

    def rollback(self) -> None:
        """The new run failed before its first checkpoint: put back what the folder held before."""
        if self._replaced:
            _restore_replaced(self.path)
            self._replaced = False
        elif self._fresh:
            _clear(self.path)
        self._fresh = False

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
            if self._created and os.listdir(self.path) == [LOCK_FILE]:
                shutil.rmtree(self.path, ignore_errors=True)  # a folder this run made and left empty

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self.rollback()
        finally:
            self.close()


def _clear(out: str) -> None:
    """Remove everything of `out` but its lock and `.replaced/`."""
    for name in os.listdir(out):
        if name in _OURS:
            continue
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _restore_replaced(out: str) -> None:
    """Remove what a new run wrote and move the replaced run back from `.replaced/`."""
    aside = os.path.join(out, REPLACED_DIR)
    _clear(out)
    for name in os.listdir(aside):
        os.replace(os.path.join(aside, name), os.path.join(out, name))
    os.rmdir(aside)


def _lock(out: str) -> int:
    path = os.path.join(out, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise RunLockedError(f"output_dir {out} is in use by another rlhf-jax process (pid {holder}); wait for "
                             "it to finish or choose another run.output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _has_checkpoint(out: str) -> bool:
    ckpt = os.path.join(out, "checkpoints")
    return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def claim_run_folder(command: str, cfg, out: str, *, overwrite: bool) -> RunFolder:
    """Lock `out` for this run, check it against the run it may hold, and write the config into it.

    Args:
      command: the subcommand (sft, reward, dpo, ppo, eval).
      cfg: its resolved, validated config.
      out: the output folder.
      overwrite: replace a run with another config (moved aside until `commit_overwrite`).

    Returns:
      A `RunFolder` (a context manager that releases the lock and, on an exception
      before `commit_overwrite`, puts a replaced run back).

    Raises:
      RunLockedError: another process holds the folder (its pid is named).
      RunError: the folder holds a run with another config (without `overwrite`),
        files that are not an rlhf-jax run (never touched), or is a file.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"output_dir {out} exists and is not a folder")
    entries = [n for n in os.listdir(out) if n not in _OURS] if os.path.isdir(out) else []
    has_run = os.path.isfile(os.path.join(out, RUN_FILE)) or os.path.isdir(os.path.join(out, REPLACED_DIR))
    if entries and not has_run:
        raise RunError(f"output_dir {out} is not empty and holds no rlhf-jax run ({RUN_FILE} missing); "
                       "choose another output_dir (nothing was deleted)")
    if not _is_main_process():  # on several hosts, process 0 guards and writes the run files
        return RunFolder(out, None, resume=bool(entries), replaced=False)
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    fd = _lock(out)
    folder = RunFolder(out, fd, resume=False, replaced=False)
    folder._created = created
    try:
        if os.path.isdir(os.path.join(out, REPLACED_DIR)):
            # an --overwrite that was killed: keep the new run if it got a checkpoint, else the old one
            if _has_checkpoint(out):
                shutil.rmtree(os.path.join(out, REPLACED_DIR))
            else:
                _restore_replaced(out)
                print(f"[rlhf-jax] {out}: an interrupted --overwrite left the old run aside; it was put back",
                      flush=True)
        _check_previous(command, cfg, out, folder, overwrite=overwrite)
        digest = config_hash(cfg)
        with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
            f.write(f"# rlhf-jax {command}, config hash {digest}\n")
            f.write(dump_config(cfg))
        with open(os.path.join(out, RUN_FILE), "w", encoding="utf-8") as f:
            json.dump({"command": command, "config_hash": digest, "config": to_dict(cfg)}, f, indent=1)
    except BaseException:
        folder.rollback()
        folder.close()
        raise
    return folder


def _check_previous(command: str, cfg, out: str, folder: RunFolder, *, overwrite: bool) -> None:
    run_path = os.path.join(out, RUN_FILE)
    if not os.path.isfile(run_path):
        folder._fresh = True
        return
    try:
        with open(run_path, encoding="utf-8") as f:
            previous = json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{run_path} cannot be read ({e}); move the folder away or choose another "
                       "output_dir") from None
    old, new = previous.get("config", {}), to_dict(cfg)
    changed = config_changes(old, new)
    blocking = [k for k in changed if k not in RESUMABLE_KEYS]
    if previous.get("command") == command and not blocking:
        folder.resume = True
        if changed:
            print(f"[rlhf-jax] resuming with changed {', '.join(_describe(k, old, new) for k in changed)}",
                  flush=True)
        return
    if not overwrite:
        if previous.get("command") != command:
            what = f"it is a `{previous.get('command')}` run"
        else:
            what = ("changed keys that a resumed run cannot change: "
                    + ", ".join(_describe(k, old, new) for k in blocking))
        raise RunError(f"output_dir {out} holds a run with a different config ({what}); only the run length "
                       "and logging/checkpoint settings may change on resume. Pass --overwrite to replace it "
                       "(the old run is kept until the new one has written its first checkpoint), or choose "
                       "another run.output_dir")
    aside = os.path.join(out, REPLACED_DIR)
    os.makedirs(aside)
    for name in os.listdir(out):
        if name not in _OURS:
            os.replace(os.path.join(out, name), os.path.join(aside, name))
    folder._replaced = True


def read_run(run_dir: str) -> tuple[str, object]:
    """`(command, config)` of an existing training run folder."""
    run_path = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(run_path):
        raise RunError(f"{run_dir} is not an rlhf-jax run folder ({RUN_FILE} missing)")
    try:
        with open(run_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{run_path} cannot be read ({e})") from None
    command = info.get("command")
    if command not in ("sft", "reward", "dpo", "ppo", "rl"):
        raise RunError(f"{run_path}: this is an `rlhf-jax {command}` run, which has no trained model to export")
    try:
        cfg = from_dict(COMMAND_CONFIGS[command], info["config"])
    except ConfigError as e:
        raise RunError(f"{run_path}: the stored config no longer loads ({e})") from None
    return command, cfg
