"""LoRA or full fine-tuning for the real-model demo? GRPO on SmolLM2-135M-Instruct, measured.

Both modes run the demo's task and GRPO settings (`rlhf_jax.demo.real.FULL`: 8 prompts x 8
samples per iteration, 6 new tokens, the `grpo` preset with `share_prompt_forward`) for
`--iterations` iterations on the same training problems in the same order, each in its own
subprocess (so that peak memory is per mode):

- lora: rank 16, alpha 32 on every projection, AdamW at 1e-4 (the demo's setting);
- full: every weight trained, AdamW at 1e-5 (a tenth of LoRA's rate, the usual ratio).

Reported per mode: seconds and CPU seconds per iteration (median, the first, compiling,
iteration excluded; CPU time counts all threads and is less sensitive than wall time to
other processes on a shared machine), the 1-minute load average, peak RSS, trained
parameters, the training reward per iteration, and pass@1 on the demo's held-out problems
(`--eval_samples` samples each) before and after: learning per sampled token is the
held-out gain over the tokens sampled in training.

    python benchmarks/real_lora_vs_full.py --iterations 20 --out_dir benchmarks/out/real_lora_vs_full
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def run_mode(mode: str, iterations: int, eval_samples: int, seed: int) -> dict:
    import jax

    from rlhf_jax.demo import chat_arithmetic as task
    from rlhf_jax.demo.real import EOS_TOKEN, FULL, PAD_TOKEN, load_smollm2
    from rlhf_jax.eval.passk_eval import evaluate_pass_at_k
    from rlhf_jax.models import LoRAConfig, add_lora
    from rlhf_jax.models.lora import combine, merge_adapters, num_params
    from rlhf_jax.train.options import OptimizerConfig
    from rlhf_jax.train.rl.presets import rl_config
    from rlhf_jax.train.rl.trainer import RLTrainer
    from rlhf_jax.train.state import optimizer_from_config

    s = FULL
    lm, base, tok = load_smollm2()
    pad_id, eos_id = tok.convert_tokens_to_ids(PAD_TOKEN), tok.convert_tokens_to_ids(EOS_TOKEN)
    train, heldout = task.make_problems(s.num_train, s.num_heldout, seed=seed)
    problems = heldout + train
    verifier = task.ArithmeticVerifier(tok, problems)
    h_ids, h_mask = task.encode_prompts(tok, heldout, pad_id=pad_id)
    t_ids, t_mask = task.encode_prompts(tok, train, pad_id=pad_id)

    def pass1(model_lm, params):
        res = evaluate_pass_at_k({"m": (model_lm, params)}, h_ids, h_mask, verifier, n_samples=eval_samples,
                                 max_new_tokens=s.max_new_tokens, key=jax.random.key(seed + 1),
                                 temperature=s.temperature, batch_size=s.eval_batch_size, eos_token_id=eos_id,
                                 pad_token_id=pad_id, prompt_index=np.arange(len(heldout)), share_prompts=True)
        return res["models"]["m"]["pass_at_k"]["1"]

    before = pass1(lm, base)
    cfg = rl_config("grpo", {"batch": {"batch_size": s.batch_size, "group_size": s.group_size,
                                       "share_prompt_forward": True},
                             "sampling": {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature,
                                          "eos_token_id": eos_id, "pad_token_id": pad_id},
                             "kl": {"kl_coef": s.kl_coef}, "seed": seed})
    lr = s.learning_rate if mode == "lora" else s.learning_rate / 10
    tx = optimizer_from_config(OptimizerConfig(learning_rate=lr))
    offset = len(heldout)

    def reward(i, m, t, tm, idx):
        return verifier(i, m, t, tm, offset + np.asarray(idx))

    if mode == "lora":
        policy, trained = add_lora(lm, LoRAConfig(rank=s.lora_rank, alpha=s.lora_alpha), seed=seed)
    else:
        policy, trained = lm, base
    trainer = RLTrainer(policy, cfg, tx, reward_fn=reward)
    state = trainer.init(trained, seed=seed)
    walls, cpus, loads, scores, kls, tokens = [], [], [], [], [], 0.0
    for it in range(iterations):
        rows = np.arange(it * s.batch_size, (it + 1) * s.batch_size) % len(train)
        w, c = time.perf_counter(), time.process_time()
        state, metrics, _ = trainer.iteration(state, t_ids[rows], t_mask[rows], ref_params=base, prompt_index=rows)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
        loads.append(os.getloadavg()[0])
        scores.append(float(metrics["score_mean"]))
        kls.append(float(metrics["kl_k3"]))
        tokens += float(metrics["response_length"]) * cfg.batch.rows
        print(f"{mode} {it + 1}/{iterations}: {walls[-1]:.1f} s, cpu {cpus[-1]:.1f} s, reward {scores[-1]:.3f}",
              file=sys.stderr, flush=True)
    if mode == "lora":
        final_lm, final = merge_adapters(policy, combine(base, state.params))
    else:
        final_lm, final = lm, state.params
    after = pass1(final_lm, final)
    return {
        "mode": mode, "learning_rate": lr, "iterations": iterations,
        "trained_parameters": num_params(trained), "optimizer_state_parameters": num_params(state.opt_state),
        "seconds_per_iteration": float(np.median(walls[1:])), "cpu_seconds_per_iteration": float(np.median(cpus[1:])),
        "first_iteration_seconds": walls[0], "first_iteration_cpu_seconds": cpus[0],
        "load_average": float(np.mean(loads)),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
        "train_reward": scores, "kl_k3": kls, "sampled_tokens": tokens,
        "heldout_pass_at_1": {"before": before, "after": after},
        "heldout_gain_per_1k_sampled_tokens": (after - before) / tokens * 1000,
    }


def markdown(results: list[dict], eval_samples: int) -> str:
    lines = ["| | LoRA | full |", "|---|---|---|"]
    by = {r["mode"]: r for r in results}
    rows = [
        ("learning rate", lambda r: f"{r['learning_rate']:g}"),
        ("trained parameters", lambda r: f"{r['trained_parameters'] / 1e6:.1f}M"),
        ("optimizer state (parameters)", lambda r: f"{r['optimizer_state_parameters'] / 1e6:.1f}M"),
        ("s / iteration (median)", lambda r: f"{r['seconds_per_iteration']:.1f}"),
        ("CPU s / iteration (median)", lambda r: f"{r['cpu_seconds_per_iteration']:.1f}"),
        ("first iteration (compile), s / CPU s",
         lambda r: f"{r['first_iteration_seconds']:.0f} / {r['first_iteration_cpu_seconds']:.0f}"),
        ("load average (1 min)", lambda r: f"{r['load_average']:.1f}"),
        ("peak RSS GiB", lambda r: f"{r['peak_rss_gib']:.2f}"),
        ("train reward, first 5 -> last 5 iterations",
         lambda r: f"{np.mean(r['train_reward'][:5]):.3f} -> {np.mean(r['train_reward'][-5:]):.3f}"),
        ("k3 KL at the end (mean of last 5)", lambda r: f"{np.mean(r['kl_k3'][-5:]):.2f}"),
        (f"held-out pass@1 (n={eval_samples}) before -> after",
         lambda r: f"{r['heldout_pass_at_1']['before']:.3f} -> {r['heldout_pass_at_1']['after']:.3f}"),
        ("held-out gain per 1k sampled tokens", lambda r: f"{r['heldout_gain_per_1k_sampled_tokens']:.4f}"),
        ("held-out gain per CPU minute",
         lambda r: f"{(r['heldout_pass_at_1']['after'] - r['heldout_pass_at_1']['before']) / (r['cpu_seconds_per_iteration'] * r['iterations'] / 60):.3f}"),  # noqa: E501
    ]
    for name, fn in rows:
        lines.append(f"| {name} | {fn(by['lora'])} | {fn(by['full'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--eval_samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default="benchmarks/out/real_lora_vs_full")
    parser.add_argument("--mode", choices=("lora", "full"), help=argparse.SUPPRESS)  # the subprocess
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.iterations, args.eval_samples, args.seed)))
        return
    results = []
    for mode in ("lora", "full"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--iterations", str(args.iterations),
                              "--eval_samples", str(args.eval_samples), "--seed", str(args.seed)],
                             check=True, stdout=subprocess.PIPE, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"device": "cpu", "cpu_count": os.cpu_count(), "results": results}, f, indent=1)
    table = markdown(results, args.eval_samples)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
