"""PPOTrainer end to end on a tiny GPT-2 policy with a programmatic reward.

One trainer (shared-trunk "lm+value" policy, host reward function) is compiled once
for the module and reused: the KL coefficient and controller live in the state, so the
"large kl_coef" and adaptive-controller tests only change the initial state. A second
trainer covers the reward-model + separate value network path.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ppo_config

from rlhf_jax.core.kl import kl_controller_init
from rlhf_jax.models import ModelConfig, from_config
from rlhf_jax.train import PPOBatch, PPOTrainer, optimizer_from_config, ppo_minibatch_loss

V, B, P, N = 16, 16, 4, 8
PAD, EOS, TARGET = 0, 2, 5
CTX = 32


class TargetReward:
    """Fraction of valid response tokens equal to TARGET; can be told to return NaN."""

    def __init__(self):
        self.nan = False
        self.calls = []

    def __call__(self, prompt_ids, prompt_mask, tokens, mask, prompt_index):
        assert isinstance(tokens, np.ndarray) and tokens.shape == (B, N)
        self.calls.append(prompt_index)
        scores = ((tokens == TARGET) * mask).sum(1) / np.maximum(mask.sum(1), 1)
        if self.nan == "all":
            scores = np.full_like(scores, np.nan)
        elif self.nan:
            scores = scores.copy()
            scores[3] = np.nan
        return scores


def make_cfg(**kw):
    base = dict(batch_size=B, num_minibatches=2, ppo_epochs=4, grad_accum_steps=1, max_new_tokens=N,
                temperature=1.0, eos_token_id=EOS, pad_token_id=PAD, learning_rate=2e-3, kl_coef=0.02,
                vf_coef=0.1, schedule="constant")
    base.update(kw)
    return ppo_config(**base)


@pytest.fixture(scope="module")
def model_config():
    return ModelConfig.tiny("gpt2", V, hidden_size=32, num_heads=2, max_position_embeddings=CTX)


@pytest.fixture(scope="module")
def setup(model_config):
    policy, params = from_config(model_config, head="lm+value", seed=0)
    reward = TargetReward()
    cfg = make_cfg()
    trainer = PPOTrainer(policy, cfg, optimizer_from_config(cfg.optimizer), reward_fn=reward)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, V, (B, P)).astype(np.int32)
    prompt_mask = np.ones((B, P), np.int32)
    prompt_mask[:4, :2] = 0  # some left padding
    prompts = prompts * prompt_mask
    return policy, params, trainer, reward, prompts, prompt_mask


def run(trainer, state, params, prompts, prompt_mask, iterations):
    history = []
    for i in range(iterations):
        state, metrics, rollout = trainer.iteration(
            state, prompts, prompt_mask, ref_params=params, prompt_index=np.arange(B) + i)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history, rollout


def test_ppo_raises_reward_with_bounded_kl_and_compiles_once(setup, count_compiles):
    policy, params, trainer, reward, prompts, prompt_mask = setup
    state = trainer.init(params)
    with count_compiles() as compiles:
        state, hist, rollout = run(trainer, state, params, prompts, prompt_mask, 20)
    first = np.mean([h["score_mean"] for h in hist[:2]])
    last = np.mean([h["score_mean"] for h in hist[-3:]])
    assert first < 0.2
    assert last > 0.55 and last > first + 0.45, (first, last)
    kl = [h["kl_k1"] for h in hist]
    assert kl[0] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    assert all(np.isfinite(kl)) and max(kl) < N * np.log(V)  # bounded drift: 8 tokens of a 16-way choice
    assert all(h["skipped_nonfinite"] == 0.0 for h in hist)
    assert int(state.step) == 20
    # Every phase compiled exactly once for the fixed shapes.
    assert compiles["jit(_rollout)"] == 1 and compiles["jit(_update)"] == 1, compiles
    # The metrics the driver and benchmark read are there and finite.
    for key in ("score_std", "kl_k3", "entropy", "non_score_reward", "clipfrac", "approx_kl", "policy_loss",
                "value_loss", "value_clipfrac", "ratio_mean", "ratio_max", "response_length", "eos_fraction",
                "kl_coef", "returns_mean", "advantages_mean", "advantages_std", "grad_norm", "learning_rate",
                "time/rollout", "time/score", "time/update", "tokens_per_s"):
        assert np.isfinite(hist[-1][key]), key
    assert hist[-1]["learning_rate"] == pytest.approx(2e-3)
    # The reward function saw the data-set indices; the rollout respects the mask contract.
    np.testing.assert_array_equal(reward.calls[-1], np.arange(B) + 19)
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    assert np.all(tokens[mask == 0] == PAD)
    # Sampling and training forward agree (same temperature-scaled logits).
    assert hist[-1]["logprob_sampling_diff"] < 1e-4


def test_large_kl_coef_keeps_policy_near_reference(setup):
    policy, params, trainer, reward, prompts, prompt_mask = setup
    state = trainer.init(params)
    state = state.replace(kl_ctl=kl_controller_init(5.0))
    state, hist, _ = run(trainer, state, params, prompts, prompt_mask, 10)
    assert max(h["kl_k1"] for h in hist) < 1.0  # vs ~10-18 nats with kl_coef=0.02
    assert np.mean([h["score_mean"] for h in hist[-3:]]) < 0.3
    assert hist[-1]["kl_coef"] == pytest.approx(5.0)  # fixed controller


def test_adaptive_kl_controller_moves_the_coefficient(setup):
    policy, params, trainer, reward, prompts, prompt_mask = setup
    target, horizon = 0.2, 64
    state = trainer.init(params)
    state = state.replace(kl_ctl=kl_controller_init(0.05, target=target, horizon=horizon))
    state, hist, _ = run(trainer, state, params, prompts, prompt_mask, 4)
    coefs = [h["kl_coef"] for h in hist] + [float(state.kl_ctl.kl_coef)]
    for i, h in enumerate(hist):  # Ziegler et al.: beta *= 1 + clip(KL/target - 1, +-0.2) * n / horizon
        err = np.clip(h["kl_k1"] / target - 1.0, -0.2, 0.2)
        assert coefs[i + 1] == pytest.approx(coefs[i] * (1 + err * B / horizon), rel=1e-5)
    assert coefs[-1] != coefs[0]


def test_nonfinite_reward_masks_its_rows_and_all_nonfinite_skips_the_update(setup):
    policy, params, trainer, reward, prompts, prompt_mask = setup
    state = trainer.init(params, seed=3)
    state, _, _ = run(trainer, state, params, prompts, prompt_mask, 1)
    before = jax.device_get(state)
    # One NaN row: masked out of this update, the others still learn.
    reward.nan = True
    try:
        masked, metrics, _ = trainer.iteration(state, prompts, prompt_mask, ref_params=params)
    finally:
        reward.nan = False
    assert float(metrics["reward/nonfinite_rows"]) == 1.0 and float(metrics["skipped_nonfinite"]) == 0.0
    assert float(metrics["loss_rows"]) == B - 1
    assert np.isfinite(float(metrics["score_mean"])) and np.isfinite(float(metrics["policy_loss"]))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(masked.params), jax.tree.leaves(before.params))]
    assert any(changed)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(masked.params))
    # Every row NaN: nothing to learn from, the update is skipped.
    state = trainer.init(params, seed=3)
    state, _, _ = run(trainer, state, params, prompts, prompt_mask, 1)
    reward.nan = "all"
    try:
        after, metrics, _ = trainer.iteration(state, prompts, prompt_mask, ref_params=params)
    finally:
        reward.nan = False
    assert float(metrics["skipped_nonfinite"]) == 1.0 and float(metrics["reward/nonfinite_rows"]) == B
    for name in ("params", "opt_state", "kl_ctl"):
        for a, b in zip(jax.tree.leaves(getattr(after, name)), jax.tree.leaves(getattr(before, name))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert int(after.step) == int(before.step) + 1
    # The rng advanced exactly as in a normal iteration.
    expected_rng = jax.random.split(before.rng, 3)[0]
    np.testing.assert_array_equal(jax.random.key_data(after.rng), jax.random.key_data(expected_rng))
    # Training resumes with finite scores.
    resumed, metrics, _ = trainer.iteration(after, prompts, prompt_mask, ref_params=params)
    assert float(metrics["skipped_nonfinite"]) == 0.0
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(after.params))]
    assert any(changed)


def test_same_seed_same_run(setup):
    policy, params, trainer, reward, prompts, prompt_mask = setup
    runs = []
    for _ in range(2):
        state = trainer.init(params, seed=7)
        _, hist, rollout = run(trainer, state, params, prompts, prompt_mask, 2)
        runs.append(([{k: v for k, v in h.items() if not k.startswith("time/") and "per_s" not in k}
                      for h in hist], np.asarray(rollout.tokens)))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_bad_input_errors(setup, model_config):
    policy, params, trainer, reward, prompts, prompt_mask = setup
    state = trainer.init(params)
    with pytest.raises(ValueError, match="empty"):
        trainer.iteration(state, prompts[:0], prompt_mask[:0], ref_params=params)
    with pytest.raises(ValueError, match="batch_size"):
        trainer.iteration(state, prompts[:8], prompt_mask[:8], ref_params=params)
    long = np.ones((B, CTX - N + 1), np.int32)
    with pytest.raises(ValueError, match="max_new_tokens.*context length 32"):
        trainer.iteration(state, long, long, ref_params=params)
    with pytest.raises(ValueError, match="prompt_mask"):
        trainer.iteration(state, prompts, prompt_mask[:, :2], ref_params=params)
    with pytest.raises(ValueError, match="vocab_size=16"):
        trainer.iteration(state, prompts + V, prompt_mask, ref_params=params)
    with pytest.raises(ValueError, match="num_minibatches.*grad_accum_steps"):
        make_cfg(batch_size=12, num_minibatches=4, grad_accum_steps=2)
    with pytest.raises(ValueError, match="kl_estimator"):
        make_cfg(kl_estimator="k4")
    with pytest.raises(ValueError, match="exactly one of `reward_model` and `reward_fn`"):
        PPOTrainer(policy, make_cfg(), optimizer_from_config(make_cfg().optimizer))
    lm_only, _ = from_config(model_config, head="lm", seed=0)
    with pytest.raises(ValueError, match="lm\\+value"):
        PPOTrainer(lm_only, make_cfg(), optimizer_from_config(make_cfg().optimizer), reward_fn=reward)


def test_reward_model_and_separate_value_network(setup, model_config, count_compiles):
    """Score phase on device with a reward model; value network initialised from it (N+).

    The policy is the module's (its own value head then goes unused), so the compiled
    sampler is shared.
    """
    policy, params = setup[:2]
    rm, rm_params = from_config(model_config, head="scalar", seed=5)
    cfg = make_cfg(num_minibatches=1, ppo_epochs=1, missing_eos_penalty=1.0,
                   value_learning_rate=1e-2)
    trainer = PPOTrainer(policy, cfg, optimizer_from_config(cfg.optimizer), value_model=rm,
                         value_tx=optimizer_from_config(cfg.value_optimizer_config), reward_model=rm)
    state = trainer.init(params, rm_params)
    rng = np.random.default_rng(1)
    prompts = rng.integers(3, V, (B, P)).astype(np.int32)
    prompt_mask = np.ones((B, P), np.int32)
    with pytest.raises(ValueError, match="reward_params"):
        trainer.iteration(state, prompts, prompt_mask, ref_params=params)
    old_state = jax.device_get(state)  # the update donates `state`
    with count_compiles() as compiles:
        new, metrics, rollout = trainer.iteration(state, prompts, prompt_mask, ref_params=params,
                                                  reward_params=rm_params)
    ids = jnp.concatenate([jnp.asarray(prompts), rollout.tokens], axis=1)
    mask = jnp.concatenate([jnp.asarray(prompt_mask), rollout.mask.astype(jnp.int32)], axis=1)
    scores = np.asarray(jax.jit(rm.scores)(rm_params, ids, mask))
    np.testing.assert_allclose(float(metrics["score_mean"]), scores.mean(), rtol=1e-5, atol=1e-6)
    assert float(metrics["skipped_nonfinite"]) == 0.0
    assert np.isfinite(float(metrics["value_grad_norm"]))
    for name in ("params", "value_params"):
        old, upd = jax.tree.leaves(getattr(old_state, name)), jax.tree.leaves(getattr(new, name))
        assert any(not np.array_equal(a, b) for a, b in zip(old, upd)), name
    # The sampler is shared with the module's trainer when that one ran first (same policy
    # value and sampling settings); score and update are this trainer's own.
    assert compiles["jit(_rollout)"] <= 1, compiles
    assert compiles["jit(_score)"] == 1 and compiles["jit(_update)"] == 1, compiles


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_minibatch_loss_entropy_bonus_and_dual_clip(agg):
    """The loss options against a plain NumPy formula (no model involved)."""
    rng = np.random.default_rng(4)
    b, n = 6, 5
    lengths = np.array([1, 5, 3, 2, 5, 4])
    mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float64)
    old_lp = -rng.gamma(2.0, 0.5, (b, n))
    lp = old_lp + rng.normal(0, 0.6, (b, n))
    adv = rng.normal(0, 1, (b, n)) * 2
    old_v, ret = rng.normal(0, 1, (b, n)), rng.normal(0, 1, (b, n))
    v = old_v + rng.normal(0, 0.5, (b, n))
    ent = rng.uniform(0.5, 2.5, (b, n))
    cfg = make_cfg(clip_eps=0.2, dual_clip=1.5, value_clip_eps=0.25, vf_coef=0.3, entropy_coef=0.05, loss_agg=agg)

    def agg_np(x):
        if agg == "token-mean":
            return (x * mask).sum() / mask.sum()
        return np.mean((x * mask).sum(1) / mask.sum(1))

    ratio = np.exp(lp - old_lp)
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    pg = np.where(adv < 0, np.minimum(pg, -1.5 * adv), pg)
    vc = old_v + np.clip(v - old_v, -0.25, 0.25)
    vf = 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2)
    want = agg_np(pg) + 0.3 * agg_np(vf) - 0.05 * agg_np(ent)
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    batch = PPOBatch(None, None, f(mask), f(old_lp), f(old_v), f(adv), f(ret))
    loss, aux = ppo_minibatch_loss(f(lp), f(v), f(ent), batch, cfg=cfg)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux["entropy"], (ent * mask).sum() / mask.sum(), rtol=1e-5)
    assert float(aux["ratio_max"]) == pytest.approx(ratio[mask > 0].max(), rel=1e-5)
    # The dual clip was active somewhere, so the test distinguishes it.
    assert (np.where(adv < 0, -adv * ratio > -1.5 * adv, False) * mask).any()


def test_grad_accumulation_matches_whole_minibatches(setup, count_compiles):
    """Micro-batches weighted by their token counts: the same updates as whole minibatches."""
    policy, params, trainer, reward, prompts, prompt_mask = setup
    cfg = make_cfg(grad_accum_steps=2)
    accum = PPOTrainer(policy, cfg, optimizer_from_config(cfg.optimizer), reward_fn=reward)
    out = []
    for t in (trainer, accum):
        state = t.init(params, seed=11)
        with count_compiles() as compiles:
            new, metrics, rollout = t.iteration(state, prompts, prompt_mask, ref_params=params)
        out.append((new, metrics, np.asarray(rollout.tokens)))
    # The second trainer has an equal policy and sampling settings: jax.jit's cache, keyed on
    # the static LM value, serves its rollout; only its update (another grad_accum_steps) compiles.
    assert compiles["jit(_rollout)"] == 0 and compiles["jit(_update)"] == 1, compiles
    (a, ma, ta), (b, mb, tb) = out
    np.testing.assert_array_equal(ta, tb)
    # Rows of different lengths, so a plain mean over micro-batches would differ.
    assert len(set(np.asarray(rollout.mask).sum(1).tolist())) > 1
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=2e-5)  # vs ~1e-4 for a plain mean
    for key in ("policy_loss", "value_loss", "clipfrac", "entropy", "grad_norm"):
        np.testing.assert_allclose(float(ma[key]), float(mb[key]), rtol=1e-4, atol=1e-6, err_msg=key)
