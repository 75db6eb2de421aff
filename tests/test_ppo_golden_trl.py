"""Golden test: our PPO batch math against a NumPy re-implementation of TRL 1.8's PPO.

The reference below follows `trl/experimental/ppo/ppo_trainer.py` (TRL 1.8.0) step by
step, in float64 NumPy: TRL pads log-probs with INVALID_LOGPROB = 1 after the last
valid token `L` (the EOS, or N - 1), keeps values through `L + 1` ("padding_mask_p1"),
adds the score at index `L + 1` when it fits (else at `L`), runs GAE in a Python loop
over all N positions, whitens advantages over the valid tokens 0..L (Bessel-corrected
variance, eps 1e-8), and its losses are a token masked-mean clipped surrogate over
0..L plus `vf_coef * 0.5 * masked_mean(max(...))` over 0..L+1.

Deliberate difference: we put the score on the last valid token `L` (the EOS), where
the reward model read it, and the value bootstrap stops there. Where TRL's "fits"
branch does not fire (a response that runs to the full N tokens) both agree exactly;
elsewhere TRL's numbers equal ours computed on the mask extended by one token (with a
zero KL on that extra token), which the second test checks. TRL's `approxkl` metric
is `0.5 * mean(d^2)`, ours is the k3 estimate; it is a diagnostic, not compared.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ppo_config

from rlhf_jax import gae, masked_whiten, ppo_value_loss, shaped_rewards
from rlhf_jax.train import PPOBatch, ppo_advantages, ppo_minibatch_loss

INVALID_LOGPROB = 1.0


# ---------------------------------------------------------------------------
# TRL 1.8 PPO math in NumPy (float64), from reading its source.


def trl_masked_mean(x, keep):
    return float((x * keep).sum() / keep.sum())


def trl_masked_var(x, keep):
    mean = trl_masked_mean(x, keep)
    var = trl_masked_mean((x - mean) ** 2, keep)
    n = keep.sum()
    return var * n / (n - 1)


def trl_whiten(x, keep, shift_mean=True):
    mean, var = trl_masked_mean(x, keep), trl_masked_var(x, keep)
    out = (x - mean) / np.sqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out


def trl_batch(scores, logprobs, ref_logprobs, values, seq_len, *, kl_coef, gamma, lam,
              whiten_rewards, estimator="k1"):
    """Rewards, advantages (whitened) and returns of TRL's PPOTrainer.train for one batch."""
    b, n = logprobs.shape
    idx = np.tile(np.arange(n), (b, 1))
    padding = idx > seq_len[:, None]
    padding_p1 = idx > (seq_len + 1)[:, None]
    logprobs = np.where(padding, INVALID_LOGPROB, logprobs)
    ref_logprobs = np.where(padding, INVALID_LOGPROB, ref_logprobs)
    values = np.where(padding_p1, 0.0, values)
    logr = ref_logprobs - logprobs
    kl = -logr if estimator == "k1" else (np.exp(logr) - 1) - logr
    rewards = -kl_coef * kl
    end = np.where(seq_len + 1 < n, seq_len + 1, seq_len)
    rewards[np.arange(b), end] += scores
    if whiten_rewards:
        rewards = trl_whiten(rewards, ~padding_p1, shift_mean=False)
        rewards = np.where(padding_p1, 0.0, rewards)
    last = np.zeros(b)
    adv_rev = []
    for t in reversed(range(n)):
        next_values = values[:, t + 1] if t < n - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        adv_rev.append(last)
    advantages = np.stack(adv_rev[::-1], axis=1)
    returns = advantages + values
    advantages = trl_whiten(advantages, ~padding)
    advantages = np.where(padding, 0.0, advantages)
    return dict(rewards=rewards, advantages=advantages, returns=returns, values=values,
                logprobs=logprobs, padding=padding, padding_p1=padding_p1)


def trl_minibatch_loss(new_logprobs, vpred, mb, *, clip, clip_value, vf_coef):
    """TRL's per-micro-batch loss: pg_loss + vf_coef * vf_loss, with its clip fractions."""
    padding, padding_p1 = mb["padding"], mb["padding_p1"]
    new_logprobs = np.where(padding, INVALID_LOGPROB, new_logprobs)
    vpred = np.where(padding_p1, 0.0, vpred)
    vclipped = np.clip(vpred, mb["values"] - clip_value, mb["values"] + clip_value)
    vf1 = (vpred - mb["returns"]) ** 2
    vf2 = (vclipped - mb["returns"]) ** 2
    vf_loss = 0.5 * trl_masked_mean(np.maximum(vf1, vf2), ~padding_p1)
    vf_clipfrac = trl_masked_mean((vf2 > vf1).astype(float), ~padding_p1)
    ratio = np.exp(new_logprobs - mb["logprobs"])
    pg1 = -mb["advantages"] * ratio
    pg2 = -mb["advantages"] * np.clip(ratio, 1 - clip, 1 + clip)
    pg_loss = trl_masked_mean(np.maximum(pg1, pg2), ~padding)
    pg_clipfrac = trl_masked_mean((pg2 > pg1).astype(float), ~padding)
    return dict(loss=pg_loss + vf_coef * vf_loss, pg_loss=pg_loss, vf_loss=vf_loss,
                clipfrac=pg_clipfrac, vf_clipfrac=vf_clipfrac)


# ---------------------------------------------------------------------------
# Fixed inputs.

B, N = 8, 7


def make_inputs(seed, seq_len):
    rng = np.random.default_rng(seed)
    logprobs = -rng.gamma(2.0, 0.7, (B, N))
    ref_logprobs = logprobs + rng.normal(0, 0.3, (B, N))
    values = rng.normal(0, 1, (B, N))
    scores = rng.normal(0, 2, B)
    new_logprobs = logprobs + rng.normal(0, 0.25, (B, N))
    new_values = values + rng.normal(0, 0.4, (B, N))
    mask = (np.arange(N)[None, :] <= seq_len[:, None]).astype(np.float64)
    return dict(logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, scores=scores,
                new_logprobs=new_logprobs, new_values=new_values, mask=mask, seq_len=seq_len)


def f32(x):
    return jnp.asarray(x, jnp.float32)


TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("whiten_rewards", [False, True])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_full_length_rows_match_trl_exactly(whiten_rewards, estimator):
    """No EOS before the end: TRL's score index is L = N - 1, the same as ours."""
    seq_len = np.full(B, N - 1)
    x = make_inputs(0, seq_len)
    kw = dict(kl_coef=0.1, gamma=0.97, lam=0.9)
    # TRL: `scores[~contain_eos_token] -= missing_eos_penalty` (here half the rows end in EOS).
    eos = np.arange(B) % 2 == 0
    trl_scores = np.where(eos, x["scores"], x["scores"] - 1.5)
    ref = trl_batch(trl_scores, x["logprobs"], x["ref_logprobs"], x["values"], seq_len,
                    whiten_rewards=whiten_rewards, estimator=estimator, **kw)
    cfg = ppo_config(batch_size=B, num_minibatches=2, gamma=kw["gamma"], lam=kw["lam"],
                    whiten_rewards=whiten_rewards, whiten_advantages=True, kl_estimator=estimator,
                    clip_eps=0.2, value_clip_eps=0.3, vf_coef=0.1, missing_eos_penalty=1.5)
    ours = ppo_advantages(f32(x["scores"]), f32(x["logprobs"]), f32(x["ref_logprobs"]), f32(x["values"]),
                          f32(x["mask"]), kl_coef=kw["kl_coef"], cfg=cfg, eos_mask=jnp.asarray(eos))
    np.testing.assert_allclose(ours["rewards"], ref["rewards"], **TOL)
    np.testing.assert_allclose(ours["advantages"], ref["advantages"], **TOL)
    np.testing.assert_allclose(ours["returns"], ref["returns"], **TOL)

    # One minibatch of the loss: rows picked by a permutation, as TRL does.
    rows = np.random.default_rng(1).permutation(B)[: B // 2]
    mb = {k: ref[k][rows] for k in ("advantages", "returns", "values", "logprobs", "padding", "padding_p1")}
    want = trl_minibatch_loss(x["new_logprobs"][rows], x["new_values"][rows], mb,
                              clip=cfg.loss.clip_eps, clip_value=cfg.loss.value_clip_eps, vf_coef=cfg.loss.vf_coef)
    batch = PPOBatch(
        input_ids=None, attention_mask=None,
        response_mask=f32(x["mask"][rows]),
        old_logprobs=f32(x["logprobs"][rows]),
        old_values=f32(x["values"][rows]),
        advantages=ours["advantages"][rows],
        returns=ours["returns"][rows],
    )
    loss, aux = ppo_minibatch_loss(f32(x["new_logprobs"][rows]), f32(x["new_values"][rows]), None, batch, cfg=cfg)
    np.testing.assert_allclose(loss, want["loss"], **TOL)
    np.testing.assert_allclose(aux["policy_loss"], want["pg_loss"], **TOL)
    np.testing.assert_allclose(aux["value_loss"], want["vf_loss"], **TOL)
    np.testing.assert_allclose(aux["clipfrac"], want["clipfrac"], **TOL)
    np.testing.assert_allclose(aux["value_clipfrac"], want["vf_clipfrac"], **TOL)
    # The inputs are such that clipping happens: the comparison covers both branches.
    assert 0 < want["clipfrac"] < 1 and 0 < want["vf_clipfrac"] < 1


def test_eos_rows_match_trl_with_the_score_shift_accounted_for():
    """With EOS before the end TRL scores one past the EOS; ours scores the EOS.

    TRL's numbers equal our primitives run on the mask extended by one token (the
    "p1" mask; zero KL there), with advantages whitened over the real mask.
    """
    seq_len = np.array([1, 3, 6, 2, 4, 6, 0, 5])
    x = make_inputs(2, seq_len)
    kw = dict(kl_coef=0.05, gamma=1.0, lam=0.95)
    ref = trl_batch(x["scores"], x["logprobs"], x["ref_logprobs"], x["values"], seq_len,
                    whiten_rewards=False, **kw)
    mask = x["mask"]
    mask_p1 = (np.arange(N)[None, :] <= np.minimum(seq_len + 1, N - 1)[:, None]).astype(np.float64)
    # TRL's padded log-probs are equal (INVALID) on the extra token: its KL is zero there.
    lp = np.where(mask > 0, x["logprobs"], INVALID_LOGPROB)
    ref_lp = np.where(mask > 0, x["ref_logprobs"], INVALID_LOGPROB)
    rewards, _ = shaped_rewards(f32(x["scores"]), f32(lp), f32(ref_lp), f32(mask_p1), kl_coef=kw["kl_coef"])
    np.testing.assert_allclose(rewards, ref["rewards"], **TOL)
    adv, ret = gae(rewards, f32(x["values"]), f32(mask_p1), gamma=kw["gamma"], lam=kw["lam"])
    np.testing.assert_allclose(ret * mask_p1, ref["returns"] * mask_p1, **TOL)
    np.testing.assert_allclose(masked_whiten(adv, f32(mask)), ref["advantages"], **TOL)
    # TRL's value loss is over the p1 mask.
    rows = np.arange(B)
    vloss, vaux = ppo_value_loss(f32(x["new_values"]), f32(ref["values"]), ret, f32(mask_p1), clip_eps=0.2)
    mb = {k: ref[k][rows] for k in ("advantages", "returns", "values", "logprobs", "padding", "padding_p1")}
    want = trl_minibatch_loss(x["new_logprobs"], x["new_values"], mb, clip=0.2, clip_value=0.2, vf_coef=0.1)
    np.testing.assert_allclose(vloss, want["vf_loss"], **TOL)
    np.testing.assert_allclose(vaux["value_clipfrac"], want["vf_clipfrac"], **TOL)

    # Our trainer's own placement: the score on the EOS (index L), not L + 1.
    cfg = ppo_config(batch_size=B, num_minibatches=2, gamma=kw["gamma"], lam=kw["lam"])
    ours = ppo_advantages(f32(x["scores"]), f32(x["logprobs"]), f32(x["ref_logprobs"]), f32(x["values"]),
                          f32(mask), kl_coef=kw["kl_coef"], cfg=cfg)
    kl = (x["logprobs"] - x["ref_logprobs"]) * mask
    expected = -kw["kl_coef"] * kl
    expected[np.arange(B), seq_len] += x["scores"]
    np.testing.assert_allclose(ours["rewards"], expected, **TOL)
    differs = np.abs(np.asarray(ours["rewards"]) - ref["rewards"]) > 1e-4
    short = seq_len + 1 < N
    assert differs[short].any(axis=1).all() and not differs[~short].any()
