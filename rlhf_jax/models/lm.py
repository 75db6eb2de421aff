"""The LM: a static, hashable model description plus pure functions over a params pytree.

An :class:`LM` is a frozen dataclass of what fixes the program (config, head kind,
compute and storage dtypes; the NNX graph definition follows from them). It holds no
weights: those travel separately as a plain pytree (``params``, a nested dict of
arrays), and every method takes them as its first argument. Because an ``LM`` compares
and hashes by value, it is a static argument of ``jax.jit``:

  >>> lm, params = from_config(ModelConfig.tiny("gpt2", 64), head="lm", seed=0)
  >>> logits = jax.jit(lambda lm, p, i, m: lm.logits(p, i, m), static_argnums=0)
  >>> logits(lm, params, jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3))).shape
  (1, 3, 64)

Two ``LM`` values built separately from the same config share one compilation.

Heads:

- ``"lm"``: next-token logits (tied to the embedding or a separate ``lm_head``).
- ``"scalar"``: one number per position (``score``: ``[D] -> 1`` with bias,
  initialised N(0, 1/sqrt(D + 1)), Ziegler et al. 2019). As a reward model the
  score is read at the last ``mask == 1`` position; as a value model per token.
- ``"lm+value"``: the LM head plus a zero-initialised ``value_head`` on the shared
  trunk (OpenAI's lm-human-preferences policy).

References: Ziegler et al. 2019, arXiv 1909.08593; Huang et al. 2024, arXiv 2403.17031.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.core import ops
from rlhf_jax.models.attention import AttentionMask, cache_allowed, init_kv_cache, pack_order, slot_positions
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.families import get_family
from rlhf_jax.models.layers import Dense
from rlhf_jax.models.lora import LoRAConfig, attach
from rlhf_jax.models.stack import check_remat

HEADS = ("lm", "scalar", "lm+value")
# Tokens per chunk of the LM head in token_stats: [1024, V] float32 logits at a time
# (0.6 GB at Qwen's 151936 vocabulary).
LOGITS_CHUNK_SIZE = 1024


class Network(nnx.Module):
    """Trunk plus the heads that ``head`` asks for (the NNX module behind an :class:`LM`).

    ``rngs`` is a ``numpy.random.Generator`` that draws the initial weights, or
    None for an abstract (shape-only) model under ``nnx.eval_shape``.
    """

    def __init__(self, cfg: ModelConfig, head: str, *, rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.trunk = get_family(cfg.family).trunk(cfg, rngs=rngs, **kw)
        d = cfg.hidden_size
        # Each attribute is assigned once (NNX fixes an attribute's data/static status
        # at its first assignment).
        if head in ("lm", "lm+value") and not cfg.tie_word_embeddings:
            self.lm_head = Dense(d, cfg.vocab_size, use_bias=False, rngs=rngs,
                                 std=cfg.initializer_range, **kw)
        else:
            self.lm_head = None
        if head == "scalar":
            self.score = Dense(d, 1, use_bias=True, rngs=rngs, std=1.0 / math.sqrt(d + 1), **kw)
        else:
            self.score = None
        if head == "lm+value":
            self.value_head = Dense(d, 1, use_bias=True, rngs=rngs, std=0.0, **kw)
        else:
            self.value_head = None

def _stringify(tree):
    """Pure-dict keys as strings (NNX list indices are ints; orbax prefers strings)."""
    if isinstance(tree, dict):
        return {str(k): _stringify(v) for k, v in tree.items()}
    return tree


def _intify(tree):
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _intify(v)
                for k, v in tree.items()}
    return tree


def _check_head(head):
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")


@dataclasses.dataclass(frozen=True)
class LM:
    """A decoder LM description: static, hashable, weight-free; methods are pure in ``params``.

    Two ``LM`` values are equal (and hash equal) when their config, head and dtypes are,
    so ``jax.jit(f, static_argnames=("lm",))`` caches by value. The NNX graph definition
    (:attr:`graphdef`) is a function of those fields, built (abstractly) on first use and
    not part of the comparison (hashing it would cost a walk over the whole graph on every
    jitted call).

    Attributes:
      config: the frozen :class:`ModelConfig`.
      head: ``"lm"``, ``"scalar"`` or ``"lm+value"``.
      dtype: compute dtype; param_dtype: storage dtype of freshly made params.
      remat: activation checkpointing per layer, a key of
        ``rlhf_jax.models.stack.REMAT_POLICIES`` (``"none"``, ``"full"``, ``"save_dots"``,
        ``"save_dots_no_batch"``, ``"save_attention"``). It acts only where a forward is
        differentiated, so every training step (SFT, reward, PPO update) uses it and
        frozen-model forwards are unchanged.
      logits_chunk_size: tokens per chunk of the LM head in :meth:`token_stats` (log-probs,
        entropies, SFT cross-entropy): the most ``[chunk, V]`` float32 logits held at once.
      lora: a :class:`~rlhf_jax.models.lora.LoRAConfig` or None. With one, the graph holds
        ``lora_a`` / ``lora_b`` in the matching projections and ``params`` must hold them
        too (``lora.combine(base, adapters)``); :attr:`base` is the same LM without them.
    """

    config: ModelConfig
    head: str = "lm"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    logits_chunk_size: int = LOGITS_CHUNK_SIZE
    lora: LoRAConfig | None = None

    def __post_init__(self):
        if not isinstance(self.config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(self.config).__name__}")
        _check_head(self.head)
        check_remat(self.remat)
        if self.lora is not None and not isinstance(self.lora, LoRAConfig):
            raise TypeError(f"lora must be a LoRAConfig or None, got {type(self.lora).__name__}")
        if not isinstance(self.logits_chunk_size, int) or self.logits_chunk_size < 1:
            raise ValueError(f"logits_chunk_size must be a positive int, got {self.logits_chunk_size!r}")
        # Normalised so that jnp.bfloat16, "bfloat16" and jnp.dtype("bfloat16") give equal LMs.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

    def __repr__(self):
        return (f"LM({self.config.model_type}, head={self.head!r}, layers={self.config.num_layers}, "
                f"d={self.config.hidden_size}, vocab={self.config.vocab_size}, dtype={self.dtype.name}"
                + ("" if self.lora is None else f", lora=r{self.lora.rank}") + ")")

    @property
    def base(self) -> "LM":
        """This LM without LoRA adapters (itself when it has none)."""
        return self if self.lora is None else dataclasses.replace(self, lora=None)

    @functools.cached_property
    def graphdef(self):
        """The NNX ``GraphDef`` of the network (shapes only; no weights are made)."""
        graphdef, _ = build(self.config, self.head, dtype=self.dtype, param_dtype=self.param_dtype,
                            abstract=True, lora=self.lora)
        return graphdef

    def init(self, seed: int = 0):
        """Freshly initialised params (HF-style N(0, 0.02); norms 1, biases 0; see :func:`build`)."""
        _, params = build(self.config, self.head, seed=seed, dtype=self.dtype, param_dtype=self.param_dtype,
                          lora=self.lora)
        return params

    def abstract_params(self):
        """The params pytree as ``jax.ShapeDtypeStruct`` leaves (no memory allocated)."""
        _, params = build(self.config, self.head, dtype=self.dtype, param_dtype=self.param_dtype,
                          abstract=True, lora=self.lora)
        return params

    def _net(self, params) -> Network:
        return nnx.merge(self.graphdef, _intify(params))

    # ------------------------------------------------------------------ trunk
    def hidden_states(self, params, input_ids, attention_mask, *, positions=None, cache=None,
                      cache_index=None, remat=None):
        """Final hidden states (after the last norm) and the updated KV cache.

        Without a cache, ``attention_mask`` is ``[B, T]`` like ``input_ids``; with a
        cache it is ``[B, S]`` over the cache slots (1 = a real token is or will be
        in that slot), the ``T`` inputs are written into slots ``cache_index ..
        cache_index + T - 1``, and the query in slot ``i`` attends to slots
        ``j <= i`` whose mask is 1. Positions default to ``cumsum(mask) - 1``, so
        left padding is handled.

        Without a cache, any 0/1 mask works: each row's real tokens are moved to the
        front (in order) before the trunk and the hidden states moved back after it, so
        attention runs in its packed, fusable form (see :mod:`rlhf_jax.models.attention`).
        Hidden states at padding positions are finite junk.

        Args:
          params: the parameter pytree.
          input_ids: ``[B, T]`` int token ids (``< vocab_size``; not checked in jit,
            see :meth:`check_inputs`).
          attention_mask: ``[B, T]`` (no cache) or ``[B, S]`` (cache), 1 = real token.
          positions: optional ``[B, T]`` int position ids.
          cache: from :meth:`init_cache` (or a previous call), or None.
          cache_index: int (may be traced): the first slot written; needed with a cache.
          remat: activation-checkpointing policy per layer (a key of
            ``rlhf_jax.models.stack.REMAT_POLICIES``); default the model's ``remat``.

        Returns:
          ``(hidden [B, T, D] in the compute dtype, cache)`` (cache is None without one).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        b, t = input_ids.shape
        max_len = self.config.max_position_embeddings
        if cache is None:
            if attention_mask.shape != (b, t):
                raise ValueError(f"attention_mask must have the shape of input_ids {(b, t)}, "
                                 f"got {attention_mask.shape}")
            if t > max_len:
                raise ValueError(f"sequence length {t} exceeds the model context "
                                 f"max_position_embeddings={max_len}")
            cache_index = None
        else:
            if cache_index is None:
                raise ValueError("cache_index is required when cache is given")
            num_slots = cache["k"].shape[2]
            if attention_mask.shape != (b, num_slots):
                raise ValueError(f"with a cache, attention_mask must be [B, S] = {(b, num_slots)} "
                                 f"over the cache slots, got {attention_mask.shape}")
            if t > num_slots:
                raise ValueError(f"{t} input tokens do not fit in a cache of {num_slots} slots")
        if positions is None:
            positions = slot_positions(attention_mask, cache_index, t)
        remat = self.remat if remat is None else remat
        trunk = self._net(params).trunk
        if cache is not None:
            sliding = self.config.sliding_layers
            if all(sliding) or not any(sliding):  # one mask for all layers
                allowed = cache_allowed(attention_mask, cache_index, t, window=self.config.sliding_window)
                mask = AttentionMask(allowed=allowed)
            else:  # sliding and global layers: both masks, each layer picks one
                mask = AttentionMask(allowed=cache_allowed(attention_mask, cache_index, t),
                                     local=cache_allowed(attention_mask, cache_index, t,
                                                         window=self.config.sliding_window))
            return trunk(input_ids, positions, mask, cache, cache_index, remat=remat)
        order, inverse, lengths = pack_order(attention_mask)
        hidden, _ = trunk(jnp.take_along_axis(input_ids, order, axis=1),
                          jnp.take_along_axis(positions, order, axis=1),
                          AttentionMask(lengths=lengths), None, None, remat=remat)
        return jnp.take_along_axis(hidden, inverse[:, :, None], axis=1), None

    def init_cache(self, batch_size: int, max_length: int, dtype=None):
        """A zero KV cache ``{"k", "v"}``, each ``[L, B, S, Hkv, Dh]`` (layers stacked).

        Args:
          batch_size: B. max_length: S, the number of slots (prompt + new tokens).
          dtype: cache dtype; the compute dtype by default.
        """
        cfg = self.config
        if max_length > cfg.max_position_embeddings:
            raise ValueError(f"cache max_length {max_length} exceeds the model context "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        dt = self.dtype if dtype is None else dtype
        return init_kv_cache(cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.head_dim, dt)

    # ------------------------------------------------------------------ heads
    def lm_head(self, params, hidden):
        """Logits ``[..., V]`` (float32) from hidden states ``[..., D]`` (soft-capped
        ``cap * tanh(logits / cap)`` where the config has ``final_logit_softcap``)."""
        if self.head == "scalar":
            raise ValueError("this LM has head='scalar' and no LM head; use with_head('lm')")
        h = hidden.astype(self.dtype)
        if self.config.tie_word_embeddings:
            table = _embedding(self.config, params).astype(self.dtype)
            logits = jnp.einsum("...d,vd->...v", h, table, preferred_element_type=jnp.float32)
        else:
            kernel = params["lm_head"]["kernel"].astype(self.dtype)
            logits = jnp.einsum("...d,dv->...v", h, kernel, preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def value_head(self, params, hidden):
        """Per-position scalars ``[...]`` (float32) from hidden states ``[..., D]``.

        Uses ``score`` for head ``"scalar"`` and ``value_head`` for ``"lm+value"``.
        """
        if self.head == "lm":
            raise ValueError("this LM has head='lm' and no scalar/value head; "
                             "use with_head('scalar') or with_head('lm+value')")
        p = params["score"] if self.head == "scalar" else params["value_head"]
        out = jnp.einsum("...d,do->...o", hidden.astype(jnp.float32),
                         p["kernel"].astype(jnp.float32))
        return out[..., 0] + p["bias"].astype(jnp.float32)[0]

    def logits(self, params, input_ids, attention_mask):
        """Next-token logits ``[B, T, V]`` float32 (left padding supported)."""
        hidden, _ = self.hidden_states(params, input_ids, attention_mask)
        return self.lm_head(params, hidden)

    def values(self, params, input_ids, attention_mask):
        """Per-token values ``[B, T]`` float32 (head ``"scalar"`` or ``"lm+value"``)."""
        hidden, _ = self.hidden_states(params, input_ids, attention_mask)
        return self.value_head(params, hidden)

    def scores(self, params, input_ids, attention_mask):
        """Reward-model scores ``[B]``: the scalar head at the last ``mask == 1`` position.

        A row with no valid token reads position 0.
        """
        values = self.values(params, input_ids, attention_mask)
        last = jnp.maximum(ops.last_valid_index(attention_mask), 0)
        return jnp.take_along_axis(values, last[:, None], axis=1)[:, 0]

    def response_logprobs(self, params, input_ids, attention_mask, num_response: int, *,
                          temperature: float = 1.0, with_entropy: bool = False):
        """Log-probs of the response tokens, the LM head applied on response positions only.

        ``input_ids`` is ``[prompt (left-padded, P) | response (right-padded, N)]``;
        the token in column ``P + n`` is predicted from the hidden state in column
        ``P + n - 1``, so the head runs on columns ``P - 1 .. P + N - 2``.

        Args:
          params: parameters. input_ids, attention_mask: ``[B, P + N]``.
          num_response: N (static int, 1 <= N < P + N).
          temperature: logits are divided by it (as when sampling).
          with_entropy: also return the per-token entropy.

        Returns:
          ``[B, N]`` float32 log-probs (padding positions hold junk: mask them), or
          ``(logprobs, entropy)``.
        """
        t = input_ids.shape[1]
        n = int(num_response)
        if not 1 <= n < t:
            raise ValueError(f"num_response must be in [1, {t - 1}] for sequences of length {t}, got {n}")
        hidden, _ = self.hidden_states(params, input_ids, attention_mask)
        stats = self.token_stats(params, hidden[:, t - n - 1:t - 1], input_ids[:, t - n:],
                                 temperature=temperature, with_entropy=with_entropy)
        if with_entropy:
            return stats["logprobs"], stats["entropy"]
        return stats["logprobs"]

    def token_stats(self, params, hidden, targets, *, temperature: float = 1.0,
                    with_entropy: bool = False, with_accuracy: bool = False, chunk_size=None):
        """Log-probs of ``targets`` (and entropies, argmax hits) from hidden states, the LM
        head applied over chunks of tokens so no ``[B, T, V]`` float32 array exists.

        See :func:`rlhf_jax.core.ops.chunked_token_stats`.

        Args:
          params: parameters. hidden: ``[B, T, D]``. targets: ``[B, T]`` token ids, the
            token each position predicts.
          temperature: logits are divided by it.
          with_entropy, with_accuracy: also return ``"entropy"`` / ``"correct"``.
          chunk_size: tokens per chunk; default the model's ``logits_chunk_size``.

        Returns:
          dict of ``[B, T]`` float32: ``"logprobs"`` (+ ``"entropy"``, ``"correct"``).
        """
        return ops.chunked_token_stats(
            hidden, targets, lambda h: self.lm_head(params, h),
            chunk_size=self.logits_chunk_size if chunk_size is None else chunk_size,
            temperature=temperature, with_entropy=with_entropy, with_accuracy=with_accuracy)

    # ------------------------------------------------------------------ misc
    def check_inputs(self, input_ids, attention_mask=None):
        """Eager validation (not jittable): ranks, shapes, context length, token-id range.

        Call it from drivers and samplers before entering ``jit``, where out-of-range
        ids cannot be detected (they would read NaN embeddings).

        Raises:
          ValueError: naming the argument and the offending value.
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
        t = ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise ValueError(f"input_ids length {t} exceeds the model context "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids contain ids outside [0, vocab_size={self.config.vocab_size}): "
                             f"min {ids.min()}, max {ids.max()}")
        if attention_mask is not None:
            mask = np.asarray(attention_mask)
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
            if not np.isin(mask, (0, 1)).all():
                raise ValueError("attention_mask must contain only 0 and 1")

    def with_head(self, head: str, params, *, seed: int = 0):
        """Another head on this trunk: ``(new_lm, new_params)`` reusing ``params``' trunk.

        E.g. a reward model initialised from an SFT policy:
        ``rm, rm_params = policy.with_head("scalar", sft_params, seed=1)``.
        The LM head is carried over when both heads have one; new heads are freshly
        initialised (``score`` N(0, 1/sqrt(D+1)), ``value_head`` zeros). ``params`` is
        not modified.
        """
        _check_head(head)
        new_lm = dataclasses.replace(self, head=head)
        new_params = dict(new_lm.init(seed))
        new_params["trunk"] = params["trunk"]
        if "lm_head" in new_params and "lm_head" in params:
            new_params["lm_head"] = params["lm_head"]
        return new_lm, new_params

    def num_params(self, params) -> int:
        """Number of parameters in ``params``."""
        leaves = jax.tree_util.tree_leaves(params)
        return int(sum(np.prod(x.shape) for x in leaves))


def _embedding(cfg: ModelConfig, params):
    node = params["trunk"]
    for key in get_family(cfg.family).embed_path.split("/"):
        node = node[key]
    return node


def build(config: ModelConfig, head: str, *, seed: int = 0, dtype=jnp.float32,
          param_dtype=jnp.float32, abstract: bool = False, lora: LoRAConfig | None = None):
    """(graphdef, params) of a fresh :class:`Network`; ``abstract`` gives ShapeDtypeStructs.

    With ``lora``, the matching projections carry adapters (see :mod:`rlhf_jax.models.lora`).

    Random tensors are drawn from ``numpy.random.default_rng(seed)`` (fast and
    reproducible; no per-shape compilation).
    """
    _check_head(head)
    dtype, param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)

    def make(rng):
        net = Network(config, head, rngs=rng, dtype=dtype, param_dtype=param_dtype)
        if lora is not None:
            attach(net, lora, rng)
        return net

    if abstract:
        graphdef, state = nnx.split(nnx.eval_shape(lambda: make(None)), nnx.Param)
    else:
        graphdef, state = nnx.split(make(np.random.default_rng(seed)), nnx.Param)
    return graphdef, _stringify(state.to_pure_dict())


def from_config(config: ModelConfig, *, head: str = "lm", seed: int = 0, dtype=jnp.float32,
                param_dtype=jnp.float32, remat: str = "none") -> tuple[LM, Any]:
    """A randomly initialised model: ``(lm, params)`` (HF-style N(0, 0.02) init; norms 1, biases 0).

    Args:
      config: the architecture, e.g. ``ModelConfig.tiny("gpt2", vocab_size=64)``.
      head: ``"lm"``, ``"scalar"`` or ``"lm+value"``.
      seed: PRNG seed of the initialisation.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); param_dtype: storage dtype.
      remat: activation-checkpointing policy per layer (see :class:`LM`).

    Returns:
      ``(lm, params)``: the static :class:`LM` and its parameter pytree.

    Example:
      >>> lm, params = from_config(ModelConfig.tiny("llama", 64), head="lm", seed=0)
      >>> lm.logits(params, jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3))).shape
      (1, 3, 64)
    """
    lm = LM(config, head, dtype=dtype, param_dtype=param_dtype, remat=remat)
    return lm, lm.init(seed)
