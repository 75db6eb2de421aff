"""Runs never lose work and never waste it silently: the CLI against bad inputs and interruptions.

Each test drives `rlhf-jax` in-process (`main([...])`, or a second process where a second
process is the point) on the tiny configs (configs/tiny/*.yaml, a 2-layer width-32 GPT-2
and a character tokenizer under `tiny_run/`), and checks the exit status, that the one-line
message names the culprit, and that nothing on disk was lost.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from rlhf_jax.cli import main as cli
from rlhf_jax.demo.tiny_run import make_tiny_run
from rlhf_jax.io.metrics import read_metrics, strip_timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(ROOT, "configs", "tiny", "sft.yaml")
PPO = os.path.join(ROOT, "configs", "tiny", "ppo.yaml")
PPO_VERIFIER = os.path.join(ROOT, "configs", "tiny", "ppo_verifier.yaml")

# the runs below repeat the tiny SFT program many times: compile it once (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("compile_cache")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_safety")
    make_tiny_run(str(root))
    old = os.getcwd()
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def sft_run(workdir):
    """A finished tiny SFT run (4 steps) that the tests below must never damage."""
    assert cli.main(["sft", "--config", SFT]) == 0
    return workdir / "tiny_run" / "sft"


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder) -> dict:
    """Every file under `folder` with a digest of its bytes."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


# --------------------------------------------------------------------------- --overwrite


def test_overwrite_with_a_bad_config_or_a_failing_model_keeps_the_old_run(sft_run, capsys, monkeypatch):
    before = snapshot(sft_run)
    assert {"run.json", "resolved_config.yaml", "hf/model.safetensors"} <= set(before)
    # Invalid config: refused before the folder is touched.
    code, _, err = run(capsys, "sft", "--config", SFT, "train.optimizer.learning_rate=-1", "--overwrite")
    assert code == 2 and "`train.optimizer.learning_rate` must be > 0" in one_line(err)
    assert snapshot(sft_run) == before
    # Valid config, but the model fails to build after the folder was claimed: the old run is put back.
    from rlhf_jax.cli import commands

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure while building the model")

    monkeypatch.setattr(commands, "load_model", broken)
    code, _, err = run(capsys, "sft", "--config", SFT, "train.optimizer.learning_rate=1e-3", "--overwrite")
    assert code == 1  # not the user's mistake: an internal error, still one line
    assert "internal error: RuntimeError: simulated failure" in one_line(err)
    assert snapshot(sft_run) == before
    assert not (sft_run / ".replaced").exists()


# --------------------------------------------------------------------------- validation before the claim


@pytest.mark.parametrize("config, overrides, culprit", [
    (SFT, ["train.batch_size=-8"], "`train.batch_size` must be an int >= 1, got -8"),
    (SFT, ["train.batch_size=0"], "`train.batch_size` must be an int >= 1, got 0"),
    (SFT, ["train.batch_size=64"], "`train.batch_size` (64) is larger than the 32 examples of tiny_run/sft.jsonl"),
    (SFT, ["train.optimizer.schedule=cosin"], "`train.optimizer.schedule`: expected one of"),
    (SFT, ["train.num_epochs=0"], "`train.num_epochs` must be an int >= 1, got 0"),
    (SFT, ["train.optimizer.warmup_steps=-1"], "`train.optimizer.warmup_steps` must be an int >= 0"),
    (PPO_VERIFIER, ["data.answer_column=answr"],
     "tiny_run/prompts.jsonl, line 1: no `answr` column (`data.answer_column`), which `reward.function`"),
    (PPO, ["reward.model_path=tiny_run/sft/hf"],
     "`reward.model_path`: tiny_run/sft/hf holds a GPT2LMHeadModel, not a reward model"),
    (PPO, ["train.kl.kl_estimator=k5"], "`train.kl.kl_estimator`: expected one of ['k1', 'k2', 'k3']"),
    (PPO, ["train.batch.batch_size=32", "train.batch.num_minibatches=1"],
     "`train.batch.batch_size` (32) is larger than the 16 prompts"),
])
def test_bad_input_fails_before_the_output_folder_exists(sft_run, capsys, config, overrides, culprit):
    out = "tiny_run/never_created"
    code, _, err = run(capsys, "ppo" if config != SFT else "sft", "--config", config, *overrides,
                       f"run.output_dir={out}")
    assert code == 2
    assert culprit in one_line(err)
    assert not os.path.exists(out)


def test_bad_utf8_and_chat_templates(workdir, capsys):
    bad = workdir / "tiny_run" / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "caf\xe9", "completion": "3"}\n')
    code, _, err = run(capsys, "sft", "--config", SFT, f"data.train_files=[{bad}]", "--dry_run")
    assert code == 2 and f"{bad}, line 2: not valid UTF-8 (byte 0xe9 at column 16)" in one_line(err)
    # Conversations with a tokenizer that has no chat template: an error, not a made-up format.
    chats = workdir / "tiny_run" / "chats.jsonl"
    turns = [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]
    chats.write_text("\n".join(json.dumps({"messages": turns}) for _ in range(8)) + "\n")
    code, _, err = run(capsys, "sft", "--config", SFT, f"data.train_files=[{chats}]", "--dry_run")
    assert code == 2
    assert f"{chats}, line 1: a message list, but the tokenizer" in one_line(err)
    assert "has no chat template" in err and "`tokenizer.chat_template`" in err
    # The config override gives it one (a Jinja string or a file).
    template = workdir / "tiny_run" / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% if not loop.last %}={% endif %}{% endfor %}")
    code, out, err = run(capsys, "sft", "--config", SFT, f"data.train_files=[{chats}]",
                         f"tokenizer.chat_template={template}", "train.batch_size=4", "--dry_run")
    assert code == 0, err
    assert "[rlhf-jax]" not in out  # a dry run builds nothing


# --------------------------------------------------------------------------- one process per folder


def test_a_second_process_is_refused_while_the_folder_is_locked(sft_run, capsys):
    holder_code = (
        "import sys\n"
        "from rlhf_jax.cli.config import SFTRunConfig, load_config\n"
        "from rlhf_jax.cli.run_folder import claim_run_folder\n"
        f"cfg = load_config({SFT!r}, [], SFTRunConfig)\n"
        "folder = claim_run_folder('sft', cfg, cfg.run.output_dir, overwrite=False)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(sft_run)
        code, _, err = run(capsys, "sft", "--config", SFT)
        assert code == 2
        assert f"output_dir tiny_run/sft is in use by another rlhf-jax process (pid {holder.pid})" in one_line(err)
        assert snapshot(sft_run) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # Once the holder is gone, the same command resumes (the run is finished: it only re-exports).
    code, out, _ = run(capsys, "sft", "--config", SFT)
    assert code == 0 and "resuming" in out


# --------------------------------------------------------------------------- damaged checkpoints


def _corrupt(step_dir):
    for dirpath, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(dirpath, name), "r+b") as f:
                f.truncate(max(os.path.getsize(f.name) // 3, 1))


def test_a_corrupt_newest_checkpoint_is_skipped_and_none_readable_is_an_error(sft_run, workdir, capsys):
    out = "tiny_run/ckpt"
    base = ["sft", "--config", SFT, f"run.output_dir={out}", "run.checkpoint_every=1", "run.keep=3"]
    assert run(capsys, *base)[0] == 0  # 4 steps; checkpoints 2, 3, 4 kept
    ckpt = workdir / out / "checkpoints"
    assert sorted(int(p) for p in os.listdir(ckpt) if p.isdigit()) == [2, 3, 4]
    _corrupt(ckpt / "4")
    # A longer run (allowed on resume: the schedule is constant) resumes from checkpoint 3.
    code, stdout, err = run(capsys, *base, "train.num_epochs=2")
    assert code == 0, err
    assert f"checkpoint {ckpt / '4'} cannot be read" in stdout and "resuming from checkpoint step 3" in stdout
    assert [r["step"] for r in read_metrics(str(workdir / out))] == list(range(1, 9))
    assert len(os.listdir(workdir / out / "corrupt_checkpoints")) == 1  # kept for inspection, out of the way
    # Every checkpoint damaged: an error naming the folder, nothing deleted.
    for step in os.listdir(ckpt):
        if step.isdigit():
            _corrupt(ckpt / step)
    code, _, err = run(capsys, *base, "train.num_epochs=3")
    assert code == 2 and f"no readable checkpoint in {ckpt}" in one_line(err)


# --------------------------------------------------------------------------- SIGINT / SIGTERM


def _signal_after(monkeypatch, step: int, signum: int):
    """Send `signum` to this process right after the metrics of `step` are written."""
    from rlhf_jax.io import metrics

    original = metrics.MetricsLogger.log

    def log(self, s, record):
        result = original(self, s, record)
        if s == step:
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(metrics.MetricsLogger, "log", log)


def _tensors(path):
    from rlhf_jax.models.hf.pretrained import read_safetensors

    return {name: np.array(a) for name, a in read_safetensors(path)}


def test_interrupted_runs_resume_bit_identical(sft_run, workdir, capsys, monkeypatch):
    assert threading.current_thread() is threading.main_thread()  # signal handlers need it
    common = ["sft", "--config", SFT, "train.num_epochs=2", "run.checkpoint_every=4"]
    assert run(capsys, *common, "run.output_dir=tiny_run/straight")[0] == 0
    interrupted = common + ["run.output_dir=tiny_run/stopped"]
    for step, signum, code in ((2, signal.SIGINT, 130), (5, signal.SIGTERM, 143)):
        with monkeypatch.context() as patch:
            _signal_after(patch, step, signum)
            got, _, err = run(capsys, *interrupted)
        assert got == code
        line = one_line(err)
        assert f"{signal.Signals(signum).name}: stopped after step {step}" in line
        assert "resume with the same command" in line
        assert os.path.isdir(workdir / "tiny_run" / "stopped" / "checkpoints" / str(step))
    got, out, _ = run(capsys, *interrupted)
    assert got == 0 and "resuming from checkpoint step 5" in out
    ref, resumed = workdir / "tiny_run" / "straight", workdir / "tiny_run" / "stopped"
    want = [strip_timing(r) for r in read_metrics(str(ref))]
    assert [r["step"] for r in want] == list(range(1, 9))
    assert json.dumps([strip_timing(r) for r in read_metrics(str(resumed))], sort_keys=True) == \
        json.dumps(want, sort_keys=True)
    a, b = _tensors(ref / "hf" / "model.safetensors"), _tensors(resumed / "hf" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# --------------------------------------------------------------------------- resuming with another config


def test_resume_accepts_a_longer_run_and_refuses_other_changes(sft_run, capsys):
    before = snapshot(sft_run)
    code, _, err = run(capsys, "sft", "--config", SFT, "train.batch_size=4", "run.seed=3", "run.log_every=2")
    assert code == 2
    line = one_line(err)
    assert "run.seed (0 -> 3)" in line and "train.batch_size (8 -> 4)" in line and "run.log_every" not in line
    assert snapshot(sft_run) == before
    # A decaying schedule whose length follows the run length: extending it changes the math.
    code, _, err = run(capsys, "sft", "--config", SFT, f"run.output_dir={sft_run}_cosine",
                       "train.optimizer.schedule=cosine")
    assert code == 0, err
    code, _, err = run(capsys, "sft", "--config", SFT, f"run.output_dir={sft_run}_cosine",
                       "train.optimizer.schedule=cosine", "train.num_epochs=2")
    assert code == 2 and "train.optimizer.total_steps (4 -> 8)" in one_line(err)


# --------------------------------------------------------------------------- load errors name the file


def test_load_errors_name_the_file(sft_run, workdir, capsys):
    import shutil

    broken = workdir / "tiny_run" / "broken_model"
    shutil.copytree(sft_run / "hf", broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 1000)
    code, _, err = run(capsys, "sft", "--config", SFT, "model.random_init=null", f"model.path={broken}",
                       "run.output_dir=tiny_run/from_broken")
    assert code == 2
    assert f"{weights}: truncated or corrupted: tensor" in one_line(err)
    assert not (workdir / "tiny_run" / "from_broken").exists()  # found before the folder was claimed
    (broken / "config.json").write_text('{"model_type": "gpt2"} }')
    code, _, err = run(capsys, "sft", "--config", SFT, "model.random_init=null", f"model.path={broken}",
                       "run.output_dir=tiny_run/from_broken2", "--dry_run")
    assert code == 2 and f"{broken / 'config.json'}: cannot read it as JSON (Extra data" in one_line(err)
