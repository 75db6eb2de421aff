"""The error types of rlhf_jax (the bottom layer: any module may raise them).

Two families, told apart by the exit status the CLI gives them:

- :class:`UserError` (exit 2): something the user gave cannot be used as asked: a config
  key, a data row, a path, a model folder, a reward source. The message names the culprit
  (dotted key, file and line, folder).
- :class:`RLHFJaxError` itself (exit 1): anything else the library detects about itself.

:class:`RunInterrupted` (SIGINT / SIGTERM, after the current step was checkpointed) exits
with 128 + the signal number (130, 143), as shells report a process stopped by a signal.

Every class also derives from ``ValueError`` so that callers written against the plain
exception keep working.
"""
from __future__ import annotations

__all__ = [
    "RLHFJaxError",
    "UserError",
    "ConfigError",
    "DataError",
    "RunError",
    "LoadError",
    "ConfigMismatchError",
    "TrainingStalledError",
    "RunLockedError",
    "RunInterrupted",
]


class RLHFJaxError(ValueError):
    """Base class; ``exit_code`` is the CLI's exit status for it."""

    exit_code = 1


class UserError(RLHFJaxError):
    """A mistake in what the user gave (exit status 2)."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or override that cannot be used; the message names the key."""


class DataError(UserError):
    """A data file or row that cannot be used; the message names the file and line."""


class RunError(UserError):
    """A run folder or a path that cannot be used as asked."""


class LoadError(UserError):
    """A model, tokenizer or checkpoint file that cannot be read; the message names the file."""


class ConfigMismatchError(UserError):
    """A resumed run whose config differs from the stored one in a key that changes the math."""


class TrainingStalledError(UserError):
    """A run that has nothing left to learn from (e.g. every reward non-finite for N iterations)."""


class RunLockedError(RunError):
    """Another process holds the run folder's lock; the message names the folder and its pid."""


class RunInterrupted(RLHFJaxError):
    """A run stopped by SIGINT / SIGTERM after checkpointing the step it was in.

    Attributes:
      signum: the signal number; `exit_code` is 128 + signum.
      step: the step the checkpoint holds.
    """

    def __init__(self, signum: int, *, step: int, where: str):
        import signal

        self.signum, self.step = int(signum), int(step)
        self.exit_code = 128 + self.signum
        super().__init__(f"{signal.Signals(self.signum).name}: stopped after step {step}, checkpoint saved in "
                         f"{where}; resume with the same command")
