"""Group sampling: `generate(num_samples=G)` (one prefill per prompt, its KV cache shared by the
G samples) vs repeating each prompt G times (G prefills per prompt), side by side in one run.

Both decode the same random Llama-style weights, the same prompts, G = 8 samples per prompt,
256-token prompts, 64 new tokens, EOS off so every row generates exactly 64 tokens. Reported:
median wall time after a warm-up call, generated tokens/s (B x G x 64 / s), and the compiled
programs' FLOPs (XLA cost analysis) for the prefill-only program (max_new_tokens = 1).

Usage:
  python benchmarks/group_sampling.py            # CPU, ~1-3 minutes on 2 cores
  python benchmarks/group_sampling.py --no-write # print only

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._results import machine, markdown_table, median_time, write_section  # noqa: E402
from rlhf_jax.models import ModelConfig, from_config  # noqa: E402
from rlhf_jax.rollout import _generate_jit, generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4, help="prompts B")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt G")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    b, g, p, n = args.prompts, args.group, args.prompt_len, args.new_tokens
    config = ModelConfig.tiny("llama", 1024, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                              num_kv_heads=4, intermediate_size=4 * args.hidden, max_position_embeddings=p + n)
    lm, params = from_config(config, head="lm", seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 1024, (b, p)).astype(np.int32)
    mask = np.ones((b, p), np.int32)
    rep_ids, rep_mask = np.repeat(ids, g, axis=0), np.repeat(mask, g, axis=0)
    key = jax.random.key(0)
    kw = dict(max_new_tokens=n, temperature=1.0)

    def shared():
        jax.block_until_ready(generate(lm, params, ids, mask, key, num_samples=g, **kw))

    def repeated():
        jax.block_until_ready(generate(lm, params, rep_ids, rep_mask, key, **kw))

    load = os.getloadavg()[0]
    t_shared = median_time(shared, repeats=args.repeats)
    t_repeated = median_time(repeated, repeats=args.repeats)
    a = generate(lm, params, ids, mask, key, num_samples=g, **kw)
    r = generate(lm, params, rep_ids, rep_mask, key, **kw)
    same = bool(np.array_equal(np.asarray(a.tokens), np.asarray(r.tokens)))

    knobs = {"temperature": np.float32(1.0), "top_p": np.float32(1.0), "eos_token_id": np.int32(-1),
             "pad_token_id": np.int32(0)}
    structure = dict(max_new_tokens=1, greedy=False, top_k=0, use_top_p=False, has_eos=False)

    def prefill_flops(x, m, samples):
        cost = _generate_jit.lower(lm, params, x, m, key, knobs, num_samples=samples, **structure).compile()
        cost = cost.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])

    f_shared, f_repeated = prefill_flops(ids, mask, g), prefill_flops(rep_ids, rep_mask, 1)
    tokens = b * g * n
    result = {
        "shared_s": t_shared, "repeated_s": t_repeated, "speedup": t_repeated / t_shared,
        "shared_tokens_per_s": tokens / t_shared, "repeated_tokens_per_s": tokens / t_repeated,
        "prefill_gflop_shared": f_shared / 1e9, "prefill_gflop_repeated": f_repeated / 1e9,
        "same_tokens": same, "B": b, "G": g, "P": p, "N": n,
    }
    rows = [
        ["shared prefill (`num_samples=G`)", f"{t_shared:.3f}", f"{tokens / t_shared:.0f}", f"{f_shared / 1e9:.2f}"],
        ["repeated prompts", f"{t_repeated:.3f}", f"{tokens / t_repeated:.0f}", f"{f_repeated / 1e9:.2f}"],
    ]
    body = (
        f"## Group sampling: shared prefill vs repeated prompts (cpu, float32)\n\n"
        f"`python benchmarks/group_sampling.py`. Machine: {machine()}.\n\n"
        f"Llama-style {args.layers} x {args.hidden} (vocab 1024), B = {b} prompts x G = {g} samples, "
        f"prompt {p}, {n} new tokens, EOS off. Median of {args.repeats} after a warm-up; 1-minute load "
        f"average {load:.1f} at the start (the cores may be shared with other jobs).\n\n"
        + markdown_table(["sampler", "seconds", "generated tokens/s", "prefill-program GFLOP"], rows)
        + f"\nShared prefill: **{t_repeated / t_shared:.2f}x** the repeated prompts' tokens/s; the samples are "
        f"{'identical' if same else 'not identical'} (same key). The prefill FLOPs fall by "
        f"{f_repeated / f_shared:.1f}x (G = {g}).\n"
    )
    print(body)
    if not args.no_write:
        write_section("group_sampling", body)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
