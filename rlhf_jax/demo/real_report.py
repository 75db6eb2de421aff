"""The real-model demo's report: statistics, conclusions in words, `report.md`, the training plot.

Pure functions of the report dict that `rlhf_jax.demo.real.run_real_demo` builds, so a
saved `report.json` can be re-rendered. `conclusions` says what the numbers say: the
pass@1 gain against the target (+0.10), and whether the trained model still leads at the
largest k, with a paired bootstrap interval of the difference over problems.
"""
from __future__ import annotations

import numpy as np

from rlhf_jax.core.passk import pass_at_k

__all__ = ["TARGET_GAIN", "response_stats", "paired_difference", "conclusions", "markdown_report", "plot_training"]

TARGET_GAIN = 0.10


def response_stats(problems, entry: dict, n: int) -> dict:
    """pass@1 per operation, and the share of problems never solved in `n` samples."""
    correct = np.asarray(entry["correct_per_prompt"], np.float64)
    ops = np.asarray([p.op for p in problems])
    per_op = {op: float(np.mean(correct[ops == op]) / n) for op in dict.fromkeys(ops.tolist())}
    return {"pass_at_1_by_operation": per_op, "never_solved": float(np.mean(correct == 0)),
            "examples": entry["examples"]}


def paired_difference(n: int, base_correct, rl_correct, k: int, *, num_samples: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-problem pass@k(rl) - pass@k(base), with a percentile bootstrap over problems.

    The two models were sampled on the same problems (with common random numbers), so the
    problems are resampled jointly: the interval is that of the difference, narrower than
    the two separate intervals suggest.
    """
    diff = pass_at_k(n, np.asarray(rl_correct), k) - pass_at_k(n, np.asarray(base_correct), k)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (num_samples, len(diff)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(diff.mean()), float(lo), float(hi)


def conclusions(report: dict) -> list[str]:
    """What the numbers say, in sentences."""
    base, rl = report["base"], report["rl"]
    n = report["settings"]["eval_samples"]
    b1, r1 = base["pass_at_k"]["1"], rl["pass_at_k"]["1"]
    gain, lo, hi = paired_difference(n, base["correct_per_prompt"], rl["correct_per_prompt"], 1)
    met = "meets" if gain >= TARGET_GAIN else "misses"
    out = [f"pass@1 on held-out problems: base {b1:.3f}, GRPO + LoRA {r1:.3f} ({gain:+.3f}, 95% paired interval "
           f"[{lo:+.3f}, {hi:+.3f}]); this {met} the target of +{TARGET_GAIN:.2f}."]
    gk, glo, ghi = paired_difference(n, base["correct_per_prompt"], rl["correct_per_prompt"], n)
    bn, rn = base["pass_at_k"][str(n)], rl["pass_at_k"][str(n)]
    if glo > 0:
        verdict = ("the trained model still leads at the largest k: here RL did not only sharpen what the base "
                   "model already sampled, it also solves problems the base model rarely or never solved in "
                   f"{n} tries")
    elif ghi < 0:
        verdict = ("the base model overtakes the trained one at the largest k: RL sharpened the distribution "
                   "onto answers it already had and lost some of the base model's coverage (Yue et al. 2025)")
    else:
        verdict = ("at the largest k the two are within noise of each other: the gain is concentrated at small "
                   "k, where RL sharpened the distribution (Yue et al. 2025)")
    out.append(f"pass@{n}: base {bn:.3f}, trained {rn:.3f} ({gk:+.3f}, 95% paired interval [{glo:+.3f}, "
               f"{ghi:+.3f}]); {verdict}.")
    out.append(f"problems never solved in {n} samples: base {base['never_solved']:.3f}, trained "
               f"{rl['never_solved']:.3f}.")
    tr = report["training"]
    if tr["entropy"]:
        out.append(f"the price: KL(trained || base) {report['final_kl']:.2f} nats per held-out answer, and the "
                   f"per-token entropy of the sampled answers fell from {tr['entropy'][0]:.2f} to "
                   f"{tr['entropy'][-1]:.2f} during training.")
    return out


def _fmt_ci(entry, k):
    lo, hi = entry["pass_at_k_ci"][k]
    return f"{entry['pass_at_k'][k]:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown_report(report: dict) -> str:
    """`report.md`: the setup, the pass@k table, timings, and the conclusions."""
    s, base, rl, tr = report["settings"], report["base"], report["rl"], report["training"]
    ks = list(base["pass_at_k"])
    phases = report["phases"]
    cpu_it = np.asarray(tr["cpu_seconds_per_iteration"][1:] or tr["cpu_seconds_per_iteration"] or [0.0])
    wall_it = np.asarray(tr["seconds_per_iteration"][1:] or tr["seconds_per_iteration"] or [0.0])
    lines = [
        "# Real model: GRPO + LoRA on SmolLM2-135M-Instruct (two-digit arithmetic)",
        "",
        f"Seed {report['seed']}, {'quick' if report['quick'] else 'full'} mode, on {report['device']} "
        f"({report['cpu_count']} cores): **{report['seconds']:.0f} s wall, {report['cpu_seconds']:.0f} s CPU** "
        f"(1-minute load average {report['load_average']['mean']:.1f} on average, "
        f"{report['load_average']['max']:.1f} at most: the machine was shared).",
        "",
        "## Setup",
        "",
        f"- Model: {report['model']['name']}, {report['model']['parameters'] / 1e6:.1f}M parameters, read from the "
        f"Q4_1 GGUF file `{report['model']['file']}` by `rlhf_jax.models.from_pretrained` (dequantized to "
        "float32) with the tokenizer and chat template from its metadata.",
        f"- PAD = `{report['model']['pad_token']}` (id {report['model']['pad_id']}), EOS = "
        f"`{report['model']['eos_token']}` (id {report['model']['eos_id']}, the chat template's end of turn; the "
        "file's own PAD equals its EOS).",
        f"- Task: `a + b`, `a - b` (two-digit, a >= b) and `a * b` (11..49 times 2..9), "
        f"{report['task']['num_train']} training and {report['task']['num_heldout']} held-out problems (disjoint). "
        f"Prompt ({report['task']['prompt_tokens']} tokens at most): the chat template with the system message "
        f"\"{report['task']['system_prompt']}\", the question, and the assistant turn begun with the equation:",
        "",
        "  ```",
        "  " + report["task"]["example_prompt"].replace("\n", "\n  "),
        "  ```",
        "",
        f"- Reward: 1 if the final number of the response equals the answer, else 0 (at most "
        f"{s['max_new_tokens']} new tokens, temperature {s['temperature']}).",
        f"- GRPO (`rl_config(\"grpo\")`): {s['iterations']} iterations of {s['batch_size']} prompts x "
        f"{s['group_size']} samples, group-normalised advantages, one update per iteration, "
        f"{report['grpo']['kl_estimator']} KL to the base model in the loss (coefficient "
        f"{report['grpo']['kl_coef']}), {report['grpo']['loss_agg']} aggregation, AdamW at {s['learning_rate']}; "
        "each prompt runs through the trunk once per group (`batch.share_prompt_forward`).",
        f"- LoRA: rank {report['lora']['rank']}, alpha {report['lora']['alpha']}, on every projection "
        f"(`{report['lora']['targets']}`): {report['lora']['trainable_parameters'] / 1e6:.2f}M trained parameters; "
        "the reference policy is the base without adapters (no second copy of the weights).",
        "",
        f"## pass@k on the held-out problems (n = {s['eval_samples']} samples each, 95% bootstrap intervals)",
        "",
        "| k | " + " | ".join(ks) + " |",
        "|---|" + "---|" * len(ks),
        "| base | " + " | ".join(_fmt_ci(base, k) for k in ks) + " |",
        "| GRPO + LoRA | " + " | ".join(_fmt_ci(rl, k) for k in ks) + " |",
        "",
        "![pass@k](pass_at_k.png)",
        "",
        "pass@1 by operation: " + ", ".join(
            f"`{op}` {base['pass_at_1_by_operation'][op]:.3f} -> {rl['pass_at_1_by_operation'][op]:.3f}"
            for op in base["pass_at_1_by_operation"]) + ".",
        f"Responses ending with EOS: {base['eos_fraction']:.2f} -> {rl['eos_fraction']:.2f}; "
        f"mean length {base['response_length']:.1f} -> {rl['response_length']:.1f} tokens.",
        "",
        "## Conclusions",
        "",
        *[f"- {c}" for c in report["conclusions"]],
        "",
        "## Training",
        "",
        "![training](training.png)",
        "",
        f"{tr['iterations']} iterations, {tr['sampled_tokens']:.0f} sampled tokens; after the first (compiling) "
        f"iteration {np.mean(wall_it):.1f} s wall and {np.mean(cpu_it):.1f} s CPU per iteration. Training reward "
        f"{np.mean(tr['score_mean'][:5]):.3f} (first 5 iterations) -> {np.mean(tr['score_mean'][-5:]):.3f} "
        f"(last 5); k3 KL per sequence at the end {tr['kl_k3'][-1]:.3f}.",
        "",
        "| phase | wall s | CPU s |",
        "|---|---|---|",
        *[f"| {name} | {p['seconds']:.1f} | {p['cpu_seconds']:.1f} |" for name, p in phases.items()],
        f"| total | {report['seconds']:.1f} | {report['cpu_seconds']:.1f} |",
        "",
        "## Samples (first held-out problem)",
        "",
        "| base | GRPO + LoRA |",
        "|---|---|",
        *[f"| `{_cell(a)}` | `{_cell(b)}` |" for a, b in zip(base["examples"][: s["num_examples"]],
                                                         rl["examples"][: s["num_examples"]])],
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("\n", "\\n").replace("|", "\\|").replace("`", "'")


def plot_training(path, training: dict) -> str:
    """Training reward, KL (k3, per sequence) and entropy over GRPO iterations; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(training["score_mean"]) + 1)
    fig, axes = plt.subplots(3, 1, figsize=(6.5, 6.0), dpi=110, sharex=True)
    for ax, key, label in zip(axes, ("score_mean", "kl_k3", "entropy"),
                              ("verifier reward (train)", "KL to base, k3 / sequence", "entropy / token")):
        values = np.asarray(training[key], np.float64)
        ax.plot(steps, values, color="C0", linewidth=1.0, alpha=0.5)
        if len(values) >= 5:
            smooth = np.convolve(values, np.ones(5) / 5, mode="valid")
            ax.plot(steps[4:], smooth, color="C0", linewidth=1.8, label="mean of 5")
            ax.legend(loc="best", fontsize="small")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("GRPO + LoRA on SmolLM2-135M-Instruct")
    axes[-1].set_xlabel("GRPO iteration")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
