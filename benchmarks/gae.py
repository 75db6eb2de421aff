"""GAE speed: rlhf_jax (lax.scan, lax.associative_scan) vs a TRL-style PyTorch loop vs rlax.

All four compute the same masked GAE (checked against each other before timing):

- `torch loop`: the reversed Python loop over t that TRL's PPOTrainer used
  (`lastgaelam = delta + gamma * lam * lastgaelam`), on torch tensors, with the
  episode ending after the last valid token; the anchor of every ratio.
- `rlax`: `rlax.truncated_generalized_advantage_estimation`, vmapped over the
  batch and jitted (discount_t = gamma * mask_{t+1}).
- `scan` / `associative`: `rlhf_jax.gae(method=...)`, jitted.

Run: `python benchmarks/gae.py [--quick]`. Writes the "gae" section of
benchmarks/RESULTS.md and prints one JSON line at the end. On GPU it adds the
bytes-moved floor (read rewards, values, mask; write advantages, returns:
5 x B x T x 4 bytes over the HBM bandwidth).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._results import machine, markdown_table, median_time, write_section  # noqa: E402
from rlhf_jax import gae  # noqa: E402

GAMMA, LAM = 1.0, 0.95
# Peak HBM bandwidth (bytes/s) by device kind, for the floor column; override with GAE_BENCH_BANDWIDTH.
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def torch_loop(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """TRL-style GAE: a Python loop over t in reverse on [B, T] torch tensors."""
    import torch

    t_len = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(t_len)):
        if t < t_len - 1:
            next_mask = mask[:, t + 1]
            nextvalues = values[:, t + 1] * next_mask
        else:
            next_mask = torch.zeros_like(mask[:, 0])
            nextvalues = next_mask
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * next_mask * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = (advantages + values) * mask
    return advantages * mask, returns


def make_rlax():
    import rlax

    def one_row(r, v, m):
        next_mask = jnp.concatenate([m[1:], jnp.zeros(1, m.dtype)])
        v_ext = jnp.concatenate([v * m, jnp.zeros(1, v.dtype)])
        adv = rlax.truncated_generalized_advantage_estimation(r * m, GAMMA * next_mask, LAM, v_ext)
        return adv * m, (adv + v) * m

    return jax.jit(jax.vmap(one_row))


def inputs(b, t, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(t // 2, t + 1, size=b)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    rewards = (rng.normal(size=(b, t)) * mask).astype(np.float32)
    values = (rng.normal(size=(b, t)) * mask).astype(np.float32)
    return rewards, values, mask


def bandwidth():
    if "GAE_BENCH_BANDWIDTH" in os.environ:
        return float(os.environ["GAE_BENCH_BANDWIDTH"])
    kind = jax.devices()[0].device_kind
    for name, bw in BANDWIDTH.items():
        if name in kind:
            return bw
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape (smoke test)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    shapes = [(64, 128)] if args.quick else [(64, 128), (64, 1024), (512, 128), (512, 1024)]
    on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
    bw = bandwidth() if on_gpu else None
    ours = {m: jax.jit(lambda r, v, k, m=m: gae(r, v, k, gamma=GAMMA, lam=LAM, method=m))
            for m in ("scan", "associative")}
    rlax_gae = make_rlax()

    rows, records = [], []
    for b, t in shapes:
        r, v, m = inputs(b, t)
        rj, vj, mj = (jax.device_put(x) for x in (r, v, m))
        rt, vt, mt = (torch.from_numpy(x) for x in (r, v, m))
        # correctness first: everybody agrees
        want = torch_loop(rt, vt, mt)[0].numpy()
        for name, fn in [*ours.items(), ("rlax", rlax_gae)]:
            got = np.asarray(fn(rj, vj, mj)[0])
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4, err_msg=name)

        def timed_jax(fn):
            return median_time(lambda: jax.block_until_ready(fn(rj, vj, mj)), repeats=args.repeats, warmup=2)

        torch_repeats = max(1, min(args.repeats, 3 if t >= 1024 else args.repeats))
        times = {"torch loop": median_time(lambda: torch_loop(rt, vt, mt), repeats=torch_repeats, warmup=1)}
        times["rlax (vmap, jit)"] = timed_jax(rlax_gae)
        times["scan"] = timed_jax(ours["scan"])
        times["associative"] = timed_jax(ours["associative"])
        anchor = times["torch loop"]
        row = [f"{b} x {t}"]
        for name in ("torch loop", "rlax (vmap, jit)", "scan", "associative"):
            row.append(f"{times[name] * 1e3:.3f} ms ({anchor / times[name]:.1f}x)")
        rec = {"B": b, "T": t, **{k: v for k, v in times.items()}}
        if bw:
            floor = 5 * b * t * 4 / bw
            row += [f"{floor * 1e6:.2f} us", f"{times['associative'] / floor:.1f}x"]
            rec["floor_s"] = floor
        rows.append(row)
        records.append(rec)
        print(" | ".join(row), flush=True)

    headers = ["B x T", "torch loop (anchor)", "rlax", "scan", "associative"]
    if bw:
        headers += ["bytes floor", "associative / floor"]
    auto = "associative" if on_gpu or jax.default_backend() == "tpu" else "scan"
    body = (
        "## GAE: `rlhf_jax.gae` vs a TRL-style PyTorch loop and rlax\n\n"
        f"Machine: {machine()}; torch {torch.__version__} on CPU ({torch.get_num_threads()} threads).\n"
        f"Median of {args.repeats} runs (torch loop: up to 3 at T = 1024) after warm-up, outputs blocked on; "
        "cells are time (speed-up over the torch loop, measured in the same run). "
        "All four implementations are checked equal on these inputs before timing. "
        "gamma = 1, lam = 0.95, random right padding (lengths T/2..T).\n"
        f"`method=\"auto\"` picks `{auto}` on this backend. "
        "Measured while other engineers loaded the same CPU: absolute times are noisy, ratios less so.\n\n"
        + markdown_table(headers, rows)
    )
    if not args.no_write and not args.quick:
        write_section("gae", body)
    print(body)
    print(json.dumps({"benchmark": "gae", "backend": jax.default_backend(), "results": records}))


if __name__ == "__main__":
    main()
