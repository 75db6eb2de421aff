"""Sharded from the first byte: tensor-parallel rules, checkpoints read into their shards,
dtype policy, and training on a 2 x 2 x 2 mesh over two processes of 4 host devices (joined by
`jax.distributed` over loopback) equal to one device.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scale_entry  # tests/ is on sys.path under pytest
from jax.sharding import PartitionSpec

from rlhf_jax.models import ModelConfig, from_config, from_pretrained, save_pretrained
from rlhf_jax.train.sharding import make_mesh, param_shardings, param_spec
from rlhf_jax.train.state import make_optimizer

ENTRY = os.path.join(os.path.dirname(__file__), "scale_entry.py")


def test_tensor_parallel_rules_by_path_with_the_stacked_layer_axis():
    spec = lambda path, shape, **kw: param_spec(path, shape, **kw)  # noqa: E731
    tp = dict(tensor_size=2, fsdp_size=2)
    # column-parallel: the output axis over "tensor"; FSDP takes the other (never the layer axis)
    assert spec("trunk/layers/self_attn/q_proj/kernel", (24, 896, 896), **tp) == PartitionSpec(None, "fsdp", "tensor")
    assert spec("trunk/layers/mlp/up_proj/kernel", (24, 896, 4864), **tp) == PartitionSpec(None, "fsdp", "tensor")
    # row-parallel: the input axis
    assert spec("trunk/layers/mlp/down_proj/kernel", (24, 4864, 896), **tp) == PartitionSpec(None, "tensor", "fsdp")
    assert spec("trunk/layers/self_attn/o_proj/kernel", (24, 896, 896), **tp) == PartitionSpec(None, "tensor", "fsdp")
    assert spec("trunk/embed_tokens/embedding", (151936, 896), **tp) == PartitionSpec("tensor", "fsdp")
    assert spec("lm_head/kernel", (896, 151936), **tp) == PartitionSpec("fsdp", "tensor")
    # optimizer moments end with the same path
    assert spec("opt_state/1/0/mu/lm_head/kernel", (896, 151936), **tp) == PartitionSpec("fsdp", "tensor")
    # the layer axis (24, the largest divisible one for a norm scale of width 6) is never split
    assert spec("trunk/layers/input_layernorm/scale", (24, 6), fsdp_size=4) == PartitionSpec()
    # an axis that "tensor" does not divide stays whole; FSDP alone as before
    assert spec("trunk/layers/self_attn/k_proj/kernel", (2, 8, 6), tensor_size=4) == PartitionSpec()
    assert spec("trunk/wpe/embedding", (64, 32), fsdp_size=2) == PartitionSpec("fsdp", None)
    mesh = make_mesh(data=1, fsdp=2, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    tree = {"step": jnp.int32(0), "trunk": {"layers": {"mlp": {"down_proj": {"kernel": jnp.zeros((2, 8, 4))}}}}}
    sh = param_shardings(tree, mesh, fsdp=True)
    assert sh["step"].spec == PartitionSpec()
    assert sh["trunk"]["layers"]["mlp"]["down_proj"]["kernel"].spec == PartitionSpec(None, "tensor", "fsdp")
    with pytest.raises(ValueError, match="needs 8 devices"):
        make_mesh(data=2, fsdp=2, tensor=2)


def test_checkpoint_loads_straight_into_its_shards(tmp_path):
    cfg = ModelConfig.tiny("llama", 64, num_layers=2)
    lm, params = from_config(cfg, head="lm", seed=0)
    save_pretrained(lm, params, tmp_path)
    mesh = make_mesh(data=1, fsdp=2, tensor=2)
    reads = []
    import rlhf_jax.models.hf.pretrained as pretrained

    real = pretrained._read_stacked
    def spy(views, dtype, index):
        reads.append(index)
        return real(views, dtype, index)
    pretrained._read_stacked = spy
    try:
        lm2, sharded = from_pretrained(tmp_path, param_dtype=jnp.bfloat16,
                                       shardings=lambda a: param_shardings(a, mesh, fsdp=True))
    finally:
        pretrained._read_stacked = real
    _, whole = from_pretrained(tmp_path, param_dtype=jnp.bfloat16)
    up = sharded["trunk"]["layers"]["mlp"]["up_proj"]["kernel"]  # [L, D, F]
    assert up.dtype == jnp.bfloat16
    assert up.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert {s.data.shape for s in up.addressable_shards} == {(2, cfg.hidden_size // 2, cfg.intermediate_size // 2)}
    # each device's callback read a quarter of the matrix, never the whole of it
    full = (slice(None),) * 3
    assert reads and all(idx != full for idx in reads if len(idx) == 3)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(whole)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)), jnp.int32)
    mask = jnp.ones_like(ids)
    logits = jax.jit(lambda p: lm2.logits(p, ids, mask))
    np.testing.assert_allclose(logits(sharded), logits(whole), atol=1e-2)


def test_mu_dtype_stores_the_first_moment_in_bfloat16():
    params = {"w": jnp.ones((4, 4), jnp.float32)}
    tx = make_optimizer(1e-3, schedule="constant", mu_dtype="bfloat16")
    state = tx.init(params)
    mus = [x for x in jax.tree.leaves(state) if getattr(x, "shape", None) == (4, 4)]
    assert sorted(str(x.dtype) for x in mus) == ["bfloat16", "float32"]  # mu bf16, nu f32
    updates, _ = tx.update({"w": jnp.ones((4, 4))}, state, params)
    assert updates["w"].dtype == jnp.float32


def test_frozen_bfloat16_weights_run_under_a_float32_description():
    # the reference and reward model store bf16 weights; the LM computes in its own dtype
    lm, params = from_config(ModelConfig.tiny("llama", 64), head="lm", seed=0)
    frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    ids = jnp.ones((2, 5), jnp.int32)
    mask = jnp.ones_like(ids)
    # both forwards in one compiled program (cheaper than two, or than op-by-op)
    out, want = jax.jit(lambda a, b: (lm.response_logprobs(a, ids, mask, 2),
                                      lm.response_logprobs(b, ids, mask, 2)))(frozen, params)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, want, atol=0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_process(process_id, port, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    # (XLA_FLAGS passes on: scale_entry.py sets its own device count and keeps the rest)
    return subprocess.Popen([sys.executable, ENTRY, str(tmp_path), "--process_id", str(process_id),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_two_processes_on_a_2x2x2_mesh_equal_one_device(tmp_path):
    """SFT (2 steps) and PPO (2 iterations: rollout, reward model, separate value network) on a
    2 x 2 x 2 (data x fsdp x tensor) mesh split over two processes with 4 host devices each,
    joined over 127.0.0.1 (gloo), against one device (this process, while they run).

    (One process on a mesh: tests/test_sharding.py, SFT with FSDP over 4 devices, GRPO on
    data x fsdp, DPO on fsdp x tensor.)"""
    port = _free_port()
    procs = [_start_process(i, port, tmp_path) for i in (0, 1)]
    try:
        want = scale_entry.train(str(tmp_path / "single"), mesh=None)
    finally:
        outputs = [p.communicate(timeout=420)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    got = np.load(tmp_path / "multi.npz")
    assert sorted(got.files) == sorted(want)
    assert len(want["sft_loss"]) == 2 and len(want["ppo_loss"]) == 2
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=2e-4, err_msg=key)
