"""The settings every trainer and driver shares: `OptimizerConfig` and `RunOptions`.

- `OptimizerConfig`: AdamW with warm-up, decay and clipping (built by
  `rlhf_jax.train.state.optimizer_from_config`); nested as `optimizer` in
  `SFTConfig`, `RewardConfig` and `PPOConfig` (which also has an optional
  `value_optimizer`).
- `RunOptions`: where a driver writes (output folder, checkpoints, logging
  sinks: stdout, TensorBoard, Weights & Biases (`WandbOptions`), sample completions,
  held-out evaluation during training), the seed of its data order and PRNG, and the device mesh. The same
  object serves `fit_sft`, `fit_reward`, `fit_ppo` and the `run:` section of
  every training command of the CLI.

Every field carries its help text in `metadata["help"]` (`hyper(default, help)`);
`rlhf-jax CMD --help` lists them. Each class checks its own values in
`__post_init__` and raises `ConfigError` naming the key, so a bad value fails
when the config is built, before any folder is touched.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Literal

from rlhf_jax.errors import ConfigError

__all__ = ["hyper", "check", "check_choices", "check_positive_int", "OptimizerConfig", "MeshOptions", "WandbOptions",
           "RunOptions", "RESUMABLE_RUN_OPTIONS"]


def hyper(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING):  # noqa: A002
    """A dataclass field with its `--help` text (`default` or `factory` as in `dataclasses.field`)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def check(condition: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `condition` (messages name keys in backquotes)."""
    if not condition:
        raise ConfigError(message)


@functools.lru_cache(maxsize=None)
def _choices(cls) -> dict:
    """`{field: allowed values}` of the `Literal[...]` (or `Literal[...] | None`) fields of `cls`."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        args = typing.get_args(tp)
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            literal = [a for a in args if typing.get_origin(a) is Literal]
            if len(literal) == 1 and type(None) in args:
                out[name] = typing.get_args(literal[0]) + (None,)
        elif typing.get_origin(tp) is Literal:
            out[name] = args
    return out


def check_choices(obj) -> None:
    """Each `Literal` field of the dataclass `obj` holds one of its values (also outside the CLI)."""
    for name, allowed in _choices(type(obj)).items():
        value = getattr(obj, name)
        check(value in allowed, f"`{name}` must be one of {[a for a in allowed]}, got {value!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_positive_int(obj, *names: str, minimum: int = 1) -> None:
    """Each named int field of `obj` is an int >= `minimum`."""
    for name in names:
        value = getattr(obj, name)
        check(_is_int(value) and value >= minimum, f"`{name}` must be an int >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up, then cosine / linear decay or a constant rate, and clipping."""

    learning_rate: float = hyper(1e-4, "peak learning rate (> 0)")
    schedule: Literal["constant", "cosine", "linear"] = hyper(
        "constant", "learning-rate shape after warm-up: constant, cosine or linear decay")
    warmup_steps: int = hyper(0, "linear warm-up length in optimizer updates (>= 0)")
    total_steps: int | None = hyper(
        None, "schedule length in optimizer updates (null: the run length; the CLI writes the value it used)")
    end_learning_rate_ratio: float = hyper(0.0, "final learning rate of a decay, as a fraction of the peak (0..1)")
    weight_decay: float = hyper(0.0, "AdamW decoupled weight decay on matrices (>= 0)")
    max_grad_norm: float | None = hyper(1.0, "global gradient-norm clip before Adam (null: off)")
    b1: float = hyper(0.9, "Adam first-moment decay, in [0, 1)")
    b2: float = hyper(0.999, "Adam second-moment decay, in [0, 1)")
    eps: float = hyper(1e-8, "Adam epsilon (> 0)")
    mu_dtype: Literal["float32", "bfloat16"] | None = hyper(
        None, "dtype of Adam's first moment (optax `mu_dtype`; null: the params' dtype; bfloat16 saves memory)")

    def __post_init__(self):
        check_choices(self)
        check(self.learning_rate > 0, f"`learning_rate` must be > 0, got {self.learning_rate}")
        check(_is_int(self.warmup_steps) and self.warmup_steps >= 0,
              f"`warmup_steps` must be an int >= 0, got {self.warmup_steps!r}")
        if self.total_steps is not None:
            check(_is_int(self.total_steps) and self.total_steps >= 1,
                  f"`total_steps` must be an int >= 1 or null, got {self.total_steps!r}")
            if self.schedule != "constant":
                check(self.total_steps > self.warmup_steps,
                      f"`total_steps` ({self.total_steps}) must be larger than `warmup_steps` ({self.warmup_steps})")
        check(0.0 <= self.end_learning_rate_ratio <= 1.0,
              f"`end_learning_rate_ratio` must lie in [0, 1], got {self.end_learning_rate_ratio}")
        check(self.weight_decay >= 0, f"`weight_decay` must be >= 0, got {self.weight_decay}")
        check(self.max_grad_norm is None or self.max_grad_norm > 0,
              f"`max_grad_norm` must be > 0 or null, got {self.max_grad_norm}")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            check(0.0 <= value < 1.0, f"`{name}` must lie in [0, 1), got {value}")
        check(self.eps > 0, f"`eps` must be > 0, got {self.eps}")


@dataclasses.dataclass(frozen=True)
class MeshOptions:
    """The device mesh (data parallel x FSDP x tensor parallel)."""

    data: int = hyper(1, "devices along the data axis (-1: all that fsdp x tensor leaves; the CLI's default)")
    fsdp: int = hyper(1, "devices along the FSDP (parameter sharding) axis")
    tensor: int = hyper(1, "devices along the tensor-parallel axis")

    def __post_init__(self):
        check(_is_int(self.fsdp) and self.fsdp >= 1, f"`fsdp` must be an int >= 1, got {self.fsdp!r}")
        check(_is_int(self.tensor) and self.tensor >= 1, f"`tensor` must be an int >= 1, got {self.tensor!r}")
        check(_is_int(self.data) and (self.data == -1 or self.data >= 1),
              f"`data` must be an int >= 1 or -1, got {self.data!r}")

    @property
    def single_device(self) -> bool:
        """One device, no sharding (`data=-1` too when only one device is visible)."""
        import jax

        return self.fsdp == 1 and self.tensor == 1 and (
            self.data == 1 or (self.data == -1 and jax.device_count() == 1))


@dataclasses.dataclass(frozen=True)
class WandbOptions:
    """An optional Weights & Biases sink (needs the `wandb` package: `pip install 'rlhf_jax[wandb]'`)."""

    enabled: bool = hyper(False, "also log scalars and sample tables to Weights & Biases (files under "
                                 "output_dir/wandb/)")
    mode: Literal["online", "offline"] | None = hyper(
        None, "online, or offline (no network; `wandb sync` later); null: W&B's default, which honours WANDB_MODE")
    project: str | None = hyper(None, "W&B project (null: W&B's default / WANDB_PROJECT)")
    entity: str | None = hyper(None, "W&B entity, a user or team (null: W&B's default)")
    name: str | None = hyper(None, "W&B run name (null: W&B picks one)")
    group: str | None = hyper(None, "W&B run group")
    tags: tuple[str, ...] = hyper((), "W&B run tags")

    def __post_init__(self):
        check_choices(self)
        check(isinstance(self.enabled, bool), f"`enabled` must be true or false, got {self.enabled!r}")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Where and how a driver runs: output folder, checkpoints, logging, seed, mesh."""

    output_dir: str | None = hyper(None, "run folder: metrics.jsonl, tb/, checkpoints/ (and, from the CLI, the "
                                         "resolved config and the hf/ export)")
    seed: int = hyper(0, "seed of the data order and of every PRNG draw of the run")
    checkpoint_every: int | None = hyper(
        500, "save a checkpoint every N steps (iterations for PPO) and at the end (null: never)")
    keep: int = hyper(2, "keep the newest K checkpoints")
    log_every: int = hyper(1, "write metrics (metrics.jsonl, TensorBoard) every N steps and at the end")
    print_every: int | None = hyper(None, "print metrics every N steps (null: 10 x log_every)")
    stdout: bool = hyper(True, "print metrics and warnings")
    tensorboard: bool = hyper(True, "write TensorBoard events under tb/")
    progress: bool | None = hyper(None, "show a progress bar (null: when stdout is a terminal)")
    wandb: WandbOptions = hyper(help="Weights & Biases sink (off by default)", factory=WandbOptions)
    log_samples_every: int | None = hyper(
        None, "every N steps (RL: iterations), write a few sampled completions (prompt, completion, score) to "
              "samples.jsonl, TensorBoard text and W&B (null: never)")
    num_logged_samples: int = hyper(4, "how many completions each sample log holds")
    eval_every: int | None = hyper(
        None, "evaluate on the held-out data (data.eval_files) every N steps (RL: iterations) and at the end, "
              "logged as eval/...; null: only at the end when there is held-out data")
    async_checkpoint: bool = hyper(True, "write checkpoints in the background")
    resume: bool = hyper(True, "continue from the newest checkpoint in output_dir (false: an existing "
                               "checkpoint is an error)")
    mesh: MeshOptions = hyper(help="device mesh (default: one device; the CLI's default: all devices)",
                              factory=MeshOptions)

    def __post_init__(self):
        check(self.output_dir is None or bool(self.output_dir), "`output_dir` must be a folder path")
        check(_is_int(self.seed), f"`seed` must be an int, got {self.seed!r}")
        check(self.checkpoint_every is None or (_is_int(self.checkpoint_every) and self.checkpoint_every >= 1),
              f"`checkpoint_every` must be an int >= 1 or null, got {self.checkpoint_every!r}")
        check_positive_int(self, "keep", "log_every", "num_logged_samples")
        for name in ("log_samples_every", "eval_every"):
            value = getattr(self, name)
            check(value is None or (_is_int(value) and value >= 1), f"`{name}` must be an int >= 1 or null, "
                                                                    f"got {value!r}")
        check(self.print_every is None or (_is_int(self.print_every) and self.print_every >= 1),
              f"`print_every` must be an int >= 1 or null, got {self.print_every!r}")


RESUMABLE_RUN_OPTIONS = ("checkpoint_every", "keep", "log_every", "print_every", "stdout", "tensorboard",
                         "progress", "async_checkpoint", "log_samples_every", "num_logged_samples",
                         "eval_every") + tuple(f"wandb.{f.name}" for f in dataclasses.fields(WandbOptions))
"""`RunOptions` fields a resumed run may change: they do not change the math of the steps done."""
