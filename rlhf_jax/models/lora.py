"""LoRA: low-rank adapters on chosen projections, kept as their own pytree.

A projection ``y = x @ W (+ b)`` with ``W`` ``[in, out]`` gains ``scale * (x @ A) @ B``
with ``A`` ``[in, r]`` and ``B`` ``[r, out]``; ``scale = alpha / r`` (``alpha / sqrt(r)``
with rsLoRA). ``A`` is drawn Kaiming-uniform as PEFT does (``U(-1/sqrt(in), 1/sqrt(in))``)
and ``B`` is zero, so the adapted model equals the base at step 0. There is no dropout
(RL needs it off), and nothing is merged in the training forward.

How the pieces fit:

- :class:`LoRAConfig` (frozen, hashable) is a field of the static ``LM`` (``lm.lora``).
  The LM's graph then holds ``lora_a`` / ``lora_b`` in every matching ``Dense`` of the
  trunk (matched by module name, e.g. ``q_proj|v_proj``), stacked along the layer axis
  like the base weights; ``Dense`` adds the low-rank term when it has them.
- The weights stay in two pytrees: the frozen ``base`` (the checkpoint as loaded, may be
  stored in bf16) and the ``adapters`` (only ``lora_a`` / ``lora_b`` leaves, float32,
  nested like the base). The forward takes ``combine(base, adapters)``: a nested dict
  union, no array is copied.
- The trained pytree is the adapters (plus any new head, e.g. a reward model's
  ``score``): see :func:`partition`. The reference policy is the base without adapters
  (:func:`reference_lm` over the same ``base``), so no second copy of the weights exists.

  >>> from rlhf_jax.models import ModelConfig, from_config
  >>> base_lm, base = from_config(ModelConfig.tiny("llama", 64))
  >>> lm, adapters = add_lora(base_lm, LoRAConfig(rank=4, alpha=8))
  >>> logits = lm.logits(combine(base, adapters), ids, mask)       # doctest: +SKIP

Recipes (``frozen`` is an argument of the jitted step, never a captured constant, and has
no optimizer state):

- SFT: ``make_sft_step(lm, tx, cfg)(state, batch, frozen)`` with ``state.params = adapters``.
- Reward model: ``trainable, frozen = partition(params, heads=("score",))``; ``make_reward_step``
  as for SFT.
- RL (``PPOTrainer``): ``trainable, frozen = partition(params, heads=("value_head",))`` for an
  ``"lm+value"`` policy; ``state = trainer.init(trainable)`` and ``ref_params=frozen``: the
  frozen base is also the reference.
- DPO (or any loss against a reference): differentiate ``adapters`` only, ::

      policy_lp = lm.response_logprobs(combine(frozen, adapters), ids, mask, n)
      ref_lp = reference_lm(lm).response_logprobs(frozen, ids, mask, n)   # no adapters

  (stop the gradient of ``ref_lp`` or compute it once per batch).

Export: ``save_pretrained(lm, combine(base, adapters), out)`` writes merged HF weights;
``rlhf_jax.models.hf.peft.save_peft_adapter(lm, adapters, out)`` writes a PEFT folder.

References: Hu et al. 2021, arXiv 2106.09685 (LoRA); Kalajdzievski 2023, arXiv 2312.03732
(rsLoRA).
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LoRAConfig",
    "LLAMA_TARGETS",
    "GPT2_TARGETS",
    "ADAPTER_KEYS",
    "add_lora",
    "init_adapters",
    "combine",
    "split_adapters",
    "partition",
    "trained_heads",
    "reference_lm",
    "merge_adapters",
    "adapter_paths",
    "num_params",
]

LLAMA_TARGETS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
GPT2_TARGETS = "c_attn|c_proj|c_fc"
ADAPTER_KEYS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters, and their rank and scale.

    Attributes:
      rank: r >= 1.
      alpha: the scale numerator: ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
      targets: a regular expression matched in full against each projection's module name
        inside the trunk (``"q_proj|v_proj"``), or a tuple of names. Default: every
        projection of either family (Llama's seven, GPT-2's three).
      use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` (arXiv 2312.03732).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str | tuple[str, ...] = LLAMA_TARGETS + "|" + GPT2_TARGETS
    use_rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an int >= 1, got {self.rank!r}")
        if not float(self.alpha) > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        targets = self.targets
        if not isinstance(targets, str):
            targets = tuple(str(t) for t in targets)
            if not targets:
                raise ValueError("LoRA targets must name at least one module")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "alpha", float(self.alpha))
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"LoRA targets {self.targets!r} is not a valid regular expression: {err}") from None

    @property
    def scale(self) -> float:
        """The factor of the low-rank term: ``alpha / r`` or ``alpha / sqrt(r)``."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def pattern(self) -> str:
        """The regular expression a target module's name must match in full."""
        if isinstance(self.targets, str):
            return self.targets
        return "|".join(re.escape(t) for t in self.targets)

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


def attach(network, cfg: LoRAConfig, rng) -> None:
    """Give every matching ``Dense`` of ``network.trunk`` its ``lora_a`` / ``lora_b``.

    Called while the network is built (see ``rlhf_jax.models.lm.build``). ``rng`` is a
    ``numpy.random.Generator`` (A drawn Kaiming-uniform) or None (zeros: an abstract model).
    Raises ValueError when no module matches.
    """
    from flax import nnx

    from rlhf_jax.models.layers import Dense

    found = []
    for path, node in nnx.iter_graph(network.trunk):
        if isinstance(node, Dense) and path and isinstance(path[-1], str) and cfg.matches(path[-1]):
            found.append(node)
    if not found:
        raise ValueError(f"LoRA targets {cfg.targets!r} match no projection of this model")
    for dense in found:
        kernel = dense.kernel[...]
        *lead, fan_in, fan_out = kernel.shape
        bound = 1.0 / math.sqrt(fan_in)
        shape_a = (*lead, fan_in, cfg.rank)
        if rng is None:
            a = jnp.zeros(shape_a, jnp.float32)
        else:
            a = jnp.asarray(rng.uniform(-bound, bound, shape_a).astype(np.float32))
        dense.lora_a = nnx.Param(a)
        dense.lora_b = nnx.Param(jnp.zeros((*lead, cfg.rank, fan_out), jnp.float32))
        dense.lora_scale = cfg.scale


def add_lora(lm, cfg: LoRAConfig, *, seed: int = 0):
    """``(lora_lm, adapters)``: ``lm`` with ``cfg`` attached and freshly drawn adapters.

    The adapters are drawn without building the base weights (only their shapes are
    read), so this is cheap at any model size. ``lm`` must not already have LoRA.
    """
    if getattr(lm, "lora", None) is not None:
        raise ValueError("this LM already has LoRA adapters (lm.lora is set)")
    lora_lm = dataclasses.replace(lm, lora=cfg)
    return lora_lm, init_adapters(lora_lm, seed=seed)


def init_adapters(lm, *, seed: int = 0):
    """Fresh adapters of a LoRA ``lm``: A Kaiming-uniform, B zero (float32), stacked ``[L, ...]``.

    Draws from ``numpy.random.default_rng(seed)`` in a fixed order, so a seed fixes them.
    """
    if lm.lora is None:
        raise ValueError("lm has no LoRA config; use add_lora(lm, LoRAConfig(...))")
    rng = np.random.default_rng(seed)
    abstract, _ = split_adapters(lm.abstract_params())

    def draw(path, leaf):
        if _key(path[-1]) == "lora_b":
            return jnp.zeros(leaf.shape, jnp.float32)
        bound = 1.0 / math.sqrt(leaf.shape[-2])
        return jnp.asarray(rng.uniform(-bound, bound, leaf.shape).astype(np.float32))

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _key(entry) -> str:
    return str(getattr(entry, "key", entry))


def combine(base, *others):
    """The nested-dict union of ``base`` and the ``others`` (adapters, trained heads).

    Nothing is copied: the leaves are the same arrays. A leaf present in two trees is an
    error (a trained weight must not silently shadow a frozen one). ``None`` entries of
    ``others`` are skipped, so ``combine(frozen, trainable)`` works whether or not there
    is a frozen part: ``combine(None, params)`` is ``params``.
    """
    trees = [t for t in (base, *others) if t is not None]
    if not trees:
        raise ValueError("combine needs at least one tree")
    out = trees[0]
    for tree in trees[1:]:
        out = _union(out, tree, ())
    return out


def _union(a, b, path):
    if not isinstance(a, dict) or not isinstance(b, dict):
        raise ValueError(f"parameter {'/'.join(map(str, path))!r} is in both trees")
    out = dict(a)
    for k, v in b.items():
        out[k] = _union(a[k], v, path + (k,)) if k in a else v
    return out


def _filter(tree, keep):
    """The sub-tree of ``tree`` whose leaves satisfy ``keep(path)`` (empty dicts dropped)."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _filter(v, lambda p, k=k: keep((k,) + p))
            if sub:
                out[k] = sub
        elif keep((k,)):
            out[k] = v
    return out


def split_adapters(params):
    """``(adapters, base)``: the ``lora_a`` / ``lora_b`` leaves, and everything else."""
    is_adapter = lambda path: path[-1] in ADAPTER_KEYS  # noqa: E731
    return _filter(params, is_adapter), _filter(params, lambda p: not is_adapter(p))


def partition(params, *, heads=()):
    """``(trainable, frozen)`` of a LoRA model's full params.

    ``trainable`` holds the adapters and the top-level ``heads`` named (e.g.
    ``("score",)`` for a reward model, ``("value_head",)`` for a shared-trunk value head:
    heads that are new and must be trained); ``frozen`` holds the rest. Train
    ``trainable``, pass ``frozen`` as an argument, and run the model on
    ``combine(frozen, trainable)``.
    """
    adapters, rest = split_adapters(params)
    missing = [h for h in heads if h not in rest]
    if missing:
        raise ValueError(f"heads {missing} are not in params (top-level keys: {sorted(rest)})")
    trainable = combine(adapters, {h: rest[h] for h in heads}) if heads else adapters
    frozen = {k: v for k, v in rest.items() if k not in heads}
    return trainable, frozen


def trained_heads(lm) -> tuple[str, ...]:
    """The top-level heads a LoRA run of ``lm`` trains beside its adapters (the new heads the
    base checkpoint has no trained weights for): ``("score",)`` for head ``"scalar"``,
    ``("value_head",)`` for ``"lm+value"``, none for ``"lm"``."""
    return {"scalar": ("score",), "lm+value": ("value_head",)}.get(getattr(lm, "head", "lm"), ())


def reference_lm(lm, *, head: str = "lm"):
    """The base model without adapters (and with ``head``): the reference policy of RL/DPO.

    Its params are the frozen base (``frozen`` of :func:`partition`, whose trunk and LM
    head are the policy's). Equal base models share one compilation.
    """
    return dataclasses.replace(lm, lora=None, head=head)


def adapter_paths(params):
    """The ``/``-joined paths of the adapted projections (``trunk/layers/self_attn/q_proj`` ...)."""
    adapters, _ = split_adapters(params)
    out = []

    def walk(tree, prefix):
        if "lora_a" in tree:
            out.append("/".join(prefix))
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, prefix + (str(k),))

    walk(adapters, ())
    return out


def merge_adapters(lm, params):
    """``(base_lm, merged_params)``: ``W + scale * A @ B`` folded into each adapted kernel.

    For export (``save_pretrained``) and fast sampling; never inside the training forward.
    The sum is formed in float32 and cast to the kernel's storage dtype.
    """
    if lm.lora is None:
        raise ValueError("lm has no LoRA config")
    scale = lm.lora.scale

    def merge(tree):
        if not isinstance(tree, dict):
            return tree
        if "lora_a" in tree:
            out = {k: v for k, v in tree.items() if k not in ADAPTER_KEYS}
            w = tree["kernel"]
            delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(tree["lora_a"], jnp.float32),
                               jnp.asarray(tree["lora_b"], jnp.float32))
            out["kernel"] = (jnp.asarray(w, jnp.float32) + scale * delta).astype(jnp.asarray(w).dtype)
            return out
        return {k: merge(v) for k, v in tree.items()}

    return dataclasses.replace(lm, lora=None), merge(params)


def num_params(tree) -> int:
    """Number of scalars in a pytree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))
