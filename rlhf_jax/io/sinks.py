"""Metric sinks: where `MetricsLogger` sends each logged step's scalars and sample completions.

A sink is any object with three methods (the `Sink` base class gives no-op ones):

    scalars(step, values)   # {name: float | int}: every numeric metric of a logged step
    samples(step, rows)     # [{"prompt", "completion", "score", ...}]: a few sampled completions
    close()

`MetricsLogger` itself writes ``metrics.jsonl`` and ``samples.jsonl`` (the files a resume
truncates); the sinks here are the viewers around them:

- `TensorBoardSink`: scalars under their names, samples as a Markdown table under the
  ``samples`` text tag (tensorboardX);
- `WandbSink`: an optional Weights & Biases run (the `wandb` package, extra
  ``rlhf_jax[wandb]``): scalars with ``wandb.log(..., step=step)``, samples as a
  ``wandb.Table``. ``mode="offline"`` (or ``WANDB_MODE=offline`` in the environment)
  needs no network; the run's files go under ``<output_dir>/wandb/`` and the run id is
  kept in ``<output_dir>/wandb_run_id`` so a resumed run continues the same W&B run.

A driver user can pass more sinks (e.g. a custom logger) through `MetricsLogger(sinks=...)`.
"""
from __future__ import annotations

import os
import uuid
from typing import Any, Mapping, Sequence

from rlhf_jax.errors import ConfigError

__all__ = ["Sink", "TensorBoardSink", "WandbSink", "samples_markdown"]

WANDB_ID_FILE = "wandb_run_id"


class Sink:
    """The sink interface (every method optional: the defaults do nothing)."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """The numeric metrics of one logged step."""

    def samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """A few sampled completions of one step (prompt, completion, score, ...)."""

    def close(self) -> None:
        """Flush and release what the sink holds."""


def _cell(value: Any) -> str:
    text = str(value).replace("|", "\\|").replace("\n", "<br>")
    return text if len(text) <= 2000 else text[:2000] + "..."


def samples_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of sample rows (columns in the order of the first row)."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


class TensorBoardSink(Sink):
    """TensorBoard events under `logdir` (scalars; samples as a text table).

    Args:
      logdir: the events folder (the drivers use ``<output_dir>/tb``).
      purge_step: hide events at and after this step left by an earlier, killed run.
    """

    def __init__(self, logdir: str | os.PathLike, *, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(os.fspath(logdir), purge_step=purge_step)

    def scalars(self, step, values):
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)

    def samples(self, step, rows):
        if rows:
            self._writer.add_text("samples", samples_markdown(rows), step)
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _import_wandb(option: str):
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"`{option}` is on but the `wandb` package is not installed; "
                          "`pip install 'rlhf_jax[wandb]'` (or `pip install wandb`), or turn it off") from None
    return wandb


class WandbSink(Sink):
    """A Weights & Biases run in `output_dir` (its files under ``output_dir/wandb/``).

    Args:
      output_dir: the run folder.
      project, entity, name, group, tags: passed to ``wandb.init``.
      mode: "online", "offline" (no network; sync later with ``wandb sync``) or None
        (W&B's own default, which honours ``WANDB_MODE``).
      config: the run's config, shown in the W&B UI.
      option: how the config key is named in errors (e.g. ``run.wandb.enabled``).

    Raises:
      ConfigError: naming `option` when the `wandb` package is missing.
    """

    def __init__(self, output_dir: str | os.PathLike, *, project: str | None = None, entity: str | None = None,
                 name: str | None = None, group: str | None = None, tags: Sequence[str] = (),
                 mode: str | None = None, config: Mapping[str, Any] | None = None,
                 option: str = "wandb"):
        wandb = _import_wandb(option)
        self._wandb = wandb
        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        id_path = os.path.join(output_dir, WANDB_ID_FILE)
        if os.path.isfile(id_path):
            with open(id_path, encoding="utf-8") as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_path, "w", encoding="utf-8") as f:
                f.write(run_id + "\n")
        kwargs = dict(project=project, entity=entity, name=name, group=group, tags=list(tags) or None,
                      dir=output_dir, id=run_id, resume="allow", config=dict(config or {}),
                      reinit="create_new")
        if mode is not None:
            kwargs["mode"] = mode
        self.run = wandb.init(**kwargs)
        self._columns: list[str] | None = None

    def scalars(self, step, values):
        if values:
            self.run.log(dict(values), step=step)

    def samples(self, step, rows):
        if not rows:
            return
        columns = list(rows[0])
        table = self._wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.run.log({"samples": table}, step=step)

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None
