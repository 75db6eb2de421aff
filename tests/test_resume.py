"""A training run killed with SIGKILL and restarted resumes exactly.

Each run is a subprocess of `tests/resume_entry.py` (tiny SFT / PPO through
`fit_sft` / `fit_ppo`, checkpoints every k steps). The interrupted runs kill
themselves with SIGKILL from the `on_step` hook: once right after a
checkpoint was started (the asynchronous write may be cut short), once a few
steps after one. The restarted command must report that it resumed from a
checkpoint and end with the same `metrics.jsonl` (timing fields dropped) and
the same final params, bit for bit, as a run that was never interrupted.
The subprocesses share a persistent compilation cache so that only the first
one compiles.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax.io.metrics import read_metrics, strip_timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "tests", "resume_entry.py")


def _run(mode, out_dir, cache_dir, *, steps, every, kill_at=None, wait_for=None):
    env = dict(os.environ)
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, ENTRY, mode, str(out_dir), "--steps", str(steps),
           "--checkpoint_every", str(every), "--cache_dir", str(cache_dir)]
    if kill_at is not None:
        cmd += ["--kill_at", str(kill_at)]
    if wait_for is not None:
        cmd += ["--wait_for_checkpoint", str(wait_for)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if kill_at is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    return proc.stdout


def _resumed_step(stdout):
    found = re.findall(r"resuming from checkpoint step (\d+)", stdout)
    return int(found[-1]) if found else None


def _assert_same_run(ref_dir, resumed_dir, steps):
    ref = [strip_timing(r) for r in read_metrics(ref_dir)]
    got = [strip_timing(r) for r in read_metrics(resumed_dir)]
    assert [r["step"] for r in ref] == list(range(1, steps + 1))
    assert json.dumps(got, sort_keys=True) == json.dumps(ref, sort_keys=True)  # NaN-safe ==
    want = np.load(os.path.join(ref_dir, "final_params.npz"))
    have = np.load(os.path.join(resumed_dir, "final_params.npz"))
    assert sorted(want.files) == sorted(have.files) and want.files
    for name in want.files:
        np.testing.assert_array_equal(have[name], want[name], err_msg=name)


@pytest.mark.parametrize("mode,steps,every,kills", [
    # SFT: 20 rows / batch 4 = 5 steps per epoch, so the run crosses an epoch boundary.
    # Kill 1 comes one step after checkpoint 3 was started (its write may be cut short);
    # kill 2 waits until checkpoint 6 is committed, so the last restart resumes from 6.
    ("sft", 9, 3, ((4, None), (8, 6))),
    # PPO: kill right after checkpoint 4 was started, once checkpoint 2 is committed.
    ("ppo", 5, 2, ((5, 2),)),
    # The RL trainer (GRPO with dynamic sampling: refills drawn per (seed, step, try)).
    ("grpo", 4, 2, ((3, 2),)),
])
def test_sigkill_and_restart_matches_uninterrupted_run(tmp_path, mode, steps, every, kills):
    cache = tmp_path / "jax_cache"
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "interrupted"
    _run(mode, ref_dir, cache, steps=steps, every=every)
    resumed_from = []
    for kill_at, wait_for in kills:
        out = _run(mode, run_dir, cache, steps=steps, every=every, kill_at=kill_at, wait_for=wait_for)
        resumed_from.append(_resumed_step(out))
        # the killed process wrote the records of the steps before kill_at, and maybe
        # the start of a checkpoint it never finished
        assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, kill_at))
    out = _run(mode, run_dir, cache, steps=steps, every=every)
    resumed_from.append(_resumed_step(out))
    # the final command really resumed (it did not start over from step 0)
    last_kill, last_wait = kills[-1]
    assert resumed_from[-1] is not None and last_wait <= resumed_from[-1] < last_kill
    assert resumed_from[-1] % every == 0
    _assert_same_run(ref_dir, run_dir, steps)
