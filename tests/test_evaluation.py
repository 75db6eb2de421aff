"""Tests for pass@k evaluation (rlhf_jax.eval.passk_eval) on tiny random models."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.eval.passk_eval import default_ks, evaluate_pass_at_k, format_table, write_eval
from rlhf_jax.models import ModelConfig, from_config

VOCAB = 16
EOS = 1


@pytest.fixture(scope="module")
def models():
    cfg = ModelConfig.tiny("gpt2", VOCAB, hidden_size=32, num_layers=1, num_heads=2, max_position_embeddings=32)
    lm, params = from_config(cfg, head="lm", seed=0)
    # Large random changes make the two policies clearly different distributions (NumPy draws:
    # no compilation per parameter shape).
    rng = np.random.default_rng(1)
    other = jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.5 * rng.standard_normal(x.shape), x.dtype), params)
    return lm, params, other


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, VOCAB, size=(6, 5))
    mask = np.ones_like(ids)
    mask[:3, :2] = 0  # some left padding
    ids[mask == 0] = 0
    return ids, mask


def _first_token_even(prompt_ids, prompt_mask, tokens, mask, prompt_index):
    return (tokens[:, 0] % 2 == 0).astype(np.float32)


def _comb_pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_default_ks():
    assert default_ks(64) == [1, 2, 4, 8, 16, 32, 64]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(1) == [1]


# Shared settings: every call below with them reuses one compiled sampler
# (batches of 24 rows of [prompt (5) | 2 new tokens]).
BASIC = dict(max_new_tokens=2, batch_size=24, eos_token_id=EOS, num_bootstrap=100)


@pytest.fixture(scope="module")
def basic_results(models, prompts):
    lm, params, other = models
    ids, mask = prompts
    # 6 prompts x 10 samples = 60 rows: three batches of 24, the last one wrapped.
    return evaluate_pass_at_k(
        # The second model is an equal LM value but another object: the sampler is shared.
        {"sft": (lm, params), "ppo": (dataclasses.replace(lm), other)}, ids, mask, _first_token_even,
        n_samples=10, key=jax.random.key(0), **BASIC,
    )


def test_pass_at_k_matches_math_comb(basic_results, prompts):
    n = 10
    res = basic_results
    assert res["settings"]["ks"] == [1, 2, 4, 8, 10]
    # Two models, equal LM values, fixed batch shape: at most one compilation.
    assert res["settings"]["sampler_compilations"] <= 1
    for entry in res["models"].values():
        counts = entry["correct_per_prompt"]
        assert len(counts) == len(prompts[0]) and all(0 <= c <= n for c in counts)
        for k in range(1, n + 1):
            want = np.mean([_comb_pass_at_k(n, c, k) for c in counts])
            assert entry["curve"]["mean"][k - 1] == pytest.approx(want, abs=1e-12)
            assert entry["curve"]["lower"][k - 1] <= want + 1e-12 <= entry["curve"]["upper"][k - 1] + 2e-12
        assert entry["accuracy"] == pytest.approx(entry["pass_at_k"]["1"])
        assert 0 < entry["response_length"] <= 2
        assert 0 <= entry["eos_fraction"] <= 1
    # The two parameter sets really were sampled separately.
    assert res["models"]["sft"]["examples"] != res["models"]["ppo"]["examples"]


def test_verifier_sees_the_right_prompt_for_every_sample(models, prompts):
    lm, params, _ = models
    ids, mask = prompts
    index = np.array([10, 11, 12, 13, 14, 15])
    seen = []

    def even_rows_only(prompt_ids, prompt_mask, tokens, response_mask, prompt_index):
        seen.append((prompt_ids.copy(), prompt_index.copy(), tokens.shape))
        return (prompt_index % 2 == 0).astype(np.float32)

    res = evaluate_pass_at_k(
        {"m": (lm, params)}, ids, mask, even_rows_only, n_samples=4,
        key=jax.random.key(3), prompt_index=index, **BASIC,
    )
    entry = res["models"]["m"]
    assert entry["correct_per_prompt"] == [4, 0, 4, 0, 4, 0]
    assert entry["pass_at_k"]["4"] == pytest.approx(0.5)
    (got_ids, got_index, shape), = seen
    np.testing.assert_array_equal(got_index, np.repeat(index, 4))
    np.testing.assert_array_equal(got_ids, np.repeat(ids, 4, axis=0))
    assert shape == (24, 2)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _exact_one_token_kl(lm, p_params, q_params, ids, mask):
    """KL(p || q) of the next-token distributions after each prompt, and the variance of log p/q."""
    logits = jax.jit(lm.logits)  # one compilation for both parameter sets
    logp = _np_log_softmax(np.asarray(logits(p_params, jnp.asarray(ids), jnp.asarray(mask))[:, -1], np.float64))
    logq = _np_log_softmax(np.asarray(logits(q_params, jnp.asarray(ids), jnp.asarray(mask))[:, -1], np.float64))
    p = np.exp(logp)
    ratio = logp - logq
    kl = (p * ratio).sum(-1)
    var = (p * ratio**2).sum(-1) - kl**2
    return kl, var


def test_kl_to_reference_reward_model_and_scorers(models, prompts):
    lm, params, other = models
    ids, mask = prompts
    rm, rm_params = lm.with_head("scalar", params, seed=2)
    n = 128

    def response_length(prompt_ids, prompt_mask, tokens, response_mask, prompt_index):
        return response_mask.sum(axis=1)

    res = evaluate_pass_at_k(
        {"same": (lm, params), "other": (lm, other)}, ids, mask, _first_token_even,
        n_samples=n, max_new_tokens=1, key=jax.random.key(5), ref=(lm, params),
        reward_model=(rm, rm_params), scorers={"length": response_length}, batch_size=256,
        num_bootstrap=20, num_examples=n * len(ids),
    )
    same, diff = res["models"]["same"], res["models"]["other"]
    # KL of a model to itself is exactly zero sample by sample.
    assert abs(same["kl_to_ref"]["mean"]) < 1e-5 and same["kl_to_ref"]["std"] < 1e-5
    # Against the exact one-token KL, within 4 standard errors of the k1 estimate.
    kl, var = _exact_one_token_kl(lm, other, params, ids, mask)
    stderr = math.sqrt(var.mean() / n / len(ids)) + 1e-6
    assert kl.mean() > 0.05
    assert abs(diff["kl_to_ref"]["mean"] - kl.mean()) < 4 * stderr
    # Host scorers are averaged over all samples.
    assert same["length"]["mean"] == pytest.approx(1.0)
    # The reward model's score is its score on [prompt | sampled response].
    tokens = np.array(diff["examples"])
    full_ids = np.concatenate([np.repeat(ids, n, axis=0), tokens], axis=1)
    full_mask = np.concatenate([np.repeat(mask, n, axis=0), np.ones_like(tokens)], axis=1)
    want = np.asarray(jax.jit(rm.scores)(rm_params, jnp.asarray(full_ids), jnp.asarray(full_mask)))
    assert diff["rm_score"]["mean"] == pytest.approx(float(want.mean()), rel=1e-4, abs=1e-5)
    assert diff["rm_score"]["std"] == pytest.approx(float(want.std()), rel=1e-3, abs=1e-5)


def test_bad_arguments_are_errors(models, prompts):
    lm, params, _ = models
    ids, mask = prompts
    kw = dict(n_samples=4, key=jax.random.key(0), **BASIC)
    with pytest.raises(ValueError, match="k must be"):
        evaluate_pass_at_k({"m": (lm, params)}, ids, mask, _first_token_even, ks=[8], **kw)
    with pytest.raises(ValueError, match="prompt_mask"):
        evaluate_pass_at_k({"m": (lm, params)}, ids, mask[:, :2], _first_token_even, **kw)
    with pytest.raises(ValueError, match="empty"):
        evaluate_pass_at_k({}, ids, mask, _first_token_even, **kw)
    with pytest.raises(ValueError, match="verifier"):
        evaluate_pass_at_k({"m": (lm, params)}, ids, mask, lambda *a: np.zeros(3), **kw)


def test_write_eval_writes_json_plot_and_table(basic_results, tmp_path, capsys):
    res = basic_results
    paths = write_eval(res, str(tmp_path))
    printed = capsys.readouterr().out
    assert "sft" in printed and "ppo" in printed and "pass@10" in printed
    assert json.loads(open(paths["json"]).read())["models"]["ppo"]["pass_at_k"] == res["models"]["ppo"]["pass_at_k"]
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = format_table(res).splitlines()
    assert table[0].startswith("model") and table[2].startswith("sft")
