"""The offline demo: which estimator, and online or offline? (`run_demo`, `rlhf-jax demo`).

`run_demo(output_dir)` trains tiny GPT-2-shaped transformers from scratch on the two
built-in tasks of `rlhf_jax.demo.tasks` with the library's own drivers, and writes a
report. Nothing is downloaded.

Part 1, RLVR (`rlhf_jax.demo.rlvr`): addition with an exact verifier as the reward. PPO,
GRPO and RLOO train from one SFT model with the same rollout budget (iterations x rows x
max_new_tokens generated tokens); the pass@k curves of all four models on held-out problems
say which estimator helped and whether RL taught anything the SFT model could not already
reach by sampling (Yue et al. 2025).

Part 2, RLHF (`rlhf_jax.demo.rlhf`): moods judged by a hidden, noisy annotator. From the
same labelled pairs of SFT samples, PPO optimises a learned reward model online and DPO
learns offline; the annotator's verdict on held-out samples (gold success and gold score)
says which served it better, and the gold score logged during PPO shows over-optimisation
(Gao et al. 2022) where it happens.

Outputs in `output_dir`: `report.json` (every number), `report.md`, `rlvr_pass_at_k.png`,
`rlvr_training.png`, `rlhf_training.png`, and one folder per stage with its metrics,
checkpoints and (for the PPO and DPO policies) an HF export that loads in `transformers`.

References:
  Yue et al. 2025, arXiv 2504.13837. Gao et al. 2022, arXiv 2210.10760.
  Ziegler et al. 2019, arXiv 1909.08593. Shao et al. 2024, arXiv 2402.03300.
  Ahmadian et al. 2024, arXiv 2402.14740. Rafailov et al. 2023, arXiv 2305.18290.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax

from rlhf_jax.data.tokenizers import char_tokenizer
from rlhf_jax.demo.common import QUIET, prepare_output_dir
from rlhf_jax.demo.report import conclusions, markdown_report, plot_training
from rlhf_jax.demo.rlhf import run_rlhf
from rlhf_jax.demo.rlvr import RL_RUNS, run_rlvr
from rlhf_jax.eval.passk_eval import format_table, plot_pass_at_k

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
    # PPO, GRPO and RLOO: the same iterations, rows per iteration (`ppo_batch_size`; the group
    # runs take ppo_batch_size / add_group_size prompts x add_group_size samples), response
    # length and optimizer updates per iteration (ppo_epochs x ppo_minibatches).
    # One learning rate for the three (measured at seed 0 in 1e-4 .. 3e-4: 2e-4 is the best or
    # within noise of the best for each).
    add_rl_iterations: int = 30
    add_ppo_lr: float = 2e-4
    add_group_size: int = 8
    add_grpo_lr: float = 2e-4
    add_grpo_kl_coef: float = 0.04
    add_rloo_lr: float = 2e-4
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
    # DPO on the reward model's training pairs.
    # beta and the learning rate measured at seed 0 (beta 0.1-0.5, lr 1e-4 .. 1e-3): larger steps
    # buy gold success with malformed text, 2e-4 with beta 0.3 has the best gold score.
    dpo_beta: float = 0.3
    dpo_lr: float = 2e-4
    dpo_epochs: int = 2
    dpo_batch_size: int = 64
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
    add_rl_iterations=8,
    add_ppo_lr=2e-4,
    add_grpo_lr=2e-4,
    add_rloo_lr=2e-4,
    eval_samples=16,
    mood_num_sft=2000,
    mood_sft_steps=240,
    mood_sft_lr=3e-3,
    mood_num_pairs=1024,
    rm_lr=3e-3,
    mood_ppo_iterations=6,
    mood_ppo_lr=2e-4,
    dpo_epochs=1,
    mood_num_eval=128,
    mood_eval_samples=2,
    mood_low_kl_coef=None,
    ppo_batch_size=128,
)

_STAGES = ("rlvr", "rlhf")
_REPORT_FILES = ("report.json", "report.md", "rlvr_pass_at_k.png", "rlvr_training.png", "rlhf_training.png")


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
      `seconds`, `cpu_seconds`, `rlvr.models.{sft,ppo,grpo,rloo}.pass_at_k.{1,...}`,
      `rlvr.runs.{ppo,grpo,rloo}` (the budget of each run), `rlvr.final_kl`,
      `rlhf.reward_model.heldout_accuracy`,
      `rlhf.models.{sft,dpo,ppo}.{gold_success,gold_score,rm_score}` and
      `rlhf.final_kl`.
    """
    start = time.perf_counter()
    cpu_start = time.process_time()
    settings = settings or (QUICK if quick else FULL)
    output_dir = prepare_output_dir(output_dir, _STAGES + _REPORT_FILES, what="a demo run", overwrite=overwrite)

    def log(message):
        if verbose:
            print(message, flush=True)

    tokenizer = char_tokenizer()
    quiet = {**QUIET, "stdout": verbose}
    rlvr = run_rlvr(tokenizer, settings, os.path.join(output_dir, "rlvr"), seed, log, quiet)
    rlhf = run_rlhf(tokenizer, settings, os.path.join(output_dir, "rlhf"), seed, log, quiet)

    plot_pass_at_k(rlvr["eval"], os.path.join(output_dir, "rlvr_pass_at_k.png"),
                   title="RLVR (addition): pass@k on held-out problems")
    colors = {name.upper(): f"C{i}" for i, name in enumerate(RL_RUNS)}
    plot_training(os.path.join(output_dir, "rlvr_training.png"),
                  {name.upper(): rlvr["training"][f"{name}_reward"] for name in RL_RUNS},
                  {name.upper(): rlvr["training"][f"{name}_kl"] for name in RL_RUNS},
                  "RLVR: train accuracy (the verifier's reward) of PPO, GRPO and RLOO", colors=colors,
                  ylabel="train accuracy", xlabel="RL iteration")
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
    report["cpu_seconds"] = time.process_time() - cpu_start
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
        print(f"\nreport: {os.path.join(output_dir, 'report.md')} ({report['seconds']:.1f} s, "
              f"cpu {report['cpu_seconds']:.1f} s)")
    return report
