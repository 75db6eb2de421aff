"""Response log-probs of G samples per prompt with each prompt run through the trunk once.

RL with groups (GRPO, RLOO, ...) scores `G` responses to the same prompt. The plain
forward (`LM.response_logprobs`) runs `[prompt | response]` for each of the `B * G` rows,
so every prompt goes through the trunk G times. Here the prompt is prefilled once per
group into a KV cache (`B` rows), the cache is repeated G times along the batch, and only
the response tokens of the `B * G` rows run on top of it, attending to the prompt's keys
and values. Gradients flow through the cache into the prompt's forward, so the result and
its gradient equal the plain forward's (up to float rounding); the work falls from
`B G (P + N)` to `B P + B G N` tokens (about 3.7x less at P = 31, N = 6, G = 8).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["grouped_response_logprobs"]


def grouped_response_logprobs(lm, params, input_ids, attention_mask, num_response: int, group_size: int, *,
                              temperature: float = 1.0, with_entropy: bool = False):
    """`lm.response_logprobs` for rows that come in groups of `group_size` sharing one prompt.

    Rows `i*G .. i*G + G - 1` must hold the same prompt columns (the first `P = T - N`
    columns of `input_ids` and `attention_mask`, left-padded); only row `i*G`'s are read.

    Args:
      lm: the `LM` (head "lm" or "lm+value"). params: its parameters.
      input_ids, attention_mask: `[B*G, P + N]` = [prompt (left-padded) | response (right-padded)].
      num_response: N (static, 1 <= N < P + N).
      group_size: G (static, >= 1; must divide the rows).
      temperature: logits are divided by it.
      with_entropy: also return the per-token entropy.

    Returns:
      `[B*G, N]` float32 log-probs (junk at padding positions), or `(logprobs, entropy)`.
    """
    rows, total = input_ids.shape
    n, g = int(num_response), int(group_size)
    if not 1 <= n < total:
        raise ValueError(f"num_response must be in [1, {total - 1}] for sequences of length {total}, got {n}")
    if g < 1 or rows % g:
        raise ValueError(f"group_size {g} must be >= 1 and divide the {rows} rows")
    p = total - n
    prompt_ids = input_ids[::g, :p]
    prompt_mask = jnp.asarray(attention_mask[::g, :p], jnp.int32)
    response_ids = input_ids[:, p:]
    response_mask = jnp.asarray(attention_mask[:, p:], jnp.int32)
    b = rows // g
    cache = lm.init_cache(b, total)
    slots = jnp.concatenate([prompt_mask, jnp.ones((b, n), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    hidden_prompt, cache = lm.hidden_states(params, prompt_ids, slots, positions=positions, cache=cache,
                                            cache_index=0)
    # The state after the last prompt token predicts the first response token.
    last = jnp.repeat(hidden_prompt[:, -1:], g, axis=0)
    if n == 1:
        hidden = last
    else:
        # Cache leaves are [L, B, S, ...]: repeat each prompt's keys and values for its G rows.
        cache = jax.tree.map(lambda c: jnp.repeat(c, g, axis=1), cache)
        slots = jnp.concatenate([jnp.repeat(prompt_mask, g, axis=0), response_mask], axis=1)
        start = jnp.repeat(jnp.sum(prompt_mask, axis=1), g)
        response_positions = start[:, None] + jnp.arange(n - 1, dtype=jnp.int32)[None, :]
        hidden_response, _ = lm.hidden_states(params, response_ids[:, : n - 1], slots,
                                              positions=response_positions, cache=cache, cache_index=p)
        hidden = jnp.concatenate([last, hidden_response.astype(last.dtype)], axis=1)
    stats = lm.token_stats(params, hidden, response_ids, temperature=temperature, with_entropy=with_entropy)
    if with_entropy:
        return stats["logprobs"], stats["entropy"]
    return stats["logprobs"]
