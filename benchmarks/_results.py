"""Shared helpers for benchmark scripts: machine description and RESULTS.md sections.

Each benchmark owns one section of `benchmarks/RESULTS.md`, delimited by
`<!-- BEGIN name -->` / `<!-- END name -->`, and replaces only that section.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Every speed claim is a ratio against an anchor measured side by side in the same run.\n"
    "Each section is written by the script named in it; rerun the script to refresh it.\n"
)


def machine() -> str:
    """A one-line description of the machine and JAX backend."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores"
    try:
        import jax

        dev = jax.devices()[0]
        desc += f"; JAX {jax.__version__} on {dev.platform} ({dev.device_kind})"
    except Exception:  # noqa: BLE001 - the description is best effort
        pass
    return desc


def median_time(fn, *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` (which must block until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `name` of RESULTS.md with `body`."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = f"<!-- BEGIN {name} -->\n{body.rstrip()}\n\n_Written {stamp}._\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_page_malloc(enable: bool) -> str:
    """Give both halves' subprocesses glibc's transparent-huge-page tunable (or take the
    Makefile's away); a sentence for the table saying what they run with.

    XLA:CPU allocates each call's temporary buffer afresh (133 MB for one GPT-2 4 x 256
    minibatch forward + backward, above glibc's 32 MB mmap ceiling, so every call maps new
    memory) and faults it in 4 KiB at a time: measured 34,500 minor faults and 65 ms of system
    time per such call. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` glibc advises those
    mappings `MADV_HUGEPAGE` (transparent huge pages in `madvise` mode, the Debian default), and
    the same call takes 750 faults. The tunable is process-wide and read at start-up, so it is
    set here for the subprocesses, TRL's included. Another `GLIBC_TUNABLES` value is kept either
    way; `enable=False` only removes this one (which `make bench` exports).
    """
    if enable:
        os.environ.setdefault("GLIBC_TUNABLES", HUGE_PAGE_TUNABLE)
    elif os.environ.get("GLIBC_TUNABLES") == HUGE_PAGE_TUNABLE:
        del os.environ["GLIBC_TUNABLES"]
    value = os.environ.get("GLIBC_TUNABLES")
    if value is None:
        return "Both halves run without `GLIBC_TUNABLES` (`--no-huge-pages`). "
    return (f"Both halves run with `GLIBC_TUNABLES={value}` (`glibc.malloc.hugetlb=1`: glibc backs "
            "large allocations with transparent huge pages; `make bench` sets it too; without it "
            "XLA:CPU page-faults each call's fresh temporary buffer in 4 KiB pages). ")


def run_json_subprocess(cmd: list[str], what: str) -> dict:
    """Run `cmd` (a benchmark half in a fresh interpreter); its last stdout line is a JSON object,
    returned with `wall_s` added. On failure the output's tails go to stderr and the run stops."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"the {what} half failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result
