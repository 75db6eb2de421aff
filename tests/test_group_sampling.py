"""`generate(num_samples=G)`: each prompt prefilled once, its KV cache shared by its G samples.

- greedy: all G samples equal the single-sample output;
- sampled: the same rows as repeating the prompts G times (same key), and the reported
  log-probs equal a fresh forward's;
- prefill work: the compiled program with a shared prefill does fewer FLOPs than with
  repeated prompts, by about the prefill's (G - 1) / G share.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import ModelConfig, from_config
from rlhf_jax.rollout import _generate_jit, generate

V, B, G, P, N = 32, 3, 4, 12, 5
EOS = 2


@pytest.fixture(scope="module")
def model():
    config = ModelConfig.tiny("llama", V, hidden_size=32, num_heads=4, num_kv_heads=2, max_position_embeddings=32)
    lm, params = from_config(config, head="lm", seed=3)
    rng = np.random.default_rng(0)
    lengths = np.array([P, 5, 9])
    mask = (np.arange(P)[None, ::-1] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(3, V, (B, P)), 0).astype(np.int32)
    return lm, params, ids, mask


def test_greedy_group_equals_single_sample(model):
    lm, params, ids, mask = model
    single = generate(lm, params, ids, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0, eos_token_id=EOS)
    group = generate(lm, params, ids, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0, eos_token_id=EOS,
                     num_samples=G)
    assert group.tokens.shape == (B * G, N)
    for name in ("tokens", "mask", "ended_with_eos"):
        np.testing.assert_array_equal(np.asarray(getattr(group, name)),
                                      np.repeat(np.asarray(getattr(single, name)), G, axis=0), err_msg=name)
    np.testing.assert_allclose(group.logprobs, np.repeat(np.asarray(single.logprobs), G, axis=0), atol=1e-5)


def test_sampled_group_equals_repeated_prompts_and_a_fresh_forward(model):
    lm, params, ids, mask = model
    key = jax.random.key(7)
    group = generate(lm, params, ids, mask, key, max_new_tokens=N, temperature=1.0, num_samples=G)
    rep_ids, rep_mask = np.repeat(ids, G, axis=0), np.repeat(mask, G, axis=0)
    repeated = generate(lm, params, rep_ids, rep_mask, key, max_new_tokens=N, temperature=1.0)
    np.testing.assert_array_equal(np.asarray(group.tokens), np.asarray(repeated.tokens))
    np.testing.assert_allclose(group.logprobs, repeated.logprobs, atol=1e-5)
    # The G samples of a prompt differ (they are independent draws, not copies).
    tokens = np.asarray(group.tokens).reshape(B, G, N)
    assert all(len({tuple(t) for t in tokens[i]}) > 1 for i in range(B))
    full = jnp.concatenate([rep_ids, group.tokens], axis=1)
    full_mask = jnp.concatenate([rep_mask, group.mask.astype(jnp.int32)], axis=1)
    fresh = jax.jit(lambda p, i, m: lm.response_logprobs(p, i, m, N, temperature=1.0))(params, full, full_mask)
    np.testing.assert_allclose(np.asarray(group.logprobs), np.asarray(fresh) * np.asarray(group.mask), atol=1e-5)


def test_shared_prefill_does_less_work(model):
    lm, params, ids, mask = model
    knobs = {"temperature": np.float32(1.0), "top_p": np.float32(1.0), "eos_token_id": np.int32(-1),
             "pad_token_id": np.int32(0)}
    structure = dict(max_new_tokens=1, greedy=False, top_k=0, use_top_p=False, has_eos=False)

    def flops(prompt_ids, prompt_mask, num_samples):
        lowered = _generate_jit.lower(lm, params, prompt_ids, prompt_mask, jax.random.key(0), knobs,
                                      num_samples=num_samples, **structure)
        cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])

    shared = flops(ids, mask, G)
    repeated = flops(np.repeat(ids, G, axis=0), np.repeat(mask, G, axis=0), 1)
    single = flops(ids, mask, 1)
    # N = 1: the program is the prefill plus one head; shared ~ single, repeated ~ G x single.
    assert shared < 0.5 * repeated, (shared, repeated)
    assert shared < 1.5 * single, (shared, single)
