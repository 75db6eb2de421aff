"""Held-out evaluation during RL training: the `eval_fn` a driver calls every `eval_every` iterations.

`rl_eval_fn(...)` closes over the held-out prompts, the reward source and the
reference, and returns `eval_fn(policy_params) -> dict`, which samples one response
per held-out prompt (`evaluate_pass_at_k` with n = 1, the sampler of `rlhf-jax
eval`) and reports

- with a reward function or verifier: ``pass@1`` (the share of responses scored above
  `success_threshold`) and ``score_mean`` (the function's mean value);
- with a reward model: ``rm_score`` (its mean score);
- with a reference: ``kl_to_ref`` (k1 summed over the response, on the policy's samples).

Every call uses the same PRNG key, so successive evaluations compare the policies on
common random numbers and a resumed run logs exactly what an uninterrupted one did.
The drivers (`rlhf_jax.train.drivers`) only see the callback: train/ never imports eval/.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from rlhf_jax.eval.passk_eval import evaluate_pass_at_k

__all__ = ["rl_eval_fn", "sft_sample_fn"]


def rl_eval_fn(policy, prompt_ids, prompt_mask, *, max_new_tokens: int, reward_fn: Callable | None = None,
               reward_model: tuple | None = None, ref: tuple | None = None, temperature: float = 1.0,
               eos_token_id: int | None = None, pad_token_id: int = 0, seed: int = 0, batch_size: int = 64,
               prompt_index=None, success_threshold: float = 0.5) -> Callable[..., dict]:
    """An `eval_fn(policy_params) -> dict` on held-out prompts (see the module docstring).

    Args:
      policy: the policy `LM` ("lm" or "lm+value" head).
      prompt_ids, prompt_mask: `[P, L]` left-padded held-out prompts.
      max_new_tokens: response length limit (the training rollouts').
      reward_fn: host function `(prompt_ids, prompt_mask, response_tokens, response_mask,
        prompt_index) -> [B]` (a verifier or reward function over the held-out set).
      reward_model: `(scalar-head lm, params)`.
      ref: `(lm, params)` of the frozen reference.
      temperature: sampling temperature (the training rollouts').
      eos_token_id, pad_token_id: the sampler's.
      seed: the fixed PRNG seed of every evaluation.
      batch_size: rows per sampling call.
      prompt_index: `[P]` rows passed to `reward_fn` (default `arange(P)`).
      success_threshold: a `reward_fn` value above it counts as a pass.
    """
    if reward_fn is None and reward_model is None and ref is None:
        raise ValueError("`rl_eval_fn` needs a `reward_fn`, a `reward_model` or a `ref` to report anything")
    prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    num_prompts = prompt_ids.shape[0]
    key = jax.random.key(seed)
    batch_size = min(int(batch_size), num_prompts)

    def eval_fn(params) -> dict:
        values: list[np.ndarray] = []

        def verifier(*args):
            if reward_fn is None:
                return np.zeros(args[2].shape[0])
            scores = np.asarray(reward_fn(*args), np.float64)
            values.append(scores)
            return scores

        results = evaluate_pass_at_k(
            {"policy": (policy, params)}, prompt_ids, prompt_mask, verifier, n_samples=1,
            max_new_tokens=max_new_tokens, key=key, temperature=temperature, ref=ref, reward_model=reward_model,
            batch_size=batch_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            prompt_index=prompt_index, success_threshold=success_threshold, num_bootstrap=1, num_examples=0)
        entry = results["models"]["policy"]
        out = {"response_length": entry["response_length"], "eos_fraction": entry["eos_fraction"]}
        if reward_fn is not None:
            out["pass@1"] = entry["accuracy"]
            out["score_mean"] = float(np.mean(values[0]))
        if "rm_score" in entry:
            out["rm_score"] = entry["rm_score"]["mean"]
        if "kl_to_ref" in entry:
            out["kl_to_ref"] = entry["kl_to_ref"]["mean"]
        return out

    eval_fn.num_prompts = num_prompts
    return eval_fn


def sft_sample_fn(lm, prompt_ids, prompt_mask, *, decode: Callable, max_new_tokens: int,
                  references=None, eos_token_id: int | None = None, pad_token_id: int = 0) -> Callable[..., list]:
    """A `sample_fn(params) -> rows` for `fit_sft`: greedy completions of a few prompts.

    Args:
      lm: the `LM`.
      prompt_ids, prompt_mask: `[K, P]` left-padded prompts (the rows that are logged).
      decode: `decode(ids, mask) -> list[str]`.
      max_new_tokens: completion length limit.
      references: optional K reference completions, logged beside the model's.
      eos_token_id, pad_token_id: the sampler's.
    """
    import jax.numpy as jnp

    from rlhf_jax.rollout import generate

    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    prompts = decode(np.asarray(prompt_ids), np.asarray(prompt_mask))
    key = jax.random.key(0)

    def sample_fn(params) -> list:
        rollout = generate(lm, params, prompt_ids, prompt_mask, key, max_new_tokens=int(max_new_tokens),
                           temperature=0.0, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        tokens, mask = jax.device_get((rollout.tokens, rollout.mask))
        completions = decode(np.asarray(tokens), np.asarray(mask))
        rows = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            row = {"prompt": prompt, "completion": completion}
            if references is not None:
                row["reference"] = references[i]
            rows.append(row)
        return rows

    return sample_fn
