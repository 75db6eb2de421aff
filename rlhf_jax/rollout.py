"""Jitted KV-cache sampling from a causal LM: `generate` and its `Rollout`.

The sampler prefills the whole left-padded prompt batch in one forward pass
into a preallocated KV cache of `P + N` slots, then decodes inside one
compiled loop: a `lax.while_loop` that stops as soon as every row has emitted
EOS, or a `lax.scan` of fixed length when there is no EOS token. Every shape
is static, so one (batch, prompt length, max_new_tokens) bucket compiles once.

Log-probabilities returned with the tokens are those of the temperature-scaled
*unfiltered* distribution `softmax(logits / T)`, taken before top-k / top-p
filtering: that is the distribution the PPO training forward recomputes
(`lm.response_logprobs(..., temperature=T)`), so old and new log-probs agree
exactly on-policy (Huang et al. 2024; TRL does the same).

References:
  Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", arXiv 2403.17031.
  Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration" (top-p), arXiv 1904.09751.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Rollout", "generate", "sample_logits"]


class Rollout(NamedTuple):
    """What `generate` returns; every array has a leading batch axis B.

    Attributes:
      tokens: `[B, N]` int32 sampled response tokens; `pad_token_id` after the
        first EOS (and after an early exit of the decode loop).
      logprobs: `[B, N]` float32 log-probabilities of `tokens` under
        `softmax(logits / temperature)` (unfiltered; untempered when greedy); 0 where
        `mask` is 0.
      mask: `[B, N]` float32, 1 on response tokens through the first EOS inclusive.
      ended_with_eos: `[B]` bool, True where the row emitted `eos_token_id`.
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    ended_with_eos: jax.Array


# ---------------------------------------------------------------------------
# One sampling step: [B, V] logits -> tokens and their log-probs.


def _filter_logits(z, *, top_k: int, top_p):
    """Set to -inf every logit outside the top-k set and then the top-p nucleus.

    `top_k` is static (0 = off); `top_p` is None (off) or a scalar, possibly traced.
    """
    vocab = z.shape[-1]
    neg_inf = jnp.asarray(-jnp.inf, z.dtype)
    sorted_desc = None
    if 0 < top_k < vocab:
        sorted_desc, _ = jax.lax.top_k(z, top_k)
        z = jnp.where(z >= sorted_desc[:, -1:], z, neg_inf)
    if top_p is not None:
        if sorted_desc is None:
            sorted_desc = -jnp.sort(-z, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # A token stays if the tokens ranked above it hold less than top_p of the
        # mass; the most likely token always stays.
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z >= threshold, z, neg_inf)
    return z


def _sample(logits, key, *, greedy: bool, temperature, top_k: int, top_p):
    """`sample_logits` with the structure static and the values (possibly) traced."""
    logits = jnp.asarray(logits).astype(jnp.float32)
    if greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        z = logits
    else:
        z = logits / temperature
        filtered = _filter_logits(z, top_k=top_k, top_p=top_p)
        tokens = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    log_norm = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0]
    return tokens, picked - log_norm


def sample_logits(logits, key, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Draw one token per row from `logits` and return it with its log-probability.

    Equation: `z = logits / T`; the token is drawn from `softmax(filter(z))`, where
    `filter` keeps the `top_k` largest logits (HF order: temperature, then top-k,
    then top-p) and then the smallest set of tokens whose probability reaches
    `top_p`; the returned log-prob is `log softmax(z)[token]`, of the *unfiltered*
    tempered distribution. `temperature == 0` picks `argmax(logits)` and returns
    `log softmax(logits)[token]` (temperature 1).

    Args:
      logits: `[B, V]` any float dtype (computed in float32).
      key: a PRNG key.
      temperature: >= 0, a Python number (0 = greedy).
      top_k: keep the k most likely tokens; 0 keeps all.
      top_p: nucleus mass in (0, 1]; 1 keeps all.

    Returns:
      `(tokens [B] int32, logprobs [B] float32)`.

    References:
      Holtzman et al. 2019, arXiv 1904.09751 (top-p); Huang et al. 2024, arXiv 2403.17031.
    """
    _check_knobs(temperature, top_k, top_p)
    return _sample(logits, key, greedy=temperature == 0, temperature=temperature, top_k=int(top_k),
                   top_p=None if top_p >= 1.0 else top_p)


def _check_knobs(temperature, top_k, top_p):
    if not isinstance(temperature, (int, float, np.floating, np.integer)) or temperature < 0:
        raise ValueError(f"`temperature` must be a Python number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"`top_k` must be an int >= 0 (0 = no top-k), got {top_k!r}")
    if not isinstance(top_p, (int, float, np.floating, np.integer)) or not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be a number in (0, 1], got {top_p!r}")


# ---------------------------------------------------------------------------
# The sampler body (pure; traced either inside a caller's jit or by `_generate_jit`).


def _context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "context_length"):
        value = getattr(config, name, None)
        if isinstance(value, (int, np.integer)) and value > 0:
            return int(value)
    return None


def _vocab_size(config) -> int | None:
    value = getattr(config, "vocab_size", None)
    return int(value) if isinstance(value, (int, np.integer)) else None


def _cache_batch_axes(lm, total: int):
    """The batch axis of every leaf of `lm.init_cache` (found by comparing batch 1 and 2)."""
    one = jax.eval_shape(lambda: lm.init_cache(1, total))
    two = jax.eval_shape(lambda: lm.init_cache(2, total))

    def axis(a, b):
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
        if len(diff) != 1:
            raise ValueError(f"cannot find the batch axis of a KV cache leaf of shape {b.shape}")
        return diff[0]

    return jax.tree.map(axis, one, two)


def _generate_body(lm, params, prompt_ids, prompt_mask, key, knobs, *, max_new_tokens: int,
                   greedy: bool, top_k: int, use_top_p: bool, has_eos: bool,
                   num_samples: int = 1) -> Rollout:
    """The sampler. Keyword arguments fix the program's structure (static); `knobs`
    holds the values that may change without recompiling: `temperature`, `top_p`,
    `eos_token_id`, `pad_token_id` (scalars, possibly traced).

    With `num_samples = G > 1` the `[B, P]` prompts are prefilled once; the prefilled
    cache, the last prompt logits and the per-row positions are then repeated G times
    along the batch (row i*G + j is sample j of prompt i) and the decode runs on B*G rows."""
    batch, prompt_len = prompt_ids.shape
    n = max_new_tokens
    total = prompt_len + n
    prompt_ids = prompt_ids.astype(jnp.int32)
    prompt_mask = prompt_mask.astype(jnp.int32)
    # Generated slots are marked valid up front: a query in slot i only attends to
    # slots j <= i, so slots not yet written are never read.
    cache_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, n), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    real_len = jnp.sum(prompt_mask, axis=1)  # [B]: position of the first response token

    cache = lm.init_cache(batch, total)
    hidden, cache = lm.hidden_states(params, prompt_ids, cache_mask, positions=positions,
                                     cache=cache, cache_index=0)
    first_logits = lm.lm_head(params, hidden[:, -1])
    if num_samples > 1:
        # Share the prefill: G copies of each prompt's cache, not G prompts through prefill.
        axes = _cache_batch_axes(lm, total)
        cache = jax.tree.map(lambda c, ax: jnp.repeat(c, num_samples, axis=ax), cache, axes)
        first_logits = jnp.repeat(first_logits, num_samples, axis=0)
        cache_mask = jnp.repeat(cache_mask, num_samples, axis=0)
        real_len = jnp.repeat(real_len, num_samples, axis=0)
        batch = batch * num_samples

    sample = functools.partial(_sample, greedy=greedy, temperature=knobs["temperature"],
                               top_k=top_k, top_p=knobs["top_p"] if use_top_p else None)
    pad = jnp.asarray(knobs["pad_token_id"], jnp.int32)
    eos = jnp.asarray(knobs["eos_token_id"], jnp.int32)

    def record(t, logits, tokens, logprobs, done, lengths, ended):
        token, logprob = sample(logits, jax.random.fold_in(key, t))
        token = jnp.where(done, pad, token)
        logprob = jnp.where(done, 0.0, logprob)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, t))
        logprobs = jax.lax.dynamic_update_slice(logprobs, logprob[:, None], (0, t))
        lengths = lengths + (~done).astype(jnp.int32)
        if has_eos:
            hit = (~done) & (token == eos)
            ended = ended | hit
            done = done | hit
        return token, tokens, logprobs, done, lengths, ended

    tokens = jnp.full((batch, n), pad, jnp.int32)
    logprobs = jnp.zeros((batch, n), jnp.float32)
    done = jnp.zeros((batch,), bool)
    lengths = jnp.zeros((batch,), jnp.int32)
    ended = jnp.zeros((batch,), bool)
    token, tokens, logprobs, done, lengths, ended = record(
        jnp.int32(0), first_logits, tokens, logprobs, done, lengths, ended)

    def step(carry):
        t, cache, token, tokens, logprobs, done, lengths, ended = carry
        # The token sampled at step t-1 goes into slot P + t - 1 at position len + t - 1.
        hidden, cache = lm.hidden_states(
            params, token[:, None], cache_mask, positions=(real_len + t - 1)[:, None],
            cache=cache, cache_index=prompt_len + t - 1)
        logits = lm.lm_head(params, hidden[:, 0])
        token, tokens, logprobs, done, lengths, ended = record(
            t, logits, tokens, logprobs, done, lengths, ended)
        return t + 1, cache, token, tokens, logprobs, done, lengths, ended

    carry = (jnp.int32(1), cache, token, tokens, logprobs, done, lengths, ended)
    if n > 1:
        if has_eos:
            carry = jax.lax.while_loop(lambda c: (c[0] < n) & ~jnp.all(c[5]), step, carry)
        else:
            carry, _ = jax.lax.scan(lambda c, _: (step(c), None), carry, None, length=n - 1)
    _, _, _, tokens, logprobs, _, lengths, ended = carry
    mask = (jnp.arange(n, dtype=jnp.int32)[None, :] < lengths[:, None]).astype(jnp.float32)
    return Rollout(tokens, logprobs, mask, ended)


# ---------------------------------------------------------------------------
# Validation and the eager entry point.


def _is_traced(*trees) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))


def _validate_static(lm, prompt_ids, prompt_mask, *, max_new_tokens, temperature, top_k, top_p,
                     eos_token_id, pad_token_id):
    if jnp.ndim(prompt_ids) != 2:
        raise ValueError(f"`prompt_ids` must be [B, P], got shape {jnp.shape(prompt_ids)}")
    if jnp.shape(prompt_mask) != jnp.shape(prompt_ids):
        raise ValueError(
            f"`prompt_mask` must have the shape of `prompt_ids` {jnp.shape(prompt_ids)}, "
            f"got {jnp.shape(prompt_mask)}")
    dtype = prompt_ids.dtype if hasattr(prompt_ids, "dtype") else np.asarray(prompt_ids).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"`prompt_ids` must hold integer token ids, got dtype {dtype}")
    if jnp.shape(prompt_ids)[1] < 1:
        raise ValueError("`prompt_ids` must have at least one column (prompt length P >= 1)")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}")
    _check_knobs(temperature, top_k, top_p)
    config = lm.config
    vocab = _vocab_size(config)
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is None and name == "eos_token_id":
            continue
        if not isinstance(value, (int, np.integer)) or value < 0 or (vocab is not None and value >= vocab):
            raise ValueError(f"`{name}` must be an int in [0, vocab_size={vocab}), got {value!r}")
    if eos_token_id is not None and eos_token_id == pad_token_id:
        warnings.warn(
            f"`eos_token_id` == `pad_token_id` == {pad_token_id}: PAD and EOS should differ "
            "(Huang et al. 2024), otherwise an EOS cannot be told from padding in `tokens`; "
            "use `Rollout.mask`", stacklevel=3)
    context = _context_length(config)
    prompt_len = jnp.shape(prompt_ids)[1]
    if context is not None and prompt_len + max_new_tokens > context:
        raise ValueError(
            f"prompt length {prompt_len} + `max_new_tokens` {max_new_tokens} = "
            f"{prompt_len + max_new_tokens} exceeds the model's context of {context} positions")


def _validate_values(lm, prompt_ids, prompt_mask):
    ids = np.asarray(prompt_ids)
    mask = np.asarray(prompt_mask)
    vocab = _vocab_size(lm.config)
    if vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)]
        raise ValueError(
            f"`prompt_ids` holds token ids outside the vocabulary [0, {vocab}): e.g. {bad[:5].tolist()}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("`prompt_mask` must hold only 0 and 1")
    if not (mask[:, -1] == 1).all():
        rows = np.nonzero(mask[:, -1] != 1)[0]
        raise ValueError(
            f"`prompt_mask` rows {rows[:5].tolist()} end with padding: prompts must be left-padded "
            "and non-empty (use rlhf_jax.data.left_pad)")
    if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise ValueError("`prompt_mask` must be zeros then ones per row (left padding)")


_STRUCTURE_NAMES = ("max_new_tokens", "greedy", "top_k", "use_top_p", "has_eos", "num_samples")

# The model and the program structure are static: jax.jit's own cache keys on them by
# value (an `LM` is hashable), so equal models share one compilation per bucket.
_generate_jit = jax.jit(_generate_body, static_argnames=("lm",) + _STRUCTURE_NAMES)


def generate(lm, params, prompt_ids, prompt_mask, key, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | None = None, pad_token_id: int = 0, num_samples: int = 1) -> Rollout:
    """Sample `max_new_tokens` response tokens per prompt with a KV cache.

    The prompt batch is prefilled in one pass into a cache of `P + N` slots; the
    decode runs in one compiled loop (`lax.while_loop` that exits once every row has
    emitted EOS, or `lax.scan` when `eos_token_id` is None). Prompt positions are
    `cumsum(prompt_mask) - 1`; response positions continue from each row's own
    prompt length, so left padding does not shift them.

    Sampling: `z = logits / temperature`, then top-k, then top-p, then a categorical
    draw. The returned log-prob is `log softmax(z)[token]` over the full vocabulary
    (before top-k / top-p), equal to a fresh forward's
    `lm.response_logprobs(params, [prompt | tokens], mask, N, temperature=temperature)`.
    `temperature=0` is greedy decoding (`top_k`/`top_p` ignored) and its log-probs are
    those of the untempered distribution (temperature 1).

    Callable eagerly (inputs are validated, then one jitted sampler runs with `lm` and the
    program structure as static arguments, so `jax.jit` caches it per model value and
    structure, see below) or inside a caller's `jax.jit` with `lm` closed over or static
    (shape checks only). Step `t` draws with `jax.random.fold_in(key, t)`, so a fixed
    key gives fixed samples. What recompiles: the shapes, `max_new_tokens`, greedy or
    not, `top_k`, top-p on or off, EOS on or off; the values of `temperature`,
    `top_p`, `eos_token_id` and `pad_token_id` do not.

    Args:
      lm: an `rlhf_jax.models.LM` (hashable; needs `config`, `init_cache`, `hidden_states`,
        `lm_head`).
      params: the LM's parameter pytree.
      prompt_ids: `[B, P]` int, left-padded prompts (last column is a real token).
      prompt_mask: `[B, P]`, 1 on real prompt tokens.
      key: a PRNG key.
      max_new_tokens: N >= 1; `P + N` must fit the model's context.
      temperature: >= 0, a Python number; 0 = greedy.
      top_k: keep the k most likely tokens; 0 = off.
      top_p: nucleus mass in (0, 1]; 1 = off.
      eos_token_id: stop token, or None for fixed-length sampling.
      pad_token_id: written after a row's EOS; should differ from EOS.
      num_samples: G >= 1 samples per prompt. Each prompt is prefilled once and its KV
        cache repeated along the batch for its G samples (the decode runs on B*G rows);
        row i*G + j of the result is sample j of prompt i, as if the prompts had been
        repeated (`jnp.repeat(prompt_ids, G, axis=0)`), but with 1/G of the prefill work.

    Returns:
      `Rollout(tokens [B*G, N] int32, logprobs [B*G, N] float32, mask [B*G, N] float32,
      ended_with_eos [B*G] bool)` (G = `num_samples`); mask is 1 through the first EOS
      inclusive.

    Raises:
      ValueError: bad shapes (naming the argument), a prompt plus `max_new_tokens`
        beyond the model's context (naming both numbers), token ids outside the
        vocabulary, a mask that is not left padding (the last two only eagerly).

    References:
      Huang et al. 2024, arXiv 2403.17031; Holtzman et al. 2019, arXiv 1904.09751.
    """
    _validate_static(lm, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_k=top_k, top_p=top_p,
                     eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"`num_samples` must be an int >= 1, got {num_samples!r}")
    greedy = temperature == 0
    structure = (int(max_new_tokens), bool(greedy), 0 if greedy else int(top_k),
                 not greedy and top_p < 1.0, eos_token_id is not None, int(num_samples))
    knobs = {
        "temperature": np.float32(1.0 if greedy else temperature),
        "top_p": np.float32(top_p),
        "eos_token_id": np.int32(-1 if eos_token_id is None else eos_token_id),
        "pad_token_id": np.int32(pad_token_id),
    }
    if _is_traced(params, prompt_ids, prompt_mask, key):
        return _generate_body(lm, params, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), key,
                              knobs, **dict(zip(_STRUCTURE_NAMES, structure)))
    _validate_values(lm, prompt_ids, prompt_mask)
    return _generate_jit(lm, params, prompt_ids, prompt_mask, key, knobs,
                         **dict(zip(_STRUCTURE_NAMES, structure)))
