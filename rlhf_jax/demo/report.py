"""The offline demo's report: conclusions in words, `report.md`, training plots.

Pure functions of the report dict that `rlhf_jax.demo.run.run_demo` builds (so a
saved `report.json` can be re-rendered): `conclusions` states what the
numbers say (which RL estimator reached the highest pass@1 and whether the others
are within its interval, whether the SFT model catches up at large k, whether
the gold score fell while the reward-model score rose, and whether DPO or PPO
served the annotator better), and `markdown_report` and `plot_training` draw them.
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


_ESTIMATOR_WORDS = {
    "ppo": "GAE with a value head on the shared trunk",
    "grpo": "(r - group mean) / group std, no critic",
    "rloo": "r - mean of the other samples of the prompt, no critic",
}


def _seconds(t: dict) -> str:
    return f"{t['wall']:.0f} s, cpu {t['cpu']:.0f} s"


def _and(words: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def markdown_report(report: dict) -> str:
    """`report.md`: the settings in words, the tables, the plots and the conclusions."""
    rlvr, rlhf = report["rlvr"], report["rlhf"]
    ks = list(rlvr["models"]["sft"]["pass_at_k"])
    cpu = f", cpu {report['cpu_seconds']:.1f} s" if "cpu_seconds" in report else ""
    lines = [
        "# rlhf_jax offline demo",
        "",
        f"Seed {report['seed']}, {'quick' if report['quick'] else 'full'} mode, "
        f"{report['seconds']:.1f} s{cpu} on {report['device']}.",
        "",
        "## RLVR: addition with a verifier, which estimator?",
        "",
        f"SFT data: {rlvr['task']['sft_examples']} {rlvr['task']['digits']}-digit problems, "
        f"{100 * rlvr['task']['sft_noise_rate']:.0f}% of answers wrong by one digit "
        f"({rlvr['task']['format']}; e.g. `{rlvr['task']['example']}`). Every RL run starts from the same SFT "
        "model with the same rollout budget and the same optimizer updates per iteration:",
        "",
        "| run | advantages | KL to SFT | prompts x samples | iterations | generated tokens (at most) | "
        "updates / iteration | lr | time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rlvr["runs"].items():
        lines.append(
            f"| {name} | {_ESTIMATOR_WORDS.get(name, name)} | {r['kl']} | {r['prompts_per_iteration']} x "
            f"{r['group_size']} | {r['iterations']} | {r['iterations']} x {r['rows_per_iteration']} x "
            f"{r['max_new_tokens']} = {r['token_budget']:,} | {r['updates_per_iteration']} | "
            f"{r['learning_rate']:g} | {_seconds(r['seconds'])} |")
    lines += [
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
        f"{rlvr['eval']['settings']['temperature']}; 95% bootstrap intervals over prompts (one training seed: "
        "they say nothing about the spread between training runs).",
        "",
        "![pass@k](rlvr_pass_at_k.png) ![training](rlvr_training.png)",
        "",
        "## RLHF: a hidden annotator's pairs, learned online (PPO) or offline (DPO)?",
        "",
        f"Reward model held-out accuracy (noisy annotator labels): "
        f"{rlhf['reward_model']['heldout_accuracy']:.3f}; against the noise-free gold ordering: "
        f"{rlhf['reward_model']['heldout_accuracy_vs_gold']:.3f} "
        f"(the annotator itself agrees with gold on {rlhf['task']['label_agreement_with_gold']:.3f} of its labels).",
        "",
        f"PPO kl_coef: {rlhf['kl_coef']['ppo']} (ppo), {rlhf['kl_coef']['ppo_low_kl']} (ppo_low_kl, when run).",
    ]
    if "dpo" in rlhf:
        d = rlhf["dpo"]
        lines += [
            "",
            f"DPO: the reward model's {rlhf['task']['pairs_train']} training pairs, beta {d['beta']}, "
            f"{d['epochs']} epoch(s) of batches of {d['batch_size']} ({d['steps']} steps), lr {d['learning_rate']:g}, "
            f"the SFT model as the reference; final pair accuracy {d['final_pair_accuracy']:.3f} "
            f"(DPO took {_seconds(rlhf['seconds']['dpo'])}; PPO {_seconds(rlhf['seconds']['ppo'])}).",
        ]
    lines += [
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


def _overlap(a: dict, b: dict, key: str) -> bool:
    """Whether two models' 95% intervals of `key` (e.g. "1" of pass_at_k_ci) overlap."""
    (lo_a, hi_a), (lo_b, hi_b) = a["pass_at_k_ci"][key], b["pass_at_k_ci"][key]
    return lo_a <= hi_b and lo_b <= hi_a


def _rlvr_conclusions(rlvr: dict) -> list[str]:
    ks = list(rlvr["sft"]["pass_at_k"])
    k_max = ks[-1]
    runs = [name for name in ("ppo", "grpo", "rloo") if name in rlvr]
    p1 = {name: rlvr[name]["pass_at_k"]["1"] for name in ["sft"] + runs}
    ranked = sorted(runs, key=lambda n: -p1[n])
    out = [
        "RLVR, the same budget for each estimator: pass@1 " + ", ".join(
            f"{p1[n]:.3f} ({n.upper() if n != 'sft' else 'SFT'})" for n in ["sft"] + runs) + "."
    ]
    best, rest = ranked[0], ranked[1:]
    close = [n for n in rest if _overlap(rlvr[best], rlvr[n], "1")]
    apart = [n for n in rest if n not in close]
    sentence = f"{best.upper()} has the highest pass@1"
    if apart:
        sentence += (f", ahead of {_and([n.upper() for n in apart])} by "
                     + " and ".join(f"{p1[best] - p1[n]:.3f}" for n in apart)
                     + " with disjoint 95% intervals over prompts")
    if close:
        sentence += (f"; {_and([n.upper() for n in close])} "
                     f"{'is' if len(close) == 1 else 'are'} within its interval")
    out.append(sentence + " (intervals over prompts, from one training seed: another seed may order close runs "
                          "differently).")
    for name in runs:
        gain = p1[name] - p1["sft"]
        if gain <= 0:
            out.append(f"{name.upper()} did not improve pass@1 over SFT ({p1[name]:.3f} vs {p1['sft']:.3f}).")
    caught = {n: next((k for k in ks if rlvr["sft"]["pass_at_k"][k] >= rlvr[n]["pass_at_k"][k]), None)
              for n in runs}
    behind = [n for n in runs if caught[n] is not None]
    if behind:
        by_k = {}
        for n in behind:
            by_k.setdefault(caught[n], []).append(f"{n.upper()}'s")
        where = "; ".join(f"{_and(names)} from k = {k} on" for k, names in sorted(by_k.items()))
        out.append(f"At large k the SFT model catches up: SFT's pass@k is at least {where} (pass@{k_max}: SFT "
                   f"{rlvr['sft']['pass_at_k'][k_max]:.3f}, "
                   + ", ".join(f"{n.upper()} {rlvr[n]['pass_at_k'][k_max]:.3f}" for n in behind)
                   + "); RL made correct answers likelier rather than reachable for the first time.")
    for n in runs:
        if caught[n] is None:
            out.append(f"{n.upper()} stays ahead of SFT at every k up to {k_max} (pass@{k_max}: SFT "
                       f"{rlvr['sft']['pass_at_k'][k_max]:.3f}, {n.upper()} {rlvr[n]['pass_at_k'][k_max]:.3f}).")
    return out


def _online_offline(report: dict) -> list[str]:
    rlhf = report["rlhf"]["models"]
    if "dpo" not in rlhf:
        return []
    sft, dpo, ppo = rlhf["sft"], rlhf["dpo"], rlhf["ppo"]
    out = [f"Online or offline, from the same {report['rlhf']['task']['pairs_train']} pairs: gold success "
           f"{sft['gold_success']:.3f} (SFT) -> {dpo['gold_success']:.3f} (DPO) and {ppo['gold_success']:.3f} "
           f"(PPO on the reward model); gold score {sft['gold_score']:.3f} -> {dpo['gold_score']:.3f} (DPO) and "
           f"{ppo['gold_score']:.3f} (PPO); KL to SFT {dpo['kl_to_sft']:.2f} (DPO) and {ppo['kl_to_sft']:.2f} (PPO)."]
    lo_d, hi_d = dpo["gold_success_ci"]
    lo_p, hi_p = ppo["gold_success_ci"]
    if lo_p > hi_d:
        out.append(f"PPO serves the annotator better than DPO here (gold success {ppo['gold_success']:.3f} vs "
                   f"{dpo['gold_success']:.3f}, disjoint 95% intervals) and moves further from the SFT model "
                   "(PPO's own fresh samples are judged by the reward model; DPO learns only from the SFT "
                   "samples in the pairs).")
    elif lo_d > hi_p:
        out.append(f"DPO serves the annotator better than PPO here (gold success {dpo['gold_success']:.3f} vs "
                   f"{ppo['gold_success']:.3f}, disjoint 95% intervals), without a reward model or sampling.")
    else:
        out.append(f"DPO and PPO are within each other's 95% intervals of gold success "
                   f"({dpo['gold_success']:.3f} vs {ppo['gold_success']:.3f}).")
    if dpo["gold_success"] <= sft["gold_success"]:
        out.append("DPO did not improve the gold success over SFT.")
    if dpo["malformed_fraction"] > sft["malformed_fraction"] + 0.03:
        out.append(f"DPO raised the share of malformed responses from {sft['malformed_fraction']:.3f} to "
                   f"{dpo['malformed_fraction']:.3f}.")
    return out


def conclusions(report: dict) -> list[str]:
    """What the numbers say, one sentence per finding."""
    rlvr, rlhf = report["rlvr"]["models"], report["rlhf"]["models"]
    out = _rlvr_conclusions(rlvr)
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
    out += _online_offline(report)
    return out
