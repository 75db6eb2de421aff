"""Logging sinks, sample completions and evaluation during training, through the logger and the CLI.

- `MetricsLogger` hands scalars and samples to every sink, writes `samples.jsonl` and
  truncates it on resume; TensorBoard gets the samples as text.
- The W&B sink in offline mode (no network) writes its run folder under the run's
  output_dir; without the `wandb` package the CLI fails in one line (exit 2) naming the key.
- SFT with `data.eval_files`: held-out loss equal to a NumPy reference, greedy samples.
- Reward model with `run.eval_every`: held-out accuracy at those steps.
- PPO with a `path.py:function` reward: samples.jsonl rows whose scores are the function's
  values for those completions; eval/pass@1, score_mean, kl_to_ref on held-out prompts.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from rlhf_jax.cli import main as cli
from rlhf_jax.demo.tiny_run import make_tiny_run
from rlhf_jax.errors import ConfigError
from rlhf_jax.io.metrics import MetricsLogger, read_metrics, read_samples
from rlhf_jax.io.sinks import Sink

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny")

# the CLI runs share programs with tests/test_cli.py: compile each once (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("compile_cache")


def tiny(name):
    return os.path.join(TINY, f"{name}.yaml")


class Recorder(Sink):
    def __init__(self):
        self.scalar_calls, self.sample_calls, self.closed = [], [], False

    def scalars(self, step, values):
        self.scalar_calls.append((step, dict(values)))

    def samples(self, step, rows):
        self.sample_calls.append((step, list(rows)))

    def close(self):
        self.closed = True


def test_logger_feeds_sinks_and_truncates_samples_on_resume(tmp_path):
    sink = Recorder()
    with MetricsLogger(tmp_path, stdout=False, tensorboard=True, sinks=[sink]) as log:
        for step in (1, 2, 3):
            log.log(step, {"loss": float(step), "flag": True, "hist": np.arange(2), "time/step": 0.1})
            log.log_samples(step, [{"prompt": "1+1=", "completion": f"|{step}|", "score": np.float32(step)}],
                            step_key="iteration")
    assert sink.closed
    assert sink.scalar_calls[0] == (1, {"loss": 1.0, "time/step": 0.1})  # numbers only, timing included
    assert [s for s, _ in sink.sample_calls] == [1, 2, 3]
    assert sink.sample_calls[1][1] == [{"iteration": 2, "prompt": "1+1=", "completion": "|2|", "score": 2.0}]
    assert [r["iteration"] for r in read_samples(tmp_path)] == [1, 2, 3]
    # TensorBoard holds the samples as a Markdown table (the pipe in the completion escaped)
    events = b"".join(open(f, "rb").read() for f in glob.glob(str(tmp_path / "tb" / "*tfevents*")))
    assert b"samples" in events and b"\\|3\\|" in events
    # a resume from step 1 drops the later samples (they are written again)
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"iteration": 4, "pro')
    with MetricsLogger(tmp_path, stdout=False, tensorboard=False, resume_step=1) as log:
        log.log_samples(2, [{"prompt": "p", "completion": "again", "score": 0.0}], step_key="iteration")
    assert [(r["iteration"], r["completion"]) for r in read_samples(tmp_path)] == [(1, "|1|"), (2, "again")]


def test_wandb_sink_without_the_package_names_the_option(tmp_path, monkeypatch):
    from rlhf_jax.io.sinks import WandbSink

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=r"`run.wandb.enabled`.*wandb.*not installed"):
        WandbSink(tmp_path, mode="offline", option="run.wandb.enabled")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sinks")
    make_tiny_run(str(root))
    old = os.getcwd()
    os.chdir(root)
    try:
        yield root
    finally:
        os.chdir(old)


def run(capsys, *argv):
    capsys.readouterr()
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_missing_wandb_is_one_line_exit_2_before_the_folder_exists(workdir, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, _, err = run(capsys, "sft", "--config", tiny("sft"), "run.wandb.enabled=true",
                       "run.output_dir=tiny_run/no_wandb")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "`run.wandb.enabled`" in err and "wandb" in err and "pip install" in err
    assert not (workdir / "tiny_run" / "no_wandb").exists()
    # the other sink keys are checked up front too
    code, _, err = run(capsys, "sft", "--config", tiny("sft"), "run.eval_every=2", "run.output_dir=tiny_run/x")
    assert code == 2 and "`run.eval_every`" in err and "data.eval_files" in err
    code, _, err = run(capsys, "reward", "--config", tiny("reward"), "run.log_samples_every=1",
                       "run.output_dir=tiny_run/x")
    assert code == 2 and "`run.log_samples_every`" in err
    assert not (workdir / "tiny_run" / "x").exists()


def _sft_reference_loss(hf_dir, examples):
    """Token-mean completion NLL and argmax accuracy, in float64 NumPy from the model's logits."""
    from rlhf_jax.models import from_pretrained

    lm, params = from_pretrained(str(hf_dir), head="lm")
    ids, attn, loss = (examples[k] for k in ("input_ids", "attention_mask", "loss_mask"))
    logits = np.asarray(lm.logits(params, ids, attn), np.float64)[:, :-1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    targets = ids[:, 1:]
    mask = (loss * attn)[:, 1:].astype(np.float64)
    token_logp = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = (logits.argmax(-1) == targets).astype(np.float64)
    return -(token_logp * mask).sum() / mask.sum(), (correct * mask).sum() / mask.sum()


def test_sft_reward_ppo_with_eval_samples_and_wandb_offline(workdir, capsys, monkeypatch):
    import wandb  # noqa: F401  (the test extra: missing is a failure)
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny_run = workdir / "tiny_run"
    # SFT: held-out loss every 2 steps and at the end, greedy samples every 2 steps, a W&B offline run.
    code, _, err = run(capsys, "sft", "--config", tiny("sft"), "data.eval_files=[tiny_run/sft.jsonl]",
                       "data.max_rows=16", "run.eval_every=2", "run.log_samples_every=2",
                       "run.num_logged_samples=3", "run.wandb.enabled=true", "run.wandb.mode=offline",
                       "run.wandb.project=rlhf-jax-tests")
    assert code == 0, err
    sft = tiny_run / "sft"
    records = read_metrics(sft)
    assert [r["step"] for r in records if "eval/loss" in r] == [2]  # 16 rows / batch 8 = 2 steps
    from rlhf_jax.cli.commands import load_tokenizer
    from rlhf_jax.cli.config import SFTRunConfig, load_config
    from rlhf_jax.data.datasets import read_sources, sft_examples

    cfg = load_config(tiny("sft"), ["data.max_rows=16"], SFTRunConfig)
    tok = load_tokenizer(cfg.tokenizer, cfg.model)
    held = sft_examples(read_sources(["tiny_run/sft.jsonl"], max_rows=16), tok, max_prompt_length=8, max_length=16,
                        buckets=(8, 16, 32))
    ref_loss, ref_acc = _sft_reference_loss(sft / "hf", held.arrays)
    np.testing.assert_allclose(records[-1]["eval/loss"], ref_loss, rtol=1e-4)
    np.testing.assert_allclose(records[-1]["eval/token_accuracy"], ref_acc, atol=1e-6)
    samples = read_samples(sft)
    assert [s["step"] for s in samples] == [2, 2, 2]
    assert [s["reference"] for s in samples] == [json.loads(line)["completion"] for line in
                                                 open("tiny_run/sft.jsonl").read().splitlines()[:3]]
    assert all(isinstance(s["completion"], str) and s["prompt"].endswith("=") for s in samples)
    offline = glob.glob(str(sft / "wandb" / "offline-run-*"))
    assert len(offline) == 1 and glob.glob(os.path.join(offline[0], "*.wandb"))
    assert (sft / "wandb_run_id").read_text().strip() in offline[0]
    # the sink settings are logging settings: changing them resumes the run
    code, out, err = run(capsys, "sft", "--config", tiny("sft"), "data.eval_files=[tiny_run/sft.jsonl]",
                         "data.max_rows=16", "run.eval_every=1", "run.num_logged_samples=3")
    assert code == 0, err
    assert "resuming with changed" in out and "run.wandb.enabled (True -> False)" in out
    assert read_samples(sft) == samples

    # Reward model: held-out accuracy at every step.
    code, _, err = run(capsys, "reward", "--config", tiny("reward"), "run.eval_every=1", "data.max_rows=16")
    assert code == 0, err
    rm_records = read_metrics(tiny_run / "reward")
    assert [r["step"] for r in rm_records if "eval/accuracy" in r] == [1, 2]
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 for r in rm_records)

    # PPO with a user reward function from a .py file and a separate value network (initialised
    # from the reward model): samples carry the function's scores.
    (workdir / "length_reward.py").write_text(
        "def reward(prompts, completions):\n    return [float(len(c)) for c in completions]\n")
    code, _, err = run(capsys, "ppo", "--config", tiny("ppo_verifier"), "reward.function=length_reward.py:reward",
                       "data.eval_files=[tiny_run/prompts.jsonl]", "data.max_rows=8", "run.eval_every=1",
                       "run.log_samples_every=2", "run.num_logged_samples=3", "train.batch.batch_size=4",
                       "train.batch.num_minibatches=1", "value_model=tiny_run/reward/hf")
    assert code == 0, err
    ppo = tiny_run / "ppo_verifier"
    assert "value_model: tiny_run/reward/hf" in (ppo / "resolved_config.yaml").read_text()
    assert (ppo / "hf" / "model.safetensors").exists()
    samples = read_samples(ppo)
    assert [s["iteration"] for s in samples] == [2, 2, 2]
    prompts = [json.loads(line)["prompt"] for line in open("tiny_run/prompts.jsonl").read().splitlines()]
    for s in samples:
        assert s["score"] == float(len(s["completion"]))
        assert s["prompt"] == prompts[s["prompt_index"]]
    records = read_metrics(ppo)
    evals = [r for r in records if "eval/pass@1" in r]
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:
        assert 0.0 <= r["eval/pass@1"] <= 1.0 and r["eval/score_mean"] >= 0.0
        assert np.isfinite(r["eval/kl_to_ref"]) and 0.0 < r["eval/response_length"] <= 4.0
    # with the length reward a pass is a non-empty completion: the pass rate is at most the mean length
    assert all(r["eval/pass@1"] <= r["eval/score_mean"] + 1e-9 for r in evals)


def test_rollout_samples_repeat_prompts_over_groups_and_take_the_trainers_scores():
    from rlhf_jax.rollout import Rollout
    from rlhf_jax.train.drivers import rollout_samples

    class Trainer:  # the score phase of an RL trainer with 2 samples per prompt
        def score(self, reward_params, prompt_ids, prompt_mask, rollout, prompt_index):
            assert reward_params == "rm" and list(prompt_index) == [7, 9]
            return np.array([0.5, 1.5, 2.5, 3.5], np.float32)

    prompt_ids = np.array([[0, 5, 6], [4, 5, 6]])
    prompt_mask = np.array([[0, 1, 1], [1, 1, 1]])
    tokens = np.array([[1, 2], [3, 0], [4, 4], [5, 0]])
    mask = np.array([[1, 1], [1, 0], [1, 1], [1, 0]], np.float32)
    rollout = Rollout(tokens=tokens, logprobs=np.zeros_like(mask), mask=mask,
                      ended_with_eos=np.array([False, True, False, True]))
    rows = rollout_samples(Trainer(), "rm", prompt_ids, prompt_mask, rollout, np.array([7, 9]), limit=3)
    assert rows == [
        {"prompt": [5, 6], "completion": [1, 2], "score": 0.5, "ended_with_eos": False, "prompt_index": 7},
        {"prompt": [5, 6], "completion": [3], "score": 1.5, "ended_with_eos": True, "prompt_index": 7},
        {"prompt": [4, 5, 6], "completion": [4, 4], "score": 2.5, "ended_with_eos": False, "prompt_index": 9},
    ]
    texts = rollout_samples(Trainer(), "rm", prompt_ids, prompt_mask, rollout, np.array([7, 9]),
                            decode=lambda ids, m: ["".join(map(str, r[np.asarray(m[i]) > 0])) for i, r in
                                                   enumerate(np.asarray(ids))])
    assert [(t["prompt"], t["completion"]) for t in texts] == [("56", "12"), ("56", "3"), ("456", "44"), ("456", "5")]
