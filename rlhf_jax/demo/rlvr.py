"""Part 1 of the offline demo, RLVR: which estimator, with the exact verifier as the reward?

SFT on addition problems whose answers are often wrong by one digit, so the SFT model is
right only some of the time; then three RL runs from that same SFT model, each with the same
rollout budget (`iterations x rows x max_new_tokens` generated tokens, the same optimizer
updates per iteration):

- PPO: one response for each of `ppo_batch_size` prompts, a value head on the shared trunk,
  GAE, the KL to the frozen SFT model shaped into the rewards (k1);
- GRPO: `add_group_size` G responses for each of `ppo_batch_size / G` prompts, advantages
  `(r - mean_group) / std_group`, no critic, the KL as a loss term (k3);
- RLOO: the same groups, advantages `r_i - mean_{j != i} r_j`, the KL in the rewards (k1);

then the pass@k curves of all four models on held-out problems, k = 1..n (Yue et al. 2025:
does RL teach something new, or sharpen what the model already knew?).

References:
  Schulman et al. 2017, arXiv 1707.06347 (PPO); Shao et al. 2024, arXiv 2402.03300 (GRPO);
  Ahmadian et al. 2024, arXiv 2402.14740 (RLOO); Yue et al. 2025, arXiv 2504.13837.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from rlhf_jax.data.tokenizers import decode_tokens
from rlhf_jax.demo import tasks
from rlhf_jax.demo.common import (
    elapsed,
    export,
    history_series,
    new_policy,
    now,
    pad_lists,
    ppo_config,
    prompt_arrays,
    run_options,
    sft,
    sft_arrays,
    since,
)
from rlhf_jax.eval.passk_eval import evaluate_pass_at_k
from rlhf_jax.train import PPOTrainer
from rlhf_jax.train.drivers import fit_ppo
from rlhf_jax.train.rl.presets import rl_config
from rlhf_jax.train.rl.trainer import RLTrainer
from rlhf_jax.train.state import optimizer_from_config

__all__ = ["run_rlvr", "RL_RUNS"]

RL_RUNS = ("ppo", "grpo", "rloo")
"""The RL runs of this part, in the order of the report's tables."""


def _group_config(algorithm: str, settings, lr: float, max_new: int, tokenizer):
    """The `RLConfig` of a critic-free run: the preset with the demo's budget laid over it."""
    g = settings.add_group_size
    if settings.ppo_batch_size % g:
        raise ValueError(f"`add_group_size` ({g}) must divide `ppo_batch_size` ({settings.ppo_batch_size}): "
                         "the group runs sample as many rows as PPO")
    kl = {"kl_coef": settings.add_grpo_kl_coef} if algorithm == "grpo" else {"kl_coef": settings.add_kl_coef}
    return rl_config(algorithm, {
        "batch": {"batch_size": settings.ppo_batch_size // g, "group_size": g,
                  "num_minibatches": settings.ppo_minibatches, "ppo_epochs": settings.ppo_epochs},
        "sampling": {"max_new_tokens": max_new, "temperature": settings.temperature,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        "kl": kl,
        "optimizer": {"learning_rate": lr},
    })


def run_rlvr(tokenizer, settings, out: str, seed: int, log, quiet: dict) -> dict:
    """Runs part 1 in `out`; returns its section of the report."""
    task = tasks.make_addition_task(
        seed, num_digits=settings.add_digits, num_sft=settings.add_num_sft,
        num_rl=settings.add_num_rl, num_eval=settings.add_num_eval, noise_rate=settings.add_noise,
    )
    prompt_len = 1 + len(task.eval_prompts[0])
    max_new = task.max_answer_length + 1  # room for EOS after the longest answer
    lm, init_params = new_policy(tokenizer, settings, settings.add_layers, prompt_len + max_new, seed)
    sft_data = sft_arrays(tokenizer, task.sft_prompts, task.sft_completions, prompt_len + max_new)

    t0 = now()
    sft_params, sft_hist = sft(lm, init_params, sft_data, settings.add_sft_steps, settings.add_sft_lr, settings,
                               os.path.join(out, "sft"), seed, quiet)
    log(f"[rlvr] SFT: {settings.add_sft_steps} steps, final loss {sft_hist[-1]['loss']:.3f} {since(t0)}")

    rl_ids, rl_mask = prompt_arrays(tokenizer, task.rl_prompts, prompt_len)
    verifier = tasks.make_addition_verifier(tokenizer, task.rl_answers)
    ppo_cfg = ppo_config(settings, settings.add_ppo_lr, settings.add_kl_coef, max_new, tokenizer)
    trainers = {"ppo": PPOTrainer(lm, ppo_cfg, optimizer_from_config(ppo_cfg.optimizer), reward_fn=verifier)}
    configs = {"ppo": ppo_cfg}
    for name, lr in (("grpo", settings.add_grpo_lr), ("rloo", settings.add_rloo_lr)):
        cfg = _group_config(name, settings, lr, max_new, tokenizer)
        trainers[name] = RLTrainer(lm, cfg, optimizer_from_config(cfg.optimizer), reward_fn=verifier)
        configs[name] = cfg
    policies = {"sft": (lm, sft_params)}
    histories, seconds = {}, {}
    for name, trainer in trainers.items():
        t0 = now()
        params, hist = fit_ppo(trainer, sft_params, sft_params, {"prompt_ids": rl_ids, "prompt_mask": rl_mask},
                               run_options(quiet, os.path.join(out, name), seed, log_every=1),
                               max_steps=settings.add_rl_iterations)
        policies[name], histories[name] = (lm, params), hist
        seconds[name] = elapsed(t0)
        log(f"[rlvr] {name.upper()}: {settings.add_rl_iterations} iterations, train accuracy "
            f"{hist[0]['score_mean']:.3f} -> {hist[-1]['score_mean']:.3f} {since(t0)}")

    t0 = now()
    ev_ids, ev_mask = prompt_arrays(tokenizer, task.eval_prompts, prompt_len)
    results = evaluate_pass_at_k(
        policies, ev_ids, ev_mask, tasks.make_addition_verifier(tokenizer, task.eval_answers),
        n_samples=settings.eval_samples, max_new_tokens=max_new, key=jax.random.key(seed + 1),
        temperature=settings.temperature, ref=(lm, sft_params), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    log(f"[rlvr] pass@k evaluation: {len(ev_ids)} prompts x {settings.eval_samples} samples x "
        f"{len(policies)} models {since(t0)}")
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    export(lm, policies["ppo"][1], tokenizer, os.path.join(out, "ppo_hf"))

    models = {}
    for name, entry in results["models"].items():
        models[name] = {
            "pass_at_k": entry["pass_at_k"],
            "pass_at_k_ci": entry["pass_at_k_ci"],
            "kl_to_sft": entry["kl_to_ref"]["mean"],
            "examples": [
                f"{task.eval_prompts[0]}{text}" for text in decode_tokens(tokenizer, pad_lists(entry["examples"]))
            ],
        }
    runs = {}
    for name, cfg in configs.items():
        b = cfg.batch
        group = getattr(b, "group_size", 1)
        runs[name] = {
            "prompts_per_iteration": b.batch_size,
            "group_size": group,
            "rows_per_iteration": b.batch_size * group,
            "iterations": settings.add_rl_iterations,
            "max_new_tokens": max_new,
            "token_budget": settings.add_rl_iterations * b.batch_size * group * max_new,
            "updates_per_iteration": b.num_minibatches * b.ppo_epochs,
            "learning_rate": cfg.optimizer.learning_rate,
            "kl": _kl_words(cfg),
            "seconds": seconds[name],
        }
    return {
        "task": {
            "digits": settings.add_digits, "sft_noise_rate": settings.add_noise,
            "sft_examples": len(task.sft_prompts), "sft_correct_fraction": float(np.mean(task.sft_is_correct)),
            "rl_prompts": len(task.rl_prompts), "eval_prompts": len(task.eval_prompts),
            "format": "operands zero-padded; sum zero-padded and written least significant digit first",
            "example": f"{task.eval_prompts[0]}{task.eval_answers[0]}",
        },
        "models": models,
        "runs": runs,
        "final_kl": results["models"]["ppo"]["kl_to_ref"]["mean"],
        "training": {
            "sft_loss": history_series(sft_hist, "loss"),
            **{f"{name}_reward": history_series(h, "score_mean") for name, h in histories.items()},
            **{f"{name}_kl": history_series(h, "kl_k1") for name, h in histories.items()},
        },
        "eval": results,
    }


def _kl_words(cfg) -> str:
    """The KL penalty of a run in a few words, e.g. "k3 as a loss, coef 0.04"."""
    kl = cfg.kl
    placement = getattr(kl, "placement", "in_reward")  # a PPOConfig's KL is always in the reward
    where = {"in_reward": "in the reward", "in_loss": "as a loss", "none": "none"}[placement]
    return f"{kl.kl_estimator} {where}, coef {kl.kl_coef}"
