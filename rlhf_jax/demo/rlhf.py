"""Part 2 of the offline demo, RLHF: online (PPO on a reward model) or offline (DPO)?

SFT on short mood descriptions; pairs of the SFT model's own samples labelled by a hidden,
noisy annotator; then the two ways of learning from those pairs:

- online: a Bradley-Terry reward model initialised from the SFT trunk learns the pairs, and
  PPO samples fresh responses and optimises its score (a second PPO run with a weak KL
  penalty, `mood_low_kl_coef`, full mode only, shows where the learned reward stops being a
  good proxy: Gao et al. 2022);
- offline: DPO on the very same training pairs, against the frozen SFT model, no reward
  model and no sampling.

The gold annotator's score of every PPO rollout is logged next to the reward model's, so
over-optimisation would show; at the end the annotator judges held-out samples of every
policy (gold success: the share it accepts; gold score: its mean score).

References:
  Ziegler et al. 2019, arXiv 1909.08593; Huang et al. 2024, arXiv 2403.17031;
  Rafailov et al. 2023, arXiv 2305.18290 (DPO); Gao et al. 2022, arXiv 2210.10760.
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
from rlhf_jax.rollout import generate
from rlhf_jax.train import DPOConfig, OptimizerConfig, PPOTrainer, RewardConfig, normalize_reward_head
from rlhf_jax.train.drivers import fit_dpo, fit_ppo, fit_reward
from rlhf_jax.train.state import optimizer_from_config

__all__ = ["run_rlhf", "dpo_pairs"]


def _preference_pairs(tokenizer, task, lm, sft_params, prompt_ids, prompt_mask, max_new, seed):
    """Two SFT samples per prompt, labelled by the hidden annotator (noisy)."""
    rollouts = [
        generate(lm, sft_params, prompt_ids, prompt_mask, jax.random.key(seed * 1000 + i),
                 max_new_tokens=max_new, temperature=1.0, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=tokenizer.pad_token_id)
        for i in (1, 2)
    ]
    gold = []
    for r in rollouts:
        texts = decode_tokens(tokenizer, r.tokens, r.mask)
        gold.append(task.annotator.score(texts, np.asarray(r.ended_with_eos)))
    prefer_a, decided = tasks.label_pairs(task.annotator, gold[0], gold[1], np.random.default_rng(seed))
    seq = [np.concatenate([prompt_ids, np.asarray(r.tokens)], axis=1) for r in rollouts]
    mask = [np.concatenate([prompt_mask, (np.asarray(r.mask) > 0).astype(np.int32)], axis=1) for r in rollouts]
    pick = prefer_a[decided, None]
    pairs = {
        "chosen_ids": np.where(pick, seq[0][decided], seq[1][decided]),
        "chosen_mask": np.where(pick, mask[0][decided], mask[1][decided]),
        "rejected_ids": np.where(pick, seq[1][decided], seq[0][decided]),
        "rejected_mask": np.where(pick, mask[1][decided], mask[0][decided]),
    }
    chosen_gold = np.where(prefer_a, gold[0], gold[1])[decided]
    rejected_gold = np.where(prefer_a, gold[1], gold[0])[decided]
    return pairs, chosen_gold, rejected_gold, seq[0], mask[0]


def dpo_pairs(pairs: dict, prompt_length: int) -> dict:
    """The reward model's pairs as DPO's columns: `*_loss_mask` = 1 on the response tokens.

    The sequences are `[left-padded prompt (prompt_length) | response through EOS | PAD]`;
    DPO's sequence log-probs sum over the response tokens only (the prompt is shared by
    both sides and conditions them), EOS included.
    """
    out = dict(pairs)
    for side in ("chosen", "rejected"):
        mask = np.asarray(pairs[f"{side}_mask"])
        response = np.arange(mask.shape[1])[None, :] >= prompt_length
        out[f"{side}_loss_mask"] = (response & (mask > 0)).astype(np.int32)
    return out


def run_rlhf(tokenizer, settings, out: str, seed: int, log, quiet: dict) -> dict:
    """Runs part 2 in `out`; returns its section of the report."""
    task = tasks.make_mood_task(seed, num_sft=settings.mood_num_sft, num_rl=settings.mood_num_pairs,
                                num_eval=settings.mood_num_eval)
    prompt_len = 1 + max(len(p) for p in task.sft_prompts + task.rl_prompts + task.eval_prompts)
    max_new = task.max_completion_length + 3  # room for EOS and a little overshoot
    context = prompt_len + max_new
    lm, init_params = new_policy(tokenizer, settings, settings.mood_layers, context, seed)
    sft_data = sft_arrays(tokenizer, task.sft_prompts, task.sft_completions, context)

    t0 = now()
    sft_params, sft_hist = sft(lm, init_params, sft_data, settings.mood_sft_steps, settings.mood_sft_lr, settings,
                               os.path.join(out, "sft"), seed, quiet)
    log(f"[rlhf] SFT: {settings.mood_sft_steps} steps, final loss {sft_hist[-1]['loss']:.3f} {since(t0)}")

    # Preference data from the SFT model's own samples.
    t0 = now()
    rl_ids, rl_mask = prompt_arrays(tokenizer, task.rl_prompts, prompt_len)
    pairs, chosen_gold, rejected_gold, ref_seq, ref_mask = _preference_pairs(
        tokenizer, task, lm, sft_params, rl_ids, rl_mask, max_new, seed)
    num_pairs = len(pairs["chosen_ids"])
    if num_pairs < 2 * settings.rm_batch_size:
        raise RuntimeError(
            f"the annotator found only {num_pairs} decided pairs among {len(rl_ids)} SFT sample pairs "
            "(the SFT model's samples are mostly malformed or equal); train the SFT model longer"
        )
    num_heldout = int(round(settings.mood_heldout_fraction * num_pairs))
    train_pairs = {k: v[num_heldout:] for k, v in pairs.items()}
    heldout_pairs = {k: v[:num_heldout] for k, v in pairs.items()}

    rm, rm_params = lm.with_head("scalar", sft_params, seed=seed + 7)
    rm_cfg = RewardConfig(batch_size=settings.rm_batch_size, num_epochs=settings.rm_epochs,
                          optimizer=OptimizerConfig(learning_rate=settings.rm_lr, warmup_steps=10, schedule="cosine"))
    rm_run = run_options(quiet, os.path.join(out, "reward"), seed)
    rm_params, rm_hist = fit_reward(rm, rm_params, train_pairs, rm_cfg, rm_run, eval_data=heldout_pairs)
    heldout = {k[len("eval/"):]: float(v) for k, v in rm_hist[-1].items() if k.startswith("eval/")}
    # Agreement with the noise-free gold ordering on held-out pairs with distinct gold scores.
    score = jax.jit(rm.scores)
    s_chosen = np.asarray(score(rm_params, heldout_pairs["chosen_ids"], heldout_pairs["chosen_mask"]))
    s_rejected = np.asarray(score(rm_params, heldout_pairs["rejected_ids"], heldout_pairs["rejected_mask"]))
    g_c, g_r = chosen_gold[:num_heldout], rejected_gold[:num_heldout]
    distinct = g_c != g_r
    gold_accuracy = float(np.mean((s_chosen > s_rejected)[distinct] == (g_c > g_r)[distinct]))
    label_agreement = float(np.mean((chosen_gold > rejected_gold)[chosen_gold != rejected_gold]))
    # Scores on SFT samples get mean 0 and std `rm_target_std` (Ziegler et al. 2019), so
    # the KL coefficient has a known scale to act against.
    rm_params = normalize_reward_head(rm, rm_params, ref_seq, ref_mask, target_std=settings.rm_target_std)
    log(f"[rlhf] reward model: {len(train_pairs['chosen_ids'])} pairs x {settings.rm_epochs} epochs, "
        f"held-out accuracy {heldout['accuracy']:.3f} (vs gold ordering {gold_accuracy:.3f}) {since(t0)}")

    # Offline: DPO on the reward model's training pairs, the SFT model as the reference.
    t0 = now()
    dpo_cfg = DPOConfig(beta=settings.dpo_beta, batch_size=settings.dpo_batch_size, num_epochs=settings.dpo_epochs,
                        optimizer=OptimizerConfig(learning_rate=settings.dpo_lr, warmup_steps=5, schedule="cosine"))
    dpo_params, dpo_hist = fit_dpo(lm, sft_params, dpo_pairs(train_pairs, prompt_len), dpo_cfg,
                                   run_options(quiet, os.path.join(out, "dpo"), seed, log_every=1))
    seconds = {"dpo": elapsed(t0)}
    log(f"[rlhf] DPO: {len(dpo_hist)} steps (beta {settings.dpo_beta}), pair accuracy "
        f"{dpo_hist[0]['accuracy']:.3f} -> {dpo_hist[-1]['accuracy']:.3f}, margin {dpo_hist[-1]['margin']:.3f} "
        f"{since(t0)}")

    # Online: PPO against the learned reward model; the gold annotator only watches.
    gold_fn = task.annotator.reward_fn(tokenizer)

    def watch_gold(step, rows, rollout):
        tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
        gold = gold_fn(None, None, tokens, mask, rows)
        return {"gold_score": float(gold.mean()),
                "gold_success": float(np.mean(gold >= task.annotator.accept_threshold))}

    def run_ppo(kl_coef, folder):
        cfg = ppo_config(settings, settings.mood_ppo_lr, kl_coef, max_new, tokenizer, missing_eos_penalty=1.0)
        trainer = PPOTrainer(lm, cfg, optimizer_from_config(cfg.optimizer), reward_model=rm)
        t0 = now()
        params, hist = fit_ppo(trainer, sft_params, sft_params, {"prompt_ids": rl_ids, "prompt_mask": rl_mask},
                               run_options(quiet, os.path.join(out, folder), seed, log_every=1),
                               reward_params=rm_params, max_steps=settings.mood_ppo_iterations,
                               on_rollout=watch_gold)
        seconds[folder] = elapsed(t0)
        log(f"[rlhf] PPO (kl_coef {kl_coef}): {settings.mood_ppo_iterations} iterations, RM score "
            f"{hist[0]['score_mean']:.3f} -> {hist[-1]['score_mean']:.3f}, gold score "
            f"{hist[0]['gold_score']:.3f} -> {hist[-1]['gold_score']:.3f} {since(t0)}")
        return params, hist

    policies = {"sft": (lm, sft_params), "dpo": (lm, dpo_params)}
    histories = {}
    ppo_params, histories["ppo"] = run_ppo(settings.mood_kl_coef, "ppo")
    policies["ppo"] = (lm, ppo_params)
    if settings.mood_low_kl_coef is not None:
        # The same run with a weak KL penalty: how far does the learned reward stay a good proxy?
        low_params, histories["ppo_low_kl"] = run_ppo(settings.mood_low_kl_coef, "ppo_low_kl")
        policies["ppo_low_kl"] = (lm, low_params)

    t0 = now()
    ev_ids, ev_mask = prompt_arrays(tokenizer, task.eval_prompts, prompt_len)
    accept = task.annotator.accept_threshold

    def gold_accepts(prompt_ids, prompt_mask, tokens, mask, index):
        return (gold_fn(prompt_ids, prompt_mask, tokens, mask, index) >= accept).astype(np.float32)

    def malformed(prompt_ids, prompt_mask, tokens, mask, index):
        # Non-words, broken grammar or no EOS: text the reward model rarely saw in its pairs.
        gold = gold_fn(prompt_ids, prompt_mask, tokens, mask, index)
        return (gold == task.annotator.malformed_score).astype(np.float32)

    results = evaluate_pass_at_k(
        policies, ev_ids, ev_mask, gold_accepts,
        n_samples=settings.mood_eval_samples, max_new_tokens=max_new, key=jax.random.key(seed + 2),
        temperature=settings.temperature, ref=(lm, sft_params), reward_model=(rm, rm_params),
        scorers={"gold_score": gold_fn, "malformed": malformed}, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, num_examples=6,
    )
    log(f"[rlhf] evaluation: {len(ev_ids)} prompts x {settings.mood_eval_samples} samples x "
        f"{len(policies)} models {since(t0)}")
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    export(lm, ppo_params, tokenizer, os.path.join(out, "ppo_hf"))
    export(lm, dpo_params, tokenizer, os.path.join(out, "dpo_hf"))

    models = {}
    for name, entry in results["models"].items():
        texts = decode_tokens(tokenizer, pad_lists(entry["examples"]))
        models[name] = {
            "gold_success": entry["accuracy"],
            "gold_success_ci": entry["pass_at_k_ci"]["1"],
            "gold_score": entry["gold_score"]["mean"],
            "rm_score": entry["rm_score"]["mean"],
            "kl_to_sft": entry["kl_to_ref"]["mean"],
            "eos_fraction": entry["eos_fraction"],
            "malformed_fraction": entry["malformed"]["mean"],
            "examples": [f"{task.eval_prompts[i // settings.mood_eval_samples]}{t}" for i, t in enumerate(texts)],
        }
    return {
        "task": {
            "sft_examples": len(task.sft_prompts),
            "sft_gold_success": float(task.annotator.accepts(task.sft_completions).mean()),
            "label_noise": task.annotator.label_noise,
            "tie_margin": task.annotator.tie_margin,
            "pairs_sampled": len(rl_ids),
            "accept_threshold": accept,
            "malformed_score": task.annotator.malformed_score,
            "pairs_train": int(len(train_pairs["chosen_ids"])),
            "pairs_heldout": num_heldout,
            "label_agreement_with_gold": label_agreement,
            "hidden_weights": {k: round(v, 3) for k, v in task.annotator.weights.items()},
        },
        "reward_model": {
            "heldout_accuracy": heldout["accuracy"],
            "heldout_accuracy_vs_gold": gold_accuracy,
            "heldout_loss": heldout["loss"],
        },
        "dpo": {
            "beta": settings.dpo_beta,
            "epochs": settings.dpo_epochs,
            "batch_size": settings.dpo_batch_size,
            "learning_rate": settings.dpo_lr,
            "steps": len(dpo_hist),
            "final_pair_accuracy": float(dpo_hist[-1]["accuracy"]),
            "final_margin": float(dpo_hist[-1]["margin"]),
        },
        "models": models,
        "final_kl": results["models"]["ppo"]["kl_to_ref"]["mean"],
        "kl_coef": {"ppo": settings.mood_kl_coef, "ppo_low_kl": settings.mood_low_kl_coef},
        "seconds": seconds,
        "training": {
            "sft_loss": history_series(sft_hist, "loss"),
            "rm_loss": history_series(rm_hist, "loss"),
            "dpo_loss": history_series(dpo_hist, "loss"),
            "dpo_accuracy": history_series(dpo_hist, "accuracy"),
            **{
                f"{run}_{name}": history_series(hist, key)
                for run, hist in histories.items()
                for name, key in (("rm_score", "score_mean"), ("gold_score", "gold_score"),
                                  ("gold_success", "gold_success"), ("kl", "kl_k1"))
            },
        },
        "eval": results,
    }
