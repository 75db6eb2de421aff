"""The chunked LM head: log-probs, entropies and argmax hits equal the unchunked ones (values
and gradients), and no [B, T, V] float32 array is compiled into the SFT step's gradient
(memory_analysis on a tiny-width model with a large vocabulary)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.core import ops
from rlhf_jax.models import ModelConfig, from_config
from rlhf_jax.train.sft import sft_loss_fn


def _unchunked(hidden, tokens, table, temperature):
    logits = jnp.einsum("btd,vd->btv", hidden, table)
    return {"logprobs": ops.token_logprobs(logits, tokens, temperature=temperature),
            "entropy": ops.token_entropy(logits, temperature=temperature),
            "correct": (jnp.argmax(logits, -1) == tokens).astype(jnp.float32)}


def _objective(stats, weights):
    return jnp.sum(stats["logprobs"] * weights) + jnp.sum(stats["entropy"] * weights[::-1])


# The reference and its gradient, jitted once for every chunk size below.
_unchunked_jit = jax.jit(_unchunked, static_argnames="temperature")
_unchunked_grad = jax.jit(jax.grad(lambda h, w, tokens, weights: _objective(_unchunked(h, tokens, w, 0.7), weights),
                                   argnums=(0, 1)))


# 3 x 20 = 60 positions: a ragged last chunk of several, several exact chunks, one chunk
@pytest.mark.parametrize("chunk_size", [7, 20, 1000])
def test_chunked_stats_equal_unchunked_values_and_gradients(chunk_size):
    rs = np.random.default_rng(0)
    b, t, d, v = 3, 20, 8, 50
    hidden = jnp.asarray(rs.standard_normal((b, t, d)), jnp.float32)
    table = jnp.asarray(rs.standard_normal((v, d)), jnp.float32)
    tokens = jnp.asarray(rs.integers(0, v, (b, t)), jnp.int32)
    weights = jnp.asarray(rs.standard_normal((b, t)), jnp.float32)

    def chunked(h, w):
        return ops.chunked_token_stats(h, tokens, lambda x: x @ w.T, chunk_size=chunk_size, temperature=0.7,
                                       with_entropy=True, with_accuracy=True)

    got = jax.jit(chunked)(hidden, table)
    want = _unchunked_jit(hidden, tokens, table, temperature=0.7)
    assert set(got) == {"logprobs", "entropy", "correct"}
    for k in want:
        assert got[k].shape == (b, t) and got[k].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-5)
    assert set(np.unique(np.asarray(got["correct"]))) <= {0.0, 1.0}

    g_got = jax.jit(jax.grad(lambda h, w: _objective(chunked(h, w), weights), argnums=(0, 1)))(hidden, table)
    g_want = _unchunked_grad(hidden, table, tokens, weights)
    for a, c in zip(g_got, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        ops.chunked_token_stats(hidden, tokens, lambda x: x @ table.T, chunk_size=0)


def test_sft_step_gradient_never_holds_full_logits():
    """Width 16, vocab 16384, 2 x 256 tokens: full f32 logits would be 32 MiB; with chunks of
    16 tokens the compiled gradient's temporaries stay far below one copy of them, while the
    unchunked reference needs several. Loss, accuracy and gradients agree."""
    vocab, b, t = 16384, 2, 256
    cfg = ModelConfig.tiny("llama", vocab, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                           intermediate_size=32, max_position_embeddings=t, initializer_range=0.5)
    lm, params = from_config(cfg, seed=0)
    lm = dataclasses.replace(lm, logits_chunk_size=16)
    rs = np.random.default_rng(1)
    batch = {"input_ids": jnp.asarray(rs.integers(0, vocab, (b, t)), jnp.int32),
             "attention_mask": jnp.ones((b, t), jnp.int32),
             "loss_mask": jnp.asarray(np.arange(t)[None, :] >= 16, jnp.int32) * jnp.ones((b, 1), jnp.int32)}

    def chunked(params):
        loss, (aux, _) = sft_loss_fn(lm, params, batch)
        return loss, aux

    def unchunked(params):
        logits = lm.logits(params, batch["input_ids"], batch["attention_mask"])[:, :-1]
        targets = batch["input_ids"][:, 1:]
        mask = (batch["loss_mask"] * batch["attention_mask"])[:, 1:].astype(jnp.float32)
        nll = -ops.token_logprobs(logits, targets)
        acc = ops.masked_mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32), mask)
        return ops.masked_mean(nll, mask), {"token_accuracy": acc}

    full_logits_bytes = b * t * vocab * 4
    temps = {}
    results = {}
    for name, fn in (("chunked", chunked), ("unchunked", unchunked)):
        # run what was measured: one compilation (a call of the jitted function would compile again)
        compiled = jax.jit(jax.value_and_grad(fn, has_aux=True)).lower(params).compile()
        temps[name] = compiled.memory_analysis().temp_size_in_bytes
        results[name] = compiled(params)
    assert temps["chunked"] < full_logits_bytes / 4, temps
    assert temps["unchunked"] > 2 * full_logits_bytes, temps
    (loss_c, aux_c), grads_c = results["chunked"]
    (loss_u, aux_u), grads_u = results["unchunked"]
    np.testing.assert_allclose(float(loss_c), float(loss_u), rtol=1e-5)
    np.testing.assert_allclose(float(aux_c["token_accuracy"]), float(aux_u["token_accuracy"]), atol=1e-6)
    for a, c in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_u)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-6)
