"""One PPO-RLHF iteration: `rlhf_jax.train.PPOTrainer` vs TRL 1.8.0's `PPOTrainer`.

Both sides train the same random GPT-2 shape (policy, a frozen reference that
starts as a copy of the policy, a separate value model and a random reward
model, both scalar-head GPT-2s), on batches of random fixed-length prompts,
sampling exactly `response_length` tokens per prompt (no EOS stop) at
temperature 0.7, then `epochs x minibatches` clipped policy + value updates
(AdamW, lr 1e-5, grad-norm clip 1, kl_coef 0.05, vf_coef 0.1, clip 0.2,
gamma 1, lam 0.95: TRL's defaults, which ours share).

Each half runs in its own subprocess of this script, so that peak memory is
per framework (and JAX's GPU pre-allocation never meets PyTorch's). Reported
per half: the median over the timed iterations (after `--warmup` iterations;
ours' first one includes compilation, reported separately, and the compile
count of each jitted phase) of seconds per iteration and its phases; on CPU
also the process CPU time per iteration (all threads: less sensitive than wall
time to other processes on the machine, though PyTorch's spinning OpenMP
threads inflate it under contention); response tokens/s = batch x
response_length / seconds per iteration; the update's achieved model FLOP/s;
peak memory (CPU: the largest RSS sampled every 10 ms minus the RSS after
imports, before any model is built; for ours over the timed iterations, after
a glibc `malloc_trim`, so that neither the compiler's transient peak nor the
~0.5 GiB of freed heap that glibc would keep after it is counted; GPU: the
device's peak bytes in use, `memory_stats()` /
`torch.cuda.max_memory_allocated`).

Phases do not split at the same place in the two trainers:
  - TRL: generate | score = reference, value and reward forwards, rewards and
    GAE | update = epochs x minibatches of forward/backward + optimizer steps.
  - ours: generate | score = the reward model's forward | update = one jitted
    call with reference / old-policy / value forwards, shaped rewards, GAE,
    whitening and the nested `lax.scan` of epochs x minibatches.
so `score + update` is the comparable pair (it is reported too).

The update's FLOPs are model FLOPs (MFU is reported on GPU only), with T = P + N tokens per
sequence, N_trunk = non-embedding parameters of one GPT-2 trunk, L layers,
width D, vocabulary V:

    trunk forward per sequence  F_t = 2 * N_trunk * T + 4 * L * T^2 * D
    LM head forward per sequence F_h = 2 * D * V * N     (response positions only)
    update FLOPs = B * [ (3 F_t + 2 F_h)                 reference, old policy, old values
                         + epochs * 3 * (2 F_t + F_h) ]  policy + value forward/backward

(backward = 2 x forward; biases, norms and the softmax are not counted),
divided by the update time and, for MFU, by the peak of the device (dense
bf16 989e12 FLOP/s for H100 SXM and H200; float32 67e12, the non-tensor-core
peak, although both frameworks may use TF32 tensor cores for float32 matmuls).
TRL's update phase is credited with the epochs term only, since its
pre-update forwards are in its score phase. On the CPU config this is 546
GFLOP per iteration for ours (485 for TRL's update phase), so on a 2-core
machine at ~100 GFLOP/s per core of float32 matmul either side needs >= ~2.7 s
per iteration: the CPU config is compute-bound.

Usage:
  python benchmarks/ppo_iteration.py                  # --device cpu, ~3-4 minutes on 2 quiet cores
  python benchmarks/ppo_iteration.py --device gpu --bf16
  python benchmarks/ppo_iteration.py --torch-threads 1   # TRL without OpenMP spinning on a busy box

On a shared, busy CPU PyTorch's OpenMP threads spin and TRL slows down several
times more than JAX does (measured here: a GPT-2 4x256 minibatch forward/backward
takes 0.25 CPU-s with 1 torch thread, 1.85 CPU-s with 2 at load ~10 on 2 cores),
so a speed-up measured on a loaded machine overstates the quiet-machine one.

The last line printed is one JSON object with `ours_s_per_iter`,
`trl_s_per_iter`, `speedup` (TRL seconds / ours) and the phases of both.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
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

CPU = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=512, batch_size=64, prompt_length=16,
           response_length=32, ppo_epochs=4, num_minibatches=4)
GPU = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, batch_size=64, prompt_length=512,
           response_length=53, ppo_epochs=4, num_minibatches=4)
# --smoke: the smallest shape that runs every code path (a check of the script, not a benchmark)
SMOKE = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=64, batch_size=8, prompt_length=4,
             response_length=4, ppo_epochs=1, num_minibatches=2)
N_POSITIONS = 1024  # TRL's anchor builds GPT2Config(n_positions=max(1024, P + N))
# Dense peak FLOP/s by device kind (public spec sheets): (bf16 tensor core, float32 non-tensor).
PEAK_FLOPS = {"H100": (989e12, 67e12), "H200": (989e12, 67e12)}


def _peak_flops(device_kind: str, bf16: bool) -> float | None:
    for name, (p16, p32) in PEAK_FLOPS.items():
        if name in device_kind:
            return p16 if bf16 else p32
    return None


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _malloc_trim() -> None:
    """glibc `malloc_trim(0)`: return freed heap to the OS so that RSS shows live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """Peak resident set size of this process, sampled every `interval` s in a thread.

    `reset()` starts a new window; `peak` is the largest RSS seen since. (`ru_maxrss`
    cannot be reset, and ours would report the XLA compiler's peak, not training's.)
    """

    def __init__(self, interval: float = 0.01):
        import threading

        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def reset(self):
        self.peak = self._proc.memory_info().rss

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return self.peak


def update_flops(shape: dict, *, with_pre_forwards: bool = True) -> float:
    """Model FLOPs of one PPO update phase (see the module docstring)."""
    L, D, V = shape["n_layer"], shape["n_embd"], shape["vocab_size"]
    B, N = shape["batch_size"], shape["response_length"]
    T = shape["prompt_length"] + N
    n_trunk = L * 12 * D * D  # attention 4 D^2 + MLP 8 D^2 per layer (biases, norms ignored)
    f_trunk = 2 * n_trunk * T + 4 * L * T * T * D
    f_head = 2 * D * V * N
    flops = shape["ppo_epochs"] * 3 * (2 * f_trunk + f_head)
    if with_pre_forwards:
        flops += 3 * f_trunk + 2 * f_head
    return float(B * flops)


# ------------------------------------------------------------------------------- ours


def matmul_throughput(shape: dict, dtype, *, repeats: int = 5) -> float:
    """XLA's FLOP/s on the update's own matmuls: one minibatch's [M, K] x [K, N] projections
    (M = minibatch rows x (P + N) tokens: attention qkv and output, MLP in and out) and the LM
    head on its response tokens, each jitted alone, timed as a median; total FLOPs / total time."""
    import jax
    import jax.numpy as jnp

    mb = shape["batch_size"] // shape["num_minibatches"]
    d, v = shape["n_embd"], shape["vocab_size"]
    rows = mb * (shape["prompt_length"] + shape["response_length"])
    dims = [(rows, d, 3 * d), (rows, d, d), (rows, d, 4 * d), (rows, 4 * d, d),
            (mb * shape["response_length"], d, v)]
    total_flops = total_s = 0.0
    for m, k, n in dims:
        a = jnp.ones((m, k), dtype)
        b = jnp.ones((k, n), dtype)
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        f(a, b).block_until_ready()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a, b).block_until_ready()
            samples.append(time.perf_counter() - t0)
        total_s += sorted(samples)[len(samples) // 2]
        total_flops += 2.0 * m * k * n
    return total_flops / total_s


def run_ours(shape: dict, *, iterations: int, warmup: int, gpu: bool, bf16: bool, seed: int,
             devices: int = 1) -> dict:
    """Ours; with `devices` > 1 (CPU), data-parallel over that many XLA host devices."""
    if not gpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if devices > 1:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       f" --xla_force_host_platform_device_count={devices}").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax.models import ModelConfig, from_config
    from rlhf_jax.train import (
        AdvantageConfig,
        BatchConfig,
        KLConfig,
        LossConfig,
        OptimizerConfig,
        PPOConfig,
        PPOTrainer,
        SamplingConfig,
        optimizer_from_config,
    )

    rss0 = _rss_bytes()
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    V = shape["vocab_size"]
    cfg = ModelConfig(
        family="gpt2", model_type="gpt2", vocab_size=V, hidden_size=shape["n_embd"],
        num_layers=shape["n_layer"], num_heads=shape["n_head"],
        max_position_embeddings=max(N_POSITIONS, shape["prompt_length"] + shape["response_length"]),
        norm_eps=1e-5, hidden_act="gelu_new", tie_word_embeddings=True, attention_bias=True,
        attention_out_bias=True, mlp_bias=True, pad_token_id=V - 2, eos_token_id=V - 1,
    )
    policy, policy_params = from_config(cfg, head="lm", seed=seed, dtype=dtype)
    value_model, value_params = from_config(cfg, head="scalar", seed=seed + 1, dtype=dtype)
    reward_model, reward_params = from_config(cfg, head="scalar", seed=seed + 2, dtype=dtype)
    ref_params = jax.tree.map(jnp.copy, policy_params)

    ppo_cfg = PPOConfig(
        batch=BatchConfig(batch_size=shape["batch_size"], num_minibatches=shape["num_minibatches"],
                          ppo_epochs=shape["ppo_epochs"]),
        sampling=SamplingConfig(max_new_tokens=shape["response_length"], temperature=0.7, eos_token_id=None,
                                pad_token_id=V - 2),
        loss=LossConfig(vf_coef=0.1, clip_eps=0.2, value_clip_eps=0.2),
        kl=KLConfig(kl_coef=0.05),
        advantages=AdvantageConfig(gamma=1.0, lam=0.95),
        optimizer=OptimizerConfig(learning_rate=1e-5, schedule="constant", max_grad_norm=1.0),
    )
    tx = optimizer_from_config(ppo_cfg.optimizer)
    trainer = PPOTrainer(policy, ppo_cfg, tx, value_model=value_model, reward_model=reward_model)
    state = trainer.init(policy_params, value_params, seed=seed)
    # Data parallel: the trainer's phases jitted for a `data` mesh (`with_mesh`): params replicated,
    # every batch split over the mesh, each minibatch's rows kept split inside the update.
    mesh = None
    if devices > 1:
        from rlhf_jax.train.sharding import make_mesh, replicated, shard_batch

        mesh = make_mesh(data=devices)
        trainer = trainer.with_mesh(mesh)
        state = jax.device_put(state, trainer.param_shardings(state))
        ref_params, reward_params = jax.device_put((ref_params, reward_params), replicated(mesh))

    # Compilations per jitted phase, from JAX's public monitoring events (fun_name "jit(_update)", ...).
    compiles: dict[str, int] = {}

    def on_event(event, duration_secs, **kwargs):
        del duration_secs
        if event == "/jax/core/compile/backend_compile_duration":
            name = kwargs.get("fun_name", "?")
            compiles[name] = compiles.get(name, 0) + 1

    jax.monitoring.register_event_duration_secs_listener(on_event)

    rng = np.random.default_rng(seed)
    B, P = shape["batch_size"], shape["prompt_length"]
    prompts = [jnp.asarray(rng.integers(0, V - 2, size=(B, P)), jnp.int32) for _ in range(warmup + iterations)]
    prompt_mask = jnp.ones((B, P), jnp.int32)

    sampler = RssSampler()
    times = {"iteration": [], "generate": [], "score": [], "update": [], "iteration_cpu": []}
    for i, prompt_ids in enumerate(prompts):
        if i == warmup:
            peak_with_compile = sampler.peak
            _malloc_trim()  # hand the XLA compiler's freed heap back to the OS (~0.5 GiB here)
            sampler.reset()
        cpu0 = time.process_time()
        batch_mask = prompt_mask
        if mesh is not None:
            prompt_ids, batch_mask = shard_batch((prompt_ids, prompt_mask), mesh)
        state, metrics, _ = trainer.iteration(
            state, prompt_ids, batch_mask, ref_params=ref_params, reward_params=reward_params
        )
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
    out["matmul_flops_per_s"] = matmul_throughput(shape, dtype)
    out["first_iteration_s"] = times["iteration"][0]
    out["compile_s"] = max(times["iteration"][0] - out["iteration"], 0.0)
    out["compile_counts"] = {phase: compiles.get(f"jit(_{phase})", 0) for phase in ("rollout", "score", "update")}
    out["response_length_mean"] = last["response_length"]
    out["finite"] = all(np.isfinite(v) for v in last.values())
    out["approx_kl"] = last.get("approx_kl")
    dev = jax.devices()[0]
    out["device"] = f"JAX {jax.__version__} on {dev.platform} ({dev.device_kind}" + (
        f", {devices} host devices, data-parallel)" if devices > 1 else ")")
    if gpu:
        stats = dev.memory_stats() or {}
        out["peak_memory_bytes"] = stats.get("peak_bytes_in_use")
    else:
        out["peak_memory_bytes"] = peak - rss0
        out["peak_memory_with_compile_bytes"] = max(peak_with_compile, peak) - rss0
    return out


# -------------------------------------------------------------------------------- TRL


def run_trl(shape: dict, *, iterations: int, warmup: int, gpu: bool, bf16: bool, seed: int,
            torch_threads: int | None = None) -> dict:
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)

    from trl_ppo_anchor import time_trl_ppo

    rss0 = _rss_bytes()
    sampler = RssSampler()
    device = "cuda" if gpu else "cpu"
    times = time_trl_ppo(**shape, iterations=iterations, warmup=warmup, device=device, bf16=bf16, seed=seed)
    peak = sampler.stop()
    out = dict(times)
    out["device"] = f"torch {torch.__version__} on " + (
        torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    )
    out["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if gpu else peak - rss0
    return out


def _summarise(times: dict, warmup: int) -> dict:
    import statistics

    return {k: statistics.median(v[warmup:]) for k, v in times.items()} | {
        "iterations_timed": len(times["iteration"]) - warmup
    }


# ----------------------------------------------------------------------------- driver


def _run_half(half: str, args, torch_threads: int | None = None, devices: int = 1) -> dict:
    """Run one half in a fresh interpreter; its last stdout line is its JSON result."""
    cmd = [sys.executable, __file__, "--half", half, "--device", args.device, "--iterations",
           str(args.iterations), "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--ours-devices", str(devices)]
    if args.bf16:
        cmd.append("--bf16")
    if args.smoke:
        cmd.append("--smoke")
    if torch_threads:
        cmd += ["--torch-threads", str(torch_threads)]
    return run_json_subprocess(cmd, half)


def _fmt_mem(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 compute (GPU config)")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations per side")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-trl", action="store_true", help="time ours only (no table written)")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--load-note", default=None, help="what else ran on the machine")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="do not set GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for the halves")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads for TRL (default: torch's own, one per core)")
    parser.add_argument("--no-trl-1thread", action="store_true",
                        help="CPU: skip the extra TRL run with one torch thread")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny shape that runs every code path in seconds (implies --no-write)")
    parser.add_argument("--no-data-parallel", action="store_true",
                        help="CPU: skip ours data-parallel on 2 host devices")
    parser.add_argument("--half", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ours-devices", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device == "gpu"
    shape = SMOKE if args.smoke else (GPU if gpu else CPU)
    if args.smoke:
        args.no_write = True
    if args.iterations is None:
        args.iterations = 5 if gpu else 3

    if args.half is not None:
        kwargs = dict(iterations=args.iterations, warmup=args.warmup, gpu=gpu, bf16=args.bf16,
                      seed=args.seed)
        if args.half == "ours":
            result = run_ours(shape, devices=args.ours_devices, **kwargs)
        else:
            result = run_trl(shape, torch_threads=args.torch_threads, **kwargs)
        print(json.dumps(result))
        return

    malloc_note = huge_page_malloc(not args.no_huge_pages)
    load_start = os.getloadavg()[0]
    ours = _run_half("ours", args)
    print(f"ours: {json.dumps(ours)}", flush=True)
    # On CPU also ours data-parallel over 2 XLA host devices, one per core.
    ours2 = None if (gpu or args.no_data_parallel) else _run_half("ours", args, devices=2)
    if ours2 is not None:
        print(f"ours2: {json.dumps(ours2)}", flush=True)
    trl = None if args.skip_trl else _run_half("trl", args, args.torch_threads)
    if trl is not None:
        print(f"trl:  {json.dumps(trl)}", flush=True)
    # On CPU also TRL with one torch thread: on a busy machine PyTorch's spinning OpenMP
    # threads make the default run several times slower; this row bounds that effect.
    trl1 = None
    if trl is not None and not gpu and args.torch_threads is None and not args.no_trl_1thread:
        trl1 = _run_half("trl", args, 1)
        print(f"trl1: {json.dumps(trl1)}", flush=True)

    B, N = shape["batch_size"], shape["response_length"]
    # Model FLOPs of each side's update phase (TRL's pre-update forwards are in its score).
    flops = {"ours": update_flops(shape), "trl": update_flops(shape, with_pre_forwards=False)}
    peak = _peak_flops(ours["device"], args.bf16) if gpu else None
    mfu = {}
    if peak is not None:
        mfu["ours"] = flops["ours"] / ours["update"] / peak
        if trl is not None:
            mfu["trl"] = flops["trl"] / trl["update"] / peak

    def row(name, r, key):
        if r is None:
            return None
        cells = [name, f"{r['iteration']:.3f}"]
        if not gpu:
            cells.append(f"{r['iteration_cpu']:.2f}")
        cells += [f"{r['generate']:.3f}", f"{r['score']:.3f}", f"{r['update']:.3f}",
                  f"{r['score'] + r['update']:.3f}", f"{B * N / r['iteration']:.0f}",
                  f"{flops[key] / r['update'] / (1e12 if gpu else 1e9):.1f}",
                  f"{100 * flops[key] / r['update'] / ours['matmul_flops_per_s']:.0f}%",
                  _fmt_mem(r["peak_memory_bytes"])]
        if gpu:
            cells.append(f"{100 * mfu[key]:.1f}%" if key in mfu else "n/a")
        return cells

    headers = ["trainer", "s / iteration"] + ([] if gpu else ["CPU s / iteration"]) + [
        "generate s", "score s", "update s", "score + update s", "response tokens/s",
        "update TFLOP/s" if gpu else "update GFLOP/s", "update / XLA matmul", "peak memory"] + (
        ["update MFU"] if gpu else [])
    rows = [r for r in (row(f"TRL {_trl_version()} PPOTrainer (anchor)", trl, "trl"),
                        row(f"TRL {_trl_version()} PPOTrainer, 1 torch thread", trl1, "trl"),
                        row("rlhf_jax PPOTrainer" + ("" if gpu else ", 1 device"), ours, "ours"),
                        row("rlhf_jax PPOTrainer, 2 CPU devices, data-parallel", ours2, "ours")) if r is not None]
    speedup = trl["iteration"] / ours["iteration"] if trl is not None else None

    def speedup_row(name, t, o):
        ratio = lambda k: f"{t[k] / o[k]:.2f}x"  # noqa: E731
        both = (t["score"] + t["update"]) / (o["score"] + o["update"])
        return ([name, ratio("iteration")] + ([] if gpu else [ratio("iteration_cpu")])
                + [ratio("generate"), "", "", f"{both:.2f}x", "", "", "", ""] + ([""] if gpu else []))

    for t_name, t in (("TRL", trl), ("TRL 1 thread", trl1)):
        for o_name, o in (("ours", ours), ("ours 2 devices", ours2)):
            if t is not None and o is not None:
                name = o_name if ours2 is None or o_name != "ours" else "ours 1 device"
                rows.append(speedup_row(f"speed-up ({t_name} / {name})", t, o))
    table = markdown_table(headers, rows)
    print(table)

    def phases(r):
        return None if r is None else {k: r[k] for k in ("generate", "score", "update")}

    summary = {
        "device": args.device,
        "bf16": args.bf16,
        "shape": shape,
        "ours_s_per_iter": ours["iteration"],
        "trl_s_per_iter": trl["iteration"] if trl else None,
        "speedup": speedup,
        "ours_phases": phases(ours),
        "trl_phases": phases(trl),
        "trl_1thread_s_per_iter": trl1["iteration"] if trl1 else None,
        "speedup_vs_trl_1thread": trl1["iteration"] / ours["iteration"] if trl1 else None,
        "trl_1thread_phases": phases(trl1),
        "trl_1thread_cpu_s_per_iter": trl1.get("iteration_cpu") if trl1 else None,
        "ours_cpu_s_per_iter": ours.get("iteration_cpu"),
        "trl_cpu_s_per_iter": trl.get("iteration_cpu") if trl else None,
        "ours_tokens_per_s": B * N / ours["iteration"],
        "trl_tokens_per_s": B * N / trl["iteration"] if trl else None,
        "ours_compile_s": ours["compile_s"],
        "ours_compile_counts": ours["compile_counts"],
        "ours_update_gflops": flops["ours"] / ours["update"] / 1e9,
        "matmul_gflops": ours["matmul_flops_per_s"] / 1e9,
        "ours_update_matmul_fraction": flops["ours"] / ours["update"] / ours["matmul_flops_per_s"],
        "trl_update_gflops": flops["trl"] / trl["update"] / 1e9 if trl else None,
        "ours_peak_memory_bytes": ours["peak_memory_bytes"],
        "trl_peak_memory_bytes": trl["peak_memory_bytes"] if trl else None,
        "update_mfu": mfu or None,
        "iterations_timed": ours["iterations_timed"],
        "load_average": [load_start, os.getloadavg()[0]],
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "ours_2dev_s_per_iter": ours2["iteration"] if ours2 else None,
        "ours_2dev_cpu_s_per_iter": ours2["iteration_cpu"] if ours2 else None,
        "ours_2dev_phases": phases(ours2),
        "ours_2dev_compile_counts": ours2["compile_counts"] if ours2 else None,
        "speedup_2dev": trl["iteration"] / ours2["iteration"] if (trl and ours2) else None,
        "speedup_2dev_vs_trl_1thread": trl1["iteration"] / ours2["iteration"] if (trl1 and ours2) else None,
    }

    if trl is not None and not args.no_write:
        s = shape
        body = (
            f"## PPO iteration: `rlhf_jax.train.PPOTrainer` vs TRL {_trl_version()} "
            f"`PPOTrainer` ({args.device}, {'bfloat16' if args.bf16 else 'float32'})\n\n"
            f"Machine: {machine()}. Ours: {ours['device']}"
            + (f" and {ours2['device']}" if ours2 else "") + f"; TRL: {trl['device']}. "
            f"{args.load_note or _load_note(load_start, summary['load_average'][1])} {malloc_note}\n\n"
            f"GPT-2 {s['n_layer']} layers x {s['n_embd']} wide, {s['n_head']} heads, vocab "
            f"{s['vocab_size']} (policy, reference = copy of the policy, separate value and reward "
            f"models); batch {B}, {s['prompt_length']}-token prompts, exactly {N}-token responses "
            f"(no EOS stop), temperature 0.7, {s['ppo_epochs']} epochs x {s['num_minibatches']} "
            f"minibatches. Medians of {ours['iterations_timed']} iterations after {args.warmup} "
            f"warm-up, each side in its own process. Ours compiled each phase once "
            f"({_counts(ours['compile_counts'])}); its first iteration took "
            f"{ours['first_iteration_s']:.1f} s (compilation ~{ours['compile_s']:.1f} s, not in the medians). "
            "TRL's score phase holds its reference, value and reward forwards and GAE; ours holds "
            "only the reward model, the rest being inside our one jitted update, so compare "
            "`score + update`. "
            + ("The 1-torch-thread TRL row avoids OpenMP spinning, which on a busy machine slows "
               "the default run several times. " if trl1 is not None else "")
            + ("The 2-device row runs our trainer data-parallel over 2 XLA host devices, one per core "
               "(`--xla_force_host_platform_device_count=2`, `trainer.with_mesh(make_mesh(data=2))`: "
               "params replicated, the prompts split with `shard_batch`, each minibatch's rows kept "
               "split inside the update); the TRL anchor keeps torch's default threads. "
               if ours2 is not None else "")
            + "Response tokens/s = batch x response length / (s / iteration). "
            "Update FLOP/s: model FLOPs of each side's update phase (formula in the script's "
            "docstring) / its time. Update / XLA matmul: that FLOP/s as a fraction of the FLOP/s XLA "
            "reaches in the same run on the update's own matmul shapes alone (one minibatch's "
            "projections and LM head, `matmul_throughput`): how close the update runs to the "
            "matmul roofline of this machine. "
            + ("CPU s: process CPU time (all threads) per iteration. " if not gpu else "")
            + ("Peak memory: device peak bytes in use. " if gpu else
               "Peak memory: peak RSS (sampled every 10 ms; ours: during the timed iterations, TRL: "
               "over its whole run) minus the RSS after imports; for ours after a `malloc_trim` that "
               "returns the XLA compiler's freed heap. ")
            + (f"Update MFU: over {peak:.3g} FLOP/s." if peak is not None else "")
            + "\n\n" + table
        )
        name = "ppo_iteration" if not gpu else f"ppo_iteration_gpu{'_bf16' if args.bf16 else ''}"
        write_section(name, body)
    print(json.dumps(summary))


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}x" for k, v in counts.items())


def _trl_version() -> str:
    try:
        from importlib.metadata import version

        return version("trl")
    except Exception:  # noqa: BLE001
        return ""


def _load_note(start: float, end: float) -> str:
    cores = os.cpu_count() or 1
    busy = max(start, end) > 0.5 * cores
    return (f"Load average {start:.1f} at the start, {end:.1f} at the end, on {cores} cores"
            + (": other processes shared the CPU and the halves ran one after the other, so "
               "absolute times and ratios are noisy." if busy else "."))


if __name__ == "__main__":
    main()
