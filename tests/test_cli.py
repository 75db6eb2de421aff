"""End-to-end tests of `rlhf-jax` on the tiny configs: sft -> reward -> ppo -> eval -> export, sft -> dpo -> eval.

The tiny configs (configs/tiny/*.yaml) use paths relative to the working
directory under `tiny_run/`; the fixture builds that folder with
`rlhf_jax.demo.tiny_run.make_tiny_run` (a character tokenizer and small JSONL
files) in a temporary directory and runs there.
"""
import json
import os
import sys
import types

import numpy as np
import pytest

from rlhf_jax.cli import main as cli
from rlhf_jax.cli.config import COMMAND_CONFIGS, field_help
from rlhf_jax.demo.tiny_run import make_tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny")

# the commands repeat programs (and share them with tests/test_cli_safety.py and test_sinks.py):
# compile each once (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("compile_cache")


def tiny_config(name):
    return os.path.join(TINY, f"{name}.yaml")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_tiny_run(str(root))
    old = os.getcwd()
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(old)


def run(*argv):
    return cli.main(list(argv))


@pytest.fixture(scope="module")
def sft_run(workdir):
    """The tiny SFT run (random tiny GPT-2), once per module; returns its stdout."""
    code = run("sft", "--config", tiny_config("sft"))
    assert code == 0
    return workdir / "tiny_run" / "sft"


def test_sft_reward_ppo_eval_export_chain(workdir, sft_run, capsys):
    import transformers

    from rlhf_jax.models import from_pretrained

    # SFT from a random tiny GPT-2 (the fixture); its resolved config names the run folder.
    sft = sft_run
    assert "  output_dir: tiny_run/sft" in (sft / "resolved_config.yaml").read_text()
    for name in ("resolved_config.yaml", "run.json", "metrics.jsonl", "hf/config.json",
                 "hf/model.safetensors", "hf/tokenizer_config.json"):
        assert (sft / name).exists(), name
    assert any((sft / "checkpoints").iterdir())
    assert any(p.name.startswith("events") for p in (sft / "tb").rglob("*"))  # TensorBoard
    steps = [json.loads(line)["step"] for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4  # 32 rows / batch 8, one epoch

    # Reward model from the SFT export: a *ForSequenceClassification with a normalised head.
    assert run("reward", "--config", tiny_config("reward")) == 0
    rm_dir = workdir / "tiny_run" / "reward" / "hf"
    rm_config = json.loads((rm_dir / "config.json").read_text())
    assert rm_config["architectures"] == ["GPT2ForSequenceClassification"] and rm_config["num_labels"] == 1
    assert "accuracy" in json.loads((workdir / "tiny_run" / "reward" / "reward_eval.json").read_text())

    # PPO from the SFT export against the reward model.
    assert run("ppo", "--config", tiny_config("ppo")) == 0
    ppo = workdir / "tiny_run" / "ppo"
    records = [json.loads(line) for line in (ppo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records][-1] == 2
    _, sft_params = from_pretrained(str(sft / "hf"))
    policy_ppo, ppo_params = from_pretrained(str(ppo / "hf"))
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                zip(jax_leaves(sft_params), jax_leaves(ppo_params)))
    assert moved > 0  # PPO changed the policy

    # pass@k of both exports with the math verifier.
    capsys.readouterr()
    assert run("eval", "--config", tiny_config("eval")) == 0
    table = capsys.readouterr().out
    assert "pass@1" in table and "sft" in table and "ppo" in table
    results = json.loads((workdir / "tiny_run" / "eval" / "eval.json").read_text())
    assert set(results["models"]) == {"sft", "ppo"}
    for model in results["models"].values():
        assert set(model["pass_at_k"]) == {"1", "2", "4"}
        values = [model["pass_at_k"][k] for k in ("1", "2", "4")]
        assert all(0 <= v <= 1 for v in values) and values == sorted(values)
    assert (workdir / "tiny_run" / "eval" / "pass_at_k.png").exists()

    # Export the newest PPO checkpoint; transformers loads it and agrees with our logits.
    assert run("export", "--config", tiny_config("export")) == 0
    export = workdir / "tiny_run" / "export"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(export))
    tok = transformers.AutoTokenizer.from_pretrained(str(export))
    ids = tok(["12+5="], return_tensors="np")
    import torch

    with torch.no_grad():
        hf_logits = hf_model(torch.tensor(ids["input_ids"])).logits.numpy()
    ours = policy_ppo.logits(ppo_params, ids["input_ids"], ids["attention_mask"])
    np.testing.assert_allclose(hf_logits, np.asarray(ours), atol=1e-4)

    # The reward model export loads in transformers too.
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(rm_dir))
    assert rm.config.num_labels == 1
    # Same score as ours on a right-padded pair (HF has no head bias; ours keeps it beside the weights).
    from rlhf_jax.rewards.functions import load_reward_model

    ours_rm, ours_rm_params = load_reward_model(str(rm_dir))
    from rlhf_jax.data.padding import right_pad

    rows = [tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for text in ("1+2=3", "14+4=18")]
    pair_ids, pair_mask = right_pad(rows, 8, tok.pad_token_id)
    with torch.no_grad():
        hf_scores = rm(torch.tensor(pair_ids), attention_mask=torch.tensor(pair_mask)).logits[:, 0].numpy()
    bias = float(np.asarray(ours_rm_params["score"]["bias"]).reshape(-1)[0])
    ours_scores = np.asarray(ours_rm.scores(ours_rm_params, pair_ids, pair_mask))
    np.testing.assert_allclose(hf_scores, ours_scores - bias, atol=1e-4)

    # Exporting the reward run's checkpoint gives a classifier (bias kept beside it), in bfloat16.
    assert run("export", "run_dir=tiny_run/reward", "output_dir=tiny_run/export_rm", "dtype=bfloat16") == 0
    exported = json.loads((workdir / "tiny_run" / "export_rm" / "config.json").read_text())
    assert exported["architectures"] == ["GPT2ForSequenceClassification"] and exported["dtype"] == "bfloat16"
    assert (workdir / "tiny_run" / "export_rm" / "rlhf_jax_score_bias.json").exists()
    # An eval folder has no model to export; a non-empty target needs --overwrite.
    assert run("export", "run_dir=tiny_run/eval", "output_dir=tiny_run/x") == 2
    assert run("export", "--config", tiny_config("export")) == 2


def test_sft_dpo_eval_chain(workdir, sft_run):
    # DPO from the tiny SFT export, the same model as the frozen reference (reference log-probs
    # precomputed and kept in the run folder), then pass@k of both.
    assert run("dpo", "--config", tiny_config("dpo")) == 0
    dpo = workdir / "tiny_run" / "dpo"
    for name in ("resolved_config.yaml", "run.json", "metrics.jsonl", "reference_logprobs.npz",
                 "hf/model.safetensors", "hf/config.json"):
        assert (dpo / name).exists(), name
    records = [json.loads(line) for line in (dpo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))  # 32 pairs / 8, 2 epochs
    assert abs(records[0]["loss"] - np.log(2.0)) < 1e-5  # policy = reference at the start
    assert records[-1]["margin"] > records[0]["margin"] and records[-1]["accuracy"] >= 0.5
    ref = np.load(dpo / "reference_logprobs.npz")
    assert ref["ref_chosen_logps"].shape == (32,) and np.all(ref["ref_chosen_logps"] < 0)
    # the export loads as a causal LM and differs from the SFT model
    from rlhf_jax.models import from_pretrained

    _, sft_params = from_pretrained(str(sft_run / "hf"))
    _, dpo_params = from_pretrained(str(dpo / "hf"))
    assert any(not np.array_equal(a, b) for a, b in zip(jax_leaves(sft_params), jax_leaves(dpo_params)))
    # the same command again resumes the finished run and changes nothing
    before = (dpo / "metrics.jsonl").read_text()
    assert run("dpo", "--config", tiny_config("dpo")) == 0
    assert (dpo / "metrics.jsonl").read_text() == before

    assert run("eval", "--config", tiny_config("eval"), "reward_model=null", "output_dir=tiny_run/eval_dpo",
               "models=[{name: sft, path: tiny_run/sft/hf}, {name: dpo, path: tiny_run/dpo}]") == 0
    results = json.loads((workdir / "tiny_run" / "eval_dpo" / "eval.json").read_text())
    assert set(results["models"]) == {"sft", "dpo"}


def test_sft_with_lora_trains_the_adapters_and_exports_merged_and_peft(workdir, sft_run):
    """`lora:` on the SFT command, from the tiny SFT export: only the adapters train (the base,
    kept in float32 here, comes out bit for bit in the merged export wherever no adapter sits),
    hf/ holds the merged weights, peft/ the adapter folder, and `load_run_model` rebuilds the
    merged model from the run's checkpoint."""
    import jax

    from rlhf_jax.cli.commands import load_run_model
    from rlhf_jax.models import from_pretrained

    assert run("sft", "--config", tiny_config("sft"), "model.random_init=null", "model.path=tiny_run/sft/hf",
               "run.output_dir=tiny_run/sft_lora", "lora={rank: 4, alpha: 8}",
               "model.frozen_dtype=float32", "train.optimizer.learning_rate=3.0e-2") == 0
    out = workdir / "tiny_run" / "sft_lora"
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    _, base = from_pretrained(str(sft_run / "hf"))
    _, merged = from_pretrained(str(out / "hf"))
    flat_base = dict(jax.tree_util.tree_leaves_with_path(base))
    changed = {jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(merged)
               if not np.array_equal(np.asarray(v), np.asarray(flat_base[k]))}
    assert changed and all("kernel" in k and ("c_attn" in k or "c_proj" in k or "c_fc" in k) for k in changed), changed
    command, lm, params, _, step = load_run_model(str(out))
    assert command == "sft" and lm.lora is None and step == 4
    for a, b in zip(jax_leaves(params), jax_leaves(merged), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def test_rl_grpo_runs_and_a_nan_reward_stops_with_exit_2(workdir, sft_run, capsys):
    """`rlhf-jax rl` (GRPO preset, no critic) from the SFT run; a reward function returning NaN
    stops the run after `train.rewards.max_stalled_iterations` iterations: exit 2, one line naming it."""
    assert run("rl", "--config", tiny_config("grpo")) == 0
    out = workdir / "tiny_run" / "grpo"
    assert (out / "hf" / "config.json").exists()
    resolved = (out / "resolved_config.yaml").read_text()
    assert "algorithm: grpo" in resolved and "group_size: 4" in resolved and "placement: in_loss" in resolved
    capsys.readouterr()
    nan = workdir / "nan_reward.py"
    nan.write_text("def nan(prompts, completions):\n    return [float('nan')] * len(completions)\n")
    # (the programs of the run above, read back from the compilation cache)
    code = run("rl", "--config", tiny_config("grpo"), f"reward.function={nan}:nan", "run.output_dir=tiny_run/grpo_nan",
               "num_iterations=4", "train.rewards.max_stalled_iterations=2")
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "stalled" in err and "nan_reward.py:nan" in err, err


def test_same_config_resumes_and_different_config_is_refused(workdir, sft_run, capsys):
    sft = sft_run
    before = (sft / "run.json").read_text()
    metrics_before = (sft / "metrics.jsonl").read_text()
    # A different config: refused with a one-line error naming the changed key, nothing touched.
    assert run("sft", "--config", tiny_config("sft"), "train.optimizer.learning_rate=0.01") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "different config" in err and "train.optimizer.learning_rate (0.003 -> 0.01)" in err
    assert "--overwrite" in err
    assert (sft / "run.json").read_text() == before
    # The same config: resumes (all steps are done, so it only re-exports).
    assert run("sft", "--config", tiny_config("sft")) == 0
    assert "resuming" in capsys.readouterr().out
    assert (sft / "metrics.jsonl").read_text() == metrics_before


def test_config_errors_are_one_line_and_name_the_key(workdir, capsys, tmp_path):
    assert run("sft", "--config", tiny_config("sft"), "train.learnig_rate=1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "unknown key `train.learnig_rate`" in err and "did you mean" in err and "learning_rate" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\ndata:\n  train_files: [a.jsonl]\n  max_length: sixteen\n")
    assert run("sft", "--config", str(bad)) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 5" in err and "`data.max_length`: expected int, got str 'sixteen'" in err
    assert run("ppo", "--config", tiny_config("ppo"), "train.batch.num_minibatches=3") == 2
    err = capsys.readouterr().err
    assert "`train.batch.batch_size` (8) must be divisible by `train.batch.num_minibatches`" in err


def test_bad_data_row_fails_before_the_run_folder_exists(workdir, capsys):
    bad = workdir / "tiny_run" / "bad_sft.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+2="}\n')
    out_dir = workdir / "tiny_run" / "bad_run"
    code = run("sft", "--config", tiny_config("sft"), f"data.train_files=[{bad}]", f"run.output_dir={out_dir}")
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 2: missing column `completion`" in err
    assert not out_dir.exists()


def test_missing_model_folder_and_bad_reward_function(workdir, sft_run, capsys):
    code = run("reward", "--config", tiny_config("reward"), "model.path=tiny_run/nope", "run.output_dir=tiny_run/r2")
    assert code == 2 and "tiny_run/nope does not exist" in capsys.readouterr().err
    # Paths and the function are checked right after the data, before any model is built.
    code = run("ppo", "--config", tiny_config("ppo_verifier"), "reward.function=rlhf_jax.rewards.verifiers:nope",
               "run.output_dir=tiny_run/p2")
    assert code == 2
    assert "`reward.function`" in (err := capsys.readouterr().err) and "no attribute 'nope'" in err
    assert not (workdir / "tiny_run" / "p2").exists()
    code = run("ppo", "--config", tiny_config("ppo"), "reward.model_path=tiny_run/no_rm",
               "run.output_dir=tiny_run/p3")
    assert code == 2 and "reward model folder tiny_run/no_rm does not exist" in capsys.readouterr().err
    assert not (workdir / "tiny_run" / "p3").exists()


def test_foreign_folder_is_never_deleted(workdir, capsys):
    foreign = workdir / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code = run("sft", "--config", tiny_config("sft"), f"run.output_dir={foreign}", "--overwrite")
    assert code == 2 and "holds no rlhf-jax run" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_overwrite_replaces_a_run_only_when_committed(tmp_path):
    from rlhf_jax.cli.config import load_config
    from rlhf_jax.cli.run_folder import RunError, claim_run_folder

    cls = COMMAND_CONFIGS["sft"]
    out = str(tmp_path / "run")
    first = load_config(tiny_config("sft"), [f"run.output_dir={out}"], cls)
    with claim_run_folder("sft", first, out, overwrite=False) as folder:
        assert folder.resume is False
    (tmp_path / "run" / "checkpoints").mkdir()
    with claim_run_folder("sft", first, out, overwrite=False) as folder:
        assert folder.resume is True  # same config: resume
    longer = load_config(tiny_config("sft"), [f"run.output_dir={out}", "train.num_epochs=3", "run.log_every=2"], cls)
    with claim_run_folder("sft", longer, out, overwrite=False) as folder:
        assert folder.resume is True  # a longer run and other logging: still a resume
    second = load_config(tiny_config("sft"), [f"run.output_dir={out}", "run.seed=1", "train.batch_size=4"], cls)
    with pytest.raises(RunError, match=r"run.seed \(0 -> 1\), train.batch_size \(8 -> 4\)"):
        claim_run_folder("sft", second, out, overwrite=False)
    # --overwrite: the old run waits aside until the new one commits ...
    with pytest.raises(RuntimeError):
        with claim_run_folder("sft", second, out, overwrite=True):
            assert not (tmp_path / "run" / "checkpoints").exists()
            raise RuntimeError("the new run failed before its first checkpoint")
    assert (tmp_path / "run" / "checkpoints").is_dir()  # ... and comes back when it fails
    assert "num_epochs: 3" in (tmp_path / "run" / "resolved_config.yaml").read_text()
    with claim_run_folder("sft", second, out, overwrite=True) as folder:
        folder.commit_overwrite()
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / ".replaced").exists()
    assert "seed: 1" in (tmp_path / "run" / "resolved_config.yaml").read_text()


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_help_lists_every_config_key(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key, _, _ in field_help(COMMAND_CONFIGS[command]):
        assert f"  {key} (" in text, key
    assert "--overwrite" in text and "--config" in text


def test_dry_run_prints_the_resolved_config_and_touches_nothing(workdir, sft_run, tmp_path, capsys):
    out_dir = tmp_path / "dry"
    assert run("ppo", "--config", tiny_config("ppo_verifier"), f"run.output_dir={out_dir}", "train.kl.kl_coef=0.2",
               "train.optimizer.schedule=cosine", "--dry_run") == 0
    out = capsys.readouterr().out
    assert "kl_coef: 0.2" in out
    # the tokenizer's ids and the schedule length (2 iterations x 1 epoch x 2 minibatches) are resolved
    assert "eos_token_id: 1" in out and "pad_token_id: 0" in out and "total_steps: 4" in out
    assert not out_dir.exists()


def test_demo_forwards_its_options(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("rlhf_jax.demo.run")
    fake.run_demo = lambda output_dir, *, seed=0, quick=False, overwrite=False: calls.append(
        (output_dir, seed, quick, overwrite))
    monkeypatch.setitem(sys.modules, "rlhf_jax.demo.run", fake)
    assert cli.main(["demo", "--output_dir", str(tmp_path / "d"), "--seed", "3", "--quick"]) == 0
    assert calls == [(str(tmp_path / "d"), 3, True, False)]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert cli.main(["demo", "--output_dir", str(tmp_path / "full")]) == 2
    assert cli.main(["demo", "--output_dir", str(tmp_path / "full"), "--overwrite"]) == 0
    assert calls[-1] == (str(tmp_path / "full"), 0, False, True)


def test_version_and_missing_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("rlhf-jax ")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
