"""The offline demo: RLVR on addition and RLHF with a learned reward model.

`run_demo(output_dir)` trains tiny GPT-2-shaped transformers from scratch on
the two built-in tasks of `rlhf_jax.demo.tasks` with the library's own
drivers, and writes a report. Nothing is downloaded.

Part 1, RLVR (does RL teach something new, or sharpen what the model
already knew? Yue et al. 2025): SFT on addition problems whose answers are
often wrong by one digit, so the SFT model is right only some of the time;
then PPO with the exact verifier as the reward (frozen reference,
KL-shaped rewards, a value head on the shared trunk, GAE); then the pass@k
curves of SFT and PPO on held-out problems, k = 1..n.

Part 2, RLHF (does optimising a *learned* reward improve what the
annotator wanted? Gao et al. 2022): SFT on short mood descriptions; pairs of
the SFT model's own samples labelled by a hidden, noisy annotator; a
Bradley-Terry reward model initialised from the SFT trunk; PPO against it,
with the gold annotator's score of every rollout logged next to the reward
model's, so over-optimisation would show; a second PPO run with a weak KL
penalty (`mood_low_kl_coef`, full mode only) to see where the learned
reward stops being a good proxy; then the annotator's verdict on held-out
samples of SFT and both PPO policies.

Outputs in `output_dir`: `report.json` (every number), `report.md`,
`rlvr_pass_at_k.png`, `rlvr_training.png`, `rlhf_training.png`, and one
folder per stage with its metrics, checkpoints and (for the final policies)
an HF export that loads in `transformers`.

References:
  Yue et al. 2025, arXiv 2504.13837. Gao et al. 2022, arXiv 2210.10760.
  Ziegler et al. 2019, arXiv 1909.08593. Huang et al. 2024, arXiv 2403.17031.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import jax
import numpy as np

from rlhf_jax.data.padding import left_pad, right_pad
from rlhf_jax.data.tokenizers import char_tokenizer, decode_tokens, encode_texts
from rlhf_jax.demo import tasks
from rlhf_jax.demo.report import conclusions, markdown_report, plot_training
from rlhf_jax.eval.passk_eval import evaluate_pass_at_k, format_table, plot_pass_at_k
from rlhf_jax.models import ModelConfig, from_config, save_pretrained
from rlhf_jax.rollout import generate
from rlhf_jax.train import (
    BatchConfig,
    KLConfig,
    OptimizerConfig,
    PPOConfig,
    PPOTrainer,
    RewardConfig,
    RewardShapingConfig,
    RunOptions,
    SamplingConfig,
    SFTConfig,
    normalize_reward_head,
)
from rlhf_jax.train.drivers import fit_ppo, fit_reward, fit_sft
from rlhf_jax.train.state import optimizer_from_config

__all__ = ["DemoSettings", "run_demo", "QUICK", "FULL"]


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes and hyper-parameters of the demo (`FULL` and `QUICK` below)."""

    hidden_size: int = 64
    num_heads: int = 4
    add_layers: int = 2
    mood_layers: int = 2
    # RLVR: addition.
    add_digits: int = 2
    add_noise: float = 0.5
    add_num_sft: int = 3000
    add_num_rl: int = 1536
    add_num_eval: int = 128
    add_sft_steps: int = 800
    add_sft_lr: float = 2e-3
    add_ppo_iterations: int = 30
    add_ppo_lr: float = 1e-4
    eval_samples: int = 64
    # RLHF: moods.
    mood_num_sft: int = 3000
    mood_sft_steps: int = 500
    mood_sft_lr: float = 2e-3
    mood_num_pairs: int = 2048
    mood_heldout_fraction: float = 0.2
    rm_epochs: int = 3
    rm_lr: float = 2e-3
    mood_ppo_iterations: int = 20
    mood_ppo_lr: float = 1e-4
    mood_kl_coef: float = 0.2
    mood_low_kl_coef: float | None = 0.01
    rm_target_std: float = 1.0
    mood_num_eval: int = 256
    mood_eval_samples: int = 4
    # Shared.
    sft_batch_size: int = 64
    rm_batch_size: int = 64
    ppo_batch_size: int = 256
    ppo_minibatches: int = 4
    ppo_epochs: int = 4
    add_kl_coef: float = 0.05
    temperature: float = 1.0


FULL = DemoSettings()
# The reduced mode of the tests: a 1-layer model suffices for addition, the
# reward model needs 2 layers to judge the moods.
QUICK = dataclasses.replace(
    FULL,
    add_layers=1,
    add_num_sft=2000,
    add_num_rl=512,
    add_num_eval=64,
    add_sft_steps=600,
    add_sft_lr=3e-3,
    add_ppo_iterations=8,
    add_ppo_lr=2e-4,
    eval_samples=16,
    mood_num_sft=2000,
    mood_sft_steps=300,
    mood_num_pairs=1024,
    rm_epochs=4,
    rm_lr=3e-3,
    mood_ppo_iterations=8,
    mood_ppo_lr=2e-4,
    mood_num_eval=128,
    mood_eval_samples=2,
    mood_low_kl_coef=None,
    ppo_batch_size=128,
)

_STAGES = ("rlvr", "rlhf")
_REPORT_FILES = ("report.json", "report.md", "rlvr_pass_at_k.png", "rlvr_training.png", "rlhf_training.png")


# ----------------------------------------------------------------------------- data


def _now():
    return time.perf_counter(), time.process_time()


def _since(start) -> str:
    """`(wall s, cpu s)` since `start`: CPU time shows the cost on a busy machine."""
    wall, cpu = _now()
    return f"({wall - start[0]:.1f}s, cpu {cpu - start[1]:.1f}s)"


def _prompt_arrays(tokenizer, texts, length):
    """`[N, length]` left-padded `<bos> + text` prompts and their mask."""
    rows = [[tokenizer.bos_token_id] + ids for ids in encode_texts(tokenizer, texts)]
    return left_pad(rows, length, pad_id=tokenizer.pad_token_id)


def _sft_arrays(tokenizer, prompts, completions, length):
    """`<bos> prompt completion <eos>` right-padded to `length`; loss on completion + EOS."""
    rows, starts = [], []
    for p, c in zip(encode_texts(tokenizer, prompts), encode_texts(tokenizer, completions)):
        rows.append([tokenizer.bos_token_id] + p + c + [tokenizer.eos_token_id])
        starts.append(1 + len(p))
    ids, mask = right_pad(rows, length, pad_id=tokenizer.pad_token_id)
    loss_mask = (np.arange(length)[None, :] >= np.asarray(starts)[:, None]) & (mask > 0)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask.astype(np.int32)}


def _new_policy(tokenizer, settings: DemoSettings, num_layers: int, context: int, seed: int):
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
    # One value head on the shared trunk (OpenAI's lm-human-preferences layout): SFT
    # ignores it, PPO trains it.
    return from_config(config, head="lm+value", seed=seed)


_QUIET = dict(log_every=10, print_every=10**9, checkpoint_every=10**9, tensorboard=False,
              async_checkpoint=False, resume=False, progress=False)


def _run_options(quiet: dict, output_dir: str, seed: int, **changes) -> RunOptions:
    return RunOptions(output_dir=output_dir, seed=seed, **{**quiet, **changes})


def _sft(lm, params, data, steps, lr, settings, output_dir, seed, quiet):
    cfg = SFTConfig(batch_size=settings.sft_batch_size, num_epochs=None, optimizer=OptimizerConfig(
        learning_rate=lr, warmup_steps=min(50, steps // 10), schedule="cosine"))
    params, history = fit_sft(lm, params, data, cfg, _run_options(quiet, output_dir, seed), max_steps=steps)
    return params, history


def _ppo_config(settings, lr, kl_coef, max_new_tokens, tokenizer, missing_eos_penalty=None):
    return PPOConfig(
        batch=BatchConfig(batch_size=settings.ppo_batch_size, num_minibatches=settings.ppo_minibatches,
                          ppo_epochs=settings.ppo_epochs),
        sampling=SamplingConfig(max_new_tokens=max_new_tokens, temperature=settings.temperature,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        kl=KLConfig(kl_coef=kl_coef),
        rewards=RewardShapingConfig(missing_eos_penalty=missing_eos_penalty),
        optimizer=OptimizerConfig(learning_rate=lr),
    )


def _history_series(history, key):
    return [float(rec[key]) for rec in history if key in rec]


# ----------------------------------------------------------------------------- part 1


def _run_rlvr(tokenizer, settings: DemoSettings, out: str, seed: int, log, quiet: dict) -> dict:
    task = tasks.make_addition_task(
        seed, num_digits=settings.add_digits, num_sft=settings.add_num_sft,
        num_rl=settings.add_num_rl, num_eval=settings.add_num_eval, noise_rate=settings.add_noise,
    )
    prompt_len = 1 + len(task.eval_prompts[0])
    max_new = task.max_answer_length + 1  # room for EOS after the longest answer
    lm, init_params = _new_policy(tokenizer, settings, settings.add_layers, prompt_len + max_new, seed)
    sft_data = _sft_arrays(tokenizer, task.sft_prompts, task.sft_completions, prompt_len + max_new)

    t0 = _now()
    sft_params, sft_hist = _sft(lm, init_params, sft_data, settings.add_sft_steps, settings.add_sft_lr, settings,
                                os.path.join(out, "sft"), seed, quiet)
    log(f"[rlvr] SFT: {settings.add_sft_steps} steps, final loss {sft_hist[-1]['loss']:.3f} "
        f"{_since(t0)}")

    rl_ids, rl_mask = _prompt_arrays(tokenizer, task.rl_prompts, prompt_len)
    cfg = _ppo_config(settings, settings.add_ppo_lr, settings.add_kl_coef, max_new, tokenizer)
    trainer = PPOTrainer(lm, cfg, optimizer_from_config(cfg.optimizer),
                         reward_fn=tasks.make_addition_verifier(tokenizer, task.rl_answers))
    t0 = _now()
    ppo_params, ppo_hist = fit_ppo(trainer, sft_params, sft_params,
                                   {"prompt_ids": rl_ids, "prompt_mask": rl_mask},
                                   _run_options(quiet, os.path.join(out, "ppo"), seed, log_every=1),
                                   max_steps=settings.add_ppo_iterations)
    log(f"[rlvr] PPO: {settings.add_ppo_iterations} iterations, train accuracy "
        f"{ppo_hist[0]['score_mean']:.3f} -> {ppo_hist[-1]['score_mean']:.3f} {_since(t0)}")

    t0 = _now()
    ev_ids, ev_mask = _prompt_arrays(tokenizer, task.eval_prompts, prompt_len)
    results = evaluate_pass_at_k(
        {"sft": (lm, sft_params), "ppo": (lm, ppo_params)}, ev_ids, ev_mask,
        tasks.make_addition_verifier(tokenizer, task.eval_answers),
        n_samples=settings.eval_samples, max_new_tokens=max_new, key=jax.random.key(seed + 1),
        temperature=settings.temperature, ref=(lm, sft_params), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    log(f"[rlvr] pass@k evaluation: {len(ev_ids)} prompts x {settings.eval_samples} samples "
        f"{_since(t0)}")
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    _export(lm, ppo_params, tokenizer, os.path.join(out, "ppo_hf"))

    models = {}
    for name, entry in results["models"].items():
        models[name] = {
            "pass_at_k": entry["pass_at_k"],
            "pass_at_k_ci": entry["pass_at_k_ci"],
            "kl_to_sft": entry["kl_to_ref"]["mean"],
            "examples": [
                f"{task.eval_prompts[0]}{text}" for text in decode_tokens(tokenizer, _pad_lists(entry["examples"]))
            ],
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
        "final_kl": results["models"]["ppo"]["kl_to_ref"]["mean"],
        "training": {
            "sft_loss": _history_series(sft_hist, "loss"),
            "ppo_reward": _history_series(ppo_hist, "score_mean"),
            "ppo_kl": _history_series(ppo_hist, "kl_k1"),
        },
        "eval": results,
    }


def _export(lm, params, tokenizer, path):
    """The policy as an HF causal LM (the value head is PPO's tool, not part of the policy)."""
    policy, policy_params = lm.with_head("lm", params)
    save_pretrained(policy, policy_params, path, tokenizer=tokenizer)


def _pad_lists(rows):
    width = max([len(r) for r in rows] + [1])
    return np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)


# ----------------------------------------------------------------------------- part 2


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


def _run_rlhf(tokenizer, settings: DemoSettings, out: str, seed: int, log, quiet: dict) -> dict:
    task = tasks.make_mood_task(seed, num_sft=settings.mood_num_sft, num_rl=settings.mood_num_pairs,
                                num_eval=settings.mood_num_eval)
    prompt_len = 1 + max(len(p) for p in task.sft_prompts + task.rl_prompts + task.eval_prompts)
    max_new = task.max_completion_length + 3  # room for EOS and a little overshoot
    context = prompt_len + max_new
    lm, init_params = _new_policy(tokenizer, settings, settings.mood_layers, context, seed)
    sft_data = _sft_arrays(tokenizer, task.sft_prompts, task.sft_completions, context)

    t0 = _now()
    sft_params, sft_hist = _sft(lm, init_params, sft_data, settings.mood_sft_steps, settings.mood_sft_lr, settings,
                                os.path.join(out, "sft"), seed, quiet)
    log(f"[rlhf] SFT: {settings.mood_sft_steps} steps, final loss {sft_hist[-1]['loss']:.3f} "
        f"{_since(t0)}")

    # Preference data from the SFT model's own samples.
    t0 = _now()
    rl_ids, rl_mask = _prompt_arrays(tokenizer, task.rl_prompts, prompt_len)
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
    rm_run = _run_options(quiet, os.path.join(out, "reward"), seed)
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
        f"held-out accuracy {heldout['accuracy']:.3f} (vs gold ordering {gold_accuracy:.3f}) "
        f"{_since(t0)}")

    # PPO against the learned reward model; the gold annotator only watches.
    gold_fn = task.annotator.reward_fn(tokenizer)

    def watch_gold(step, rows, rollout):
        tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
        gold = gold_fn(None, None, tokens, mask, rows)
        return {"gold_score": float(gold.mean()),
                "gold_success": float(np.mean(gold >= task.annotator.accept_threshold))}

    def run_ppo(kl_coef, folder):
        cfg = _ppo_config(settings, settings.mood_ppo_lr, kl_coef, max_new, tokenizer, missing_eos_penalty=1.0)
        trainer = PPOTrainer(lm, cfg, optimizer_from_config(cfg.optimizer), reward_model=rm)
        t0 = _now()
        params, hist = fit_ppo(trainer, sft_params, sft_params, {"prompt_ids": rl_ids, "prompt_mask": rl_mask},
                               _run_options(quiet, os.path.join(out, folder), seed, log_every=1),
                               reward_params=rm_params, max_steps=settings.mood_ppo_iterations,
                               on_rollout=watch_gold)
        log(f"[rlhf] PPO (kl_coef {kl_coef}): {settings.mood_ppo_iterations} iterations, RM score "
            f"{hist[0]['score_mean']:.3f} -> {hist[-1]['score_mean']:.3f}, gold score "
            f"{hist[0]['gold_score']:.3f} -> {hist[-1]['gold_score']:.3f} {_since(t0)}")
        return params, hist

    policies = {"sft": (lm, sft_params)}
    histories = {}
    ppo_params, histories["ppo"] = run_ppo(settings.mood_kl_coef, "ppo")
    policies["ppo"] = (lm, ppo_params)
    if settings.mood_low_kl_coef is not None:
        # The same run with a weak KL penalty: how far does the learned reward stay a good proxy?
        low_params, histories["ppo_low_kl"] = run_ppo(settings.mood_low_kl_coef, "ppo_low_kl")
        policies["ppo_low_kl"] = (lm, low_params)

    t0 = _now()
    ev_ids, ev_mask = _prompt_arrays(tokenizer, task.eval_prompts, prompt_len)
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
    log(f"[rlhf] evaluation: {len(ev_ids)} prompts x {settings.mood_eval_samples} samples "
        f"{_since(t0)}")
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    _export(lm, ppo_params, tokenizer, os.path.join(out, "ppo_hf"))

    models = {}
    for name, entry in results["models"].items():
        texts = decode_tokens(tokenizer, _pad_lists(entry["examples"]))
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
        "models": models,
        "final_kl": results["models"]["ppo"]["kl_to_ref"]["mean"],
        "kl_coef": {"ppo": settings.mood_kl_coef, "ppo_low_kl": settings.mood_low_kl_coef},
        "training": {
            "sft_loss": _history_series(sft_hist, "loss"),
            "rm_loss": _history_series(rm_hist, "loss"),
            **{
                f"{run}_{name}": _history_series(hist, key)
                for run, hist in histories.items()
                for name, key in (("rm_score", "score_mean"), ("gold_score", "gold_score"),
                                  ("gold_success", "gold_success"), ("kl", "kl_k1"))
            },
        },
        "eval": results,
    }


def run_demo(output_dir: str, *, seed: int = 0, quick: bool = False, overwrite: bool = False,
             settings: DemoSettings | None = None, verbose: bool = True) -> dict:
    """Runs both parts of the demo and writes the report into `output_dir`.

    Args:
      output_dir: where everything goes (created if needed).
      seed: seeds the tasks, the model initialisations, the data order and
        every sample; the same seed gives the same report (on one machine).
      quick: a reduced run (for tests, well under a minute).
      overwrite: replace the outputs of an earlier demo run in `output_dir`;
        without it an existing run there is an error.
      settings: explicit sizes (default `QUICK` or `FULL`).
      verbose: print progress and the final report.

    Returns:
      The report dict (also written to `report.json`), with at least
      `seconds`, `rlvr.models.{sft,ppo}.pass_at_k.{1,...}`, `rlvr.final_kl`,
      `rlhf.reward_model.heldout_accuracy`,
      `rlhf.models.{sft,ppo}.{gold_success,gold_score,rm_score}` and
      `rlhf.final_kl`.
    """
    start = time.perf_counter()
    settings = settings or (QUICK if quick else FULL)
    output_dir = os.fspath(output_dir)
    existing = [p for p in _STAGES + _REPORT_FILES if os.path.exists(os.path.join(output_dir, p))]
    if existing and not overwrite:
        raise FileExistsError(f"{output_dir} already holds a demo run ({', '.join(existing)}); "
                              "pass overwrite=True (--overwrite) or choose another output_dir")
    for p in existing:
        path = os.path.join(output_dir, p)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(output_dir, exist_ok=True)

    def log(message):
        if verbose:
            print(message, flush=True)

    tokenizer = char_tokenizer()
    quiet = {**_QUIET, "stdout": verbose}
    rlvr = _run_rlvr(tokenizer, settings, os.path.join(output_dir, "rlvr"), seed, log, quiet)
    rlhf = _run_rlhf(tokenizer, settings, os.path.join(output_dir, "rlhf"), seed, log, quiet)

    plot_pass_at_k(rlvr["eval"], os.path.join(output_dir, "rlvr_pass_at_k.png"),
                   title="RLVR (addition): pass@k on held-out problems")
    plot_training(os.path.join(output_dir, "rlvr_training.png"),
                   {"verifier reward (train accuracy)": rlvr["training"]["ppo_reward"]},
                   {"KL": rlvr["training"]["ppo_kl"]}, "RLVR: PPO with the verifier as reward")
    training = rlhf["training"]
    series, kls = {}, {}
    for run in ("ppo", "ppo_low_kl"):
        if f"{run}_rm_score" not in training:
            continue
        tag = f"kl_coef {rlhf['kl_coef'][run]}" + (", low KL" if run == "ppo_low_kl" else "")
        series[f"RM score ({tag})"] = training[f"{run}_rm_score"]
        series[f"gold score ({tag})"] = training[f"{run}_gold_score"]
        series[f"gold success ({tag})"] = training[f"{run}_gold_success"]
        kls[tag] = training[f"{run}_kl"]
    plot_training(os.path.join(output_dir, "rlhf_training.png"), series, kls,
                   "RLHF: PPO against the learned reward model, watched by the gold annotator")
    report = {
        "seconds": time.perf_counter() - start,
        "seed": seed,
        "quick": bool(quick),
        "device": f"{jax.devices()[0].platform} x{jax.device_count()}",
        "settings": dataclasses.asdict(settings),
        "rlvr": rlvr,
        "rlhf": rlhf,
    }
    report["conclusions"] = conclusions(report)
    report["seconds"] = time.perf_counter() - start
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(markdown_report(report))
    if verbose:
        print()
        print("RLVR pass@k (held-out addition problems):")
        print(format_table(rlvr["eval"]))
        print()
        print("RLHF (held-out prompts):")
        for name, m in rlhf["models"].items():
            print(f"  {name}: gold success {m['gold_success']:.3f}, gold score {m['gold_score']:.3f}, "
                  f"RM score {m['rm_score']:.3f}, malformed {m['malformed_fraction']:.3f}, "
                  f"KL to SFT {m['kl_to_sft']:.3f}")
        print(f"  reward model held-out accuracy {rlhf['reward_model']['heldout_accuracy']:.3f}")
        print()
        for c in report["conclusions"]:
            print(f"- {c}")
        print(f"\nreport: {os.path.join(output_dir, 'report.md')} ({report['seconds']:.1f} s)")
    return report
