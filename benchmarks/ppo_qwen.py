"""A Qwen2.5-0.5B-shaped PPO iteration of `rlhf_jax.train.PPOTrainer`: seconds per phase,
compile seconds per phase, device peak memory and the update's MFU.

The shape of `configs/ppo_tldr_qwen05b.yaml`: policy, a separate value network and a
reward model with the architecture of `configs/models/qwen2.5-0.5b/config.json` (random
weights; nothing is downloaded), a frozen reference; batch 64, 576-token prompts, exactly
53-token responses (no EOS stop), 4 epochs x 4 minibatches; bfloat16 compute, float32
master weights, frozen weights in bfloat16, `remat="full"`.

Update FLOPs are the analytic model FLOPs of `rlhf_jax.train.plan` (its module docstring:
reference, old-policy and value forwards plus epochs x 3 x (policy + value) forwards); MFU
divides their rate by the device's dense bf16 peak (H100 / H200: 989e12 FLOP/s).

Usage:
  python benchmarks/ppo_qwen.py                # the GPU measurement (writes RESULTS.md "ppo_qwen05b")
  python benchmarks/ppo_qwen.py --smoke        # CPU: a 2-layer stand-in, every code path, no write

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import machine, markdown_table, write_section  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
FULL = dict(batch_size=64, prompt_length=576, response_length=53, ppo_epochs=4, num_minibatches=4)
SMOKE = dict(batch_size=8, prompt_length=8, response_length=4, ppo_epochs=1, num_minibatches=2)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, a 2-layer stand-in; implies --no-write")
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations (after one warm-up)")
    ap.add_argument("--remat", default="full")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        args.no_write, args.iterations = True, 1
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax.models import LM, ModelConfig
    from rlhf_jax.train import BatchConfig, OptimizerConfig, PPOConfig, PPOTrainer, SamplingConfig, make_optimizer
    from rlhf_jax.train.plan import forward_flops

    hf = json.loads((ROOT / "configs/models/qwen2.5-0.5b/config.json").read_text())
    if args.smoke:
        hf.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=256)
    shape = SMOKE if args.smoke else FULL
    cfg = ModelConfig.from_hf_config(hf)
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=args.remat)
    policy, value, reward = LM(cfg, "lm", **kw), LM(cfg, "scalar", **kw), LM(cfg, "scalar", **kw)
    policy_params, value_params = policy.init(0), value.init(1)
    frozen = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)  # noqa: E731
    ref_params, reward_params = frozen(policy_params), frozen(reward.init(2))
    v = cfg.vocab_size
    ppo_cfg = PPOConfig(batch=BatchConfig(batch_size=shape["batch_size"], num_minibatches=shape["num_minibatches"],
                                          ppo_epochs=shape["ppo_epochs"]),
                        sampling=SamplingConfig(max_new_tokens=shape["response_length"], temperature=0.7,
                                                eos_token_id=None, pad_token_id=v - 2),
                        optimizer=OptimizerConfig(learning_rate=3e-6, schedule="constant"))
    tx = make_optimizer(3e-6, schedule="constant")
    trainer = PPOTrainer(policy, ppo_cfg, tx, value_model=value, value_tx=tx, reward_model=reward)
    state = trainer.init(policy_params, value_params)

    compile_s: dict[str, float] = {}

    def on_event(event, duration_secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            name = kwargs.get("fun_name", "?")
            compile_s[name] = compile_s.get(name, 0.0) + duration_secs

    jax.monitoring.register_event_duration_secs_listener(on_event)
    rng = np.random.default_rng(0)
    b, p, n = shape["batch_size"], shape["prompt_length"], shape["response_length"]
    mask = jnp.ones((b, p), jnp.int32)
    times = {"rollout": [], "score": [], "update": [], "iteration": []}
    t_first = None
    for i in range(1 + args.iterations):
        ids = jnp.asarray(rng.integers(0, v - 2, (b, p)), jnp.int32)
        t0 = time.perf_counter()
        state, metrics, _ = trainer.iteration(state, ids, mask, ref_params=ref_params, reward_params=reward_params)
        jax.block_until_ready(state)
        if i == 0:
            t_first = time.perf_counter() - t0
            continue
        for k in ("rollout", "score", "update", "iteration"):
            times[k].append(float(metrics[f"time/{k}"]))
    jax.monitoring.unregister_event_duration_listener(on_event)
    med = {k: float(np.median(x)) for k, x in times.items()}
    t = p + n
    fwd_policy = forward_flops(cfg, b * t, t / 2, b * n)
    fwd_value = forward_flops(cfg, b * t, t / 2, 0, lm_head=False)
    flops = 2 * fwd_policy + fwd_value + shape["ppo_epochs"] * 3.0 * (fwd_policy + fwd_value)
    dev = jax.devices()[0]
    peak = next((f for k, f in PEAK_BF16.items() if k in dev.device_kind), None)
    stats = dev.memory_stats() or {}
    out = {"device": f"{dev.platform} ({dev.device_kind})", "shape": shape, "remat": args.remat,
           "s_per_iteration": med["iteration"], "phases_s": {k: med[k] for k in ("rollout", "score", "update")},
           "first_iteration_s": t_first, "compile_s": {k: round(s, 2) for k, s in compile_s.items()},
           "update_flops": flops, "update_tflops_per_s": flops / med["update"] / 1e12,
           "update_mfu": (flops / med["update"] / peak) if peak else None,
           "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
           "finite": bool(all(np.isfinite(float(x)) for x in jax.device_get(metrics).values()))}
    if not args.no_write:
        rows = [[f"{med['iteration']:.2f}", f"{med['rollout']:.2f}", f"{med['score']:.3f}", f"{med['update']:.2f}",
                 f"{out['update_tflops_per_s']:.0f}", f"{100 * out['update_mfu']:.1f}%" if peak else "n/a",
                 f"{(out['peak_bytes_in_use'] or 0) / 2**30:.1f} GiB",
                 ", ".join(f"{k} {s:.0f} s" for k, s in compile_s.items() if s > 1)]]
        table = markdown_table(["s / iteration", "rollout s", "score s", "update s", "update TFLOP/s", "update MFU",
                                "peak memory", "compile (> 1 s)"], rows)
        write_section("ppo_qwen05b", (
            "## PPO iteration at the Qwen2.5-0.5B shape (`benchmarks/ppo_qwen.py`)\n\n"
            f"Machine: {machine()}; {out['device']}. Policy + separate value network + reward model, "
            f"Qwen2.5-0.5B architecture (random weights), batch {b}, {p} + {n} tokens, "
            f"{shape['ppo_epochs']} x {shape['num_minibatches']}, bf16 compute, fp32 master weights, frozen bf16, "
            f"remat {args.remat}. Medians of {args.iterations} iterations after one warm-up (first: "
            f"{t_first:.1f} s with compilation). MFU: analytic update FLOPs ({flops:.3g}, formula in "
            f"`rlhf_jax/train/plan.py`) / update time / {peak or 0:.3g} FLOP/s.\n\n" + table))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
