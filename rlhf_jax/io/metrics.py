"""Metric logging for the training drivers: stdout, `metrics.jsonl`, `samples.jsonl`, sinks.

`MetricsLogger.log(step, metrics)` fetches the whole metrics dict from the
device with ONE `jax.device_get` (one synchronisation per step), then

- appends one JSON line to ``<output_dir>/metrics.jsonl``::

      {"step": 3, "loss": 1.92, "kl/k1": 0.01, ...,
       "timing": {"time/update": 0.12, "tokens_per_s": 5400.0},
       "warnings": ["..."]}           # only when there were warnings

  Timing metrics (see `is_timing_key`) go into the ``"timing"`` field, since
  they differ between two runs that are otherwise identical; everything else
  is deterministic, so a resumed run's file equals an uninterrupted one's
  once ``"timing"`` is dropped;
- hands every numeric scalar to each sink (`rlhf_jax.io.sinks`: TensorBoard by
  default, Weights & Biases when asked, or any object with the `Sink` methods);
- prints a compact line every `print_every` steps;
- advances a tqdm progress bar with ETA when `total_steps` is known and
  stderr is a terminal (never under pytest).

Resuming: construct the logger with `resume_step=s` (the restored
checkpoint's step) and the lines with ``step > s`` are dropped from
`metrics.jsonl` (they were written after that checkpoint by the killed run,
and the resumed run writes them again); TensorBoard gets `purge_step=s+1`.
A fresh run passes `resume_step=0`, which empties an old file.

Sample completions: `log_samples(step, rows)` appends one JSON line per row to
``<output_dir>/samples.jsonl`` (``{"iteration": 3, "prompt": ..., "completion": ...,
"score": ...}``; supervised drivers write ``"step"``) and hands the rows to every sink
(a TensorBoard text table, a W&B table). A resume truncates it like `metrics.jsonl`.

Warnings (a skipped non-finite update, k1 KL negative over a window) are
given with `warn(message)`: they go to Python `logging` at once and into the
``"warnings"`` field of the next JSON line.
"""
from __future__ import annotations

import json
import logging as _pylogging
import math
import os
import sys
import time
from collections import deque
from typing import Any, Mapping, Sequence

import jax
import numpy as np

__all__ = ["MetricsLogger", "KLSignMonitor", "is_timing_key", "read_metrics", "read_samples", "to_python",
           "strip_timing", "logger"]

logger = _pylogging.getLogger("rlhf_jax")

_TIMING_PREFIXES = ("time/", "timing/", "perf/", "throughput/")
_TIMING_FRAGMENTS = ("per_s", "per_sec", "seconds", "_time", "_secs")


# what a person watching a run looks for first; other scalars follow alphabetically
_STDOUT_FIRST = ("epoch", "loss", "score_mean", "kl_k1", "kl_coef", "accuracy", "eval/accuracy",
                 "policy_loss", "value_loss", "entropy", "grad_norm", "learning_rate")


def is_timing_key(name: str) -> bool:
    """True for metrics that measure wall-clock time or throughput.

    A name is a timing metric if it starts with ``time/``, ``timing/``,
    ``perf/`` or ``throughput/``, or contains ``per_s``, ``per_sec``,
    ``seconds``, ``_time`` or ``_secs`` (e.g. ``tokens_per_s``,
    ``rollout_time``).
    """
    return name.startswith(_TIMING_PREFIXES) or any(f in name for f in _TIMING_FRAGMENTS)


def to_python(value: Any) -> Any:
    """A host value -> float/int/bool (scalars) or a nested list (arrays)."""
    array = np.asarray(value)
    if array.ndim == 0:
        item = array.item()
        return item
    return array.tolist()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a `metrics.jsonl` file (a missing file gives [])."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def read_samples(path: str | os.PathLike) -> list[dict]:
    """The rows of a `samples.jsonl` file (a run folder means its file; a missing file gives [])."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "samples.jsonl")
    return read_metrics(path)


def _step_of(record: Mapping[str, Any]) -> int:
    return int(record.get("step", record.get("iteration", -1)))


def strip_timing(record: Mapping[str, Any]) -> dict:
    """A record without its ``"timing"`` field (for run-to-run comparisons)."""
    return {k: v for k, v in record.items() if k != "timing"}


def _truncate_jsonl(path: str, keep_until: int) -> int:
    """Keep the complete lines of `path` with step <= keep_until; returns how many."""
    kept = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # a line cut short by a kill: it and everything after are dropped
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if _step_of(record) <= keep_until:
                kept.append(line)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return len(kept)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        if value != 0.0 and (abs(value) >= 1e4 or abs(value) < 1e-3) and math.isfinite(value):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


class MetricsLogger:
    """Write per-step metrics to `metrics.jsonl`, TensorBoard and stdout.

    Args:
      output_dir: directory for `metrics.jsonl` and the TensorBoard events
        (subdirectory ``tb``); created if missing.
      stdout: print a compact line every `print_every` steps.
      tensorboard: write TensorBoard scalars.
      print_every: stdout period in steps (the first step always prints).
      total_steps: the run's last step, for the progress bar's ETA.
      progress: show a tqdm bar; None = only when stderr is a terminal and
        not under pytest.
      resume_step: drop the `metrics.jsonl` lines with step > resume_step
        (the step of the restored checkpoint; 0 for a fresh run). None keeps
        the file as it is and appends.
      stdout_keys: which metrics the stdout line shows (default: at most 8
        non-timing scalars, the usual ones such as loss, score_mean and kl_k1
        first).
      sinks: more `rlhf_jax.io.sinks.Sink`s (e.g. a `WandbSink`); each gets every
        logged step's scalars and samples, and is closed with the logger.
    """

    def __init__(self, output_dir: str | os.PathLike, *, stdout: bool = True,
                 tensorboard: bool = True, print_every: int = 10,
                 total_steps: int | None = None, progress: bool | None = None,
                 resume_step: int | None = None, stdout_keys: tuple[str, ...] | None = None,
                 sinks: Sequence[Any] = ()):
        if not isinstance(print_every, int) or print_every < 1:
            raise ValueError(f"`print_every` must be a positive int, got {print_every!r}")
        if resume_step is not None and (not isinstance(resume_step, int) or resume_step < 0):
            raise ValueError(f"`resume_step` must be a non-negative int or None, got {resume_step!r}")
        self.output_dir = os.fspath(output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        self.path = os.path.join(self.output_dir, "metrics.jsonl")
        self.stdout = stdout
        self.print_every = print_every
        self.stdout_keys = stdout_keys
        self.history: list[dict] = []
        self._pending_warnings: list[str] = []
        self.samples_path = os.path.join(self.output_dir, "samples.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            _truncate_jsonl(self.path, resume_step)
            self.history = read_metrics(self.path)  # the resumed run's history is the whole run's
        if resume_step is not None and os.path.exists(self.samples_path):
            _truncate_jsonl(self.samples_path, resume_step)
        self._file = open(self.path, "a")
        self._samples_file = None
        self.sinks: list = []
        if tensorboard:
            from rlhf_jax.io.sinks import TensorBoardSink

            # events of a previous, killed or discarded run after `resume_step` are hidden
            purge = resume_step + 1 if resume_step is not None else None
            self.sinks.append(TensorBoardSink(os.path.join(self.output_dir, "tb"), purge_step=purge))
        self.sinks.extend(sinks)
        if progress is None:
            progress = (total_steps is not None and sys.stderr.isatty()
                        and "PYTEST_CURRENT_TEST" not in os.environ)
        self._bar = None
        if progress and total_steps is not None:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total_steps, initial=resume_step or 0, dynamic_ncols=True,
                             desc="train", leave=True)
        self._last_time = time.perf_counter()
        self._first_print = True

    def warn(self, message: str) -> None:
        """Log a warning now and attach it to the next JSON line."""
        logger.warning(message)
        self._pending_warnings.append(str(message))

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Record the metrics of `step` (one `jax.device_get` for the whole dict).

        Returns:
          The record written to `metrics.jsonl` (host Python values).
        """
        step = int(step)
        host = jax.device_get(dict(metrics))
        record: dict[str, Any] = {"step": step}
        timing: dict[str, Any] = {}
        for name in sorted(host):
            value = to_python(host[name])
            (timing if is_timing_key(name) else record)[name] = value
        if timing:
            record["timing"] = timing
        if self._pending_warnings:
            record["warnings"] = self._pending_warnings
            self._pending_warnings = []
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.history.append(record)
        scalars = {**{k: v for k, v in record.items() if k not in ("step", "timing", "warnings")},
                   **timing}
        numeric = {name: value for name, value in scalars.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        for sink in self.sinks:
            sink.scalars(step, numeric)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
        if self.stdout and (step % self.print_every == 0 or self._first_print):
            self._first_print = False
            self._print(step, record)
        return record

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]], *, step_key: str = "step") -> list[dict]:
        """Append sample completions of `step` to `samples.jsonl` and hand them to every sink.

        Args:
          step: the driver's step (the RL iteration).
          rows: dicts of JSON-able host values (prompt, completion, score, ...).
          step_key: the name of the step field of each line ("iteration" for RL).

        Returns:
          The lines written (each row with `step_key` first).
        """
        step = int(step)
        records = [{step_key: step, **{k: to_python(v) if isinstance(v, (np.ndarray, np.generic, jax.Array))
                                       else v for k, v in row.items()}} for row in rows]
        if self._samples_file is None:
            self._samples_file = open(self.samples_path, "a", encoding="utf-8")
        for record in records:
            self._samples_file.write(json.dumps(record) + "\n")
        self._samples_file.flush()
        for sink in self.sinks:
            sink.samples(step, records)
        return records

    def _print(self, step: int, record: dict) -> None:
        keys = self.stdout_keys
        if keys is None:
            scalars = [k for k, v in record.items() if k not in ("step", "timing", "warnings")
                       and isinstance(v, (int, float)) and not isinstance(v, bool)]
            first = [k for k in _STDOUT_FIRST if k in scalars]
            keys = (first + [k for k in scalars if k not in first])[:8]
        parts = [f"step {step}"] + [f"{k}={_format_value(record[k])}" for k in keys if k in record]
        now = time.perf_counter()
        parts.append(f"({now - self._last_time:.2f}s)")
        self._last_time = now
        line = " ".join(parts)
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        """Flush and close the files, every sink and the bar."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._samples_file is not None and not self._samples_file.closed:
            self._samples_file.close()
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class KLSignMonitor:
    """Warn when the k1 KL estimate stays negative over a window of steps.

    The k1 estimator `logp - ref_logp` is unbiased but noisy; a single
    negative batch mean is normal, a negative mean over many steps means the
    sampling and training log-probs disagree (e.g. a temperature mismatch).

    Args:
      window: number of recent steps averaged.
      key: the metric holding the per-step k1 mean.
    """

    def __init__(self, *, window: int = 10, key: str = "kl/k1"):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"`window` must be a positive int, got {window!r}")
        self.window = window
        self.key = key
        self._values: deque[float] = deque(maxlen=window)

    def replay(self, records) -> None:
        """Rebuild the window from earlier records (after a resume), silently."""
        for record in records:
            self.update(record)

    def update(self, record: Mapping[str, Any]) -> str | None:
        """Feed one step's record; returns a warning message or None."""
        value = record.get(self.key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        self._values.append(float(value))
        if len(self._values) == self.window:
            mean = sum(self._values) / self.window
            if mean < 0.0:
                self._values.clear()  # one warning per window, not per step
                return (f"{self.key} has mean {mean:.4g} < 0 over the last {self.window} steps: "
                        "the policy's training log-probs may not match its sampling log-probs")
        return None
