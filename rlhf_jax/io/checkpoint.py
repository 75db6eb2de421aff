"""Checkpoints of a whole training state, on top of orbax's `CheckpointManager`.

One checkpoint holds two items written together:

- ``"state"``: every array leaf of the train-state pytree (params, all
  optimizer states, step counters, PRNG keys, KL-controller state), saved
  with `ocp.args.StandardSave`;
- ``"host"``: a small JSON document (`ocp.args.JsonSave`) with host-side
  facts: the data position (epoch, index within the epoch), the config and
  its hash, and the leaf paths, shapes and dtypes of the saved state, so a
  mismatch on restore is reported by name instead of as an orbax error.

The state is saved as the flat list of its leaves and rebuilt on restore with
the tree structure of a *freshly initialised* state (the template). Any
pytree therefore round-trips (flax dataclasses, NamedTuples, optax states,
None leaves). The template's leaf paths, shapes and dtypes must equal the
saved ones (checked, with the offending leaf named), and restored arrays take
the template's shardings, so a run resumed on a mesh gets its arrays back
already placed.

Typed PRNG keys (`jax.random.key`) are stored as their raw `uint32` key data
and re-wrapped with the template's key implementation; raw `PRNGKey` arrays
are ordinary `uint32` leaves.

Saving is asynchronous where orbax supports it: `save` returns once the
arrays are copied off the device, and the files are written in the
background. Call `wait_until_finished` (or `close`, or use the object as a
context manager) before the process exits. A checkpoint that was being
written when the process died is never listed (orbax finalises a step
directory atomically), so `latest_step` always names a complete one.

Example:

    with Checkpointer(out_dir / "checkpoints", max_to_keep=3, config=cfg) as ckpt:
        if ckpt.latest_step() is not None:
            state, host = ckpt.restore(state)
        ...
        ckpt.save(step, state, host_state={"epoch": 0, "index": 12})
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax.errors import ConfigMismatchError, LoadError

__all__ = ["Checkpointer", "ConfigMismatchError", "CorruptCheckpointError", "config_to_dict", "config_hash"]


class CorruptCheckpointError(LoadError):
    """A checkpoint whose files cannot be read (a partial or damaged write); names its folder."""

_FORMAT_VERSION = 1


def _json_safe(value: Any) -> Any:
    """Turn a config value into something `json.dumps` writes deterministically."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _json_safe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    # dtypes, enums, callables: their repr is stable enough to tell configs apart
    name = getattr(value, "__name__", None) or getattr(value, "name", None)
    return str(name) if isinstance(name, str) else repr(value)


def config_to_dict(config: Any) -> dict:
    """A JSON-safe dict of a config (a dataclass, a mapping, or None -> {})."""
    if config is None:
        return {}
    safe = _json_safe(config)
    if not isinstance(safe, dict):
        raise TypeError(f"`config` must be a dataclass or a mapping, got {type(config).__name__}")
    return safe


def config_hash(config: Any) -> str:
    """A short, stable SHA-256 hex digest of a config (see `config_to_dict`)."""
    text = json.dumps(config_to_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_typed_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _leaf_to_saveable(leaf: Any) -> jax.Array:
    if _is_typed_key(leaf):
        return jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array):
        return leaf
    return jnp.asarray(leaf)


def _leaf_to_abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    array = _leaf_to_saveable(leaf)
    return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=array.sharding)


def _leaf_from_restored(restored: Any, template: Any) -> Any:
    if _is_typed_key(template):
        return jax.random.wrap_key_data(restored, impl=jax.random.key_impl(template))
    if isinstance(template, jax.Array):
        return restored
    if isinstance(template, np.ndarray):
        return np.asarray(restored)
    if isinstance(template, (bool, int, float, np.generic)):
        return type(template)(np.asarray(restored).item())
    return restored


def _describe(leaves_with_paths) -> tuple[list[str], list[list[int]], list[str]]:
    paths, shapes, dtypes = [], [], []
    for path, leaf in leaves_with_paths:
        array = _leaf_to_saveable(leaf) if not isinstance(leaf, jax.ShapeDtypeStruct) else leaf
        paths.append(jax.tree_util.keystr(path))
        shapes.append([int(d) for d in np.shape(array)])
        dtypes.append(str(array.dtype))
    return paths, shapes, dtypes


def _flatten(tree: Any, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": leaf} (for naming the differing config fields)."""
    if not isinstance(tree, dict):
        return {prefix or "config": tree}
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


class Checkpointer:
    """Save and restore a whole train state plus host-side data with orbax.

    Args:
      directory: where the step directories go (created if missing).
      max_to_keep: keep the newest K checkpoints, delete older ones.
      async_save: write in a background thread after the device-to-host copy.
      config: the run's config (a dataclass or mapping). Its hash is stored
        with every checkpoint and checked on restore.
      allow_config_mismatch: restore even when the stored config differs
        (when False, the error message names the differing fields).
      read_only: only read (export, evaluation of a run folder, possibly
        while its training is still writing): nothing is created, saved,
        deleted or cleaned up. A writer (the default) removes the temporary
        directories of saves that a killed process left unfinished.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                 async_save: bool = True, config: Any = None,
                 allow_config_mismatch: bool = False, read_only: bool = False):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"`max_to_keep` must be a positive int or None, got {max_to_keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.config = config_to_dict(config)
        self.config_hash = config_hash(config)
        self.allow_config_mismatch = allow_config_mismatch
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoint directory {self.directory}")
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save and not read_only,
            create=not read_only,
            read_only=read_only,
            # a save cut short by a kill leaves a temporary directory: remove it on start
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "host"))

    # --- queries ---------------------------------------------------------
    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    # --- save / restore --------------------------------------------------
    def save(self, step: int, state: Any, *, host_state: Mapping[str, Any] | None = None) -> bool:
        """Save `state` and `host_state` as checkpoint `step`.

        Args:
          step: the number of updates the state has seen (a non-negative int).
          state: any pytree of arrays (jax or NumPy) and Python scalars.
          host_state: JSON-serialisable dict (e.g. the data position).

        Returns:
          True if a checkpoint was written; False if `step` already exists.
        """
        if self.read_only:
            raise ValueError(f"this Checkpointer of {self.directory} was opened with read_only=True")
        step = int(step)
        if step < 0:
            raise ValueError(f"`step` must be >= 0, got {step}")
        if step in self._manager.all_steps():
            return False
        leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(state)
        paths, shapes, dtypes = _describe(leaves_with_paths)
        leaves = [_leaf_to_saveable(leaf) for _, leaf in leaves_with_paths]
        host = {
            "format_version": _FORMAT_VERSION,
            "step": step,
            "data": dict(host_state or {}),
            "config_hash": self.config_hash,
            "config": self.config,
            "leaf_paths": paths,
            "leaf_shapes": shapes,
            "leaf_dtypes": dtypes,
        }
        try:
            json.dumps(host)
        except TypeError as err:
            raise TypeError(f"`host_state` must be JSON-serialisable: {err}") from None
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(leaves), host=ocp.args.JsonSave(host)))

    def read_host_state(self, step: int | None = None) -> dict:
        """The JSON item of checkpoint `step` (default: the latest) without the arrays.

        Raises:
          CorruptCheckpointError: the item cannot be read or is not a checkpoint of ours.
        """
        step = self._resolve_step(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))
            host = dict(restored["host"])
        except Exception as e:  # orbax raises many types for missing or damaged files
            raise self._corrupt(step, e) from None
        if not isinstance(host.get("leaf_paths"), list) or "data" not in host:
            raise self._corrupt(step, "its host item lacks the leaf list")
        return host

    def restore(self, template: Any, *, step: int | None = None) -> tuple[Any, dict]:
        """Restore checkpoint `step` (default: the latest) into the structure of `template`.

        Args:
          template: a freshly initialised state with the same tree structure,
            shapes and dtypes as the saved one; restored arrays get its
            shardings.
          step: which checkpoint; None means the latest.

        Returns:
          `(state, host_state)`: the restored pytree and the `host_state`
          dict given to `save`.

        Raises:
          FileNotFoundError: no checkpoint exists (or not `step`).
          ConfigMismatchError: the stored config hash differs from this
            run's and `allow_config_mismatch` is False.
          ValueError: the template's leaves differ from the saved ones.
          CorruptCheckpointError: the checkpoint's files cannot be read.
        """
        step = self._resolve_step(step)
        host = self.read_host_state(step)
        self._check_config(host, step)
        leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
        paths, shapes, dtypes = _describe(leaves_with_paths)
        self._check_structure(host, paths, shapes, dtypes, step)
        abstract = [_leaf_to_abstract(leaf) for _, leaf in leaves_with_paths]
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
        except Exception as e:  # a truncated or missing array file
            raise self._corrupt(step, e) from None
        leaves = [_leaf_from_restored(r, t) for r, (_, t) in zip(restored, leaves_with_paths)]
        return jax.tree_util.tree_unflatten(treedef, leaves), dict(host["data"])

    def reload(self) -> None:
        """Re-read the list of checkpoints from disk (after one was moved away)."""
        self._manager.reload()

    # --- lifecycle -------------------------------------------------------
    def wait_until_finished(self) -> None:
        """Block until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- helpers ---------------------------------------------------------
    def _resolve_step(self, step: int | None) -> int:
        steps = self._manager.all_steps()
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available: {sorted(steps)}")
        return int(step)

    def _corrupt(self, step: int, cause) -> CorruptCheckpointError:
        detail = " ".join(str(cause).split())[:200] if not isinstance(cause, str) else cause
        kind = type(cause).__name__ + ": " if not isinstance(cause, str) else ""
        return CorruptCheckpointError(f"checkpoint {os.path.join(self.directory, str(step))} cannot be read "
                                      f"({kind}{detail})")

    def _check_config(self, host: dict, step: int) -> None:
        stored = host.get("config_hash")
        if stored == self.config_hash or self.allow_config_mismatch:
            return
        old, new = _flatten(host.get("config", {})), _flatten(self.config)
        keys = sorted(set(old) | set(new))
        diffs = [f"{k}: checkpoint={old.get(k, '<absent>')!r} run={new.get(k, '<absent>')!r}"
                 for k in keys if old.get(k, "<absent>") != new.get(k, "<absent>")]
        detail = "; ".join(diffs) if diffs else "(hashes differ)"
        raise ConfigMismatchError(
            f"the config differs from the one of checkpoint {step} in {self.directory}: {detail}. "
            "Use a fresh output directory, or pass allow_config_mismatch=True to resume anyway.")

    def _check_structure(self, host, paths, shapes, dtypes, step) -> None:
        saved_paths = host.get("leaf_paths", [])
        if saved_paths != paths:
            missing = [p for p in saved_paths if p not in paths][:5]
            extra = [p for p in paths if p not in saved_paths][:5]
            raise ValueError(
                f"`template` does not match the state saved in checkpoint {step}: "
                f"{len(saved_paths)} saved leaves vs {len(paths)} in the template; "
                f"saved but not in template: {missing}; in template but not saved: {extra}")
        for path, saved_shape, shape, saved_dtype, dtype in zip(
                paths, host["leaf_shapes"], shapes, host["leaf_dtypes"], dtypes):
            if list(saved_shape) != list(shape) or saved_dtype != dtype:
                raise ValueError(
                    f"`template` leaf {path} is {dtype}{shape} but checkpoint {step} "
                    f"saved {saved_dtype}{saved_shape}")
