"""`rlhf-jax plan`: abstract compiles of every phase on tiny configs (config.json only, no weights)."""
from __future__ import annotations

import json

import pytest

from rlhf_jax.cli.main import main

TINY = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_inner": 64, "n_positions": 64,
        "vocab_size": 64, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}


# scalars of TINY: wte + wpe 2 x 64 x 32, two layer norms and ln_f 3 x 64, c_attn 32 x 96 + 96,
# attn c_proj 32 x 32 + 32, c_fc 32 x 64 + 64, mlp c_proj 64 x 32 + 32
FULL = 2 * 64 * 32 + 3 * 64 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32)
# LoRA rank 4 on the four projections: A [in, 4] and B [4, out] each
ADAPTERS = 4 * ((32 + 96) + (32 + 32) + (32 + 64) + (64 + 32))


def _plan(capsys, *argv):
    assert main(["plan", *argv, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1]), "\n".join(out[:-1])


@pytest.fixture()
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    return folder


def test_plan_sft_json_schema_and_device_memory(capsys, model_dir):
    # no weights, no tokenizer, no data: only config.json (through --model-config)
    args = ["--config", "configs/tiny/sft.yaml", "--model-config", str(model_dir), "--devices", "2",
            "model.random_init=null", "model.path=nowhere", "run.mesh.fsdp=2"]
    got, text = _plan(capsys, *args)
    assert set(got) == {"devices", "device_memory_bytes", "fits", "phases", "trainable_params", "frozen_params",
                        "state_bytes_per_device", "frozen_bytes_per_device", "lora"}
    assert got["lora"] is None and got["frozen_params"] == 0 and got["trainable_params"] == FULL
    assert got["devices"] == 2 and got["device_memory_bytes"] == 80 * 1024 ** 3 and got["fits"] is True
    assert list(got["phases"]) == ["step"]
    step = got["phases"]["step"]
    assert set(step) == {"peak_bytes_per_device", "compile_s", "flops"}
    assert isinstance(step["peak_bytes_per_device"], int) and step["peak_bytes_per_device"] > 0
    assert step["compile_s"] > 0
    # 3 forwards of 8 x 16 tokens: trunk matmuls (qkv 32 x 96, out 32 x 32, MLP 2 x 32 x 64),
    # causal attention over 16 / 2 positions on average, the tied head 32 x 64 on every token
    tokens, trunk = 8 * 16, 32 * 96 + 32 * 32 + 2 * 32 * 64
    assert step["flops"] == 3 * (tokens * (2 * trunk + 2 * 32 * 8) + 2 * 32 * 64 * tokens)
    assert "1 x 2 x 1 mesh" in text
    # the same plan against a device smaller than its peak does not fit, and says what to change
    small = step["peak_bytes_per_device"] / 2 / 1024 ** 3
    got, text = _plan(capsys, *args, "--device-memory", f"{small:.9f}")
    assert got["fits"] is False
    assert "model.remat=full" in text and "phase `step` needs" in text


def test_plan_ppo_phases_with_a_reward_model(capsys, model_dir):
    got, text = _plan(capsys, "--config", "configs/tiny/ppo.yaml", "--model-config", str(model_dir),
                      "train.batch.ppo_epochs=1")
    assert list(got["phases"]) == ["rollout", "score", "update"]
    assert got["fits"] is True
    phases = got["phases"]
    assert all(p["peak_bytes_per_device"] > 0 and p["flops"] > 0 for p in phases.values())
    assert phases["update"]["flops"] > phases["rollout"]["flops"] > 0


def test_plan_grpo_with_lora_trains_only_the_adapters(capsys, model_dir):
    # the RL trainer's recipe, named after its algorithm: GRPO with a verifier (no reward model,
    # so no score phase; no critic), a `lora:` section
    got, text = _plan(capsys, "--config", "configs/tiny/grpo.yaml", "--model-config", str(model_dir),
                      "lora={rank: 4, alpha: 8}")
    assert list(got["phases"]) == ["rollout", "update"]
    assert got["trainable_params"] == ADAPTERS and got["frozen_params"] == FULL
    lora = got["lora"]
    assert lora["rank"] == 4 and lora["heads"] == [] and lora["base_dtype"] == "bfloat16"
    assert lora["base_params"] == FULL
    assert lora["adapted"] == ["trunk/h/attn/c_attn", "trunk/h/attn/c_proj", "trunk/h/mlp/c_fc", "trunk/h/mlp/c_proj"]
    # the train state: the adapters and Adam's two moments in float32 (+ a few counters and the
    # KL controller); the frozen base (the reference too) once, in bfloat16
    assert 3 * 4 * ADAPTERS <= got["state_bytes_per_device"] < 3 * 4 * ADAPTERS + 256
    assert got["frozen_bytes_per_device"] == 2 * FULL
    assert "LoRA r=4 alpha=8 on 4 projections x 1 layers" in text and "in bfloat16 (also the reference)" in text
    # 4 prompts x 4 samples = 16 rows of 8 + 4 tokens; one epoch; the reference and the old
    # policy forwards, then training with the base frozen (2 forwards + attention once more)
    update = got["phases"]["update"]["flops"]
    trunk, rows, t = 32 * 96 + 32 * 32 + 2 * 32 * 64, 16, 12
    fwd = rows * t * (2 * trunk + 2 * 32 * t / 2) + 2 * 32 * 64 * rows * 4
    assert update == 2 * fwd + 2 * fwd + rows * t * 2 * 32 * t / 2


def test_plan_dpo_with_lora_on_the_fly_reference(capsys, model_dir):
    got, _ = _plan(capsys, "--config", "configs/tiny/dpo.yaml", "--model-config", str(model_dir), "--devices", "2",
                   "run.mesh.fsdp=2", "train.reference=on_the_fly", "lora.rank=4", "model.frozen_dtype=float32")
    assert list(got["phases"]) == ["step"] and got["devices"] == 2
    assert got["trainable_params"] == ADAPTERS and got["frozen_params"] == FULL
    assert got["lora"]["base_dtype"] == "float32"
    # the base (policy and reference at once) FSDP-split over two devices, never copied
    assert got["frozen_bytes_per_device"] < 4 * FULL * 0.6
    # 8 pairs x 2 sides x 16 tokens: the policy's forward and input gradients, the attention once
    # more, and the reference's forward
    tokens, trunk = 2 * 8 * 16, 32 * 96 + 32 * 32 + 2 * 32 * 64
    fwd = tokens * (2 * trunk + 2 * 32 * 8) + 2 * 32 * 64 * tokens
    assert got["phases"]["step"]["flops"] == 2 * fwd + tokens * 2 * 32 * 8 + fwd
