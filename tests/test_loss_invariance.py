"""Loss normalisation: one update's gradient is the same with 1 or 4 micro-batches and on 1 or 4 devices.

One test per offline loss (SFT token-mean, Bradley-Terry, DPO). The rows have random
lengths, so micro-batches hold different numbers of tokens: a loss averaged per
micro-batch and then averaged again would differ. The optimizer is SGD with rate 1,
so `params - new_params` is the gradient itself. The 4 host devices come from
conftest.py (XLA_FLAGS=--xla_force_host_platform_device_count=4).

The two splits are compared with each other, the whole batch on 4 devices against 4
micro-batches on one: a wrong micro-batch normaliser moves the second, anything that depends
on the device split the first. (The whole batch on one device computes what the sharded run
does by `jit`'s semantics; sharded drivers are compared with one device in
tests/test_sharding.py.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.models import ModelConfig, from_config
from rlhf_jax.train import (
    DPOConfig,
    RewardConfig,
    SFTConfig,
    init_train_state,
    make_dpo_step,
    make_reward_step,
    make_sft_step,
)
from rlhf_jax.train.sharding import make_mesh, replicated, shard_batch

V, L, B = 24, 10, 8
# (micro-batches, devices); the first is the reference
SPLITS = [(1, 4), (4, 1)]


def _lm(head):
    cfg = ModelConfig.tiny("gpt2", V, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16)
    return from_config(cfg, head=head, seed=0)


def _rows(rng, n):
    """Right-padded random sequences, their attention mask and a completion mask after a random prompt."""
    lengths = rng.integers(3, L + 1, n)
    prompts = rng.integers(1, 3, n)
    pos = np.arange(L)[None, :]
    attn = (pos < lengths[:, None]).astype(np.int32)
    ids = np.where(attn > 0, rng.integers(3, V, (n, L)), 0).astype(np.int32)
    return ids, attn, attn * (pos >= prompts[:, None]).astype(np.int32)


def _sft_batch(rng):
    ids, attn, loss_mask = _rows(rng, B)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def _pair_batch(rng, *, dpo):
    out = {}
    for side in ("chosen", "rejected"):
        ids, attn, loss_mask = _rows(rng, B)
        out.update({f"{side}_ids": ids, f"{side}_mask": attn})
        if dpo:
            out[f"{side}_loss_mask"] = loss_mask
            out[f"ref_{side}_logps"] = rng.normal(-20.0, 3.0, B).astype(np.float32)
    return out


def _one_update(make_step, model, params, cfg, batch, devices):
    tx = optax.sgd(1.0)
    state = init_train_state(params, tx)
    step = make_step(model, tx, cfg)
    if devices == 1:
        new_state, metrics = jax.jit(step)(state, {k: jnp.asarray(v) for k, v in batch.items()})
    else:
        mesh = make_mesh(data=devices, fsdp=1)
        state = jax.device_put(state, replicated(mesh))
        new_state, metrics = jax.jit(step)(state, shard_batch(batch, mesh))
    grads = jax.tree.map(lambda old, new: np.asarray(old) - np.asarray(new), params, new_state.params)
    return grads, float(metrics["loss"])


def _assert_invariant(make_step, model, params, make_cfg, batch):
    assert jax.device_count() >= 4
    results = {split: _one_update(make_step, model, params, make_cfg(split[0]), batch, split[1])
               for split in SPLITS}
    want_grads, want_loss = results[SPLITS[0]]
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads)) > 1e-4  # a real gradient
    for split, (grads, loss) in results.items():
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=str(split))
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=f"(micro, devices) = {split}")


def test_sft_gradient_is_invariant_to_micro_batches_and_devices():
    lm, params = _lm("lm")
    batch = _sft_batch(np.random.default_rng(0))
    _assert_invariant(make_sft_step, lm, params,
                      lambda micro: SFTConfig(batch_size=B, grad_accum_steps=micro, loss_agg="token-mean"), batch)


def test_reward_gradient_is_invariant_to_micro_batches_and_devices():
    rm, params = _lm("scalar")
    batch = _pair_batch(np.random.default_rng(1), dpo=False)
    _assert_invariant(make_reward_step, rm, params,
                      lambda micro: RewardConfig(batch_size=B, grad_accum_steps=micro), batch)


def test_dpo_gradient_is_invariant_to_micro_batches_and_devices():
    lm, params = _lm("lm")
    batch = _pair_batch(np.random.default_rng(2), dpo=True)
    _assert_invariant(make_dpo_step, lm, params,
                      lambda micro: DPOConfig(batch_size=B, grad_accum_steps=micro, beta=0.1), batch)
