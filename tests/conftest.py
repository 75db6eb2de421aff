"""Test-wide JAX settings.

Four host CPU devices so that the sharding tests can build a mesh; rank
promotion raises so that a silent broadcast is a test failure.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
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
