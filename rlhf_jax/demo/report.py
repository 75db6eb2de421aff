"""The offline demo's report: conclusions in words, `report.md`, training plots.

Pure functions of the report dict that `rlhf_jax.demo.run.run_demo` builds (so a
saved `report.json` can be re-rendered): `conclusions` states what the
numbers say (including whether the SFT model catches up at large k, and
whether the gold score fell while the reward-model score rose), and
`markdown_report` and `plot_training` draw them.
"""
from __future__ import annotations

import numpy as np

__all__ = ["conclusions", "markdown_report", "plot_training"]


def plot_training(path, series: dict, kl: dict, title, *, colors: dict | None = None,
                  ylabel: str = "mean over rollouts", xlabel: str = "PPO iteration"):
    """Two panels over RL iterations: `series` (name -> values) on top, `kl` below; writes a PNG.

    Names containing "low KL" are drawn dashed. `colors` maps a name (of either panel) to a
    matplotlib colour; by default the top panel cycles through three colours and the KL
    lines are black.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = colors or {}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8.5, 5.5), dpi=110, sharex=True)
    for i, (label, values) in enumerate(series.items()):
        style = "--" if "low KL" in label else "-"
        top.plot(np.arange(1, len(values) + 1), values, style, color=colors.get(label, f"C{i % 3}"), label=label,
                 linewidth=1.6)
    top.set_ylabel(ylabel)
    top.grid(True, alpha=0.3)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    top.set_title(title)
    for label, values in kl.items():
        style = "--" if "low KL" in label else "-"
        bottom.plot(np.arange(1, len(values) + 1), values, style, color=colors.get(label, "black"), linewidth=1.4,
                    label=label)
    if len(kl) > 1:
        bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    bottom.set_ylabel("KL(policy || SFT), k1")
    bottom.set_xlabel(xlabel)
    bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def markdown_report(report: dict) -> str:
    """`report.md`: the settings in words, the two tables, the plots and the conclusions."""
    rlvr, rlhf = report["rlvr"], report["rlhf"]
    ks = list(rlvr["models"]["sft"]["pass_at_k"])
    lines = [
        "# rlhf_jax offline demo",
        "",
        f"Seed {report['seed']}, {'quick' if report['quick'] else 'full'} mode, "
        f"{report['seconds']:.1f} s on {report['device']}.",
        "",
        "## RLVR: addition with a verifier",
        "",
        f"SFT data: {rlvr['task']['sft_examples']} {rlvr['task']['digits']}-digit problems, "
        f"{100 * rlvr['task']['sft_noise_rate']:.0f}% of answers wrong by one digit "
        f"({rlvr['task']['format']}; e.g. `{rlvr['task']['example']}`).",
        "",
        "| model | " + " | ".join(f"pass@{k}" for k in ks) + " | KL to SFT |",
        "|---|" + "---|" * (len(ks) + 1),
    ]
    for name, m in rlvr["models"].items():
        cells = [f"{m['pass_at_k'][k]:.3f} [{m['pass_at_k_ci'][k][0]:.2f}, {m['pass_at_k_ci'][k][1]:.2f}]" for k in ks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m['kl_to_sft']:.3f} |")
    lines += [
        "",
        f"{rlvr['eval']['settings']['num_prompts']} held-out prompts x n = {rlvr['eval']['settings']['n_samples']} "
        "samples at temperature "
        f"{rlvr['eval']['settings']['temperature']}; 95% bootstrap intervals over prompts.",
        "",
        "![pass@k](rlvr_pass_at_k.png) ![training](rlvr_training.png)",
        "",
        "## RLHF: a learned reward model against a hidden annotator",
        "",
        f"Reward model held-out accuracy (noisy annotator labels): "
        f"{rlhf['reward_model']['heldout_accuracy']:.3f}; against the noise-free gold ordering: "
        f"{rlhf['reward_model']['heldout_accuracy_vs_gold']:.3f} "
        f"(the annotator itself agrees with gold on {rlhf['task']['label_agreement_with_gold']:.3f} of its labels).",
        "",
        f"PPO kl_coef: {rlhf['kl_coef']['ppo']} (ppo), {rlhf['kl_coef']['ppo_low_kl']} (ppo_low_kl, when run).",
        "",
        "| model | gold success | gold score | RM score | malformed | KL to SFT |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in rlhf["models"].items():
        lo, hi = m["gold_success_ci"]
        lines.append(f"| {name} | {m['gold_success']:.3f} [{lo:.2f}, {hi:.2f}] | {m['gold_score']:.3f} | "
                     f"{m['rm_score']:.3f} | {m['malformed_fraction']:.3f} | {m['kl_to_sft']:.3f} |")
    lines += ["", "![training](rlhf_training.png)", "", "Samples:", ""]
    for name in rlhf["models"]:
        lines.append(f"- {name}: " + "; ".join(f"`{t}`" for t in rlhf["models"][name]["examples"]))
    lines += ["", "## Conclusions", ""] + [f"- {c}" for c in report["conclusions"]]
    return "\n".join(lines) + "\n"


def conclusions(report: dict) -> list[str]:
    """What the numbers say, one sentence per finding."""
    rlvr, rlhf = report["rlvr"]["models"], report["rlhf"]["models"]
    ks = list(rlvr["sft"]["pass_at_k"])
    k_max = ks[-1]
    out = [
        f"RLVR: pass@1 {rlvr['sft']['pass_at_k']['1']:.3f} (SFT) -> {rlvr['ppo']['pass_at_k']['1']:.3f} (PPO).",
    ]
    crossing = [k for k in ks if rlvr["sft"]["pass_at_k"][k] >= rlvr["ppo"]["pass_at_k"][k]]
    if crossing:
        out.append(f"At large k the SFT model catches up: from k = {crossing[0]} on, SFT's pass@k is at least "
                   f"PPO's (pass@{k_max}: SFT {rlvr['sft']['pass_at_k'][k_max]:.3f}, "
                   f"PPO {rlvr['ppo']['pass_at_k'][k_max]:.3f}); RL made correct answers likelier rather than "
                   "reachable for the first time.")
    else:
        out.append(f"PPO stays ahead at every k up to {k_max} (pass@{k_max}: SFT "
                   f"{rlvr['sft']['pass_at_k'][k_max]:.3f}, PPO {rlvr['ppo']['pass_at_k'][k_max]:.3f}).")
    out.append(f"RLHF: gold success {rlhf['sft']['gold_success']:.3f} (SFT) -> {rlhf['ppo']['gold_success']:.3f} "
               f"(PPO); RM score {rlhf['sft']['rm_score']:.3f} -> {rlhf['ppo']['rm_score']:.3f}.")
    before, after = rlhf["sft"]["malformed_fraction"], rlhf["ppo"]["malformed_fraction"]
    if after > before + 0.03:
        out.append(f"Reward hacking in small doses: the share of malformed responses (non-words, broken grammar, "
                   f"no EOS), which the annotator scores {report['rlhf']['task']['malformed_score']:.0f}, rose from "
                   f"{before:.3f} (SFT) to {after:.3f} (PPO): the policy found some of the reward model's blind "
                   "spots, text its training pairs rarely contained.")
    for run in ("ppo", "ppo_low_kl"):
        gold = report["rlhf"]["training"].get(f"{run}_gold_score")
        rm = report["rlhf"]["training"].get(f"{run}_rm_score")
        if not gold:
            continue
        name = f"kl_coef {report['rlhf']['kl_coef'][run]}"
        best = int(np.argmax(gold))
        if gold[best] - gold[-1] > 0.2 and rm[-1] >= rm[best]:
            out.append(f"Over-optimisation with {name}: the gold score peaked at {gold[best]:.3f} (iteration "
                       f"{best + 1}) and ended at {gold[-1]:.3f} while the reward-model score went on from "
                       f"{rm[best]:.3f} to {rm[-1]:.3f} (final gold success {rlhf[run]['gold_success']:.3f}, "
                       f"malformed {rlhf[run]['malformed_fraction']:.3f}): the policy exploited the reward "
                       "model's errors.")
        else:
            out.append(f"No over-optimisation with {name} within {len(gold)} iterations: the gold score rose "
                       f"with the RM score ({gold[0]:.3f} -> {gold[-1]:.3f}, best {gold[best]:.3f}; RM "
                       f"{rm[0]:.3f} -> {rm[-1]:.3f}).")
    return out
