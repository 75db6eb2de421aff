"""SFT step, optimizer factory, gradient accumulation and the shared step helpers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.models import ModelConfig, from_config
from rlhf_jax.train import (
    OptimizerConfig,
    SFTConfig,
    accumulate_gradients,
    check_vocab,
    guarded_apply,
    learning_rate_from_state,
    make_optimizer,
    make_sft_step,
    optimizer_from_config,
    sft_init,
    sft_loss_fn,
    split_micro_batches,
)

V, L, P = 24, 12, 4


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.tiny("gpt2", V, hidden_size=32, num_heads=2, max_position_embeddings=32)
    return from_config(cfg, head="lm", seed=0)


@pytest.fixture(scope="module")
def lm(model):
    return model[0]


@pytest.fixture(scope="module")
def params(model):
    return model[1]


@pytest.fixture(scope="module")
def loss_jit(lm):
    return jax.jit(lambda params, batch: sft_loss_fn(lm, params, batch))


def counting_batch(b, seed):
    """Prompt of P random tokens, then a completion that counts up from the last one.

    Rows have random right padding, so token counts differ between rows.
    """
    rng = np.random.default_rng(seed)
    ids = np.zeros((b, L), np.int32)
    ids[:, :P] = rng.integers(3, V, (b, P))
    ids[:, P:] = (ids[:, P - 1:P] + np.arange(1, L - P + 1)[None, :] - 3) % (V - 3) + 3
    lengths = rng.integers(P + 2, L + 1, b)
    attn = (np.arange(L)[None, :] < lengths[:, None]).astype(np.int32)
    ids = ids * attn
    loss_mask = attn.copy()
    loss_mask[:, :P] = 0
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(attn), "loss_mask": jnp.asarray(loss_mask)}


def reference_nll(lm, params, batch):
    """Slow token-mean cross-entropy over completion tokens, NumPy float64."""
    logits = np.asarray(jax.jit(lm.logits)(params, batch["input_ids"], batch["attention_mask"]), np.float64)
    ids = np.asarray(batch["input_ids"])
    keep = np.asarray(batch["loss_mask"]) * np.asarray(batch["attention_mask"])
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if keep[b, t]:
                z = logits[b, t - 1]
                lse = np.log(np.sum(np.exp(z - z.max()))) + z.max()
                total += lse - z[ids[b, t]]
                count += 1
    return total / count


def test_sft_loss_matches_reference_and_ignores_prompt_tokens(lm, params, loss_jit):
    batch = counting_batch(16, seed=1)
    loss, (aux, weight) = loss_jit(params, batch)
    np.testing.assert_allclose(loss, reference_nll(lm, params, batch), rtol=1e-5)
    keep = np.asarray(batch["loss_mask"]) * np.asarray(batch["attention_mask"])
    assert float(weight) == keep[:, 1:].sum()
    # The loss has no gradient through the targets of prompt tokens: changing the first
    # prompt token's id changes the context but never adds a term; masking everything
    # after the prompt gives a zero loss.
    empty = dict(batch, loss_mask=jnp.zeros_like(batch["loss_mask"]))
    loss0, _ = loss_jit(params, empty)
    assert float(loss0) == 0.0


def test_sft_loss_falls_and_compiles_once(lm, params, loss_jit, count_compiles):
    cfg = SFTConfig(batch_size=16, grad_accum_steps=2, optimizer=OptimizerConfig(learning_rate=3e-3))
    tx = optimizer_from_config(cfg.optimizer)
    state = sft_init(lm, params, tx, seed=0)
    step = jax.jit(make_sft_step(lm, tx, cfg))
    batch = counting_batch(16, seed=2)
    held_out = counting_batch(16, seed=3)
    before = float(loss_jit(state.params, held_out)[0])
    losses = []
    with count_compiles() as compiles:
        for _ in range(25):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    after = float(loss_jit(state.params, held_out)[0])
    assert losses[-1] < 0.6 * losses[0]
    assert after < 0.75 * before  # the rule generalises to unseen prompts
    assert int(state.step) == 25
    assert float(metrics["skipped_nonfinite"]) == 0.0
    np.testing.assert_allclose(metrics["learning_rate"], 3e-3, rtol=1e-6)
    assert compiles["jit(step)"] == 1, compiles


def test_grad_accumulation_equals_full_batch_by_token_count():
    """Micro-batches with very different token counts: weighted sum == one big batch."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 5, 3)), jnp.float32)
    mask = np.zeros((8, 5), np.float32)
    lengths = [1, 1, 1, 1, 5, 5, 4, 5]  # first micro-batch: 4 tokens, second: 19
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    batch = {"x": x, "mask": jnp.asarray(mask)}
    params = {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}

    def loss_fn(p, mb):
        per_token = jnp.tanh(mb["x"] @ p["w"]) ** 2
        n = jnp.sum(mb["mask"])
        loss = jnp.sum(per_token * mb["mask"]) / jnp.maximum(n, 1.0)
        return loss, ({"loss_copy": loss, "peak_max": jnp.max(per_token * mb["mask"])}, n)

    full_loss, full_grads, full_aux, w1 = accumulate_gradients(
        loss_fn, params, split_micro_batches(batch, 1), num_micro=1)
    acc_loss, acc_grads, acc_aux, w2 = jax.jit(
        lambda p, b: accumulate_gradients(loss_fn, p, split_micro_batches(b, 2), num_micro=2))(params, batch)
    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-6)
    np.testing.assert_allclose(acc_grads["w"], full_grads["w"], rtol=1e-5)
    np.testing.assert_allclose(acc_aux["loss_copy"], full_aux["loss_copy"], rtol=1e-6)
    np.testing.assert_allclose(acc_aux["peak_max"], full_aux["peak_max"], rtol=1e-6)
    assert float(w1) == float(w2) == sum(lengths)
    # A plain mean of the two micro-batch gradients would be different here.
    g_a = jax.grad(lambda p: loss_fn(p, jax.tree.map(lambda v: v[:4], batch))[0])(params)["w"]
    g_b = jax.grad(lambda p: loss_fn(p, jax.tree.map(lambda v: v[4:], batch))[0])(params)["w"]
    assert not np.allclose((g_a + g_b) / 2, full_grads["w"], rtol=1e-3)


def test_split_micro_batches_errors():
    with pytest.raises(ValueError, match="grad_accum_steps"):
        split_micro_batches({"x": jnp.zeros((6, 2))}, 4)
    with pytest.raises(ValueError, match="no rows"):
        split_micro_batches({"x": jnp.zeros((0, 2))}, 1)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        SFTConfig(batch_size=6, grad_accum_steps=4)
    with pytest.raises(ValueError, match="loss_agg"):
        SFTConfig(loss_agg="mean")


def test_make_optimizer_schedule_and_decay_mask():
    peak, warm, total = 1e-2, 3, 11
    tx = make_optimizer(peak, warmup_steps=warm, total_steps=total, schedule="cosine",
                        weight_decay=0.1, max_grad_norm=None)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    seen = []
    for _ in range(total):
        updates, state = tx.update(zeros, state, params)
        seen.append(float(learning_rate_from_state(state)))
        # Zero gradients: the update is the decoupled weight decay only, on matrices only.
        np.testing.assert_allclose(updates["b"], 0.0)
        np.testing.assert_allclose(updates["w"], -seen[-1] * 0.1 * np.ones((2, 2)), rtol=1e-5, atol=1e-12)

    def expected(t):
        if t < warm:
            return peak * t / warm
        return peak * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))

    np.testing.assert_allclose(seen, [expected(t) for t in range(total)], rtol=1e-5, atol=1e-9)

    lin = make_optimizer(1.0, warmup_steps=0, total_steps=4, schedule="linear", max_grad_norm=None)
    s = lin.init(params)
    got = []
    for _ in range(4):
        _, s = lin.update(zeros, s, params)
        got.append(float(learning_rate_from_state(s)))
    np.testing.assert_allclose(got, [1.0, 0.75, 0.5, 0.25], rtol=1e-6)


def test_make_optimizer_clips_and_rejects_bad_input():
    tx = make_optimizer(1.0, schedule="constant", max_grad_norm=0.5, b1=0.0, b2=0.0, weight_decay=0.0)
    params = {"w": jnp.zeros((3,))}
    state = tx.init(params)
    grads = {"w": jnp.asarray([3.0, 4.0, 0.0])}
    clipped = optax.clip_by_global_norm(0.5).update(grads, optax.EmptyState())[0]
    np.testing.assert_allclose(optax.global_norm(clipped), 0.5, rtol=1e-6)
    updates, _ = tx.update(grads, state, params)
    # b1 = b2 = 0: Adam's step is the sign of the (clipped) gradient.
    np.testing.assert_allclose(updates["w"], [-1.0, -1.0, 0.0], atol=1e-5)
    with pytest.raises(ValueError, match="schedule"):
        make_optimizer(1e-3, schedule="exp")
    with pytest.raises(ValueError, match="total_steps"):
        make_optimizer(1e-3, schedule="cosine")
    with pytest.raises(ValueError, match="learning_rate"):
        make_optimizer(0.0)


def test_guarded_apply_skips_nonfinite_gradients():
    tx = make_optimizer(0.1, schedule="constant")
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    bad = {"w": jnp.asarray([[1.0, jnp.nan], [0.0, 1.0]])}
    new_params, new_state, applied = jax.jit(lambda g, s, p: guarded_apply(tx, g, s, p))(bad, state, params)
    assert not bool(applied)
    np.testing.assert_array_equal(new_params["w"], params["w"])
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    good = {"w": jnp.ones((2, 2))}
    new_params, _, applied = guarded_apply(tx, good, state, params)
    assert bool(applied) and not np.allclose(new_params["w"], params["w"])


def test_check_vocab(lm):
    class Tok:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    check_vocab(Tok(V), lm)
    check_vocab(Tok(V - 4), lm)  # a padded embedding is fine
    with pytest.raises(ValueError, match=rf"{V + 1} tokens.*only {V} rows"):
        check_vocab(Tok(V + 1), lm)
