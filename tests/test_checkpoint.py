"""Tests of rlhf_jax.io.checkpoint: whole-state round trips, retention, config and structure checks."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax.io.checkpoint import Checkpointer, ConfigMismatchError, config_hash


@struct.dataclass
class _State:
    params: dict
    opt_state: object
    step: jax.Array
    rng: jax.Array
    typed_rng: jax.Array
    kl_coef: jax.Array


@dataclasses.dataclass(frozen=True)
class _Cfg:
    lr: float = 1e-3
    batch_size: int = 4
    dtype: object = jnp.float32


def _make_state(seed):
    k = jax.random.PRNGKey(seed)
    params = {"w": jax.random.normal(k, (3, 8)), "b": jnp.arange(8, dtype=jnp.bfloat16) * seed}
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    if seed:  # give the optimizer moments non-trivial values
        grads = jax.tree.map(jnp.ones_like, params)
        _, opt_state = tx.update(grads, opt_state, params)
    return _State(params, opt_state, jnp.int32(seed), jax.random.PRNGKey(seed + 7),
                  jax.random.key(seed + 11), jnp.float32(0.05 * seed))


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jnp.issubdtype(y.dtype, jax.dtypes.prng_key)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(y, np.float64))


def test_round_trip_whole_state(tmp_path):
    saved = _make_state(3)
    with Checkpointer(tmp_path, config=_Cfg()) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(3, saved, host_state={"epoch": 1, "index": 2})
        ckpt.wait_until_finished()
        assert ckpt.latest_step() == 3
    # a new process would open a new manager: do the same
    with Checkpointer(tmp_path, config=_Cfg()) as ckpt:
        restored, host = ckpt.restore(_make_state(0))
    assert host == {"epoch": 1, "index": 2}
    with Checkpointer(tmp_path, read_only=True) as reader:  # e.g. an export of a live run
        assert reader.latest_step() == 3
        with pytest.raises(ValueError, match="read_only"):
            reader.save(4, saved)
    with pytest.raises(FileNotFoundError):
        Checkpointer(tmp_path / "absent", read_only=True)
    _leaves_equal(restored, saved)
    # the typed key still draws the same numbers
    np.testing.assert_array_equal(jax.random.uniform(restored.typed_rng, (3,)),
                                  jax.random.uniform(saved.typed_rng, (3,)))
    assert restored.params["b"].dtype == jnp.bfloat16


def test_keeps_last_k_and_skips_existing_step(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2, config=_Cfg()) as ckpt:
        for step in (1, 2, 3, 4):
            assert ckpt.save(step, _make_state(step), host_state={"index": step})
        assert not ckpt.save(4, _make_state(4))
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3, 4]
        restored, host = ckpt.restore(_make_state(0), step=3)
        assert host == {"index": 3}
        _leaves_equal(restored, _make_state(3))
        with pytest.raises(FileNotFoundError, match="step 1"):
            ckpt.restore(_make_state(0), step=1)


def test_config_mismatch_is_an_error_unless_allowed(tmp_path):
    with Checkpointer(tmp_path, config=_Cfg(lr=1e-3)) as ckpt:
        ckpt.save(1, _make_state(1))
    with Checkpointer(tmp_path, config=_Cfg(lr=2e-3)) as ckpt:
        with pytest.raises(ConfigMismatchError, match="lr: checkpoint=0.001 run=0.002"):
            ckpt.restore(_make_state(0))
    with Checkpointer(tmp_path, config=_Cfg(lr=2e-3), allow_config_mismatch=True) as ckpt:
        restored, _ = ckpt.restore(_make_state(0))
    _leaves_equal(restored, _make_state(1))
    assert config_hash(_Cfg()) == config_hash(_Cfg())
    assert config_hash(_Cfg()) != config_hash(_Cfg(batch_size=8))


def test_structure_mismatch_names_the_leaf(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": jnp.ones((3, 4)), "b": jnp.ones(4)})
        ckpt.wait_until_finished()
        with pytest.raises(ValueError, match=r"\['w'\] is float32\[3, 5\]"):
            ckpt.restore({"w": jnp.ones((3, 5)), "b": jnp.ones(4)})
        with pytest.raises(ValueError, match="in template but not saved"):
            ckpt.restore({"w": jnp.ones((3, 4)), "c": jnp.ones(4)})
        with pytest.raises(TypeError, match="host_state"):
            ckpt.save(2, {"w": jnp.ones(1)}, host_state={"x": object()})


def test_restore_takes_the_template_shardings(tmp_path):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    row = NamedSharding(mesh, PartitionSpec("fsdp", None))
    value = jnp.arange(32.0).reshape(8, 4)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, {"w": value, "step": jnp.int32(5)})
        ckpt.wait_until_finished()
        template = {"w": jax.device_put(jnp.zeros((8, 4)), row), "step": jnp.int32(0)}
        restored, host = ckpt.restore(template)
    assert host == {}
    assert restored["w"].sharding.is_equivalent_to(row, 2)
    np.testing.assert_array_equal(restored["w"], value)
    assert int(restored["step"]) == 5


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path, max_to_keep=0)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore({"w": jnp.ones(2)})
        with pytest.raises(ValueError, match="step"):
            ckpt.save(-1, {"w": jnp.ones(2)})


def test_async_save_survives_deleting_the_arrays_right_after(tmp_path):
    # the drivers donate the state to the next step right after `save` returns:
    # the asynchronous write must already own a host copy of every array
    state = {"w": jnp.arange(4096.0).reshape(64, 64), "step": jnp.int32(9)}
    expected = jax.tree.map(np.asarray, state)
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(9, state)
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        ckpt.wait_until_finished()
        restored, _ = ckpt.restore({"w": jnp.zeros((64, 64)), "step": jnp.int32(0)})
    np.testing.assert_array_equal(restored["w"], expected["w"])
    assert int(restored["step"]) == 9
