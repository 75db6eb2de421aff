"""Generation throughput: rlhf_jax.generate vs HF transformers `generate` (PyTorch).

Both samplers decode the same random GPT-2 weights (one `save_pretrained` folder,
loaded by `rlhf_jax.models.from_pretrained` and by
`transformers.AutoModelForCausalLM.from_pretrained`), the same prompt batch, the
same prompt length and number of new tokens, with EOS disabled so that every row
generates exactly `max_new_tokens` tokens. The median over repeats after a warm-up
call is reported as tokens/s (batch x new tokens / seconds); ours excludes the
one-off compilation, which is reported separately.

`--device gpu` uses the GPT-2-small shape (12 x 768, vocab 50257), batch 64 and
256, 512-token prompts, 53 and 512 new tokens, bfloat16 for both, and also reports
the fraction of the memory-bandwidth floor that our decode reaches:

    floor per step = (weight bytes + B x (P + N/2) x KV bytes per token) / HBM bandwidth
    KV bytes per token = 2 x layers x kv_heads x head_dim x bytes per element

(average context P + N/2: the bytes a step must read at least; prefill is
included in the measured time, so the fraction is conservative).

Usage:
  python benchmarks/generate.py --device cpu      # ~1-2 minutes on 2 cores
  python benchmarks/generate.py --device gpu

The last line printed is one JSON object with `ours_tokens_per_s`,
`hf_tokens_per_s`, `speedup` (the headline configuration) and every row.
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

import numpy as np  # noqa: E402
from _results import machine, markdown_table, median_time, write_section  # noqa: E402

# HBM bandwidth in bytes/s by device kind (public spec sheets).
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L4": 3.0e11}

CPU_MODEL = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=512, n_positions=128)
GPU_MODEL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
# (batch, prompt length, new tokens, mode)
CPU_CONFIGS = [(16, 16, 32, "greedy"), (64, 16, 32, "greedy"), (64, 16, 32, "sample")]
GPU_CONFIGS = [(64, 512, 53, "greedy"), (64, 512, 512, "greedy"), (256, 512, 53, "greedy"),
               (256, 512, 512, "greedy"), (256, 512, 512, "sample")]


def _bandwidth(device_kind: str) -> float | None:
    for name, bw in BANDWIDTH.items():
        if name in device_kind:
            return bw
    return None


def _save_random_gpt2(folder: Path, shape: dict, seed: int = 0) -> None:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (median)")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF anchor (ours only)")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    gpu = args.device == "gpu"
    if not gpu:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        # JAX and torch share the GPU: JAX must not grab 75% of it up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from rlhf_jax.models import from_pretrained
    from rlhf_jax.rollout import generate

    repeats = args.repeats or 3
    shape = GPU_MODEL if gpu else CPU_MODEL
    configs = GPU_CONFIGS if gpu else CPU_CONFIGS
    dtype_name = "bfloat16" if gpu else "float32"
    jdtype = jnp.bfloat16 if gpu else jnp.float32
    tdtype = torch.bfloat16 if gpu else torch.float32
    torch_device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    run_hf = not args.no_hf and (not gpu or torch_device == "cuda")

    device = jax.devices()[0]
    if gpu and device.platform != "gpu":
        print(f"warning: --device gpu but JAX runs on {device.platform}", file=sys.stderr)
    if gpu and not run_hf and not args.no_hf:
        print("warning: torch has no CUDA here: the HF anchor is skipped", file=sys.stderr)
    bandwidth = _bandwidth(device.device_kind) if gpu else None
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        _save_random_gpt2(Path(tmp), shape)
        lm, params = from_pretrained(tmp, dtype=jdtype, param_dtype=jdtype)
        hf = None
        if run_hf:
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=tdtype)
            hf = hf.to(torch_device).eval()
            hf.generation_config.eos_token_id = None
        cfg = lm.config
        weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
        kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(jdtype).itemsize

        rng = np.random.default_rng(0)
        for batch, prompt_len, new_tokens, mode in configs:
            ids = rng.integers(3, cfg.vocab_size, size=(batch, prompt_len)).astype(np.int32)
            mask = np.ones_like(ids)
            temperature = 0.0 if mode == "greedy" else 1.0
            ids_dev, mask_dev = jax.device_put(ids), jax.device_put(mask)
            key = jax.random.key(0)

            def ours():
                out = generate(lm, params, ids_dev, mask_dev, key, max_new_tokens=new_tokens,
                               temperature=temperature, pad_token_id=0)
                return jax.block_until_ready(out)

            t0 = time.perf_counter()
            our_out = ours()
            compile_s = time.perf_counter() - t0
            ours()  # warm-up

            hf_tps, match, theirs = None, None, None
            if hf is not None:
                hf_ids = torch.tensor(ids, dtype=torch.long, device=torch_device)
                hf_mask = torch.tensor(mask, dtype=torch.long, device=torch_device)
                sample_kw = (dict(do_sample=False) if mode == "greedy"
                             else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0))

                def theirs():
                    with torch.no_grad():
                        out = hf.generate(input_ids=hf_ids, attention_mask=hf_mask,
                                          max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                          pad_token_id=0, **sample_kw)
                    if torch_device == "cuda":
                        torch.cuda.synchronize()
                    return out

                hf_out = theirs()  # warm-up
                assert hf_out.shape[1] == prompt_len + new_tokens, hf_out.shape
                if mode == "greedy":
                    match = float(np.mean(hf_out[:, prompt_len:].cpu().numpy()
                                          == np.asarray(our_out.tokens)))
                if torch_device == "cpu":
                    # torch's OpenMP threads spin: on a busy machine one thread can be
                    # 10x faster than all cores. Give HF its best thread count.
                    trials = {}
                    for threads in sorted({1, os.cpu_count() or 1}):
                        torch.set_num_threads(threads)
                        trials[threads] = median_time(theirs, repeats=1, warmup=0)
                    torch.set_num_threads(min(trials, key=trials.get))

            # Alternate the timed calls so both see the same machine load.
            # CPU seconds of this process too: a load-robust second opinion on CPU.
            our_times, hf_times, our_cpu, hf_cpu = [], [], [], []
            for _ in range(repeats):
                c0 = time.process_time()
                our_times.append(median_time(ours, repeats=1, warmup=0))
                our_cpu.append(time.process_time() - c0)
                if theirs is not None:
                    c0 = time.process_time()
                    hf_times.append(median_time(theirs, repeats=1, warmup=0))
                    hf_cpu.append(time.process_time() - c0)
            our_s = float(np.median(our_times))
            our_tps = batch * new_tokens / our_s
            if hf_times:
                hf_tps = batch * new_tokens / float(np.median(hf_times))

            floor_frac = None
            if bandwidth is not None:
                avg_context = prompt_len + new_tokens / 2
                step_bytes = weight_bytes + batch * avg_context * kv_bytes_per_token
                floor_s = new_tokens * step_bytes / bandwidth
                floor_frac = floor_s / our_s
            result = dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, mode=mode,
                          ours_s=our_s, ours_compile_s=compile_s, ours_tokens_per_s=our_tps,
                          hf_tokens_per_s=hf_tps,
                          speedup=None if hf_tps is None else our_tps / hf_tps,
                          greedy_token_match=match, bandwidth_fraction=floor_frac,
                          ours_cpu_s=float(np.median(our_cpu)),
                          hf_cpu_s=float(np.median(hf_cpu)) if hf_cpu else None)
            results.append(result)
            print(json.dumps(result), flush=True)
            rows.append([batch, prompt_len, new_tokens, mode, f"{our_tps:,.0f}",
                         "-" if hf_tps is None else f"{hf_tps:,.0f}",
                         "-" if hf_tps is None else f"{our_tps / hf_tps:.2f}x",
                         f"{compile_s:.1f}",
                         f"{np.median(our_cpu):.2f}" + ("" if not hf_cpu else f" / {np.median(hf_cpu):.2f}"),
                         "-" if hf is None else str(torch.get_num_threads() if torch_device == "cpu" else "gpu"),
                         "-" if match is None else f"{match:.3f}",
                         "-" if floor_frac is None else f"{floor_frac:.2f}"])

    headline = max(results, key=lambda r: r["batch"] * r["new_tokens"] * (r["mode"] == "greedy"))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    body = (
        f"### generate ({args.device})\n\n"
        f"Machine: {machine()}. Model: random GPT-2 {shape['n_layer']} layers x {shape['n_embd']}, "
        f"vocab {shape['vocab_size']} ({n_params / 1e6:.1f}M params), {dtype_name}; the same "
        f"saved weights for both. EOS disabled (every row decodes `new` tokens). "
        f"Tokens/s = batch x new tokens / median seconds over {repeats} calls after a warm-up, "
        f"ours and HF alternating; "
        f"ours excludes compilation (column `compile s`: the first call). HF: transformers "
        f"{transformers.__version__} `generate` on torch {torch.__version__} ({torch_device}; on CPU "
        f"with the faster of 1 and {os.cpu_count()} threads, column `HF threads`). "
        f"`CPU s`: median process CPU seconds per call (all threads). "
        f"`match`: fraction of greedy tokens equal to HF's. "
        + ("`bw frac`: bandwidth floor / measured time (floor: weight + KV bytes per step at "
           f"{bandwidth:.2e} B/s). " if bandwidth else "")
        + ("Other engineers were loading this machine while it ran: ratios are indicative. "
           if not gpu else "")
        + "\n\n"
        + markdown_table(["batch", "prompt", "new", "mode", "ours tok/s", "HF tok/s", "speedup",
                          "compile s", "CPU s ours / HF", "HF threads", "match", "bw frac"], rows)
    )
    if not args.no_write:
        write_section("generate" if not gpu else "generate-gpu", body)
    summary = dict(device=args.device, machine=machine(),
                   ours_tokens_per_s=headline["ours_tokens_per_s"],
                   hf_tokens_per_s=headline["hf_tokens_per_s"], speedup=headline["speedup"],
                   headline=dict(batch=headline["batch"], prompt_len=headline["prompt_len"],
                                 new_tokens=headline["new_tokens"], mode=headline["mode"]),
                   rows=results)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
