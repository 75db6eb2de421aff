"""HF checkpoints in and out: ``from_pretrained`` (config.json + safetensors, single or
sharded) and ``save_pretrained`` (a checkpoint that transformers loads).

Weights are mapped through one table per family of (HF name pattern, our parameter
path, transpose?) rows; ``{i}`` stands for a layer index: HF's per-layer tensors
``layers.<i>.*`` are slice ``i`` of one stacked parameter ``[L, ...]`` of ours (the layers
are one scanned block), so loading stacks them and export unstacks. The same table serves
both directions. Every tensor's shape is checked; an unknown or missing tensor is an error
that names it. safetensors files are read and written here directly (the format is
a JSON header plus raw little-endian buffers), so bfloat16 checkpoints load without
torch.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from rlhf_jax.errors import LoadError
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.families import get_family
from rlhf_jax.models.lm import HEADS, LM
from rlhf_jax.models.lora import merge_adapters

# HF's *ForSequenceClassification has no score bias; a reward head's bias (set by the
# normalisation to mean 0) travels in this file next to the weights and is restored on load.
SCORE_BIAS_FILE = "rlhf_jax_score_bias.json"

# ------------------------------------------------------------- weight tables
# Each family's trunk table lives in its module (``Family.hf_table``, see
# rlhf_jax.models.registry); the heads are shared:
_HEADS_TABLE = [("lm_head.weight", "lm_head/kernel", True),
                ("score.weight", "score/kernel", True),
                ("score.bias", "score/bias", False)]
# Buffers some checkpoints carry that are not parameters.
_IGNORED = [re.compile(r"^(transformer\.)?h\.\d+\.attn\.(masked_)?bias$"),
            re.compile(r"rotary_emb\.inv_freq$"),
            re.compile(r"^(gpt_neox\.)?layers\.\d+\.attention\.(masked_)?bias$")]


def _table(family: str):
    """Rows of (compiled HF regex, HF format string, our path, transpose, stacked).

    ``stacked`` rows hold a per-layer tensor: the regex captures the layer index and our
    path (``{i}`` removed) names the stacked parameter.
    """
    fam = get_family(family)
    trunk, prefix = fam.hf_table, fam.hf_prefix
    rows = []
    for hf, ours, transpose in trunk:
        # The trunk prefix is optional on load (base-model checkpoints lack it).
        regex = "^(?:" + re.escape(prefix) + ")?" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"
        rows.append((re.compile(regex), prefix + hf, "trunk/" + ours.replace("/{i}", ""), transpose,
                     "{i}" in hf))
    for hf, ours, transpose in tuple(fam.hf_head_rows) + tuple(_HEADS_TABLE):
        rows.append((re.compile("^" + re.escape(hf) + "$"), hf, ours, transpose, False))
    return rows


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (str(k),)))
        return out
    return {"/".join(prefix): tree}


def _unflatten(flat):
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        keys = path.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return tree


# -------------------------------------------------------------- safetensors
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def _safetensors_header(path: str) -> tuple[dict, int]:
    """The header of a ``.safetensors`` file and the size of its data section, checked.

    Raises:
      LoadError: naming the file (and tensor) when the header is unreadable or the file is
        shorter than the header says (a truncated download or copy).
    """
    if not os.path.isfile(path):
        raise LoadError(f"{path}: no such safetensors file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise LoadError(f"{path}: not a safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise LoadError(f"{path}: truncated or not a safetensors file (header of {header_len} bytes, "
                            f"file of {size})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, ValueError) as e:
            raise LoadError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _ST_DTYPES:
            raise LoadError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')}")
        start, end = info["data_offsets"]
        want = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
        if end > data_size or end - start != want:
            raise LoadError(f"{path}: truncated or corrupted: tensor {name!r} {tuple(info['shape'])} needs bytes "
                            f"{start}..{start + want} of the data, the file holds {data_size}")
    return header, data_size


def read_safetensors(path):
    """Yield ``(name, np.ndarray)`` for each tensor of a ``.safetensors`` file (memory-mapped).

    Raises:
      LoadError: naming the file (and tensor) when the file is truncated or damaged.
    """
    path = str(path)
    header, data_size = _safetensors_header(path)
    offset = os.path.getsize(path) - data_size
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset) if data_size else np.zeros(0, np.uint8)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=_ST_DTYPES[info["dtype"]])
        yield name, arr.reshape(info["shape"])


def check_checkpoint(path) -> dict:
    """Check a local HF folder without loading it: `config.json` parses and every safetensors
    file is complete. Returns the config dict; errors (`LoadError`) name the file."""
    folder = Path(os.fspath(path))
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LoadError(f"{folder} has no config.json (not an HF model folder)")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise LoadError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    for file in _checkpoint_files(folder):
        _safetensors_header(str(file))
    return config


def write_safetensors(path, tensors: dict, metadata: dict | None = None):
    """Write ``{name: np.ndarray}`` as a ``.safetensors`` file (PyTorch-compatible)."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


def _checkpoint_files(folder: Path):
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LoadError(f"{index}: no `weight_map` object")
        return [folder / name for name in sorted(set(weight_map.values()))]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder} "
                            "(PyTorch .bin checkpoints are not supported: convert them to safetensors)")


def _read_json(path: Path):
    """A JSON file of a checkpoint folder; errors name the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LoadError(f"{path}: cannot read it as JSON ({e})") from None


def _open_checkpoint(path):
    """``(folder, HF config dict, [(file name, iterator of (HF tensor name, array))])`` of an HF
    folder (config.json + safetensors) or of a GGUF file (or a folder holding one)."""
    from rlhf_jax.models.hf import gguf

    if gguf.is_gguf(path):
        file = gguf.gguf_file(path)
        hf_config, named_arrays = gguf.read_gguf(file)
        return file.parent, hf_config, [(str(file), named_arrays)]
    folder = _resolve(path)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"no config.json in {folder}")
    sources = [(str(file), read_safetensors(file)) for file in _checkpoint_files(folder)]
    hf_config = _read_json(config_path)
    if not isinstance(hf_config, dict):
        raise LoadError(f"{config_path}: expected a JSON object, got {type(hf_config).__name__}")
    return folder, hf_config, sources


def _resolve(path) -> Path:
    folder = Path(os.fspath(path)).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ValueError(f"from_pretrained expects a directory or a .gguf file (or a hub repo id), "
                         f"got the file {folder}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise FileNotFoundError(f"{path!r} is not a local directory and huggingface_hub is not "
                                "installed to download it") from err
    return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.model",
                                                             "*.txt", "*.tiktoken"]))


# ------------------------------------------------------------ from_pretrained
def _architecture_kind(hf_config: dict) -> str:
    archs = hf_config.get("architectures") or []
    if not archs:
        return "causal"
    arch = archs[0]
    if arch.endswith("ForSequenceClassification"):
        return "classifier"
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return "causal"
    if arch.endswith("Model"):
        return "base"
    raise ValueError(f"unsupported architecture {arch!r} in config.json: expected a "
                     "*ForCausalLM, *LMHeadModel, *ForSequenceClassification or base *Model")


def from_pretrained(path, *, head: str = "lm", dtype=jnp.float32, param_dtype=jnp.float32,
                    seed: int = 0, remat: str = "none", shardings=None) -> tuple[LM, dict]:
    """Load an HF checkpoint folder (or hub repo id): ``(lm, params)``.

    Reads ``config.json`` and ``model.safetensors`` (or the shards listed in
    ``model.safetensors.index.json``), or a GGUF file (or a folder holding exactly one
    ``.gguf`` and no ``config.json``; see :mod:`rlhf_jax.models.hf.gguf`). A hub download
    is tried only when ``path`` is not a local path and ``huggingface_hub`` is installed.

    Args:
      path: local folder, ``.gguf`` file or hub repo id.
      head: ``"lm"`` (needs a causal-LM checkpoint, or tied embeddings);
        ``"scalar"`` from a ``*ForSequenceClassification`` checkpoint with one label
        (its ``score``), or from a causal-LM checkpoint with a fresh score head
        N(0, 1/sqrt(D+1)) (a reward model initialised from the SFT model);
        ``"lm+value"``: causal LM plus a zero value head.
      dtype: compute dtype; param_dtype: storage dtype of the loaded weights.
      seed: PRNG seed for freshly initialised heads.
      remat: activation-checkpointing policy per layer (see :class:`LM`).
      shardings: None (every tensor whole on the default device), or the target
        ``jax.sharding.Sharding`` of every parameter: a pytree with the structure of the
        params, or a function of the abstract params (``lm.abstract_params()``) that
        returns one (e.g. ``lambda a: param_shardings(a, mesh, fsdp=True)``). Each tensor
        is then built with ``jax.make_array_from_callback`` from the memory-mapped file:
        every device reads only its own slice (of each layer, for the stacked per-layer
        parameters), so no process ever holds a whole checkpoint, and no device more than
        its shards.

    Returns:
      ``(lm, params)``: the static :class:`LM` and the loaded parameter pytree.

    Raises:
      ValueError: unsupported model type/architecture, a tensor with the wrong shape,
        an unknown tensor or a missing one (each named).
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    folder, hf_config, sources = _open_checkpoint(path)
    try:
        config = ModelConfig.from_hf_config(hf_config)
    except (KeyError, TypeError) as e:
        raise LoadError(f"{folder}: not a usable model config ({type(e).__name__}: {e})") from None
    kind = _architecture_kind(hf_config)
    if kind == "classifier":
        num_labels = hf_config.get("num_labels", len(hf_config.get("id2label") or {0: 0, 1: 1}))
        if num_labels != 1:
            raise ValueError(f"{folder}: a ForSequenceClassification checkpoint with num_labels="
                             f"{num_labels}; only one label (a scalar reward) is supported")
        if head != "scalar":
            raise ValueError(f"{folder} holds a {hf_config['architectures'][0]} (a scalar head); "
                             "load it with head='scalar'")

    lm = LM(config, head, dtype=dtype, param_dtype=param_dtype, remat=remat)
    expected = _flatten(lm.abstract_params())
    whole: dict = {}  # our path -> memory-mapped array (after transpose, a view)
    stacks: dict = {}  # our stacked path -> {layer: memory-mapped array}
    rows = _table(config.family)
    for source, named_arrays in sources:
        for name, array in named_arrays:
            if any(p.search(name) for p in _IGNORED):
                continue
            ours, layer, transpose = _match(rows, name)
            if ours is None:
                raise LoadError(f"{source}: unknown tensor {name!r} for model_type "
                                 f"{config.model_type!r} with head {head!r}")
            if ours.startswith("lm_head/") and (head == "scalar" or config.tie_word_embeddings):
                continue  # an LM head we do not need (reward model from SFT) or tied
            if ours.startswith("score/") and head != "scalar":
                raise ValueError(f"tensor {name!r} is a sequence-classification head; "
                                 "load with head='scalar'")
            if ours not in expected or (layer is not None and layer >= config.num_layers):
                raise LoadError(f"{source}: tensor {name!r} (-> {ours}) has no place in this "
                                 f"model (config: {config.model_type}, {config.num_layers} layers, "
                                 f"head {head!r}); config.json and weights disagree")
            if transpose:
                array = array.T
            full = tuple(expected[ours].shape)
            want = full if layer is None else full[1:]
            if tuple(array.shape) != want:
                raise LoadError(f"{source}: tensor {name!r}: shape {tuple(array.shape)} "
                                f"(after transpose: {transpose}) but the model's config needs {want}")
            if layer is None:
                whole[ours] = array
                continue
            stacks.setdefault(ours, {})[layer] = array
    missing = []
    for ours, views in stacks.items():
        if len(views) != config.num_layers:
            missing += [_to_hf(rows, ours, i)[0] for i in range(config.num_layers) if i not in views]
    if shardings is not None and callable(shardings):
        shardings = shardings(lm.abstract_params())
    targets = None if shardings is None else _flatten(shardings)
    store = jnp.dtype(param_dtype)
    loaded: dict = {}
    if not missing:
        for ours, array in whole.items():
            loaded[ours] = _place(expected[ours].shape, store, targets and targets[ours],
                                  functools.partial(_read_slice, array, store))
        for ours, views in stacks.items():
            loaded[ours] = _place(expected[ours].shape, store, targets and targets[ours],
                                  functools.partial(_read_stacked, views, store))
    fresh = _fresh_heads(expected, loaded, config, head, seed, param_dtype)
    for ours, value in fresh.items():
        host = np.asarray(value)
        loaded[ours] = _place(host.shape, host.dtype, targets and targets[ours], lambda index, h=host: h[index])
    for p in expected:
        if p not in loaded and p not in whole and p not in stacks:
            name, _, stacked = _to_hf(rows, p)
            missing += [_to_hf(rows, p, i)[0] for i in range(config.num_layers)] if stacked else [name or p]
    if missing:
        raise LoadError(f"{folder}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    bias_file = folder / SCORE_BIAS_FILE
    if head == "scalar" and bias_file.is_file():
        try:
            bias = float(_read_json(bias_file)["bias"])
        except (KeyError, TypeError, ValueError) as e:
            raise LoadError(f"{bias_file}: no number `bias` ({e})") from None
        host = np.full((1,), bias, store)
        loaded["score/bias"] = _place((1,), store, targets and targets["score/bias"], lambda index: host[index])
    return lm, _unflatten(loaded)


def _read_slice(array, dtype, index):
    """``array[index]`` as a contiguous host array of ``dtype`` (reads only that slice)."""
    return np.ascontiguousarray(np.asarray(array[index]), dtype=dtype)


def _read_stacked(views, dtype, index):
    """Slice ``index`` of the ``[L, ...]`` stack of per-layer arrays ``views`` (a dict by layer)."""
    layers = range(len(views))[index[0]] if index else range(len(views))
    rest = tuple(index[1:])
    return np.stack([np.asarray(views[i][rest], dtype=dtype) for i in layers])


def _place(shape, dtype, sharding, read):
    """A ``jax.Array`` of ``shape``: ``read(index)`` gives the host data of slice ``index``.

    Without a sharding the whole array goes to the default device (uncommitted, as
    ``jax.device_put`` does); with one, each addressable device gets only its slice.
    """
    shape = tuple(shape)
    if sharding is None:
        return jax.device_put(read(tuple(slice(None) for _ in shape)))
    return jax.make_array_from_callback(shape, sharding, read)


def _match(rows, name):
    """(our path, layer index or None, transpose) of an HF tensor name, or (None, None, False)."""
    for regex, _, ours, transpose, stacked in rows:
        m = regex.match(name)
        if m:
            return ours, (int(m.group(1)) if stacked else None), transpose
    return None, None, False


def _to_hf(rows, ours_path, layer=None):
    """(HF tensor name, transpose, stacked) of one of our parameter paths.

    A stacked path names layer ``layer`` (the name keeps ``{i}`` when ``layer`` is None);
    an unknown path gives ``(None, False, False)``.
    """
    for _, hf, ours, transpose, stacked in rows:
        if ours == ours_path:
            return (hf.replace("{i}", str(layer)) if stacked and layer is not None else hf), transpose, stacked
    return None, False, False


def _unstack(name, array):
    """``(HF name of layer i, array[i])`` for each layer of a stacked parameter."""
    return [(name.replace("{i}", str(i)), array[i]) for i in range(array.shape[0])]


def _fresh_heads(expected, loaded, config, head, seed, param_dtype):
    """Heads that a causal-LM checkpoint does not hold: score (reward init) and value (zeros)."""
    d = config.hidden_size
    out = {}
    if head == "scalar" and "score/kernel" not in loaded:
        key = jax.random.PRNGKey(seed)
        out["score/kernel"] = (jax.random.normal(key, (d, 1), jnp.float32) / math.sqrt(d + 1)).astype(param_dtype)
    if "score/bias" in expected and "score/bias" not in loaded:
        out["score/bias"] = jnp.zeros((1,), param_dtype)
    if head == "lm+value":
        out["value_head/kernel"] = jnp.zeros((d, 1), param_dtype)
        out["value_head/bias"] = jnp.zeros((1,), param_dtype)
    return out


# ------------------------------------------------------------ save_pretrained
def save_pretrained(lm: LM, params, out_dir, *, tokenizer=None, save_dtype=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that transformers loads.

    Head ``"lm"`` writes a ``*ForCausalLM`` (GPT-2: ``GPT2LMHeadModel``); ``"scalar"``
    writes a ``*ForSequenceClassification`` with one label (HF's ``score`` has no
    bias: a nonzero bias is dropped with a warning; HF reads the score at the last
    token that is not ``pad_token_id``, so ``pad_token_id`` is written, falling back
    to ``eos_token_id``); ``"lm+value"`` writes the causal LM without the value head
    (warning). A LoRA model is saved merged (``W + scale * A @ B``, see
    :func:`rlhf_jax.models.lora.merge_adapters`); for an adapter folder instead, see
    :func:`rlhf_jax.models.hf.peft.save_peft_adapter`.

    Args:
      lm: the model. params: its parameters (LoRA: ``combine(base, adapters)``).
      out_dir: created if needed.
      tokenizer: optional; saved with ``tokenizer.save_pretrained(out_dir)``.
      save_dtype: storage dtype (default: the params' own dtype).

    Returns:
      the output folder.
    """
    if lm.lora is not None:
        lm, params = merge_adapters(lm, params)
    out = Path(os.fspath(out_dir))
    out.mkdir(parents=True, exist_ok=True)
    cfg = lm.config
    rows = _table(cfg.family)
    flat = _flatten(params)
    tensors = {}
    score_bias = 0.0
    for path, value in flat.items():
        if path.startswith("value_head/"):
            continue
        if path == "score/bias":
            score_bias = float(np.asarray(value, np.float32)[0])
            continue
        name, transpose, stacked = _to_hf(rows, path)
        if name is None:
            raise ValueError(f"parameter {path!r} has no HF name")
        array = np.asarray(jax.device_get(value))
        if save_dtype is not None:
            array = array.astype(jnp.dtype(save_dtype))
        for hf_name, piece in (_unstack(name, array) if stacked else [(name, array)]):
            tensors[hf_name] = np.ascontiguousarray(piece.T if transpose else piece)
    if lm.head == "lm+value":
        warnings.warn("head 'lm+value': the value head is not part of an HF causal-LM "
                      "checkpoint and is not saved", stacklevel=2)
    head = "scalar" if lm.head == "scalar" else "lm"
    stored = next(iter(tensors.values())).dtype
    hf_config = cfg.to_hf_config(head=head, dtype=np.dtype(stored).name)
    if head == "scalar" and hf_config.get("pad_token_id") is None:
        fallback = cfg.eos_token_id if cfg.eos_token_id is not None else 0
        warnings.warn(f"config has no pad_token_id; writing pad_token_id={fallback} so HF can find "
                      "the last token (HF treats every token equal to it as padding)", stacklevel=2)
        hf_config["pad_token_id"] = fallback
    write_safetensors(out / "model.safetensors", tensors)
    bias_file = out / SCORE_BIAS_FILE
    if score_bias != 0.0:
        warnings.warn(f"the reward head bias ({score_bias:.4g}) has no place in an HF "
                      f"ForSequenceClassification checkpoint: it is saved in {SCORE_BIAS_FILE}, which "
                      "rlhf_jax restores; plain transformers scores are shifted by it", stacklevel=2)
        bias_file.write_text(json.dumps({"bias": score_bias}) + "\n")
    elif bias_file.exists():
        bias_file.unlink()
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out

