"""Driver loops: `fit_sft`, `fit_reward`, `fit_dpo`, `fit_ppo`.

A driver is the thin host-side loop around a jitted step: it orders the data,
feeds fixed-shape batches, logs (`rlhf_jax.io.metrics.MetricsLogger`), saves
checkpoints (`rlhf_jax.io.checkpoint.Checkpointer`), and resumes a killed run
from its newest checkpoint so that it continues exactly as if it had never
stopped (same batches, same PRNG draws, same metrics bit for bit on CPU).

Data order. Epoch `e` visits the rows in the order of a permutation drawn
from NumPy's PCG64 seeded with `(cfg.seed, e)`; a step takes the next
`cfg.batch_size` rows of it. The last partial batch of an epoch is DROPPED
(every batch has the same shape, so the step compiles once); with N rows an
epoch has `N // batch_size` steps. Because the order is a function of the
seed and the epoch, the data position (epoch, index within the epoch) saved
with each checkpoint is all a resumed run needs to see the same batches.

Output directory layout:

    output_dir/metrics.jsonl     one JSON line per logged step (see MetricsLogger)
    output_dir/tb/               TensorBoard events
    output_dir/checkpoints/<step>/   orbax checkpoints (state + host JSON)
    output_dir/reference_logprobs.npz   DPO: the precomputed reference log-probs (read back on resume)

Run options. Every driver takes a `RunOptions` (`rlhf_jax.train.options`):
output folder, seed (data order and PRNG), checkpoint period and count, logging
sinks and periods, and the device mesh.

Resuming. With `run.resume=True` (the default) a driver restores the newest
readable checkpoint in `output_dir/checkpoints` (after checking that its
config, seed and data fingerprint equal this run's), truncates `metrics.jsonl`
to the steps it covers, and continues. The checked config is the math of the
steps: the trainer config without its run length (`num_epochs`), with the
schedule length it resolved, so a run may be extended when its schedule does
not depend on the run length. A checkpoint that cannot be read (a partial or
corrupted write) is moved to `output_dir/corrupt_checkpoints/` with a warning
naming it, and the next older one is tried; only when none is readable is it
an error naming the folder. A fresh run (no checkpoint) empties an old
`metrics.jsonl`. `run.resume=False` with existing checkpoints is an error.

Interruption. SIGINT and SIGTERM (in the main thread) let the current step
finish, save a checkpoint of it, and raise `RunInterrupted` (exit status
128 + signal number at the CLI); the same command resumes it exactly. A second
signal stops at once (KeyboardInterrupt).

Sharding. With `mesh` (from `rlhf_jax.train.sharding.make_mesh`) the state is
created under `jit` with `param_shardings` as its output shardings (FSDP when
the mesh's "fsdp" axis is larger than 1, tensor-parallel rules when its
"tensor" axis is), frozen params are placed the same way, batches with
`shard_batch`, and every step is jitted with explicit shardings: the state and
the frozen arguments (LoRA's base, DPO's reference) by `param_shardings` as
`in_shardings`, batch columns split along their rows, the state's own
shardings as `out_shardings` (it is donated and keeps its layout); the RL
trainer's phases likewise (`RLTrainer.with_mesh`). Without a mesh everything
runs on the default device.

Metrics. Each logged step fetches its metrics with one `jax.device_get`;
the driver adds ``epoch``, ``time/step`` (wall clock since the previous
logged step) and, for SFT, ``tokens_per_s``. A skipped non-finite update
and, for PPO, a k1 KL estimate that stays negative over a window, are
reported as warnings (Python `logging` and the JSON line).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import threading
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from rlhf_jax.errors import LoadError, RunInterrupted, TrainingStalledError
from rlhf_jax.io.checkpoint import Checkpointer, CorruptCheckpointError
from rlhf_jax.io.metrics import KLSignMonitor, MetricsLogger, to_python
from rlhf_jax.io.metrics import logger as _log
from rlhf_jax.models.lora import combine
from rlhf_jax.train.options import RunOptions
from rlhf_jax.train.sharding import (
    FSDP_AXIS,
    batch_sharding,
    make_mesh,
    mesh_batch_size,
    param_shardings,
    place,
    replicated,
    shard_batch,
)

__all__ = ["fit_sft", "fit_reward", "fit_dpo", "fit_ppo", "rollout_samples", "REF_LOGPROBS_FILE", "epoch_permutation",
           "batch_rows"]

_SFT_KEYS = ("input_ids", "attention_mask", "loss_mask")
_PAIR_KEYS = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")
_PROMPT_KEYS = ("prompt_ids", "prompt_mask")


# --------------------------------------------------------------------------- data order


def epoch_permutation(num_rows: int, *, seed: int, epoch: int) -> np.ndarray:
    """The row order of epoch `epoch`: a permutation of `range(num_rows)` from `(seed, epoch)`."""
    return np.random.Generator(np.random.PCG64([int(seed), int(epoch)])).permutation(num_rows)


def batch_rows(step: int, *, num_rows: int, batch_size: int, seed: int) -> tuple[int, int, np.ndarray]:
    """The data rows of global step `step` (0-based): `(epoch, index_in_epoch, rows)`.

    The last partial batch of each epoch is dropped, so an epoch has
    `num_rows // batch_size` steps.
    """
    per_epoch = num_rows // batch_size
    if per_epoch < 1:
        raise ValueError(f"`batch_size` ({batch_size}) is larger than the data ({num_rows} rows)")
    epoch, index = divmod(int(step), per_epoch)
    perm = epoch_permutation(num_rows, seed=seed, epoch=epoch)
    return epoch, index, perm[index * batch_size:(index + 1) * batch_size]


class _Order:
    """Caches one epoch's permutation (drawing it per step would cost O(N) each)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.per_epoch = num_rows // batch_size
        self._epoch, self._perm = None, None

    def rows(self, step: int) -> tuple[int, int, np.ndarray]:
        epoch, index = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = epoch_permutation(self.num_rows, seed=self.seed, epoch=epoch)
        return epoch, index, self._perm[index * self.batch_size:(index + 1) * self.batch_size]


def _check_data(data: Any, keys: tuple[str, ...], name: str) -> tuple[dict[str, np.ndarray], int]:
    """NumPy arrays for `keys` of `data`, all with the same number of rows."""
    if not isinstance(data, Mapping):
        raise TypeError(f"`{name}` must be a dict of arrays with keys {list(keys)}, "
                        f"got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"`{name}` is missing keys {missing}; it has {sorted(data)}")
    arrays = {k: np.asarray(v) for k, v in data.items()}
    rows = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
    n = rows[keys[0]]
    if n is None or any(r != n for r in rows.values()):
        raise ValueError(f"every array of `{name}` needs the same number of rows, got {rows}")
    if n == 0:
        raise ValueError(f"`{name}` is empty (0 rows)")
    return arrays, n


def _fingerprint(arrays: Mapping[str, np.ndarray]) -> dict:
    """Shapes, dtypes and a content hash of the data, so a resume on other data is caught."""
    digest = hashlib.blake2b(digest_size=12)
    out = {}
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        digest.update(key.encode())
        digest.update(a.tobytes())
        out[key] = [list(a.shape), str(a.dtype)]
    return {"arrays": out, "hash": digest.hexdigest()}


def _num_steps(per_epoch: int, num_epochs: int | None, max_steps: int | None) -> int:
    if max_steps is not None and (not isinstance(max_steps, (int, np.integer)) or max_steps < 1):
        raise ValueError(f"`max_steps` must be a positive int or None, got {max_steps!r}")
    if num_epochs is None:
        return int(max_steps) if max_steps is not None else per_epoch
    if num_epochs < 1:
        raise ValueError(f"`num_epochs` must be >= 1, got {num_epochs}")
    total = per_epoch * int(num_epochs)
    return min(total, int(max_steps)) if max_steps is not None else total


def _with_schedule_length(cfg, total_updates: int):
    """`cfg` with `optimizer.total_steps` filled in when a decaying schedule needs it."""
    opt = cfg.optimizer
    if opt.total_steps is None and opt.schedule != "constant":
        return dataclasses.replace(cfg, optimizer=dataclasses.replace(opt, total_steps=int(total_updates)))
    return cfg


def _math_config(kind: str, cfg, seed: int, fingerprint: dict) -> dict:
    """What a checkpoint must share with a run that resumes it: the config without its run
    length (a run may be extended), the seed and the data."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "num_epochs"}
    return {"driver": kind, "cfg": fields, "seed": int(seed), "data": fingerprint}


def _plain(value):
    """A config dataclass as nested dicts / lists of JSON-able values (for the W&B run config)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def mesh_from_options(run: RunOptions):
    """The `make_mesh` mesh of `run.mesh`, or None for one device without sharding."""
    if run.mesh.single_device:
        return None
    return make_mesh(data=None if run.mesh.data == -1 else run.mesh.data, fsdp=run.mesh.fsdp,
                     tensor=run.mesh.tensor)


class _StopSignals:
    """SIGINT / SIGTERM set a flag that the loop reads after each step (main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt  # a second signal: stop now
        self.received = signum
        _log.warning(f"{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint "
                     "(send it again to stop at once)")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# --------------------------------------------------------------------------- the engine


class _Run:
    """Shared set-up and bookkeeping of the drivers (checkpointing, logging, mesh, signals)."""

    def __init__(self, *, kind: str, cfg, fingerprint: dict, run: RunOptions, mesh, total_steps: int,
                 allow_config_mismatch: bool, on_checkpoint: Callable | None):
        if not isinstance(run, RunOptions):
            raise TypeError(f"`run` must be a RunOptions, got {type(run).__name__}")
        if run.output_dir is None:
            raise ValueError("`run.output_dir` is required")
        self.output_dir = os.fspath(run.output_dir)
        self.mesh = mesh
        self.log_every = run.log_every
        self.checkpoint_every = run.checkpoint_every
        self.total_steps = total_steps
        self.resume = run.resume
        self.ckpt = Checkpointer(
            os.path.join(self.output_dir, "checkpoints"), max_to_keep=run.keep,
            async_save=run.async_checkpoint, config=_math_config(kind, cfg, run.seed, fingerprint),
            allow_config_mismatch=allow_config_mismatch)
        self._logger_kwargs = dict(stdout=run.stdout, tensorboard=run.tensorboard,
                                   print_every=run.print_every or 10 * self.log_every,
                                   total_steps=total_steps, progress=run.progress)
        self._stdout = run.stdout
        self._run_options = run
        self._wandb_config = {"driver": kind, "train": _plain(cfg), "seed": int(run.seed)}
        self._on_checkpoint = on_checkpoint
        self._saved: int | None = None
        self.logger: MetricsLogger | None = None
        self._last_time = None
        self.signals = _StopSignals()

    # -- state placement and resume ------------------------------------------------
    def shardings(self, tree):
        if self.mesh is None:
            return None
        fsdp = self.mesh.shape[FSDP_AXIS] > 1
        return param_shardings(tree, self.mesh, fsdp=fsdp)

    def place(self, tree, *, copy: bool = False):
        """`tree` on the mesh (its `param_shardings`), or committed to the default device.

        Committing the fresh state too makes it look exactly like a restored one (orbax
        returns committed arrays), so an uninterrupted and a resumed run compile the same
        executable. `copy=True` never aliases the caller's buffers: the supervised steps
        donate their state, which must not delete the params the user passed in. A leaf
        already laid out as wanted (e.g. loaded straight into its shards) is not moved; a
        host or single-device leaf is spread with `place`, each process copying only its
        own devices' slices.
        """
        if tree is None:
            return tree
        if copy:
            # an explicit copy: `device_put(..., may_alias=False)` still aliases a shard
            # when it replicates a single-device array over a mesh
            tree = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, tree)
        if self.mesh is None:
            device = jax.config.jax_default_device or jax.local_devices()[0]
            return jax.device_put(tree, device)

        def move(x, sharding):
            if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() > 1:
                x = np.asarray(x)
            return place(x, sharding)

        return jax.tree.map(move, tree, self.shardings(tree))

    def init_state(self, init_fn, *args):
        """`init_fn(*args)` (a fresh train state) computed under `jit` with the state's shardings
        as `out_shardings`: optimizer moments are born in their shards, never whole on one device.

        `args` (the params pytrees) are placed first (see `place`); the output shares no
        buffer with them, so the caller's params survive a step that donates its state.
        """
        args = tuple(self.place(a) for a in args)
        abstract = jax.eval_shape(init_fn, *args)
        if self.mesh is None:
            device = jax.config.jax_default_device or jax.local_devices()[0]
            out = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), abstract)
        else:
            out = self.shardings(abstract)
        return jax.jit(init_fn, out_shardings=out)(*args)

    def restore_or_start(self, state) -> tuple[Any, int]:
        """The restored state and its step (or `state` and 0); opens the logger."""
        start = 0
        steps = self.ckpt.all_steps()
        if steps and not self.resume:
            self.ckpt.close()
            raise ValueError(
                f"`output_dir` {self.output_dir} already holds checkpoints (newest: step {steps[-1]}) "
                "and resume=False; use a new output_dir or delete the old one")
        for step in reversed(steps):
            try:
                restored, host = self.ckpt.restore(state, step=step)
            except CorruptCheckpointError as e:
                moved = self._quarantine(step)
                _log.warning(f"{e}; moved it to {moved}, trying the previous checkpoint")
                if self._stdout:
                    print(f"warning: {e}; moved it to {moved}", flush=True)
                continue
            state, start = restored, int(host.get("step", step))
            message = (f"resuming from checkpoint step {start} (epoch {host.get('epoch')}, "
                       f"index {host.get('index')}) in {self.output_dir}")
            _log.info(message)
            if self._stdout:
                print(message, flush=True)
            break
        else:
            if steps:
                self.ckpt.close()
                raise LoadError(f"no readable checkpoint in {self.ckpt.directory} (all of steps {steps} are "
                                f"corrupted; moved to {os.path.join(self.output_dir, 'corrupt_checkpoints')})")
        self.logger = MetricsLogger(self.output_dir, resume_step=start, sinks=self._sinks(),
                                    **self._logger_kwargs)
        self._last_time = time.perf_counter()
        return state, start

    def _sinks(self) -> list:
        """The sinks `run` asks for beyond metrics.jsonl and TensorBoard (W&B)."""
        w = self._run_options.wandb
        if not w.enabled:
            return []
        from rlhf_jax.io.sinks import WandbSink

        return [WandbSink(self.output_dir, project=w.project, entity=w.entity, name=w.name, group=w.group,
                          tags=w.tags, mode=w.mode, config=self._wandb_config, option="run.wandb.enabled")]

    def _quarantine(self, step: int) -> str:
        """Move an unreadable checkpoint out of orbax's sight (never delete what a user may inspect)."""
        source = os.path.join(self.ckpt.directory, str(step))
        target_dir = os.path.join(self.output_dir, "corrupt_checkpoints")
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(source, target)
        self.ckpt.reload()
        return target

    # -- per step ------------------------------------------------------------------
    def should_log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    @staticmethod
    def due(step: int, every: int | None) -> bool:
        """`step` is a multiple of `every` (None: never)."""
        return every is not None and step % every == 0

    def eval_due(self, step: int, every: int | None) -> bool:
        """Evaluate every `every` steps and at the last step."""
        return step == self.total_steps or self.due(step, every)

    def log_samples(self, step: int, rows, *, step_key: str = "step") -> None:
        """Sample completions of `step` to samples.jsonl and every sink (see `MetricsLogger.log_samples`)."""
        self.logger.log_samples(step, rows[:self._run_options.num_logged_samples], step_key=step_key)

    def fetch(self, metrics: Mapping[str, Any]) -> dict:
        """One `device_get` of the whole metrics dict (as Python numbers), plus `time/step`."""
        host = {k: to_python(v) for k, v in jax.device_get(dict(metrics)).items()}
        now = time.perf_counter()
        host["time/step"] = (now - self._last_time) / self.log_every
        self._last_time = now
        return host

    def warn_if_skipped(self, step: int, host: Mapping[str, Any]) -> None:
        skipped = host.get("skipped_nonfinite")
        if isinstance(skipped, (int, float)) and skipped > 0:
            self.logger.warn(f"step {step}: non-finite loss, gradients or scores; the update was "
                             "skipped (params and optimizer state unchanged)")

    def log(self, step: int, host: dict, on_step: Callable | None) -> dict:
        if on_step is not None:
            extra = on_step(step, dict(host))
            if extra is not None:
                if not isinstance(extra, Mapping):
                    raise TypeError("`on_step` must return a dict of metrics or None, "
                                    f"got {type(extra).__name__}")
                host.update(extra)
        return self.logger.log(step, host)

    def maybe_save(self, step: int, state, position: dict) -> None:
        """Save on the schedule and at the end; on a stop signal save and raise `RunInterrupted`."""
        due = self.checkpoint_every is not None and (step % self.checkpoint_every == 0 or step == self.total_steps)
        stop = self.signals.received
        if due or stop is not None:
            self.ckpt.save(step, state, host_state={"step": step, **position})
            if self._saved is None or stop is not None:
                # the first checkpoint (the CLI's --overwrite waits for it) and an interrupted
                # run's last one must be on disk before anything else happens
                self.ckpt.wait_until_finished()
                if self._saved is None and self._on_checkpoint is not None:
                    self._on_checkpoint(step)
            self._saved = step
        if stop is not None and step < self.total_steps:
            raise RunInterrupted(stop, step=step, where=os.path.join(self.output_dir, "checkpoints"))

    def close(self) -> None:
        self.ckpt.close()
        if self.logger is not None:
            self.logger.close()


def _eval_metrics(values: Mapping[str, Any]) -> dict:
    """An `eval_fn`'s dict as ``eval/<name>`` host metrics."""
    if not isinstance(values, Mapping):
        raise TypeError(f"`eval_fn` must return a dict of metrics, got {type(values).__name__}")
    return {f"eval/{k}": to_python(v) for k, v in jax.device_get(dict(values)).items()}


def _position(step_done: int, per_epoch: int) -> dict:
    epoch, index = divmod(step_done, per_epoch)
    return {"epoch": epoch, "index": index}


def _check_model_inputs(model, pairs) -> None:
    """Eager vocab / shape / context checks through the model's `check_inputs`, if it has one."""
    check = getattr(model, "check_inputs", None)
    if check is None:
        return
    for ids, mask in pairs:
        check(ids, mask)


def _jit_step(step_fn, run: _Run, state, arrays, step_args):
    """`step_fn(state, batch, *step_args)` jitted with its state donated; on a mesh with
    `in_shardings` (the state and the frozen arguments by `param_shardings`, every batch
    column split along its rows) and `out_shardings` (the state as it came in, metrics
    replicated)."""
    if run.mesh is None:
        return jax.jit(step_fn, donate_argnums=0)
    state_sh = run.shardings(state)
    batch_sh = {k: batch_sharding(run.mesh, np.ndim(v)) for k, v in arrays.items()}
    args_sh = tuple(run.shardings(a) for a in step_args)
    return jax.jit(step_fn, donate_argnums=0, in_shardings=(state_sh, batch_sh, *args_sh),
                   out_shardings=(state_sh, replicated(run.mesh)))


def _fit_supervised(*, kind, model, params, data, cfg, run, keys, init_fn, make_step, tx, mesh, max_steps,
                    on_step, on_checkpoint, allow_config_mismatch, eval_fn=None, eval_every=None,
                    return_state=False, optional_keys=(), input_pairs=(), setup=None, frozen=None,
                    sample_fn=None):
    """The loop of every offline trainer (SFT, reward model, DPO): one jitted step per batch.

    `keys` (+ those of `optional_keys` present) are the data columns a batch carries;
    `input_pairs` the (ids, mask) columns checked against the model. `setup(driver, arrays,
    start, frozen) -> (arrays, step_args)`, called once the state is restored (start = its
    step; frozen = LoRA's base weights as placed, or None),
    may add columns (DPO's reference log-probs) and extra step arguments (a frozen
    reference); the data fingerprint is taken before it, on the given columns. Without
    `setup` the step's extra argument is `frozen` (LoRA's base weights, or None).
    """
    from rlhf_jax.train.state import optimizer_from_config

    if eval_every is None:
        eval_every = run.eval_every

    arrays, n = _check_data(data, keys, "data" if kind == "sft" else "train_data")
    batch_size = int(cfg.batch_size)
    if n < batch_size:
        raise ValueError(f"the data has {n} rows, fewer than `batch_size` ({batch_size}): "
                         "no full batch can be formed")
    if mesh is None:
        mesh = mesh_from_options(run)
    if mesh is not None:
        n_dev = mesh_batch_size(mesh)
        if batch_size % n_dev:
            raise ValueError(f"`batch_size` ({batch_size}) must be divisible by the mesh's {n_dev} "
                             "batch shards (data x fsdp)")
    order = _Order(n, batch_size, run.seed)
    total = _num_steps(order.per_epoch, cfg.num_epochs, max_steps)
    if tx is None:
        cfg = _with_schedule_length(cfg, total)
        tx = optimizer_from_config(cfg.optimizer)
    arrays = {k: arrays[k] for k in tuple(keys) + tuple(k for k in optional_keys if k in arrays)}
    _check_model_inputs(model, [(arrays[ids], arrays[mask]) for ids, mask in input_pairs])

    driver = _Run(kind=kind, cfg=cfg, fingerprint=_fingerprint(arrays), run=run, mesh=mesh, total_steps=total,
                  allow_config_mismatch=allow_config_mismatch, on_checkpoint=on_checkpoint)
    try:
        state = driver.init_state(lambda p: init_fn(model, p, tx, seed=run.seed), params)
        state, start = driver.restore_or_start(state)
        frozen = driver.place(frozen)  # LoRA's base weights: an argument of every step, never trained
        step_args = (frozen,)
        if setup is not None:
            arrays, step_args = setup(driver, arrays, start, frozen)
        step_fn = _jit_step(make_step(model, tx, cfg), driver, state, arrays, step_args)
        with driver.signals:
            for step in range(start, total):
                epoch, _, rows = order.rows(step)
                batch = {k: v[rows] for k, v in arrays.items()}
                if mesh is not None:
                    batch = shard_batch(batch, mesh)
                state, metrics = step_fn(state, batch, *step_args)
                done = step + 1
                evaluate = eval_fn is not None and driver.eval_due(done, eval_every)
                if driver.should_log(done) or evaluate:
                    host = driver.fetch(metrics)
                    host["epoch"] = epoch
                    if "tokens" in host:
                        host["tokens_per_s"] = float(host["tokens"]) / max(host["time/step"], 1e-9)
                    if evaluate:
                        host.update(_eval_metrics(eval_fn(combine(frozen, state.params))))
                    driver.warn_if_skipped(done, host)
                    driver.log(done, host, on_step)
                if sample_fn is not None and driver.due(done, run.log_samples_every):
                    driver.log_samples(done, list(sample_fn(combine(frozen, state.params))))
                driver.maybe_save(done, state, _position(done, order.per_epoch))
        history = list(driver.logger.history)
    finally:
        driver.close()
    if return_state:
        return state.params, history, state
    return state.params, history


# --------------------------------------------------------------------------- public drivers

_COMMON_DOC = """
      run: `RunOptions`: output_dir (required), seed (data order and PRNG), checkpoint_every,
        keep, log_every, print_every, the logging sinks (stdout, tensorboard, progress, wandb),
        log_samples_every and num_logged_samples (samples.jsonl), eval_every,
        async_checkpoint, resume, mesh.
      tx: the optimizer; default `optimizer_from_config(cfg.optimizer)` (with `total_steps`
        filled in from the run length when a decaying schedule needs it).
      mesh: a `make_mesh` mesh; default: the one `run.mesh` describes (None for one device).
      max_steps: stop after this many steps in total (counting restored ones).
      on_step: `on_step(step, metrics) -> dict | None`, called at each logged step
        with the host metrics before they are written; a returned dict is added to
        the step's record (values must be deterministic for resumes to match).
      eval_every: evaluate (see `eval_data` / `eval_fn`) every N steps and at the last one,
        logged as ``eval/<name>``; default `run.eval_every` (None: only at the end).
      on_checkpoint: `on_checkpoint(step)`, called once, when the run's first checkpoint
        is on disk (the CLI's `--overwrite` removes the old run then).
      allow_config_mismatch: resume even if cfg / seed / data differ from the checkpoint's.
      return_state: also return the final train state (3-tuple).

    Raises:
      RunInterrupted: SIGINT / SIGTERM arrived; the step it interrupted finished and was
        checkpointed, so calling again with the same arguments resumes it.
"""


def fit_sft(lm, params, data: Mapping[str, np.ndarray], cfg, run: RunOptions, *, eval_data=None,
            eval_every: int | None = None, eval_batch_size: int | None = None, sample_fn: Callable | None = None,
            tx=None, mesh=None, max_steps: int | None = None, on_step: Callable | None = None,
            on_checkpoint: Callable | None = None, allow_config_mismatch: bool = False,
            return_state: bool = False, frozen=None):
    """Supervised fine-tuning of `lm` for `cfg.num_epochs` epochs (or `max_steps` steps).

    Args:
      lm: the `LM` (closed over by the step).
      params: its initial trained parameters (with LoRA: the adapters only).
      frozen: with LoRA, the frozen base weights (`lora.partition`), passed to every step
        as an argument; the returned params are the trained part only. None otherwise.
      data: {"input_ids", "attention_mask", "loss_mask"}: `[N, L]` NumPy arrays
        (right-padded; `loss_mask` is 1 on completion tokens).
      cfg: `SFTConfig` (batch_size, num_epochs, optimizer, ...).
      eval_data: held-out rows (same keys); their token-mean loss and token accuracy
        (`evaluate_sft`) are logged as "eval/loss", "eval/token_accuracy".
      eval_batch_size: evaluate in chunks of this many rows (default `cfg.batch_size`).
      sample_fn: `sample_fn(params) -> list of dicts` (prompt, completion, ...), called
        every `run.log_samples_every` steps; the rows go to samples.jsonl and the sinks.
    {common}
    Returns:
      `(params, history)`: final params, and the list of logged records (the
      lines of metrics.jsonl, including those of a run this one resumed).
    """
    from rlhf_jax.train.sft import evaluate_sft, make_sft_step, sft_init

    eval_fn = None
    if eval_data is not None:
        eval_arrays, _ = _check_data(eval_data, _SFT_KEYS, "eval_data")
        eval_arrays = {k: eval_arrays[k] for k in _SFT_KEYS}
        _check_model_inputs(lm, [(eval_arrays["input_ids"], eval_arrays["attention_mask"])])

        def evaluate(p):
            return evaluate_sft(lm, p, eval_arrays, batch_size=eval_batch_size or int(cfg.batch_size))

        eval_fn = evaluate

    return _fit_supervised(
        kind="sft", model=lm, params=params, data=data, cfg=cfg, run=run, keys=_SFT_KEYS, init_fn=sft_init,
        make_step=make_sft_step, tx=tx, mesh=mesh, max_steps=max_steps, on_step=on_step,
        on_checkpoint=on_checkpoint, allow_config_mismatch=allow_config_mismatch, eval_fn=eval_fn,
        eval_every=eval_every, sample_fn=sample_fn, return_state=return_state,
        input_pairs=[("input_ids", "attention_mask")], frozen=frozen)


def fit_reward(rm, params, train_data: Mapping[str, np.ndarray], cfg, run: RunOptions, *, eval_data=None,
               eval_every: int | None = None, eval_batch_size: int | None = None, tx=None, mesh=None,
               max_steps: int | None = None, on_step: Callable | None = None,
               on_checkpoint: Callable | None = None, allow_config_mismatch: bool = False,
               return_state: bool = False, frozen=None):
    """Bradley-Terry reward-model training on preference pairs.

    Args:
      rm: a scalar-head `LM`.
      params: its initial trained parameters (e.g. the SFT trunk with a fresh head; with
        LoRA: the adapters and the score head, `lora.partition(p, heads=("score",))`).
      frozen: with LoRA, the frozen base weights; None otherwise.
      train_data: {"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"}
        `[N, L]` arrays (+ optional "margin" `[N]`).
      cfg: `RewardConfig`.
      eval_data: held-out pairs (same keys); evaluated with
        `evaluate_reward_model` at the last step and every `eval_every` steps
        (on logged steps); results logged as "eval/accuracy", "eval/loss", ...
      eval_batch_size: evaluate in chunks of this many pairs.
    {common}
    Returns:
      `(params, history)` as for `fit_sft`; the head is not normalised (call
      `normalize_reward_head` on reference samples afterwards).
    """
    from rlhf_jax.train.reward import evaluate_reward_model, make_reward_step, reward_init

    eval_fn = None
    if eval_data is not None:
        eval_arrays, _ = _check_data(eval_data, _PAIR_KEYS, "eval_data")
        _check_model_inputs(rm, [(eval_arrays["chosen_ids"], eval_arrays["chosen_mask"]),
                                 (eval_arrays["rejected_ids"], eval_arrays["rejected_mask"])])

        def evaluate(p):
            return evaluate_reward_model(rm, p, eval_arrays, batch_size=eval_batch_size)

        eval_fn = evaluate

    return _fit_supervised(
        kind="reward", model=rm, params=params, data=train_data, cfg=cfg, run=run, keys=_PAIR_KEYS,
        init_fn=reward_init, make_step=make_reward_step, tx=tx, mesh=mesh, max_steps=max_steps,
        on_step=on_step, on_checkpoint=on_checkpoint, allow_config_mismatch=allow_config_mismatch,
        eval_fn=eval_fn, eval_every=eval_every, return_state=return_state, optional_keys=("margin",),
        input_pairs=[("chosen_ids", "chosen_mask"), ("rejected_ids", "rejected_mask")], frozen=frozen)


REF_LOGPROBS_FILE = "reference_logprobs.npz"
"""Where `fit_dpo` keeps the precomputed reference log-probs, in the run folder."""


def _save_ref_logprobs(path: str, ref_logps: Mapping[str, np.ndarray], *, data_hash: str, average: bool) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, data_hash=np.asarray(data_hash), average=np.asarray(bool(average)), **ref_logps)
    os.replace(tmp, path)  # a crash never leaves half a file under the real name


def _load_ref_logprobs(path: str, keys, *, data_hash: str, average: bool, num_rows: int):
    """The saved reference log-probs, or None when absent, unreadable or of other data."""
    try:
        with np.load(path) as f:
            if str(f["data_hash"]) != data_hash or bool(f["average"]) != bool(average):
                return None
            out = {k: np.asarray(f[k], np.float32) for k in keys}
    except (OSError, KeyError, ValueError):
        return None
    if any(v.shape != (num_rows,) for v in out.values()):
        return None
    return out


def fit_dpo(lm, params, train_data: Mapping[str, np.ndarray], cfg, run: RunOptions, *, ref_params=None,
            tx=None, mesh=None, max_steps: int | None = None, on_step: Callable | None = None,
            on_checkpoint: Callable | None = None, allow_config_mismatch: bool = False,
            return_state: bool = False, frozen=None):
    """DPO (or IPO, hinge, SimPO) on preference pairs, against a frozen reference.

    The reference log-probs. With `cfg.reference == "precompute"` (the default) one
    jitted pass of the reference over all pairs runs before the first step; its result
    is written to `run.output_dir/reference_logprobs.npz` (with the data's hash) and
    travels with each batch as two columns. A resumed run reads that file back instead
    of recomputing, so it continues with exactly the numbers it started with. With
    `"on_the_fly"` the reference's forward runs inside every step (no file; more
    compute, no O(N) memory). SimPO uses no reference.

    Args:
      lm: the `LM` (head "lm").
      params: the policy's initial parameters.
      train_data: {"chosen_ids", "chosen_mask", "chosen_loss_mask", "rejected_ids",
        "rejected_mask", "rejected_loss_mask"} `[N, L]` arrays (`preference_examples`).
      cfg: `DPOConfig`.
      ref_params: the frozen reference's parameters (default: `params`, the starting
        model, as in the DPO paper).
      frozen: with a LoRA `lm`, the frozen base weights (`params` are then the adapters);
        the reference is that base without adapters (no `ref_params`: one copy of the
        weights). None otherwise.
    {common}
    Returns:
      `(params, history)` as for `fit_sft`.
    """
    from rlhf_jax.train.dpo import (
        DPO_PAIR_KEYS,
        REF_KEYS,
        dpo_init,
        dpo_reference_lm,
        make_dpo_step,
        reference_logprobs,
    )

    lora = frozen is not None
    if lora and ref_params is not None:
        raise ValueError("with LoRA (`frozen` given) the reference is the frozen base: do not pass `ref_params`")
    reference = params if ref_params is None else ref_params

    def setup(driver, arrays, start, placed_frozen):
        extra = (None, placed_frozen) if lora else ()
        if not cfg.needs_reference:
            return arrays, extra
        ref = placed_frozen if lora else driver.place(reference)
        if cfg.reference == "on_the_fly":
            return arrays, extra if lora else (ref,)
        n = int(arrays["chosen_ids"].shape[0])
        path = os.path.join(driver.output_dir, REF_LOGPROBS_FILE)
        data_hash = _fingerprint(arrays)["hash"]
        ref_logps = None
        if start > 0:
            ref_logps = _load_ref_logprobs(path, REF_KEYS, data_hash=data_hash, average=cfg.average_logprobs,
                                           num_rows=n)
            if ref_logps is None:
                driver.logger.warn(f"{path} is missing or belongs to other data: recomputing the reference "
                                   "log-probs (the resumed steps may differ in the last bits)")
        if ref_logps is None:
            place = None if driver.mesh is None else (lambda chunk: shard_batch(chunk, driver.mesh))
            started = time.perf_counter()
            ref_logps = reference_logprobs(dpo_reference_lm(lm), ref, arrays,
                                           batch_size=cfg.ref_batch_size or cfg.batch_size,
                                           average=cfg.average_logprobs, place=place)
            _save_ref_logprobs(path, ref_logps, data_hash=data_hash, average=cfg.average_logprobs)
            message = (f"reference log-probs of {n} pairs computed in {time.perf_counter() - started:.1f} s "
                       f"-> {path}")
            _log.info(message)
            if run.stdout:
                print(message, flush=True)
        return {**arrays, **ref_logps}, extra

    return _fit_supervised(
        kind="dpo", model=lm, params=params, data=train_data, cfg=cfg, run=run, keys=DPO_PAIR_KEYS,
        init_fn=dpo_init, make_step=make_dpo_step, tx=tx, mesh=mesh, max_steps=max_steps, on_step=on_step,
        on_checkpoint=on_checkpoint, allow_config_mismatch=allow_config_mismatch, return_state=return_state,
        input_pairs=[("chosen_ids", "chosen_mask"), ("rejected_ids", "rejected_mask")], setup=setup,
        frozen=frozen)


def fit_ppo(trainer, policy_params, ref_params, prompts: Mapping[str, np.ndarray], run: RunOptions, *,
            value_params=None, reward_params=None, num_epochs: int | None = None, mesh=None,
            max_steps: int | None = None, on_step: Callable | None = None,
            on_rollout: Callable | None = None, on_checkpoint: Callable | None = None,
            eval_fn: Callable | None = None, eval_every: int | None = None, decode: Callable | None = None,
            kl_warn_window: int = 10, allow_config_mismatch: bool = False, return_state: bool = False):
    """PPO-RLHF: `trainer.iteration` over batches of prompts.

    One step is one PPO iteration on `trainer.cfg.batch.batch_size` prompts (rollout,
    score, `ppo_epochs x num_minibatches` updates). Run length: `num_epochs` passes
    over the prompts (capped by `max_steps`); with `num_epochs=None`,
    `max_steps` iterations (cycling over the prompts in per-epoch seeded
    orders), or one pass when `max_steps` is None too.

    Args:
      trainer: a `PPOTrainer` (its config, optimizers, models and reward are used).
      policy_params: initial policy params (also the reference's, usually); with a LoRA
        policy the trained part only (adapters, and a shared-trunk value head).
      ref_params: the frozen reference policy's params; with a LoRA policy the frozen base.
      prompts: {"prompt_ids", "prompt_mask"} `[N, P]` left-padded prompts.
        The rows of each batch are passed to a host `reward_fn` as `prompt_index`.
      value_params: the separate value network's params (trainers with a `value_model`).
      reward_params: the reward model's params (trainers with a `reward_model`).
      num_epochs: passes over the prompts (see above).
      on_rollout: `on_rollout(step, prompt_index, rollout) -> dict | None`, called
        on logged steps with the iteration's `Rollout` (device arrays) and the
        prompt rows; a returned dict is added to the step's metrics (e.g. a gold
        reward of the responses).
      eval_fn: `eval_fn(policy_params) -> dict` of held-out metrics (the full params: with
        LoRA the adapters over the base; e.g.
        `rlhf_jax.eval.training_eval.rl_eval_fn`: verifier pass@1 or reward-model score,
        and KL to the reference), logged as ``eval/<name>``; it must draw its own,
        fixed PRNG keys so a resumed run logs the same values.
      decode: `decode(token_ids [B, N], mask [B, N]) -> list[str]`, for the sample
        completions written every `run.log_samples_every` iterations (samples.jsonl:
        iteration, prompt, completion, score; TensorBoard text; W&B table). Without it
        the lines hold token ids. The scores are the reward source's, asked again for
        the logged rows (`trainer.score`).
      kl_warn_window: warn when the k1 KL mean ("kl_k1") is negative over this
        many logged steps.
    {common}
    Returns:
      `(policy_params, history)`; with `return_state=True` also the final
      `PPOState` (value params, optimizer and KL-controller states).
    """
    cfg = trainer.cfg
    if ref_params is None:
        raise ValueError("`ref_params` (the frozen reference policy) is required")
    arrays, n = _check_data(prompts, _PROMPT_KEYS, "prompts")
    arrays = {k: arrays[k] for k in _PROMPT_KEYS}
    batch_size = int(cfg.batch.batch_size)
    if n < batch_size:
        raise ValueError(f"`prompts` has {n} rows, fewer than `batch_size` ({batch_size})")
    if mesh is None:
        mesh = getattr(trainer, "mesh", None) or mesh_from_options(run)
    if mesh is not None and batch_size % mesh_batch_size(mesh):
        raise ValueError(f"`batch_size` ({batch_size}) must be divisible by the mesh's "
                         f"{mesh_batch_size(mesh)} batch shards (data x fsdp)")
    _check_model_inputs(trainer.policy, [(arrays["prompt_ids"], arrays["prompt_mask"])])
    if getattr(trainer, "mesh", None) is not mesh and hasattr(trainer, "with_mesh"):
        # the phases jitted with this mesh's in/out shardings (the state keeps its layout)
        trainer = trainer.with_mesh(mesh)
    trainer.check_prompts(arrays["prompt_ids"][:batch_size], arrays["prompt_mask"][:batch_size])
    order = _Order(n, batch_size, run.seed)
    total = _num_steps(order.per_epoch, num_epochs, max_steps)
    if eval_every is None:
        eval_every = run.eval_every

    driver = _Run(kind="ppo", cfg=cfg, fingerprint=_fingerprint(arrays), run=run, mesh=mesh, total_steps=total,
                  allow_config_mismatch=allow_config_mismatch, on_checkpoint=on_checkpoint)
    monitor = KLSignMonitor(window=kl_warn_window, key="kl_k1")
    rl_cfg = getattr(trainer, "rl_cfg", None)
    stall_limit = rl_cfg.rewards.max_stalled_iterations if rl_cfg is not None else None
    dynamic = rl_cfg is not None and rl_cfg.rewards.dynamic_sampling
    stalled = 0
    lora = bool(getattr(trainer, "lora", False))
    try:
        state = driver.init_state(lambda p, v: trainer.init(p, v, seed=run.seed), policy_params, value_params)
        ref_params = driver.place(ref_params)
        reward_params = driver.place(reward_params)
        state, start = driver.restore_or_start(state)
        monitor.replay(driver.logger.history)
        samples_warned = False
        with driver.signals:
            for step in range(start, total):
                epoch, _, rows = order.rows(step)
                ids, mask = arrays["prompt_ids"][rows], arrays["prompt_mask"][rows]
                if mesh is not None:
                    ids, mask = shard_batch((ids, mask), mesh)
                extra = {}
                if dynamic:
                    def more_prompts(attempt, _step=step):
                        # Fresh prompts for DAPO's refill: a seeded draw per (seed, step, try), so a
                        # resumed run refills exactly as the uninterrupted one.
                        fresh = np.random.default_rng([run.seed, _step, attempt]).choice(n, batch_size, replace=False)
                        return arrays["prompt_ids"][fresh], arrays["prompt_mask"][fresh], fresh

                    extra["more_prompts"] = more_prompts
                state, metrics, rollout = trainer.iteration(
                    state, ids, mask, ref_params=ref_params, reward_params=reward_params,
                    prompt_index=rows, **extra)
                if stall_limit is not None:
                    # Nothing to learn from: every score non-finite, or every minibatch skipped
                    # for non-finite gradients. N in a row stops the run (`max_stalled_iterations`).
                    no_scores = float(metrics["skipped_nonfinite"]) == 1.0
                    no_grads = float(metrics["skipped_minibatch"]) == 1.0
                    stalled = stalled + 1 if (no_scores or no_grads) else 0
                    if stalled >= stall_limit:
                        why = ("every score was non-finite (NaN or inf)" if no_scores
                               else "every update was skipped for non-finite gradients")
                        raise TrainingStalledError(
                            f"training stalled at iteration {step + 1}: {stalled} consecutive iterations with nothing "
                            f"to learn from ({why}); check the reward source {trainer.reward_source} "
                            f"(limit: `rewards.max_stalled_iterations` = {stall_limit})")
                done = step + 1
                evaluate = eval_fn is not None and driver.eval_due(done, eval_every)
                if driver.should_log(done) or evaluate:
                    host = driver.fetch(metrics)
                    host["epoch"] = epoch
                    if evaluate:
                        # a LoRA policy is evaluated with its adapters over the frozen base
                        policy = combine(ref_params, state.params) if lora else state.params
                        host.update(_eval_metrics(eval_fn(policy)))
                    if on_rollout is not None:
                        extra = on_rollout(done, rows, rollout)
                        if extra is not None:
                            host.update({k: to_python(v) for k, v in jax.device_get(dict(extra)).items()})
                    driver.warn_if_skipped(done, host)
                    message = monitor.update(host)
                    if message:
                        driver.logger.warn(f"step {done}: {message}")
                    driver.log(done, host, on_step)
                if driver.due(done, run.log_samples_every):
                    if not dynamic:
                        driver.log_samples(done, rollout_samples(
                            trainer, reward_params, ids, mask, rollout, rows, decode=decode,
                            limit=run.num_logged_samples), step_key="iteration")
                    elif not samples_warned:  # the rollout's rows may come from refilled prompts
                        driver.logger.warn("`run.log_samples_every`: no samples are logged with "
                                           "`rewards.dynamic_sampling` (the rollout's prompts are refilled)")
                        samples_warned = True
                driver.maybe_save(done, state, _position(done, order.per_epoch))
        history = list(driver.logger.history)
    finally:
        driver.close()
    if return_state:
        return state.params, history, state
    return state.params, history


def rollout_samples(trainer, reward_params, prompt_ids, prompt_mask, rollout, prompt_index, *,
                    decode: Callable | None = None, limit: int | None = None) -> list[dict]:
    """The first `limit` rows of an RL iteration as sample records: prompt, completion, score.

    The scores come from `trainer.score(reward_params, prompt_ids, prompt_mask, rollout,
    prompt_index)` (the iteration's reward source, asked again). A rollout with several
    samples per prompt (`rows = prompts x group`) repeats each prompt.

    Args:
      decode: `decode(ids, mask) -> list[str]`; None writes token-id lists instead.
    """
    scores = np.asarray(jax.device_get(trainer.score(reward_params, prompt_ids, prompt_mask, rollout,
                                                      prompt_index)), np.float64)
    ids, mask, tokens, response_mask, ended = jax.device_get(
        (prompt_ids, prompt_mask, rollout.tokens, rollout.mask, rollout.ended_with_eos))
    ids, mask = np.asarray(ids), np.asarray(mask)
    tokens, response_mask = np.asarray(tokens), np.asarray(response_mask)
    group = max(tokens.shape[0] // max(ids.shape[0], 1), 1)
    count = tokens.shape[0] if limit is None else min(int(limit), tokens.shape[0])
    prompt_rows = np.arange(count) // group
    ids, mask = ids[prompt_rows], mask[prompt_rows]
    tokens, response_mask = tokens[:count], response_mask[:count]
    if decode is not None:
        prompts, completions = decode(ids, mask), decode(tokens, response_mask)
    else:
        prompts = [row[m > 0].tolist() for row, m in zip(ids, mask)]
        completions = [row[m > 0].tolist() for row, m in zip(tokens, response_mask)]
    index = None if prompt_index is None else np.asarray(prompt_index)[prompt_rows]
    records = []
    for i in range(count):
        record = {"prompt": prompts[i], "completion": completions[i], "score": float(scores[i]),
                  "ended_with_eos": bool(np.asarray(ended)[i])}
        if index is not None:
            record["prompt_index"] = int(index[i])
        records.append(record)
    return records


def _fill_docs() -> None:
    common = _COMMON_DOC.strip("\n")
    no_tx = "\n".join(line for line in common.splitlines()
                      if "tx: the optimizer" not in line and "filled in from the run length" not in line)
    for fn, text in ((fit_sft, common), (fit_reward, common), (fit_dpo, common), (fit_ppo, no_tx)):
        fn.__doc__ = fn.__doc__.replace("    {common}", text.rstrip() + "\n")


_fill_docs()
