"""`batch.share_prompt_forward`: each group's prompt through the trunk once, same numbers.

- `grouped_response_logprobs` equals `LM.response_logprobs` on the repeated rows (log-probs,
  entropies and the gradient), with left-padded prompts and right-padded responses, also
  with LoRA adapters;
- an RL iteration with the option equals one without it (GRPO, one minibatch);
- `evaluate_pass_at_k(share_prompts=True)` gives the greedy results and KL of the plain one;
- the config refuses group sizes that do not fit the micro-batch or the forward chunk.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.errors import ConfigError
from rlhf_jax.eval.passk_eval import evaluate_pass_at_k
from rlhf_jax.models import LoRAConfig, ModelConfig, add_lora, from_config
from rlhf_jax.models.lora import combine
from rlhf_jax.models.shared_prompt import grouped_response_logprobs
from rlhf_jax.train.rl.config import RLBatchConfig
from rlhf_jax.train.rl.presets import rl_config
from rlhf_jax.train.rl.trainer import RLTrainer

V, B, G, P, N = 40, 3, 4, 9, 5


@pytest.fixture(scope="module")
def model():
    # one layer: the prompt's KV cache is shared by the group in every layer alike
    config = ModelConfig.tiny("llama", V, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                              max_position_embeddings=32)
    lm, params = from_config(config, head="lm", seed=1)
    rng = np.random.default_rng(0)
    lengths = np.array([P, 4, 7])
    prompt_mask = (np.arange(P)[None, ::-1] < lengths[:, None]).astype(np.int32)
    prompt_ids = np.where(prompt_mask > 0, rng.integers(3, V, (B, P)), 0)
    response_lengths = rng.integers(1, N + 1, B * G)
    response_mask = (np.arange(N)[None, :] < response_lengths[:, None]).astype(np.int32)
    response_ids = np.where(response_mask > 0, rng.integers(3, V, (B * G, N)), 0)
    ids = np.concatenate([np.repeat(prompt_ids, G, 0), response_ids], 1).astype(np.int32)
    mask = np.concatenate([np.repeat(prompt_mask, G, 0), response_mask], 1).astype(np.int32)
    return lm, params, jnp.asarray(ids), jnp.asarray(mask), response_mask.astype(np.float32)


def test_grouped_logprobs_entropy_and_gradient_equal_the_plain_forward(model):
    lm, params, ids, mask, valid = model
    plain_lp, plain_ent = jax.jit(lambda p: lm.response_logprobs(p, ids, mask, N, temperature=0.7,
                                                                 with_entropy=True))(params)
    lp, ent = jax.jit(lambda p: grouped_response_logprobs(lm, p, ids, mask, N, G, temperature=0.7,
                                                          with_entropy=True))(params)
    np.testing.assert_allclose(np.asarray(lp) * valid, np.asarray(plain_lp) * valid, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ent) * valid, np.asarray(plain_ent) * valid, atol=2e-5)
    assert np.abs(np.asarray(lp) * valid).max() > 1.0  # real log-probs, not a trivial comparison

    weights = jnp.asarray(np.random.default_rng(1).normal(size=valid.shape) * valid, jnp.float32)
    plain = jax.jit(jax.grad(lambda p: jnp.sum(lm.response_logprobs(p, ids, mask, N) * weights)))(params)
    shared = jax.jit(jax.grad(lambda p: jnp.sum(grouped_response_logprobs(lm, p, ids, mask, N, G) * weights)))(params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(shared)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-4)


def test_grouped_logprobs_with_lora_and_a_single_response_token(model):
    lm, params, ids, mask, valid = model
    lora_lm, adapters = add_lora(lm, LoRAConfig(rank=2, alpha=4))
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # B != 0: the adapters change the output
    full = combine(params, adapters)
    grouped = jax.jit(grouped_response_logprobs, static_argnums=(0, 4, 5))
    plain = jax.jit(lambda lm, p, i, m, n: lm.response_logprobs(p, i, m, n), static_argnums=(0, 4))
    np.testing.assert_allclose(np.asarray(grouped(lora_lm, full, ids, mask, N, G)) * valid,
                               np.asarray(plain(lora_lm, full, ids, mask, N)) * valid, atol=2e-5)
    one = ids[:, : P + 1], mask[:, : P + 1]
    np.testing.assert_allclose(np.asarray(grouped(lm, params, *one, 1, G)), np.asarray(plain(lm, params, *one, 1)),
                               atol=2e-5)
    with pytest.raises(ValueError, match="divide"):
        grouped_response_logprobs(lm, params, ids[:-1], mask[:-1], N, G)


def test_iteration_with_shared_prompt_forward_equals_the_plain_one(model):
    lm, params, ids, mask, _ = model
    prompt_ids, prompt_mask = np.asarray(ids[::G, :P]), np.asarray(mask[::G, :P])

    def reward(pids, pmask, tokens, tmask, index):
        return (np.asarray(tokens)[:, 0] % 3 == 0).astype(np.float32)

    results = []
    for share in (False, True):
        cfg = rl_config("grpo", {"batch": {"batch_size": B, "group_size": G, "share_prompt_forward": share},
                                 "sampling": {"max_new_tokens": N, "temperature": 1.0, "eos_token_id": 2}})
        trainer = RLTrainer(lm, cfg, optax.adam(1e-2), reward_fn=reward)
        state = trainer.init(params)
        state, metrics, rollout = trainer.iteration(state, prompt_ids, prompt_mask, ref_params=params)
        results.append((state.params, metrics))
    (plain, m_plain), (shared, m_shared) = results
    assert float(m_plain["advantages_std"]) > 0  # a real update
    for key in ("loss", "kl_k3", "score_mean", "grad_norm", "entropy"):
        np.testing.assert_allclose(float(m_shared[key]), float(m_plain[key]), rtol=1e-4, atol=1e-6, err_msg=key)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(params)))
    assert moved > 1e-3
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(shared)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)  # Adam: ~lr-sized steps


def test_config_keeps_groups_whole():
    RLBatchConfig(batch_size=4, group_size=4, num_minibatches=2, share_prompt_forward=True)
    with pytest.raises(ConfigError, match="multiple of `group_size`"):
        RLBatchConfig(batch_size=4, group_size=4, num_minibatches=8, share_prompt_forward=True)
    with pytest.raises(ConfigError, match="chunk size"):
        RLBatchConfig(batch_size=4, group_size=4, forward_chunk_size=2, share_prompt_forward=True)
    with pytest.raises(ConfigError, match="group_size"):
        RLBatchConfig(batch_size=4, group_size=1, share_prompt_forward=True)
    with pytest.raises(ValueError, match="critic"):
        cfg = rl_config("ppo", {"batch": {"batch_size": 4, "group_size": 2, "num_minibatches": 1,
                                          "share_prompt_forward": True}})
        RLTrainer(from_config(ModelConfig.tiny("llama", V), head="lm+value")[0], cfg, optax.adam(1e-3),
                  reward_fn=lambda *a: np.zeros(8, np.float32))


def test_pass_at_k_with_shared_prompts(model):
    """Greedy samples do not depend on the random numbers: sharing the prompts changes nothing
    but the work."""
    lm, params, ids, mask, _ = model
    prompt_ids, prompt_mask = np.asarray(ids[::G, :P]), np.asarray(mask[::G, :P])
    other = jax.tree.map(lambda x: x * 1.1, params)  # a "policy" that differs from the reference

    def verifier(pids, pmask, tokens, tmask, index):
        return (np.asarray(tokens)[:, 0] % 2 == 0).astype(np.float32)

    common = dict(n_samples=4, max_new_tokens=N, key=jax.random.key(0), eos_token_id=2, batch_size=8,
                  ref=(lm, params), num_bootstrap=10)
    plain = evaluate_pass_at_k({"m": (lm, other)}, prompt_ids, prompt_mask, verifier, temperature=0.0, **common)
    shared = evaluate_pass_at_k({"m": (lm, other)}, prompt_ids, prompt_mask, verifier, temperature=0.0,
                                share_prompts=True, **common)
    a, b = plain["models"]["m"], shared["models"]["m"]
    assert a["correct_per_prompt"] == b["correct_per_prompt"] and a["examples"] == b["examples"]
    assert abs(a["kl_to_ref"]["mean"]) > 1e-2
    np.testing.assert_allclose(b["kl_to_ref"]["mean"], a["kl_to_ref"]["mean"], rtol=1e-4)
    with pytest.raises(ValueError, match="multiple of `n_samples`"):
        evaluate_pass_at_k({"m": (lm, other)}, prompt_ids, prompt_mask, verifier, share_prompts=True,
                           **{**common, "batch_size": 6})
