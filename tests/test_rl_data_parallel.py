"""Data parallelism of the RL update: on a `data` mesh (the trainer's `with_mesh`, or a context
mesh from `jax.set_mesh`), each device computes its share of every minibatch
(`sharding.constrain_rows`), and the iteration equals the single-device one.

Without the constraint XLA's SPMD partitioner replicates the rows gathered by a minibatch's
random permutation, and every device runs the whole minibatch's forward and backward.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from rlhf_jax.models import ModelConfig, from_config
from rlhf_jax.train import make_optimizer
from rlhf_jax.train.rl.presets import rl_config
from rlhf_jax.train.rl.trainer import RLTrainer
from rlhf_jax.train.sharding import constrain_rows, make_mesh, param_shardings, replicated, shard_batch

V, B, G, P, N, WIDTH = 16, 4, 2, 4, 4, 24
MINIBATCHES = 2  # rows B * G = 8, minibatch 4 rows, 2 per device on a 2-way data mesh
LR = 1e-3


def _reward(prompt_ids, prompt_mask, tokens, mask, prompt_index):
    return ((tokens % 2 == 0) * mask).sum(1) / np.maximum(mask.sum(1), 1)


def _constraint_specs(fn, *args):
    eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
    return [e.params["sharding"].spec for e in eqns if e.primitive.name == "sharding_constraint"]


def test_constrain_rows_is_identity_without_a_mesh():
    x = jnp.ones((4, 6, 3))
    assert _constraint_specs(lambda a: constrain_rows(a, axis=1), x) == []
    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):  # a batch split of 1: nothing to constrain
        assert _constraint_specs(lambda a: constrain_rows(a, axis=1), x) == []


def test_constrain_rows_splits_the_row_axis_on_the_context_mesh():
    mesh = make_mesh(data=2, devices=jax.devices()[:2])
    x, odd = jnp.ones((4, 6, 3)), jnp.ones((4, 5))
    with jax.set_mesh(mesh):
        specs = _constraint_specs(lambda a, b: constrain_rows((a, b), axis=1), x, odd)
        out = jax.jit(lambda a: constrain_rows(a, axis=1))(x)
    assert specs == [PartitionSpec(None, ("data", "fsdp"))]  # the 5-row array is left alone: 2 does not divide it
    assert [shard.data.shape for shard in out.addressable_shards] == [(4, 3, 3), (4, 3, 3)]
    # an explicit mesh needs no context
    assert _constraint_specs(lambda a: constrain_rows(a, mesh=mesh), x) == [PartitionSpec(("data", "fsdp"))]


@pytest.fixture(scope="module")
def grpo():
    config = ModelConfig.tiny("gpt2", V, hidden_size=WIDTH, num_heads=2, num_layers=1, max_position_embeddings=16)
    lm, params = from_config(config, head="lm", seed=0)
    cfg = rl_config("grpo", {
        "batch": {"batch_size": B, "group_size": G, "num_minibatches": MINIBATCHES, "ppo_epochs": 2},
        "sampling": {"max_new_tokens": N, "temperature": 1.0, "eos_token_id": None},
    })
    trainer = RLTrainer(lm, cfg, make_optimizer(LR, schedule="constant"), reward_fn=_reward)
    ids = np.random.default_rng(0).integers(0, V, (B, P)).astype(np.int32)
    return trainer, params, ids, np.ones((B, P), np.int32)


@pytest.fixture(scope="module")
def one_device(grpo):
    trainer, params, ids, mask = grpo
    ref = jax.tree.map(jnp.copy, params)
    state, metrics, _ = trainer.iteration(trainer.init(params, seed=0), ids, mask, ref_params=ref)
    return state, metrics


@pytest.mark.parametrize("route", ["with_mesh", "set_mesh"])
def test_grpo_iteration_on_a_data_mesh_splits_each_minibatch_and_equals_one_device(grpo, one_device, route,
                                                                                  count_compiles):
    trainer, params, ids, mask = grpo
    want_state, want = one_device
    mesh = make_mesh(data=2, devices=jax.devices()[:2])
    ref = jax.device_put(jax.tree.map(jnp.copy, params), replicated(mesh))
    state = trainer.init(params, seed=0)
    state_sh = param_shardings(state, mesh, fsdp=False)
    state = jax.device_put(state, state_sh)
    s_ids, s_mask = shard_batch((ids, mask), mesh)
    if route == "with_mesh":  # the trainer's phases jitted with shardings on its mesh
        dp = trainer.with_mesh(mesh)
        got_state, got, rollout = dp.iteration(state, s_ids, s_mask, ref_params=ref)
        scores = dp.score(None, s_ids, s_mask, rollout)
        (update,) = [f for key, f in dp._sharded_jits.items() if key[0] == "update"]
        in_sh, _ = dp.phase_shardings(got_state, ref)["update"]
        args = (got_state, dp._repeat(s_ids), dp._repeat(s_mask), rollout, scores, ref, jax.random.key(0))
        args = jax.tree.map(jax.device_put, args, in_sh)
        with count_compiles() as compiles:  # the iteration's layouts: this reuses its compilation
            hlo = update.lower(*args).compile().as_text()
    else:  # the plain trainer under a context mesh
        with jax.set_mesh(mesh):
            got_state, got, rollout = trainer.iteration(state, s_ids, s_mask, ref_params=ref)
            scores = trainer.score(None, s_ids, s_mask, rollout)
            rows_ids, rows_mask = jnp.repeat(s_ids, G, axis=0), jnp.repeat(s_mask, G, axis=0)
            args = (jax.device_put(got_state, state_sh), rows_ids, rows_mask, rollout, scores, ref,
                    jax.random.key(0))
            with count_compiles() as compiles:
                hlo = trainer._update_jit.lower(*args).compile().as_text()
    assert sum(compiles.values()) == 0, compiles
    for k in ("loss", "policy_loss", "kl_k3", "advantages_std", "grad_norm"):
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-4, atol=1e-6, err_msg=k)
    # Adam turns a float32-rounding difference of a near-zero gradient into a visible step: 1% of
    # the learning rate, against updates of up to 4 x LR.
    moved = 0.0
    leaves = zip(jax.tree.leaves(want_state.params), jax.tree.leaves(got_state.params), jax.tree.leaves(params))
    for a, b, p0 in leaves:
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=0.01 * LR)
        moved = max(moved, float(np.abs(np.asarray(a) - np.asarray(p0)).max()))
    assert moved > LR
    # The first MLP matmul of the training forward, [rows x tokens, WIDTH] x [WIDTH, 4 WIDTH]: per
    # device it holds half a minibatch's tokens; replicated it would hold all of them.
    mlp_rows = {int(m) for m in re.findall(rf"f32\[(\d+),{4 * WIDTH}\]\{{1,0\}} dot\(", hlo)}
    per_minibatch = B * G // MINIBATCHES * (P + N)
    assert per_minibatch // 2 in mlp_rows, sorted(mlp_rows)
    assert per_minibatch not in mlp_rows, sorted(mlp_rows)
