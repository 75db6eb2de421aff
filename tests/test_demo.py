"""The offline demo in its reduced mode: report structure, and PPO beats SFT in both parts."""
import json
import math
import os
import subprocess
import sys

import pytest

from rlhf_jax.demo.run import run_demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`rlhf-jax demo --quick` in a subprocess, as `make demo` runs it (one device, XLA's default
    optimisation: the demo is execution-bound, unlike the compile-bound tests; tests/conftest.py)."""
    out = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "demo", "--quick", "--output_dir", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {os.path.join(str(out), 'report.md')}" in proc.stdout
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    return str(out), report


def test_report_has_the_promised_keys_and_files(quick_run):
    out, on_disk = quick_run
    assert on_disk["seconds"] > 0 and on_disk["cpu_seconds"] > 0 and on_disk["quick"] is True
    ks = list(on_disk["rlvr"]["models"]["sft"]["pass_at_k"])
    assert ks[0] == "1" and ks[-1] == str(on_disk["rlvr"]["eval"]["settings"]["n_samples"])
    for name in ("sft", "ppo", "grpo", "rloo"):
        curve = [on_disk["rlvr"]["models"][name]["pass_at_k"][k] for k in ks]
        assert all(0.0 <= v <= 1.0 for v in curve), name
        assert curve == sorted(curve), name  # pass@k never falls with k
        assert math.isfinite(on_disk["rlvr"]["models"][name]["kl_to_sft"])
    for name in ("sft", "dpo", "ppo"):
        rlhf = on_disk["rlhf"]["models"][name]
        assert 0.0 <= rlhf["gold_success"] <= 1.0, name
        for key in ("gold_score", "rm_score", "kl_to_sft"):
            assert isinstance(rlhf[key], float) and math.isfinite(rlhf[key]), (name, key)
    # The three RL runs had the same rollout budget and updates per iteration.
    runs = on_disk["rlvr"]["runs"]
    assert set(runs) == {"ppo", "grpo", "rloo"}
    assert len({r["token_budget"] for r in runs.values()}) == 1
    assert len({r["updates_per_iteration"] for r in runs.values()}) == 1
    assert runs["ppo"]["group_size"] == 1 and runs["grpo"]["group_size"] == on_disk["settings"]["add_group_size"] > 1
    for name in ("ppo", "grpo", "rloo"):
        assert len(on_disk["rlvr"]["training"][f"{name}_reward"]) == on_disk["settings"]["add_rl_iterations"]
    # DPO learned from the reward model's training pairs.
    assert on_disk["rlhf"]["dpo"]["steps"] > 0 and math.isfinite(on_disk["rlhf"]["dpo"]["final_margin"])
    assert isinstance(on_disk["rlvr"]["final_kl"], float)
    assert isinstance(on_disk["rlhf"]["final_kl"], float)
    assert 0.0 <= on_disk["rlhf"]["reward_model"]["heldout_accuracy"] <= 1.0
    # The SFT model is its own reference: zero KL.
    assert abs(on_disk["rlvr"]["models"]["sft"]["kl_to_sft"]) < 1e-4
    for name in ("report.md", "rlvr_pass_at_k.png", "rlvr_training.png", "rlhf_training.png"):
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 0
    with open(os.path.join(out, "report.md")) as f:
        markdown = f.read()
    assert "pass@1" in markdown and "gold success" in markdown
    for name in ("| grpo |", "| rloo |", "| dpo |"):
        assert name in markdown
    assert any(c.startswith("Online or offline") for c in on_disk["conclusions"])
    assert len(on_disk["rlhf"]["training"]["ppo_gold_score"]) == on_disk["settings"]["mood_ppo_iterations"]


def test_ppo_improves_on_sft_in_both_parts(quick_run):
    _, report = quick_run
    rlvr = report["rlvr"]["models"]
    assert rlvr["ppo"]["pass_at_k"]["1"] > rlvr["sft"]["pass_at_k"]["1"] + 0.02
    assert report["rlvr"]["final_kl"] > 0.0
    rlhf = report["rlhf"]["models"]
    assert rlhf["ppo"]["gold_success"] > rlhf["sft"]["gold_success"] + 0.1
    assert rlhf["ppo"]["rm_score"] > rlhf["sft"]["rm_score"]
    assert report["rlhf"]["reward_model"]["heldout_accuracy"] > 0.6


def test_an_existing_run_is_not_overwritten_unless_asked(quick_run):
    out, _ = quick_run
    with pytest.raises(FileExistsError, match="overwrite"):
        run_demo(out, quick=True, verbose=False)


def test_exported_policy_runs_in_transformers(quick_run):
    import torch as torch  # a test extra: missing is a failure, not a skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = quick_run
    path = os.path.join(out, "rlvr", "ppo_hf")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = report["rlvr"]["task"]["example"].split("=")[0] + "="
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids])
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    # The greedy answer is a fixed-width number: the model learned the answer format.
    assert len(answer) == report["rlvr"]["task"]["digits"] + 1 and answer.isdigit(), answer
