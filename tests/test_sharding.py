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

from rlhf_jax.train.sharding import batch_sharding, make_mesh, param_shardings, replicated, shard_batch

MESHES = [(4, 1), (2, 2), (1, 4)]


def test_make_mesh_shapes_and_errors():
    assert jax.device_count() >= 4
    mesh = make_mesh(fsdp=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": jax.device_count() // 2, "fsdp": 2, "tensor": 1}
    single = make_mesh(data=1, fsdp=1)
    assert single.devices.shape == (1, 1, 1)
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


# --- the drivers on a mesh: SFT steps and PPO iterations equal the one-device run ----

VOCAB = 32


def _tiny_lm(head):
    from rlhf_jax.models import ModelConfig, from_config

    cfg = ModelConfig.tiny("gpt2", VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                           max_position_embeddings=32)
    return from_config(cfg, head=head, seed=0)


def _quiet(output_dir, **kwargs):
    from rlhf_jax.train import RunOptions

    return RunOptions(output_dir=str(output_dir), stdout=False, tensorboard=False, checkpoint_every=100, **kwargs)


def _numeric(history):
    return [{k: v for k, v in r.items() if k not in ("timing", "warnings")} for r in history]


def _assert_close_runs(got, want, *, rtol=2e-5, atol=2e-6, params_atol=5e-5):
    """Metrics within float32 reduction-order noise; params within `params_atol`.

    Clip fractions (counts of tokens beyond a threshold) may differ by a token.

    Params get a looser absolute tolerance: Adam divides by sqrt(v), so an element
    whose gradient is at the level of reduction-order noise (sharded sums add in
    another order) can move by up to about the learning rate in either run.
    """
    got_params, got_hist = got
    want_params, want_hist = want
    for g, w in zip(_numeric(got_hist), _numeric(want_hist), strict=True):
        assert g.keys() == w.keys()
        for k in w:
            # a clip fraction counts tokens on either side of a threshold: one token
            # at the boundary may fall the other way
            tol = 0.05 if "clipfrac" in k else atol
            np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=tol, err_msg=f"step {w['step']} {k}")
    for g, w in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=params_atol)


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    from rlhf_jax.train import OptimizerConfig, SFTConfig
    from rlhf_jax.train.drivers import fit_sft

    lm, lm_params = _tiny_lm("lm")
    rng = np.random.default_rng(0)
    n, length = 16, 10
    lengths = rng.integers(4, length + 1, n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    data = {"input_ids": np.where(mask > 0, rng.integers(3, VOCAB, (n, length)), 0).astype(np.int32),
            "attention_mask": mask, "loss_mask": mask * (np.arange(length)[None, :] >= 2)}
    cfg = SFTConfig(batch_size=8, num_epochs=2, optimizer=OptimizerConfig(learning_rate=3e-3))
    want = fit_sft(lm, lm_params, data, cfg, _quiet(tmp_path_factory.mktemp("sft1"), log_every=2, seed=2))
    return lm, lm_params, data, cfg, want


# FSDP over all four devices (data x fsdp 2 x 2 runs in the GRPO test below, fsdp x tensor in
# the DPO one, 2 x 2 x 2 in tests/test_scale.py)
@pytest.mark.parametrize("data_size,fsdp_size", [(1, 4)])
def test_fit_sft_on_mesh_equals_single_device(sft_setup, tmp_path, data_size, fsdp_size):
    from rlhf_jax.train.drivers import fit_sft

    lm, lm_params, data, cfg, want = sft_setup
    mesh = make_mesh(data=data_size, fsdp=fsdp_size)
    if fsdp_size == 4:
        # also resume on the mesh: 2 steps, then continue from the sharded checkpoint
        fit_sft(lm, lm_params, data, cfg, _quiet(tmp_path, log_every=2, seed=2), mesh=mesh, max_steps=2)
    params, history, state = fit_sft(lm, lm_params, data, cfg, _quiet(tmp_path, log_every=2, seed=2), mesh=mesh,
                                     return_state=True)
    assert [r["step"] for r in history] == [2, 4]  # 16 rows / 8 = 2 steps per epoch, 2 epochs
    kernel = state.params["trunk"]["h"]["mlp"]["c_fc"]["kernel"]  # [layers 1, 32, 128]
    if fsdp_size > 1:
        assert kernel.sharding.spec == PartitionSpec(None, None, "fsdp")
        assert kernel.addressable_shards[0].data.shape == (1, 32, 128 // fsdp_size)
    else:
        assert kernel.sharding.is_fully_replicated
    _assert_close_runs((params, history), want)


# --- every phase jitted with in/out shardings: GRPO's three phases and the DPO step -------


def test_fit_grpo_on_mesh_equals_single_device_and_keeps_the_shardings(tmp_path, count_compiles):
    """Two GRPO iterations (group sampling, a reward model, the KL in the loss) through `fit_ppo`
    on a 2 x 2 (data x fsdp) mesh, where the trainer's phases are jitted with in/out shardings
    (`RLTrainer.with_mesh`): the same metrics and params as on one device, the rollout split
    along its rows, the state in the layout of the update's `out_shardings`, and the update
    compiled once for both iterations. (PPO with a critic on a 2 x 2 x 2 mesh and over two
    processes: tests/test_scale.py.)"""
    from rlhf_jax.train import make_optimizer
    from rlhf_jax.train.drivers import fit_ppo
    from rlhf_jax.train.rl.presets import rl_config
    from rlhf_jax.train.rl.trainer import RLTrainer

    policy, policy_params = _tiny_lm("lm")
    rm, rm_params = _tiny_lm("scalar")
    cfg = rl_config("grpo", {
        "batch": {"batch_size": 4, "group_size": 2, "num_minibatches": 2, "ppo_epochs": 1},
        "sampling": {"max_new_tokens": 4, "temperature": 1.0, "eos_token_id": 2, "pad_token_id": 0},
    })
    trainer = RLTrainer(policy, cfg, make_optimizer(1e-2, schedule="constant"), reward_model=rm)
    rng = np.random.default_rng(3)
    mask = np.ones((4, 5), np.int32)
    mask[1, :2] = 0  # left padding
    prompts = {"prompt_ids": np.where(mask > 0, rng.integers(3, VOCAB, (4, 5)), 0).astype(np.int32),
               "prompt_mask": mask}
    want = fit_ppo(trainer, policy_params, policy_params, prompts, _quiet(tmp_path / "one", seed=4), max_steps=2,
                   reward_params=rm_params)
    mesh = make_mesh(data=2, fsdp=2)
    rollouts = []
    with count_compiles() as counts:
        params, history, state = fit_ppo(
            trainer, policy_params, policy_params, prompts, _quiet(tmp_path / "mesh", seed=4), max_steps=2,
            reward_params=rm_params, mesh=mesh, return_state=True,
            on_rollout=lambda step, rows, rollout: rollouts.append(rollout))
    assert counts["jit(_update)"] == 1, dict(counts)
    assert trainer.mesh is None  # fit_ppo jitted a copy for the mesh
    assert [r["step"] for r in history] == [1, 2]
    _assert_close_runs((params, history), want, rtol=1e-4, atol=1e-5, params_atol=1e-4)
    # the rollout is split along its 8 rows (4 prompts x 2 samples) over data x fsdp
    tokens = rollouts[-1].tokens
    assert tokens.sharding.spec == PartitionSpec(("data", "fsdp"), None)
    assert {s.data.shape for s in tokens.addressable_shards} == {(2, 4)}
    # the update's outputs keep the layout its out_shardings promise: the state by the FSDP rule
    want_specs = [s.spec for s in jax.tree.leaves(trainer.with_mesh(mesh).param_shardings(state))]
    assert [x.sharding.spec for x in jax.tree.leaves(state)] == want_specs
    kernel = state.params["trunk"]["h"]["mlp"]["c_fc"]["kernel"]  # [1, 32, 128]
    assert kernel.sharding.spec == PartitionSpec(None, None, "fsdp")
    assert {s.data.shape for s in kernel.addressable_shards} == {(1, 32, 64)}


def test_fit_dpo_on_a_tensor_mesh_equals_single_device(tmp_path):
    """Two DPO steps (reference log-probs precomputed) on a 1 x 2 x 2 (data x fsdp x tensor)
    mesh: equal to one device; the step's state comes back FSDP- and tensor-sharded."""
    from rlhf_jax.train import OptimizerConfig
    from rlhf_jax.train.dpo import DPOConfig
    from rlhf_jax.train.drivers import fit_dpo

    lm, params = _tiny_lm("lm")
    rng = np.random.default_rng(5)
    n, length = 8, 8
    data = {}
    for side in ("chosen", "rejected"):
        lengths = rng.integers(4, length + 1, n)
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
        data[f"{side}_ids"] = np.where(mask > 0, rng.integers(3, VOCAB, (n, length)), 0).astype(np.int32)
        data[f"{side}_mask"] = mask
        data[f"{side}_loss_mask"] = mask * (np.arange(length)[None, :] >= 2)
    cfg = DPOConfig(batch_size=4, num_epochs=1, optimizer=OptimizerConfig(learning_rate=1e-2))
    want = fit_dpo(lm, params, data, cfg, _quiet(tmp_path / "one", seed=1))
    mesh = make_mesh(data=1, fsdp=2, tensor=2)
    got_params, got_history, state = fit_dpo(lm, params, data, cfg, _quiet(tmp_path / "mesh", seed=1), mesh=mesh,
                                             return_state=True)
    assert [r["step"] for r in got_history] == [1, 2]
    c_fc = state.params["trunk"]["h"]["mlp"]["c_fc"]["kernel"]  # [1, 32, 128]: column-parallel
    assert c_fc.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert {s.data.shape for s in c_fc.addressable_shards} == {(1, 16, 64)}
    mu = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", None) == c_fc.shape]
    assert mu and all(x.sharding.spec == c_fc.sharding.spec for x in mu)
    _assert_close_runs((got_params, got_history), want, rtol=1e-4, atol=1e-5, params_atol=1e-4)
