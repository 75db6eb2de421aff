"""Test-wide JAX settings.

Four host CPU devices so that the sharding tests can build a mesh, at XLA:CPU's lowest
backend optimisation level (fast compiles); rank promotion raises so that a silent broadcast
is a test failure.
"""
import os

# The tests are compile-bound (tiny models, many programs): XLA:CPU at its lowest backend
# optimisation level compiles about 1.7x faster and computes the same functions (the tolerances
# stay as they are). Subprocesses started by the tests inherit these flags.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

import collections  # noqa: E402
import contextlib  # noqa: E402

import pytest  # noqa: E402

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compile_counter():
    """Count XLA compilations while the block runs, by function, from JAX's public monitoring.

    Yields a `collections.Counter` keyed by the compiled function's name as JAX reports it
    (`"jit(name)"`); it fills while the block runs. A persistent-cache hit still counts
    (the event wraps the lookup), so the count is of compilations requested, not of cache misses.
    """
    counts = collections.Counter()

    def listener(event, duration_secs, **kwargs):
        del duration_secs
        if event == BACKEND_COMPILE_EVENT:
            counts[kwargs.get("fun_name", "?")] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="session")
def count_compiles():
    """`with count_compiles() as counts:` ... `counts["jit(f)"]` (see `compile_counter`)."""
    return compile_counter


@contextlib.contextmanager
def persistent_compile_cache(path):
    """JAX's persistent compilation cache in `path` while the block runs (every compile cached).

    An executable compiled before from the same program (a second CLI run of the same config,
    a run resumed in-process) is read back instead of compiled again: the same executable,
    so results are unchanged. Compile-count events still fire on a hit (see `compile_counter`).
    The previous settings come back afterwards and the cache is detached, so tests outside the
    block compile as before.
    """
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")
    old = {name: getattr(jax.config, name) for name in names}
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor
    # A size limit turns on the cache's file lock: reads and writes of the processes sharing
    # the folder (xdist workers, subprocesses) never see a half-written entry.
    jax.config.update("jax_compilation_cache_max_size", 8 << 30)
    try:
        yield path
    finally:
        for name, value in old.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def compile_cache_dir(tmp_path_factory):
    """One persistent compilation cache folder per test run, shared by the modules that use
    `compile_cache`, by the subprocesses they start and by every xdist worker (the CLI modules
    run the same tiny programs: whichever worker compiles one first, the others read it back)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base folders are siblings
    path = root / "xla_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def compile_cache(compile_cache_dir):
    """The persistent compilation cache on for a whole module (`pytestmark =
    pytest.mark.usefixtures("compile_cache")`): modules that run the same programs many times
    (the CLI on the tiny configs, runs resumed after an interruption) compile each once."""
    with persistent_compile_cache(compile_cache_dir):
        yield compile_cache_dir



# The longest modules first (xdist's loadfile hands out modules in collection order): a long
# module started last would leave the other worker idle at the end of the run.
LONG_MODULES = ("test_demo.py", "test_scale.py", "test_gguf_real.py", "test_resume.py", "test_sharding.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))  # stable: order kept within
