"""Reward sources for PPO: Python reward functions (`module:function`) and reward models.

A reward function follows TRL's convention, so functions written for TRL's
GRPO trainer work unchanged:

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float]

where `columns` holds the prompt set's extra columns per completion (here:
`answer`). `load_function("pkg.module:name")` imports it (a path to a `.py`
file works too: `path/to/rewards.py:name`), and `host_reward_fn` wraps it into
the host reward function of the PPO trainer (DESIGN.md):

    reward_fn(prompt_ids, prompt_mask, response_tokens, response_mask, prompt_index) -> np.ndarray [B]

which decodes the responses, looks the prompts and reference answers up by
`prompt_index`, calls the function and checks what it returns.

`load_reward_model(path)` loads a reward model (ours from `rlhf-jax reward`,
or an HF `*ForSequenceClassification` checkpoint with one label) as an LM
with a scalar head, for the trainer's on-device reward path.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from typing import Callable, Sequence

import numpy as np

from rlhf_jax.data.tokenizers import decode_tokens

__all__ = ["load_function", "host_reward_fn", "load_reward_model"]


def load_function(spec: str) -> Callable:
    """Import the callable named by `module:function` (or `file.py:function`).

    Raises:
      ValueError: naming `spec` when it is malformed, the module cannot be
        imported, or the attribute is missing or not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"reward function {spec!r} must be written `module:function`")
    module_name, attr = spec.split(":")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise ValueError(f"reward function {spec!r}: no such file {module_name}")
        loader_spec = importlib.util.spec_from_file_location(
            "rlhf_jax_user_reward_" + os.path.basename(module_name)[:-3], module_name)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"reward function {spec!r}: importing {module_name} failed "
                             f"({type(e).__name__}: {e})") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward function {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {attr!r} is not callable")
    return fn


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def host_reward_fn(fn: Callable, tokenizer, *, prompts: Sequence[str], answers: Sequence | None = None,
                   name: str | None = None):
    """Wrap a TRL-style reward function into the PPO trainer's host `reward_fn`.

    Args:
      fn: `fn(prompts, completions, answer=...) -> list[float]` (`answer` is
        passed only when `fn` takes it or `**kwargs`).
      tokenizer: decodes the response tokens (special tokens and padding dropped).
      prompts: the prompt texts of the data set, indexed by `prompt_index`.
      answers: the reference answers of the data set (None where absent).
      name: how to name `fn` in errors (default: its `__name__`).

    Returns:
      `reward_fn(prompt_ids, prompt_mask, response_tokens, response_mask,
      prompt_index) -> np.ndarray [B] float32`. Without `prompt_index` the
      prompts are decoded from `prompt_ids` and no answers are passed.
    """
    name = name or getattr(fn, "__name__", repr(fn))
    prompts = list(prompts)
    answers = None if answers is None else list(answers)
    pass_answers = answers is not None and _accepts(fn, "answer")

    def reward_fn(prompt_ids, prompt_mask, response_tokens, response_mask, prompt_index=None):
        completions = decode_tokens(tokenizer, np.asarray(response_tokens), np.asarray(response_mask))
        kwargs = {}
        if prompt_index is None:
            batch_prompts = decode_tokens(tokenizer, np.asarray(prompt_ids), np.asarray(prompt_mask))
        else:
            index = np.asarray(prompt_index).astype(np.int64).tolist()
            batch_prompts = [prompts[i] for i in index]
            if pass_answers:
                kwargs["answer"] = [answers[i] for i in index]
        scores = fn(batch_prompts, completions, **kwargs)
        try:
            scores = np.asarray(scores, dtype=np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"reward function {name} must return a list of numbers, got "
                             f"{type(scores).__name__}") from None
        if scores.shape != (len(completions),):
            raise ValueError(f"reward function {name} returned shape {scores.shape} for "
                             f"{len(completions)} completions; expected one number per completion")
        return scores

    return reward_fn


def load_reward_model(path: str, *, dtype=None, param_dtype=None):
    """Load a reward model folder as an LM with a scalar head.

    Args:
      path: a folder with `config.json` + safetensors: our `rlhf-jax reward`
        export (whose head bias, which HF's format cannot hold, is restored from
        the file beside the weights) or an HF `*ForSequenceClassification`
        checkpoint with one label.
      dtype, param_dtype: compute and storage dtypes (default float32).

    Returns:
      `(lm, params)`; `lm.scores(params, ids, mask) -> [B]`.
    """
    import jax.numpy as jnp

    from rlhf_jax.models import from_pretrained

    return from_pretrained(path, head="scalar", dtype=dtype or jnp.float32,
                           param_dtype=param_dtype or jnp.float32)
