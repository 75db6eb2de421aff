"""Tests of rlhf_jax.io.metrics: JSONL records, timing split, resume truncation, warnings, TensorBoard."""
from __future__ import annotations

import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.io.metrics import KLSignMonitor, MetricsLogger, is_timing_key, read_metrics, strip_timing


def test_records_are_host_values_with_timing_apart(tmp_path, capsys):
    with MetricsLogger(tmp_path, print_every=2, tensorboard=False) as log:
        for step in (1, 2, 3):
            log.log(step, {"loss": jnp.float32(1.5 * step), "count": jnp.int32(step),
                           "time/update": 0.123, "tokens_per_s": np.float64(100.0),
                           "hist": jnp.arange(3)})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1] == {"step": 2, "count": 2, "hist": [0, 1, 2], "loss": 3.0,
                          "timing": {"time/update": 0.123, "tokens_per_s": 100.0}}
    assert strip_timing(records[0]) == {"step": 1, "count": 1, "hist": [0, 1, 2], "loss": 1.5}
    out = capsys.readouterr().out.splitlines()
    # the first step always prints, then every second step
    assert [line.split()[1] for line in out] == ["1", "2"]
    assert "loss=3.0000" in out[1] and "time/update" not in out[1]


def test_timing_key_rule():
    assert is_timing_key("time/rollout") and is_timing_key("tokens_per_s")
    assert is_timing_key("perf/mfu") and is_timing_key("rollout_time")
    assert not is_timing_key("loss") and not is_timing_key("kl/k1")
    assert not is_timing_key("score_mean") and not is_timing_key("clipfrac")


def test_resume_truncates_to_restored_step(tmp_path):
    with MetricsLogger(tmp_path, stdout=False, tensorboard=False) as log:
        for step in range(1, 6):
            log.log(step, {"loss": float(step)})
    # a kill in the middle of a write leaves a partial last line
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    with MetricsLogger(tmp_path, stdout=False, tensorboard=False, resume_step=3) as log:
        assert [r["step"] for r in log.history] == [1, 2, 3]
        log.log(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    # a fresh run (resume_step=0) starts an empty file
    with MetricsLogger(tmp_path, stdout=False, tensorboard=False, resume_step=0) as log:
        assert log.history == []
    assert read_metrics(tmp_path) == []


def test_warnings_go_to_python_logging_and_the_next_record(tmp_path, caplog):
    with MetricsLogger(tmp_path, stdout=False, tensorboard=False) as log:
        log.log(1, {"loss": 1.0})
        with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
            log.warn("skipped a non-finite update")
        log.log(2, {"loss": 2.0})
        log.log(3, {"loss": 3.0})
    assert "skipped a non-finite update" in caplog.text
    records = read_metrics(tmp_path)
    assert "warnings" not in records[0] and "warnings" not in records[2]
    assert records[1]["warnings"] == ["skipped a non-finite update"]


def test_kl_sign_monitor_warns_once_per_negative_window():
    monitor = KLSignMonitor(window=3)
    values = [0.1, -0.3, -0.2, -0.1, -0.1, -0.1, 0.5]
    messages = [monitor.update({"kl/k1": v}) for v in values]
    # windows: [.1,-.3,-.2] mean<0 -> warn at index 2; then cleared; [-.1,-.1,-.1] -> warn at 5
    assert [i for i, m in enumerate(messages) if m] == [2, 5]
    assert "kl/k1" in messages[2]
    replayed = KLSignMonitor(window=3)
    replayed.replay([{"kl/k1": v} for v in values[:4]])
    fresh = KLSignMonitor(window=3)
    for v in values[:4]:
        fresh.update({"kl/k1": v})
    assert [replayed.update({"kl/k1": v}) for v in values[4:]] == \
        [fresh.update({"kl/k1": v}) for v in values[4:]]
    assert KLSignMonitor(window=2).update({"loss": 1.0}) is None
    with pytest.raises(ValueError, match="window"):
        KLSignMonitor(window=0)


def test_tensorboard_events_are_written(tmp_path):
    with MetricsLogger(tmp_path, stdout=False, tensorboard=True) as log:
        log.log(1, {"loss": 1.0, "time/step": 0.5})
    files = os.listdir(tmp_path / "tb")
    assert files and any("tfevents" in f for f in files)
    assert os.path.getsize(tmp_path / "tb" / files[0]) > 0


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="print_every"):
        MetricsLogger(tmp_path, print_every=0)
    with pytest.raises(ValueError, match="resume_step"):
        MetricsLogger(tmp_path, resume_step=-1)
    with MetricsLogger(tmp_path, stdout=False, tensorboard=False, resume_step=0) as log:
        log.log(1, {"loss": jnp.float32(jnp.nan)})
    assert np.isnan(read_metrics(tmp_path)[0]["loss"])  # a NaN metric is kept, not dropped
