"""Loss-normalisation invariance of the RL trainer: the gradient of one update is the same with
1 or 4 micro-batches and on 1 or 4 (host) devices, one test per loss aggregation (PPO with a
critic and GAE, token-mean; GRPO, seq-mean-token-mean with the KL in the loss; Dr. GRPO, the
constant normaliser without a KL).

Why these three: the invariance depends on how the objective is aggregated and normalised
per micro-batch (`aggregation_weight`), not on how the advantages are computed, since every
estimator runs once on the whole batch before the split (`RLTrainer._prepare`). RLOO and
REINFORCE++ therefore take the same path as GRPO here; their seq-mean-token-sum and
token-mean weights are the ones GRPO's and PPO's cases exercise (seq-mean-token-sum shares
seq-mean-token-mean's row count), and every aggregation's micro-batch additivity, with each
estimator's advantages, is checked in float64-cheap array math in tests/test_losses.py.

The batch is built to break a wrong normaliser: responses of different lengths (a plain mean
of micro-batch means differs from the batch's token mean) and one row whose score is NaN,
so it is masked out and a micro-batch holds an empty row (weighting seq-mean losses by all
rows, not the non-empty ones, differs). The responses are drawn with NumPy (the sampler is
tested in tests/test_rollout.py): the update reads only their tokens, mask and EOS flags.
"""
import jax
import numpy as np
import pytest

from rlhf_jax.models import ModelConfig, from_config
from rlhf_jax.rollout import Rollout
from rlhf_jax.train import make_optimizer
from rlhf_jax.train.rl.presets import rl_config
from rlhf_jax.train.sharding import make_mesh, replicated, shard_batch

V, B, G, P, N = 16, 4, 4, 4, 6
EOS = 2

CASES = {
    # loss: (algorithm, head, loss_agg, kl placement)
    "ppo": ("ppo", "lm+value", "token-mean", "in_reward"),
    "grpo": ("grpo", "lm", "seq-mean-token-mean", "in_loss"),
    "dr_grpo": ("dr_grpo", "lm", "seq-mean-token-sum-norm", "none"),
}


def _cfg(algorithm, agg, placement, accum):
    group = 1 if algorithm == "ppo" else G
    return rl_config(algorithm, {
        "batch": {"batch_size": B * G // group, "group_size": group, "num_minibatches": 1, "ppo_epochs": 1,
                  "grad_accum_steps": accum},
        "sampling": {"max_new_tokens": N, "temperature": 1.0, "eos_token_id": EOS},
        "loss": {"loss_agg": agg, "entropy_coef": 0.01},
        "kl": {"placement": placement, "kl_coef": 0.1},
    })


def _reward(prompt_ids, prompt_mask, tokens, mask, prompt_index):
    return ((tokens == 5) * mask).sum(1) / np.maximum(mask.sum(1), 1) + 0.1 * mask.sum(1)


def _responses(rng, rows):
    """A `Rollout` of random responses of lengths 1..N, ending with EOS where shorter than N."""
    lengths = rng.integers(1, N + 1, rows)
    lengths[:3] = (1, N, 3)
    pos = np.arange(N)[None, :]
    mask = (pos < lengths[:, None]).astype(np.float32)
    tokens = rng.integers(3, V, (rows, N)).astype(np.int32)
    ended = lengths < N
    tokens = np.where(ended[:, None] & (pos == lengths[:, None] - 1), EOS, tokens)
    tokens = np.where(mask > 0, tokens, 0).astype(np.int32)
    logprobs = (-rng.uniform(0.5, 3.0, (rows, N)) * mask).astype(np.float32)
    return Rollout(tokens=tokens, logprobs=logprobs, mask=mask, ended_with_eos=ended)


@pytest.fixture(scope="module")
def models():
    config = ModelConfig.tiny("gpt2", V, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=16)
    return {head: from_config(config, head=head, seed=0) for head in ("lm", "lm+value")}


@pytest.mark.parametrize("loss", list(CASES))
def test_gradient_same_for_1_or_4_micro_batches_and_devices(loss, models):
    from rlhf_jax.train.rl.trainer import RLTrainer

    algorithm, head, agg, placement = CASES[loss]
    lm, params = models[head]
    tx = make_optimizer(1e-3, schedule="constant")
    one, four = (RLTrainer(lm, _cfg(algorithm, agg, placement, k), tx, reward_fn=_reward) for k in (1, 4))
    rows = B * G
    prompts = one.rl_cfg.batch.batch_size
    rng = np.random.default_rng(3)
    ids = rng.integers(3, V, (prompts, P)).astype(np.int32)
    mask = np.ones((prompts, P), np.int32)
    mask[0, :2] = 0
    ids = ids * mask
    state = one.init(params)
    # Make the policy differ from the reference (and old = current), so the KL terms are non-zero.
    ref = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32), params)
    rollout = _responses(rng, rows)
    scores = np.asarray(one.score(None, ids, mask, rollout), np.float32).copy()
    assert scores.shape == (rows,)
    scores[1] = np.nan  # row 1 leaves the loss: micro-batch 0 holds an empty row

    want_loss, want = one.gradient(state, ids, mask, rollout, scores, ref_params=ref)
    got_loss, got = four.gradient(state, ids, mask, rollout, scores, ref_params=ref)
    mesh = make_mesh(data=4, fsdp=1)
    put = lambda t: jax.device_put(t, replicated(mesh))  # noqa: E731
    s_ids, s_mask = shard_batch((ids, mask), mesh) if prompts % 4 == 0 else (put(ids), put(mask))
    s_rollout, s_scores = shard_batch((rollout, scores), mesh)
    dev_loss, dev = one.gradient(put(state), s_ids, s_mask, s_rollout, s_scores, ref_params=put(ref))
    assert np.isfinite(float(want_loss)) and float(want_loss) != 0.0
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(dev_loss), float(want_loss), rtol=1e-4, atol=1e-6)
    norm = max(float(np.abs(g).max()) for g in jax.tree.leaves(want[0]))
    assert norm > 1e-4
    for a, b, c in zip(jax.tree.leaves(want), jax.tree.leaves(got), jax.tree.leaves(dev)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6 * norm)
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-4, atol=1e-6 * norm)
