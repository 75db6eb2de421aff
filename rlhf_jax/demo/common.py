"""Helpers both parts of the offline demo share: arrays from texts, the tiny policy, SFT, timers.

`rlhf_jax.demo.rlvr` and `rlhf_jax.demo.rlhf` build their runs from these; nothing here
knows either task.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np

from rlhf_jax.data.padding import left_pad, right_pad
from rlhf_jax.data.tokenizers import encode_texts
from rlhf_jax.models import ModelConfig, from_config, save_pretrained
from rlhf_jax.train import (
    BatchConfig,
    KLConfig,
    OptimizerConfig,
    PPOConfig,
    RewardShapingConfig,
    RunOptions,
    SamplingConfig,
    SFTConfig,
)
from rlhf_jax.train.drivers import fit_sft

__all__ = [
    "now", "elapsed", "since", "prompt_arrays", "sft_arrays", "new_policy", "QUIET", "run_options", "sft", "ppo_config",
    "history_series", "export", "pad_lists", "prepare_output_dir",
]


def prepare_output_dir(output_dir, names, *, what: str, overwrite: bool) -> str:
    """`output_dir` (created) with the earlier run's outputs `names` removed when `overwrite`;
    with some of them there and no `overwrite`, a FileExistsError naming them (nothing touched)."""
    output_dir = os.fspath(output_dir)
    existing = [p for p in names if os.path.exists(os.path.join(output_dir, p))]
    if existing and not overwrite:
        raise FileExistsError(f"{output_dir} already holds {what} ({', '.join(existing)}); "
                              "pass overwrite=True (--overwrite) or choose another output_dir")
    for p in existing:
        path = os.path.join(output_dir, p)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(output_dir, exist_ok=True)
    return output_dir


def now():
    """`(wall, cpu)` clocks, for `since`."""
    return time.perf_counter(), time.process_time()


def elapsed(start) -> dict:
    """`{"wall": s, "cpu": s}` since `start` (CPU time of this process, all its threads)."""
    wall, cpu = now()
    return {"wall": round(wall - start[0], 2), "cpu": round(cpu - start[1], 2)}


def since(start) -> str:
    """`(wall s, cpu s)` since `start`: CPU time shows the cost on a busy machine."""
    t = elapsed(start)
    return f"({t['wall']:.1f}s, cpu {t['cpu']:.1f}s)"


def prompt_arrays(tokenizer, texts, length):
    """`[N, length]` left-padded `<bos> + text` prompts and their mask."""
    rows = [[tokenizer.bos_token_id] + ids for ids in encode_texts(tokenizer, texts)]
    return left_pad(rows, length, pad_id=tokenizer.pad_token_id)


def sft_arrays(tokenizer, prompts, completions, length):
    """`<bos> prompt completion <eos>` right-padded to `length`; loss on completion + EOS."""
    rows, starts = [], []
    for p, c in zip(encode_texts(tokenizer, prompts), encode_texts(tokenizer, completions)):
        rows.append([tokenizer.bos_token_id] + p + c + [tokenizer.eos_token_id])
        starts.append(1 + len(p))
    ids, mask = right_pad(rows, length, pad_id=tokenizer.pad_token_id)
    loss_mask = (np.arange(length)[None, :] >= np.asarray(starts)[:, None]) & (mask > 0)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask.astype(np.int32)}


def new_policy(tokenizer, settings, num_layers: int, context: int, seed: int):
    """A fresh GPT-2-shaped `(lm, params)` of the demo's width with `num_layers` layers."""
    config = ModelConfig.tiny(
        "gpt2",
        len(tokenizer),
        hidden_size=settings.hidden_size,
        num_layers=num_layers,
        num_heads=settings.num_heads,
        max_position_embeddings=context,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # One value head on the shared trunk (OpenAI's lm-human-preferences layout): SFT,
    # DPO and the critic-free estimators ignore it, PPO trains it. One `lm` for every
    # policy of a part also means one compilation of the sampler for all of them.
    return from_config(config, head="lm+value", seed=seed)


QUIET = dict(log_every=10, print_every=10**9, checkpoint_every=10**9, tensorboard=False,
             async_checkpoint=False, resume=False, progress=False)


def run_options(quiet: dict, output_dir: str, seed: int, **changes) -> RunOptions:
    return RunOptions(output_dir=output_dir, seed=seed, **{**quiet, **changes})


def sft(lm, params, data, steps, lr, settings, output_dir, seed, quiet):
    """`fit_sft` for `steps` steps with a short warm-up and a cosine decay."""
    cfg = SFTConfig(batch_size=settings.sft_batch_size, num_epochs=None, optimizer=OptimizerConfig(
        learning_rate=lr, warmup_steps=min(50, steps // 10), schedule="cosine"))
    return fit_sft(lm, params, data, cfg, run_options(quiet, output_dir, seed), max_steps=steps)


def ppo_config(settings, lr, kl_coef, max_new_tokens, tokenizer, missing_eos_penalty=None):
    """The demo's `PPOConfig`: `settings.ppo_batch_size` prompts, one response each."""
    return PPOConfig(
        batch=BatchConfig(batch_size=settings.ppo_batch_size, num_minibatches=settings.ppo_minibatches,
                          ppo_epochs=settings.ppo_epochs),
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=settings.temperature,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        kl=KLConfig(kl_coef=kl_coef),
        rewards=RewardShapingConfig(missing_eos_penalty=missing_eos_penalty),
        optimizer=OptimizerConfig(learning_rate=lr),
    )


def history_series(history, key):
    """The values of `key` over a run's logged steps."""
    return [float(rec[key]) for rec in history if key in rec]


def export(lm, params, tokenizer, path):
    """The policy as an HF causal LM (the value head is PPO's tool, not part of the policy)."""
    policy, policy_params = lm.with_head("lm", params)
    save_pretrained(policy, policy_params, path, tokenizer=tokenizer)


def pad_lists(rows):
    """Token lists as one zero-padded `[B, W]` int64 array."""
    width = max([len(r) for r in rows] + [1])
    return np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)
