"""Tests of rlhf_jax.train.sharding: meshes, sharding rules, and sharded steps equal to one device.

Runs on the 4 host CPU devices set by conftest.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from rlhf_jax.train.sharding import (batch_sharding, make_mesh, param_shardings, replicated,
                                     shard_batch)

MESHES = [(4, 1), (2, 2), (1, 4)]


def test_make_mesh_shapes_and_errors():
    assert jax.device_count() >= 4
    mesh = make_mesh(fsdp=2)
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == {"data": jax.device_count() // 2, "fsdp": 2}
    single = make_mesh(data=1, fsdp=1)
    assert single.devices.shape == (1, 1)
    with pytest.raises(ValueError, match="needs 8 devices"):
        make_mesh(data=4, fsdp=2)
    with pytest.raises(ValueError, match="`fsdp`"):
        make_mesh(fsdp=0)
    with pytest.raises(ValueError, match="does not divide"):
        make_mesh(fsdp=3)


def test_param_sharding_rule():
    mesh = make_mesh(data=2, fsdp=2)
    tree = {"wte": jnp.zeros((10, 8)), "mlp": jnp.zeros((8, 32)), "ln": jnp.zeros((8,)),
            "odd": jnp.zeros((3, 5)), "step": jnp.int32(0), "rng": jax.random.PRNGKey(0),
            "scalar": jnp.float32(1.0)}
    sh = param_shardings(tree, mesh, fsdp=True)
    assert sh["wte"].spec == PartitionSpec("fsdp", None)      # 10 > 8, both divisible
    assert sh["mlp"].spec == PartitionSpec(None, "fsdp")
    assert sh["ln"].spec == PartitionSpec("fsdp")
    for name in ("odd", "step", "rng", "scalar"):
        assert sh[name].spec == PartitionSpec(), name
    assert all(s.spec == PartitionSpec() for s in jax.tree.leaves(param_shardings(tree, mesh, fsdp=False)))
    assert param_shardings(tree, mesh, fsdp=True, min_size=1000)["mlp"].spec == PartitionSpec()


def test_shard_batch_splits_axis_zero_and_checks_divisibility():
    mesh = make_mesh(data=2, fsdp=2)
    batch = {"ids": np.arange(24).reshape(8, 3), "mask": np.ones(8)}
    placed = shard_batch(batch, mesh)
    assert placed["ids"].sharding.spec == PartitionSpec(("data", "fsdp"), None)
    assert {s.data.shape for s in placed["ids"].addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(placed["ids"], batch["ids"])
    with pytest.raises(ValueError, match=r"\['ids'\].*batch size 6"):
        shard_batch({"ids": np.zeros((6, 2))}, mesh)
    assert batch_sharding(mesh, 1).spec == PartitionSpec(("data", "fsdp"))


# --- a small two-layer regression step, sharded vs one device -----------------

def _mlp_loss(params, batch):
    hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"][None, :])
    pred = hidden @ params["w2"]
    return jnp.mean((pred[:, 0] - batch["y"]) ** 2)


def _make_step(tx):
    def step(state, batch):
        params, opt_state = state
        loss, grads = jax.value_and_grad(_mlp_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss}
    return step


@pytest.fixture(scope="module")
def mlp_problem():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w1": jax.random.normal(k1, (6, 16)) * 0.3, "b1": jnp.zeros(16),
              "w2": jax.random.normal(k2, (16, 1)) * 0.3}
    batches = [{"x": np.asarray(jax.random.normal(k, (8, 6))),
                "y": np.asarray(jax.random.normal(jax.random.fold_in(k, 1), (8,)))}
               for k in jax.random.split(k3, 3)]
    tx = optax.adam(1e-2)
    step = _make_step(tx)
    state = (params, tx.init(params))
    fn = jax.jit(step)
    for batch in batches:
        state, metrics = fn(state, batch)
    return params, tx, batches, state, metrics


@pytest.mark.parametrize("data,fsdp", MESHES)
def test_sharded_step_equals_single_device(mlp_problem, data, fsdp):
    params, tx, batches, want_state, want_metrics = mlp_problem
    mesh = make_mesh(data=data, fsdp=fsdp)
    state = (params, tx.init(params))
    state_sh = param_shardings(state, mesh, fsdp=fsdp > 1)
    state = jax.device_put(state, state_sh)
    fn = jax.jit(_make_step(tx), out_shardings=(state_sh, replicated(mesh)))
    for batch in batches:
        state, metrics = fn(state, shard_batch(batch, mesh))
    if fsdp > 1:
        assert state[0]["w1"].sharding.spec == PartitionSpec(None, "fsdp")
        assert len({s.data.shape for s in state[0]["w1"].addressable_shards}) == 1
        assert state[0]["w1"].addressable_shards[0].data.shape == (6, 16 // fsdp)
    np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
