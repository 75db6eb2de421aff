"""One GRPO iteration: `rlhf_jax.train.rl.RLTrainer` (the `grpo` preset) vs TRL 1.8.0's `GRPOTrainer`.

Both sides train the same random GPT-2 (one `save_pretrained` folder, read by
`rlhf_jax.models.from_pretrained` and by TRL, which also builds its reference model from
it), with the ppo_iteration.py CPU shape (4 layers x 256, 4 heads, vocab 512), on the
same random 16-token prompts, `prompts x G` rows per iteration, each sampling exactly
`response_length` tokens, and the same programmatic reward on the completion tokens
(`even_token_fraction`: the fraction of even token ids). One iteration = one generation
batch of all rows, then `epochs x minibatches` optimizer updates over them.

What matches (TRL option -> ours):
  - rows per iteration: `generation_batch_size` = `per_device_train_batch_size x
    steps_per_generation` = prompts x G -> `batch.batch_size x batch.group_size`;
    `num_generations` = G -> `group_size` (rows i*G .. i*G+G-1 are prompt i's on both sides).
  - updates: `steps_per_generation` = minibatches, `gradient_accumulation_steps` = 1,
    `num_iterations` (mu) = epochs -> `num_minibatches`, `grad_accum_steps` = 1, `ppo_epochs`.
    With more than one step per generation TRL computes the old-policy log-probs (a no-grad
    forward over all rows), as ours always does, so both run the same forwards: reference,
    old policy, then per minibatch one forward/backward of the policy.
  - advantages: (score - group mean) / (group std + eps) broadcast over the tokens
    (`scale_rewards="group"` -> `advantages.estimator="grpo"`, `grpo_scale="group"`).
  - loss: clipped ratio (epsilon 0.2) plus beta x k3 KL to the reference in the loss, each
    sequence's token mean then the mean over sequences (`beta=0.04`, `loss_type="grpo"` ->
    our preset's `kl: in_loss, k3, 0.04` and `loss_agg="seq-mean-token-mean"`). TRL 1.8's
    defaults are `beta=0.0` (no reference model) and `loss_type="dapo"`; we set TRL to our
    preset's, which is the original GRPO, rather than the reverse.
  - sampling: temperature 1.0 (TRL's default), full vocabulary; exactly N tokens
    (TRL: `generation_kwargs={"min_new_tokens": N}`, so HF masks EOS until N; ours: no EOS).
    Both divide the training logits by the temperature.
  - AdamW, lr 1e-6, grad-norm clip 1.0, no weight decay; float32 everywhere (`bf16=False`:
    TRL's default is bf16); no activation checkpointing on either side (TRL's default
    `gradient_checkpointing=True` would add a recompute to its backward; we turn it off).
What differs:
  - TRL's generation runs HF `generate` on the prompts repeated G times (G prefills);
    ours prefills each prompt once and shares its KV cache over its G samples.
  - ours re-permutes the rows every epoch (TRL shuffles once per generation); with one
    epoch (the default here) the two are the same.
  - TRL's learning rate decays linearly (its default scheduler); ours is constant. No effect
    on speed.
  - where the phases split: TRL: generate = `_generate` (tokenise, HF generate, decode) |
    score = old-policy and reference forwards, the reward function, group advantages |
    update = the optimizer steps. Ours: generate = the jitted rollout | score = the reward
    function on the host | update = one jitted call with reference and old-policy forwards,
    advantages and the `lax.scan` of minibatches. Compare `score + update`.

Each half runs in its own subprocess (JAX's and PyTorch's thread pools and memory never
meet). Per half: medians over the timed iterations after `--warmup` (ours' first includes
compilation, reported separately with the compile count of each jitted phase), seconds and
process CPU seconds (all threads) per iteration, response tokens/s = rows x N / seconds,
the update's model GFLOP/s, peak RSS above the post-import baseline (ours after a
`malloc_trim`, over the timed iterations), and the load average at the start and end.

On CPU ours runs twice: on one XLA device, and data-parallel on 2 host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=2`, a `data=2` mesh from
`rlhf_jax.train.sharding.make_mesh` given to `trainer.with_mesh`, the prompts split over it
with `shard_batch`, params replicated, each minibatch's rows kept split inside the update by
`sharding.constrain_rows`), so that each core runs its half of every matmul. TRL
runs with torch's default threads (one per core) and, as an extra row, with 1 thread.

Update FLOPs (model FLOPs, backward = 2 x forward), T = P + N, rows R, trunk forward
F_t = 2 N_trunk T + 4 L T^2 D and LM head F_h = 2 D V N per sequence:
    ours  = R [2 (F_t + F_h) + epochs x 3 (F_t + F_h)]   (reference + old policy, then training)
    TRL's update phase = R x epochs x 3 (F_t + F_h)      (its forwards are in its score phase)

Usage:
  python benchmarks/grpo_iteration.py               # --device cpu, a few minutes on 2 quiet cores
  python benchmarks/grpo_iteration.py --smoke       # every code path in seconds (no RESULTS.md)

The last line printed is one JSON object with `ours_s_per_iter`, `trl_s_per_iter`,
`speedup` (TRL seconds / ours) and the phases.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import (  # noqa: E402
    huge_page_malloc,
    machine,
    markdown_table,
    run_json_subprocess,
    write_section,
)
from ppo_iteration import RssSampler, _load_note, _malloc_trim, _rss_bytes, _summarise, _trl_version  # noqa: E402

CPU = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=512, prompts=64, group_size=8, prompt_length=16,
           response_length=32, num_minibatches=4, epochs=1)
SMOKE = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=64, prompts=4, group_size=2, prompt_length=4,
             response_length=4, num_minibatches=2, epochs=1)
TEMPERATURE, KL_COEF, LR = 1.0, 0.04, 1e-6
N_POSITIONS = 1024


def even_token_fraction(completion_ids: list[list[int]]) -> list[float]:
    """The reward of both sides: the fraction of a completion's token ids that are even."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def update_flops(shape: dict, *, with_pre_forwards: bool = True) -> float:
    """Model FLOPs of one GRPO update phase (see the module docstring)."""
    L, D, V = shape["n_layer"], shape["n_embd"], shape["vocab_size"]
    N = shape["response_length"]
    T = shape["prompt_length"] + N
    rows = shape["prompts"] * shape["group_size"]
    f = 2 * L * 12 * D * D * T + 4 * L * T * T * D + 2 * D * V * N
    flops = shape["epochs"] * 3 * f + (2 * f if with_pre_forwards else 0)
    return float(rows * flops)


def prompt_rows(shape: dict, count: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, shape["vocab_size"] - 2, size=(count * shape["prompts"], shape["prompt_length"]))


def save_model(folder: str, shape: dict, seed: int) -> None:
    """A random GPT-2 of `shape` as a `save_pretrained` folder (PAD = V-2, EOS = V-1)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    v = shape["vocab_size"]
    config = transformers.GPT2Config(vocab_size=v, n_positions=N_POSITIONS, n_embd=shape["n_embd"],
                                     n_layer=shape["n_layer"], n_head=shape["n_head"], pad_token_id=v - 2,
                                     eos_token_id=v - 1, bos_token_id=v - 1)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)


# ------------------------------------------------------------------------------- ours


def run_ours(shape: dict, *, model_dir: str, iterations: int, warmup: int, seed: int, devices: int) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax.models import from_pretrained
    from rlhf_jax.train import OptimizerConfig, optimizer_from_config
    from rlhf_jax.train.rl.presets import rl_config
    from rlhf_jax.train.rl.trainer import RLTrainer
    from rlhf_jax.train.sharding import make_mesh, replicated, shard_batch

    rss0 = _rss_bytes()
    V, P, N = shape["vocab_size"], shape["prompt_length"], shape["response_length"]
    mesh = make_mesh(data=devices) if devices > 1 else None
    policy, params = from_pretrained(model_dir, head="lm")
    if mesh is not None:
        params = jax.device_put(params, replicated(mesh))
    ref_params = jax.tree.map(jnp.copy, params)
    opt = OptimizerConfig(learning_rate=LR, schedule="constant", max_grad_norm=1.0)
    cfg = rl_config("grpo", {
        "batch": {"batch_size": shape["prompts"], "group_size": shape["group_size"],
                  "num_minibatches": shape["num_minibatches"], "ppo_epochs": shape["epochs"]},
        "sampling": {"max_new_tokens": N, "temperature": TEMPERATURE, "eos_token_id": None, "pad_token_id": V - 2},
        "kl": {"kl_coef": KL_COEF},
        "optimizer": {"learning_rate": LR, "schedule": "constant", "max_grad_norm": 1.0},
    })

    def reward_fn(prompt_ids, prompt_mask, tokens, mask, prompt_index):
        ids = [row[m > 0].tolist() for row, m in zip(np.asarray(tokens), np.asarray(mask))]
        return np.asarray(even_token_fraction(ids), np.float32)

    trainer = RLTrainer(policy, cfg, optimizer_from_config(opt), reward_fn=reward_fn,
                        reward_source="even_token_fraction")
    state = trainer.init(params, seed=seed)
    if mesh is not None:  # the phases jitted for the mesh; each minibatch's rows stay split
        trainer = trainer.with_mesh(mesh)
        state = jax.device_put(state, trainer.param_shardings(state))

    compiles: dict[str, int] = {}

    def on_event(event, duration_secs, **kwargs):
        del duration_secs
        if event == "/jax/core/compile/backend_compile_duration":
            name = kwargs.get("fun_name", "?")
            compiles[name] = compiles.get(name, 0) + 1

    jax.monitoring.register_event_duration_secs_listener(on_event)
    rows = prompt_rows(shape, warmup + iterations, seed).astype(np.int32)
    B = shape["prompts"]
    sampler = RssSampler()
    times = {"iteration": [], "generate": [], "score": [], "update": [], "iteration_cpu": []}
    for i in range(warmup + iterations):
        if i == warmup:
            peak_with_compile = sampler.peak
            _malloc_trim()
            sampler.reset()
        ids, mask = rows[i * B:(i + 1) * B], np.ones((B, P), np.int32)
        if mesh is not None:
            ids, mask = shard_batch((ids, mask), mesh)
        cpu0 = time.process_time()
        state, metrics, _ = trainer.iteration(state, ids, mask, ref_params=ref_params)
        times["iteration_cpu"].append(time.process_time() - cpu0)
        times["iteration"].append(metrics["time/iteration"])
        times["generate"].append(metrics["time/rollout"])
        times["score"].append(metrics["time/score"])
        times["update"].append(metrics["time/update"])
    jax.block_until_ready(state)
    jax.monitoring.unregister_event_duration_listener(on_event)
    peak = sampler.stop()
    last = {k: float(v) for k, v in jax.device_get(metrics).items()}

    out = _summarise(times, warmup)
    out["first_iteration_s"] = times["iteration"][0]
    out["compile_s"] = max(times["iteration"][0] - out["iteration"], 0.0)
    out["compile_counts"] = {phase: compiles.get(f"jit(_{phase})", 0) for phase in ("rollout", "update")}
    out["score_mean"] = last["score_mean"]
    out["response_length_mean"] = last["response_length"]
    out["finite"] = all(np.isfinite(v) for v in last.values())
    dev = jax.devices()[0]
    out["device"] = f"JAX {jax.__version__} on {dev.platform} ({dev.device_kind}" + (
        f", {devices} host devices, data-parallel)" if devices > 1 else ")")
    out["peak_memory_bytes"] = peak - rss0
    out["peak_memory_with_compile_bytes"] = max(peak_with_compile, peak) - rss0
    return out


# -------------------------------------------------------------------------------- TRL


def run_trl(shape: dict, *, model_dir: str, iterations: int, warmup: int, seed: int,
            torch_threads: int | None = None) -> dict:
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    from trl_grpo_anchor import time_trl_grpo

    rss0 = _rss_bytes()
    sampler = RssSampler()
    out = time_trl_grpo(
        model_dir=model_dir, vocab_size=shape["vocab_size"], prompts=prompt_rows(shape, warmup + iterations,
                                                                                 seed).tolist(),
        prompts_per_iteration=shape["prompts"], group_size=shape["group_size"],
        response_length=shape["response_length"], num_minibatches=shape["num_minibatches"], epochs=shape["epochs"],
        temperature=TEMPERATURE, kl_coef=KL_COEF, learning_rate=LR, reward_fn=even_token_fraction,
        warmup=warmup, seed=seed)
    peak = sampler.stop()
    out["device"] = f"torch {torch.__version__} on CPU ({torch.get_num_threads()} threads)"
    out["peak_memory_bytes"] = peak - rss0
    return out


# ----------------------------------------------------------------------------- driver


def _run_half(half: str, args, model_dir: str, *, torch_threads: int | None = None, devices: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--half", half, "--model-dir", model_dir, "--iterations", str(args.iterations),
           "--warmup", str(args.warmup), "--seed", str(args.seed), "--ours-devices", str(devices)]
    if args.smoke:
        cmd.append("--smoke")
    if torch_threads:
        cmd += ["--torch-threads", str(torch_threads)]
    return run_json_subprocess(cmd, half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per side")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-trl", action="store_true", help="time ours only (no table written)")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--no-trl-1thread", action="store_true", help="skip the extra TRL run with one torch thread")
    parser.add_argument("--no-data-parallel", action="store_true", help="skip ours on 2 host devices")
    parser.add_argument("--load-note", default=None, help="what else ran on the machine")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="do not set GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for the halves")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape through every code path (no RESULTS.md)")
    parser.add_argument("--half", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ours-devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--torch-threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = SMOKE if args.smoke else CPU
    if args.smoke:
        args.no_write = True

    if args.half is not None:
        common = dict(model_dir=args.model_dir, iterations=args.iterations, warmup=args.warmup, seed=args.seed)
        if args.half == "ours":
            result = run_ours(shape, devices=args.ours_devices, **common)
        else:
            result = run_trl(shape, torch_threads=args.torch_threads, **common)
        print(json.dumps(result))
        return

    malloc_note = huge_page_malloc(not args.no_huge_pages)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as model_dir:
        save_model(model_dir, shape, args.seed)
        ours = _run_half("ours", args, model_dir)
        print(f"ours: {json.dumps(ours)}", flush=True)
        ours2 = None if args.no_data_parallel else _run_half("ours", args, model_dir, devices=2)
        if ours2 is not None:
            print(f"ours2: {json.dumps(ours2)}", flush=True)
        trl = None if args.skip_trl else _run_half("trl", args, model_dir)
        if trl is not None:
            print(f"trl:  {json.dumps(trl)}", flush=True)
        trl1 = None if (trl is None or args.no_trl_1thread) else _run_half("trl", args, model_dir, torch_threads=1)
        if trl1 is not None:
            print(f"trl1: {json.dumps(trl1)}", flush=True)
    load_end = os.getloadavg()[0]

    rows_per_iter = shape["prompts"] * shape["group_size"]
    N = shape["response_length"]
    flops = {"ours": update_flops(shape), "trl": update_flops(shape, with_pre_forwards=False)}

    def row(name, r, key):
        if r is None:
            return None
        return [name, f"{r['iteration']:.3f}", f"{r['iteration_cpu']:.2f}", f"{r['generate']:.3f}",
                f"{r['score']:.3f}", f"{r['update']:.3f}", f"{r['score'] + r['update']:.3f}",
                f"{rows_per_iter * N / r['iteration']:.0f}", f"{flops[key] / r['update'] / 1e9:.1f}",
                f"{r['peak_memory_bytes'] / 2**20:.0f} MiB"]

    version = _trl_version()
    headers = ["trainer", "s / iteration", "CPU s / iteration", "generate s", "score s", "update s",
               "score + update s", "response tokens/s", "update GFLOP/s", "peak memory"]
    table_rows = [r for r in (
        row(f"TRL {version} GRPOTrainer (anchor)", trl, "trl"),
        row(f"TRL {version} GRPOTrainer, 1 torch thread", trl1, "trl"),
        row("rlhf_jax RLTrainer (grpo), 1 device", ours, "ours"),
        row("rlhf_jax RLTrainer (grpo), 2 CPU devices, data-parallel", ours2, "ours"),
    ) if r is not None]

    def speedup_row(name, t, o):
        ratio = lambda k: f"{t[k] / o[k]:.2f}x"  # noqa: E731
        both = (t["score"] + t["update"]) / (o["score"] + o["update"])
        return [name, ratio("iteration"), ratio("iteration_cpu"), ratio("generate"), "", "", f"{both:.2f}x",
                "", "", ""]

    for t_name, t in (("TRL", trl), ("TRL 1 thread", trl1)):
        for o_name, o in (("ours 1 device", ours), ("ours 2 devices", ours2)):
            if t is not None and o is not None:
                table_rows.append(speedup_row(f"speed-up ({t_name} / {o_name})", t, o))
    table = markdown_table(headers, table_rows)
    print(table)

    def ratio(t, o):
        return t["iteration"] / o["iteration"] if (t is not None and o is not None) else None

    summary = {
        "shape": shape,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "ours_s_per_iter": ours["iteration"],
        "ours_2dev_s_per_iter": ours2["iteration"] if ours2 else None,
        "trl_s_per_iter": trl["iteration"] if trl else None,
        "trl_1thread_s_per_iter": trl1["iteration"] if trl1 else None,
        "speedup": ratio(trl, ours),
        "speedup_2dev": ratio(trl, ours2),
        "speedup_vs_trl_1thread": ratio(trl1, ours),
        "speedup_2dev_vs_trl_1thread": ratio(trl1, ours2),
        "ours_cpu_s_per_iter": ours["iteration_cpu"],
        "ours_2dev_cpu_s_per_iter": ours2["iteration_cpu"] if ours2 else None,
        "trl_cpu_s_per_iter": trl["iteration_cpu"] if trl else None,
        "phases": {name: None if r is None else {k: r[k] for k in ("generate", "score", "update")}
                   for name, r in (("ours", ours), ("ours_2dev", ours2), ("trl", trl), ("trl_1thread", trl1))},
        "ours_compile_s": ours["compile_s"],
        "ours_compile_counts": ours["compile_counts"],
        "ours_2dev_compile_counts": ours2["compile_counts"] if ours2 else None,
        "score_mean": ours["score_mean"],
        "load_average": [load_start, load_end],
    }

    if trl is not None and not args.no_write:
        s = shape
        counts = ", ".join(f"{k} {v}x" for k, v in ours["compile_counts"].items())
        body = (
            f"## GRPO iteration: `rlhf_jax` RLTrainer (grpo preset) vs TRL {version} `GRPOTrainer` (cpu, float32)\n\n"
            f"`python benchmarks/grpo_iteration.py`. Machine: {machine()}. Ours: {ours['device']}"
            + (f" and {ours2['device']}" if ours2 else "") + f"; TRL: {trl['device']}. "
            f"{args.load_note or _load_note(load_start, load_end)} {malloc_note}\n\n"
            f"GPT-2 {s['n_layer']} layers x {s['n_embd']} wide, {s['n_head']} heads, vocab {s['vocab_size']} (the "
            f"same random weights on both sides; reference = a copy); {s['prompts']} prompts x G = "
            f"{s['group_size']} samples = {rows_per_iter} rows per iteration, {s['prompt_length']}-token prompts, "
            f"exactly {N}-token responses, temperature {TEMPERATURE}; reward: the fraction of even token ids (the "
            f"same Python function on both sides); group-normalised advantages, clipped ratio 0.2, k3 KL in the "
            f"loss with beta {KL_COEF}, per-sequence token mean (TRL `loss_type=\"grpo\"`); {s['epochs']} epoch x "
            f"{s['num_minibatches']} minibatches (TRL: `steps_per_generation={s['num_minibatches']}`, "
            f"`num_iterations={s['epochs']}`), AdamW lr {LR}; float32, no activation checkpointing on either side. "
            f"Medians of {ours['iterations_timed']} iterations after {args.warmup} warm-up, each side in its own "
            f"process. Ours compiled each phase once ({counts}); its first iteration took "
            f"{ours['first_iteration_s']:.1f} s (compilation ~{ours['compile_s']:.1f} s, "
            "not in the medians). TRL's score phase holds its old-policy and reference forwards, the reward and the "
            "advantages; ours holds only the reward function, the forwards being in our jitted update: compare "
            "`score + update`. The 2-device row runs our trainer data-parallel over 2 XLA host devices (one per "
            "core: `--xla_force_host_platform_device_count=2`, `trainer.with_mesh(make_mesh(data=2))`"
            "). CPU s: process CPU time (all threads) per iteration. Update GFLOP/s: model FLOPs of "
            "each side's update phase (formula in the script) / its time. Peak memory: peak RSS above the "
            "post-import baseline (ours: over the timed iterations, after a `malloc_trim`). What matches and "
            "differs between the two trainers is listed in the script's docstring.\n\n" + table
        )
        write_section("grpo_iteration", body)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
