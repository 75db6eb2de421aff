"""Compiled memory and compile time at a real model's shape, without weights.

Builds Qwen2.5-0.5B's `ModelConfig` from its config.json values (hidden 896, 24 layers,
14 heads, 2 KV heads, intermediate 4864, vocabulary 151936, tied embeddings, rope theta
1e6), makes abstract parameters (`jax.ShapeDtypeStruct`: no weights are downloaded or
allocated), compiles each phase with `jax.jit(f).lower(...).compile()` and reads
`memory_analysis()`:

- `sft step`: one SFT optimizer update (AdamW, state donated), 16 x 1024 tokens;
- `ppo fwd+bwd`: the gradient of a PPO-style minibatch loss over 16 rows of 576 + 53
  tokens: policy log-probs and entropies of the 53 response tokens (temperature 0.7) and a
  separate value network's values (as `configs/ppo_tldr_qwen05b.yaml` runs it);

each with bf16 compute and float32 parameters, for several remat policies. Peak =
arguments + outputs + temporaries - aliased (donated) bytes. XLA:CPU keeps bf16 tensors
as f32, so a GPU needs less than these numbers for activations.

A second table: the compile time of the SFT update (2 x 128 tokens) at 4 and 32 layers
of the same width, and their ratio (the layers are one scanned block).

Run: `python benchmarks/memory.py [--json-out FILE] [--baseline FILE] [--no-write]`.
`--baseline` takes the `--json-out` of a run on older code (the same script) and adds its
numbers as a "before" column. Writes the "memory" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks._results import machine, markdown_table, write_section  # noqa: E402
from rlhf_jax.models import LM, ModelConfig  # noqa: E402
from rlhf_jax.train.sft import SFTConfig, make_sft_step  # noqa: E402
from rlhf_jax.train.state import init_train_state  # noqa: E402

QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "intermediate_size": 4864, "vocab_size": 151936, "tie_word_embeddings": True,
    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643,
}
GiB = 2 ** 30
HAS_REMAT = "remat" in {f.name for f in dataclasses.fields(LM)}


def _lm(config, head, remat):
    kwargs = {"remat": remat} if HAS_REMAT else {}
    return LM(config, head, dtype=jnp.bfloat16, param_dtype=jnp.float32, **kwargs)


def _sds(shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _measure(fn, *args, **jit_kwargs):
    t0 = time.perf_counter()
    compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"peak": peak, "arguments": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes,
            "compile_s": seconds}


def sft_step(config, batch, length, remat):
    lm = _lm(config, "lm", remat)
    tx = optax.adamw(1e-5)
    state = jax.eval_shape(lambda p: init_train_state(p, tx, seed=0), lm.abstract_params())
    step = make_sft_step(lm, tx, SFTConfig(batch_size=batch))
    data = {k: _sds((batch, length)) for k in ("input_ids", "attention_mask", "loss_mask")}
    return _measure(step, state, data, donate_argnums=0)


def ppo_fwd_bwd(config, batch, prompt, response, remat):
    policy, value = _lm(config, "lm", remat), _lm(config, "scalar", remat)
    t = prompt + response

    def loss(params, ids, mask, advantages, returns):
        logprobs, entropy = policy.response_logprobs(params[0], ids, mask, response, temperature=0.7,
                                                     with_entropy=True)
        values = value.values(params[1], ids, mask)[:, t - response - 1:t - 1]
        return (jnp.mean(-logprobs * advantages) - 0.01 * jnp.mean(entropy)
                + 0.1 * jnp.mean(jnp.square(values - returns)))

    params = (policy.abstract_params(), value.abstract_params())
    return _measure(jax.value_and_grad(loss), params, _sds((batch, t)), _sds((batch, t)),
                    _sds((batch, response), jnp.float32), _sds((batch, response), jnp.float32))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json-out", help="write the measurements as JSON here")
    parser.add_argument("--baseline", help="JSON of a run on older code: a 'before' column")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--render", help="only render the tables of this --json-out file (no compiling)")
    args = parser.parse_args()
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    records = json.loads(Path(args.render).read_text()) if args.render else measure()
    body = render(records, baseline)
    print(body)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(records, indent=1))
    if not args.no_write:
        write_section("memory", body)


def measure():
    config = ModelConfig.from_hf_config(QWEN25_05B)
    policies = ("none", "save_dots_no_batch", "full") if HAS_REMAT else ("none",)
    records = {"backend": jax.default_backend(), "memory": {}, "depth": {}, "load": os.getloadavg()[0]}
    for remat in policies:
        records["memory"][f"sft step|16 x 1024|{remat}"] = sft_step(config, 16, 1024, remat)
        print("sft", remat, records["memory"][f"sft step|16 x 1024|{remat}"], flush=True)
        records["memory"][f"ppo fwd+bwd|16 x (576 + 53)|{remat}"] = ppo_fwd_bwd(config, 16, 576, 53, remat)
        print("ppo", remat, records["memory"][f"ppo fwd+bwd|16 x (576 + 53)|{remat}"], flush=True)
    depth_remat = "full" if HAS_REMAT else "none"
    for layers in (4, 32):
        deep = dataclasses.replace(config, num_layers=layers)
        records["depth"][str(layers)] = sft_step(deep, 2, 128, depth_remat)["compile_s"]
        print("depth", layers, records["depth"][str(layers)], flush=True)
    records["depth"]["ratio"] = records["depth"]["32"] / records["depth"]["4"]
    records["depth"]["remat"] = depth_remat
    return records


def render(records, baseline):
    def before(kind, key):
        if baseline is None:
            return []
        value = baseline.get(kind, {}).get(key)
        if value is None:
            return ["-"]
        if kind == "memory":
            return [f"{value['peak'] / GiB:.1f}"]
        return [f"{value:.2f}x" if key == "ratio" else f"{value:.1f}"]

    mem_head = ["phase", "tokens", "remat"] + (["before: peak GiB"] if baseline else []) + [
        "peak GiB", "arguments GiB", "temporaries GiB", "compile s"]
    mem_rows = []
    for key, r in records["memory"].items():
        phase, shape, remat = key.split("|")
        mem_rows.append([phase, shape, remat] + before("memory", key) + [
            f"{r['peak'] / GiB:.1f}", f"{r['arguments'] / GiB:.1f}", f"{r['temp'] / GiB:.1f}",
            f"{r['compile_s']:.1f}"])
    depth_head = ["layers (width 896)"] + (["before: compile s"] if baseline else []) + ["compile s"]
    depth_rows = [[k] + before("depth", k) + [f"{records['depth'][k]:.1f}"] for k in ("4", "32")]
    depth_rows.append(["32 / 4"] + before("depth", "ratio") + [f"{records['depth']['ratio']:.2f}x"])
    depth_remat = records["depth"].get("remat", "full")
    return (
        "## Memory at Qwen2.5-0.5B's shape (benchmarks/memory.py)\n\n"
        f"Machine: {machine()}. Backend {jax.default_backend()}: compiled with abstract params "
        "(no weights), bf16 compute, f32 params, AdamW; peak = arguments + outputs + temporaries - "
        "donated. XLA:CPU stores bf16 as f32, so activations need less on a GPU. `before` = the same "
        "script on main before the scanned layers, remat, fused-API attention and chunked LM head.\n\n"
        + markdown_table(mem_head, mem_rows)
        + f"\nCompile time of the SFT update (2 x 128 tokens, remat {depth_remat}) by depth "
        "(wall clock; on a shared machine compile times carry the load of the moment"
        + (f", load average {records['load']:.1f} when measured" if "load" in records else "") + "):\n\n"
        + markdown_table(depth_head, depth_rows))


if __name__ == "__main__":
    main()
