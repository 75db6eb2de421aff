"""`rlhf-jax plan`: abstract compiles of every phase on tiny configs (config.json only, no weights)."""
from __future__ import annotations

import json

import pytest

from rlhf_jax.cli.main import main

TINY = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "n_inner": 64, "n_positions": 64,
        "vocab_size": 64, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}


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
    assert set(got) == {"devices", "device_memory_bytes", "fits", "phases"}
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
