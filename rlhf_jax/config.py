"""Run configurations: frozen dataclasses, loaded from YAML with dotted overrides.

Every `rlhf-jax` subcommand reads one config class from this module. The
classes compose the trainers' own hyper-parameter dataclasses (`SFTConfig`,
`RewardConfig`, `PPOConfig` from `rlhf_jax.train`) with the sections a run
needs around them: the model, the tokenizer, the data, the reward, the output
folder, checkpointing, the seed and the device mesh.

`load_config(path, overrides, cls)` turns a YAML file plus `a.b=c` overrides
into an instance of `cls` and validates all of it before anything touches a
model: an unknown key, a value of the wrong type or batch sizes that cannot be
split as asked raise `ConfigError`, whose message names the dotted key and the
file (and line, where the YAML has one). `dump_config` writes the resolved
config back as YAML, and `config_hash` fingerprints it so that a run folder
can tell a resume (same config) from a clash (different config).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from rlhf_jax.train.ppo import PPOConfig
from rlhf_jax.train.reward import RewardConfig
from rlhf_jax.train.sft import SFTConfig

__all__ = [
    "ConfigError",
    "ModelSection",
    "TokenizerSection",
    "DataSection",
    "RewardSection",
    "MeshSection",
    "SFTRunConfig",
    "RewardRunConfig",
    "PPORunConfig",
    "EvalModel",
    "EvalConfig",
    "ExportConfig",
    "COMMAND_CONFIGS",
    "load_config",
    "from_dict",
    "to_dict",
    "dump_config",
    "config_hash",
    "field_help",
]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    """A dataclass field whose `--help` text is `text`."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelSection:
    """Which model to start from."""

    path: str | None = _help("local HF folder (config.json + safetensors) or hub id of the starting model", None)
    random_init: dict | None = _help(
        "instead of `path`: an HF-style config.json dict (with `model_type`) for a randomly initialised "
        "model (tests, experiments)", None)
    dtype: Literal["float32", "bfloat16", "float16"] = _help("compute dtype", "float32")
    param_dtype: Literal["float32", "bfloat16", "float16"] = _help("parameter (master weight) dtype", "float32")


@dataclass(frozen=True)
class TokenizerSection:
    """The tokenizer (an HF `AutoTokenizer` folder)."""

    path: str | None = _help("tokenizer folder or hub id; default: model.path", None)
    pad_token: str | None = _help(
        "a token already in the vocabulary to use as PAD when the tokenizer has none or its PAD equals EOS", None)


@dataclass(frozen=True)
class DataSection:
    """Training / evaluation data and how it is tokenized."""

    train_files: tuple[str, ...] = _help(
        "JSONL or Parquet files, or HF data sets `name[:config]:split` (needs `datasets` and network)", ())
    eval_files: tuple[str, ...] = _help("held-out files in the same format (optional)", ())
    prompt_column: str = _help("column with the prompt (string or message list)", "prompt")
    completion_column: str = _help("SFT: column with the completion", "completion")
    messages_column: str = _help("SFT: column with a conversation (list of {role, content})", "messages")
    chosen_column: str = _help("preferences: column with the preferred response", "chosen")
    rejected_column: str = _help("preferences: column with the dispreferred response", "rejected")
    answer_column: str = _help("RL: column with the reference answer for verifiers (optional)", "answer")
    max_prompt_length: int = _help("longest prompt in tokens; a longer prompt is an error naming its line", 256)
    max_length: int = _help("longest prompt + completion in tokens", 512)
    too_long: Literal["error", "truncate", "drop"] = _help(
        "rows over the limits: error; truncate the completion to max_length (a too-long prompt stays an "
        "error); or drop the row (too-long prompts too)", "error")
    prompt_template: str | None = _help(
        "for string prompts: a text with `{prompt}` where the prompt goes, e.g. 'Question: {prompt}\\nAnswer:'",
        None)
    buckets: tuple[int, ...] = _help("allowed padded lengths (the data is padded to the smallest that fits)",
                                      (16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
    chat_template: bool = _help("apply tokenizer.apply_chat_template to message-list rows when it has one", True)
    max_rows: int | None = _help("use only the first N rows of each file (quick experiments)", None)


@dataclass(frozen=True)
class RewardSection:
    """Where PPO's reward comes from: a reward model or a Python function."""

    model_path: str | None = _help(
        "folder of a reward model (ours, from `rlhf-jax reward`, or an HF *ForSequenceClassification)", None)
    function: str | None = _help(
        "`module:function` reward, called as f(prompts, completions, answer=[...]) -> list of floats "
        "(e.g. rlhf_jax.verifiers:math_reward)", None)


@dataclass(frozen=True)
class MeshSection:
    """The device mesh (data parallel x FSDP)."""

    data: int = _help("devices along the data axis (-1: all that fsdp leaves)", -1)
    fsdp: int = _help("devices along the FSDP (parameter sharding) axis", 1)


# --------------------------------------------------------------------------- YAML <-> dataclasses


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(map(str, args))
    if origin in (tuple, list) and args:
        return f"list of {_type_name(args[0])}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    return str(tp).replace("typing.", "")


def _is_optional(tp) -> bool:
    return type(None) in typing.get_args(tp) and (
        typing.get_origin(tp) in (typing.Union, types.UnionType))


def _convert(value, tp, key: str):
    """Check `value` against the annotation `tp` and convert it; `key` names it in errors."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise _type_error(key, tp, value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"`{key}`: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(key, tp, value, "a mapping")
        return _build(tp, value, key + ".")
    if origin in (tuple, list):
        if isinstance(value, str) and args and args[0] is str:
            value = [value]  # `train_files: a.jsonl` means a one-item list
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, tp, value, "a list")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"`{key}`: expected {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(key, tp, value, "a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(key, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, tp, value)
        return value
    if tp is float:
        if isinstance(value, bool):
            raise _type_error(key, tp, value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `1e-5` (no dot) as a string; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, tp, value)
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(key, tp, value)
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise _type_error(key, tp, value)
        return value
    return value


def _type_error(key, tp, value, expected=None):
    return ConfigError(
        f"`{key}`: expected {expected or _type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            close = [n for n in fields if n.lower().startswith(str(name)[:3].lower())]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown key `{prefix}{name}`{hint}; known keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key `{prefix}{name}`")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # the dataclass's own __post_init__ checks
        # Name the keys of the message by their dotted path (`batch_size` -> `train.batch_size`).
        message = re.sub(r"`(\w+)`", lambda m: f"`{prefix}{m.group(1)}`" if m.group(1) in fields else m.group(0),
                         str(e))
        if "`" not in message:
            message = f"`{prefix.rstrip('.') or cls.__name__}`: {message}"
        raise ConfigError(message) from None


def from_dict(cls, data: dict | None):
    """Build the dataclass `cls` from a nested dict, strictly (unknown keys and wrong types are errors).

    Args:
      cls: a (frozen) dataclass whose fields may be dataclasses themselves.
      data: nested mapping, e.g. from `yaml.safe_load`; None means all defaults.

    Returns:
      An instance of `cls`.

    Raises:
      ConfigError: naming the dotted key that is unknown, missing or of the wrong type.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping at the top level, got {type(data).__name__}")
    return _build(cls, data)


def to_dict(cfg) -> dict:
    """A dataclass config as plain nested dicts/lists (tuples become lists)."""
    def plain(x):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return plain(cfg)


def dump_config(cfg) -> str:
    """The config as YAML text (what `resolved_config.yaml` holds); `load_config` reads it back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def config_hash(cfg, *, ignore: tuple[str, ...] = ("output_dir",)) -> str:
    """A short SHA-256 fingerprint of the config, ignoring the top-level keys in `ignore`.

    Two runs with the same hash train the same thing, so a run folder whose
    stored hash matches may be resumed.
    """
    data = {k: v for k, v in to_dict(cfg).items() if k not in ignore}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _key_lines(text: str) -> dict[str, int]:
    """Map every dotted key of a YAML mapping to its 1-based line number."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. ppo.kl_coef=0.1)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override `{key}`: cannot parse {raw!r} as a YAML value ({e.__class__.__name__})")
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted `key=value` overrides (values parsed as YAML) in a nested dict; returns a copy."""
    data = json.loads(json.dumps(data, default=list)) if data else {}
    for item in overrides:
        parts, value = _parse_override(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override `{item}`: `{'.'.join(parts[:i + 1])}` is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path, overrides: list[str] | tuple[str, ...] = (), cls=None):
    """Read a YAML config, apply `a.b=c` overrides, and build and validate `cls`.

    Args:
      path: the YAML file (None: start from the defaults of `cls`).
      overrides: dotted assignments; the value is parsed as a YAML scalar or
        flow collection (`ppo.kl_coef=0.1`, `data.train_files=[a.jsonl,b.jsonl]`).
      cls: the config dataclass (e.g. `PPORunConfig`).

    Returns:
      An instance of `cls`, validated (types, known keys, batch arithmetic).

    Raises:
      ConfigError: naming the dotted key, the file and, when known, its line.
    """
    if cls is None:
        raise ConfigError("load_config needs the config class `cls`")
    text, lines, where = "", {}, "the defaults"
    if path is not None:
        where = str(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f", line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        lines = _key_lines(text)
    else:
        data = {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys, got {type(data).__name__}")
    overridden = {".".join(_parse_override(o)[0]): o for o in overrides}
    data = apply_overrides(data, list(overrides))
    try:
        cfg = from_dict(cls, data)
        validate = getattr(cfg, "validate", None)
        if validate is not None:
            validate()
    except ConfigError as e:
        message = str(e)
        key = message.split("`")[1] if message.count("`") >= 2 else None
        override = next((o for k, o in overridden.items()
                         if key and (key == k or key.startswith(k + ".") or k.startswith(key + "."))), None)
        line = lines.get(key) if key else None
        if override is not None:
            source = f"{where} with override {override!r}"
        else:
            source = where + (f", line {line}" if line else "")
        raise ConfigError(f"{source}: {message}") from None
    return cfg


def field_help(cls, prefix: str = "") -> list[tuple[str, str, str]]:
    """`(dotted key, type, help)` for every leaf field of a config class (for `--help`).

    The help text is the field's `metadata["help"]`, else the line for that
    field in the class docstring's `Attributes:` section, else empty.
    """
    hints = typing.get_type_hints(cls)
    doc = _docstring_attributes(cls)
    for name, text in _FALLBACK_HELP.get(cls.__name__, {}).items():
        if len(doc.get(name, "")) < 16:  # missing or a fragment such as "GAE."
            doc[name] = text
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if _is_optional(tp) else [tp]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            rows.extend(field_help(inner[0], prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        text = f.metadata.get("help") or doc.get(f.name, "")
        rows.append((prefix + f.name, _type_name(tp), f"{text} [default: {to_dict(default)!r}]".strip()))
    return rows


def _docstring_attributes(cls) -> dict[str, str]:
    """Parse `name: text` (or `a, b, c: text`) lines of a class docstring's Attributes section."""
    out: dict[str, str] = {}
    current: list[str] = []
    pending: list[str] = []  # names of a `a, b,` line whose text follows on the next line
    for raw in (cls.__doc__ or "").splitlines():
        line = raw.strip()
        head, sep, rest = line.partition(":")
        names = [n.strip() for n in head.split(",")]
        if line.endswith(",") and all(n.isidentifier() for n in names[:-1]) and not names[-1]:
            pending += names[:-1]
            continue
        names = pending + names
        pending = []
        if not line:
            current = []
        elif sep and all(n.isidentifier() for n in names):
            current = names
            for n in names:
                out[n] = rest.strip()
        else:
            for n in current:
                out[n] = (out[n] + " " + line).strip()
    # Several fields on one line ("clip_eps: policy ratio clip. dual_clip: ..."): split them.
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    pattern = re.compile(r"(?<=\.)\s+([a-z_][a-z0-9_]*(?:,\s*[a-z_][a-z0-9_]*)*):\s")
    for name in list(out):
        pieces = pattern.split(out[name])
        owners = [name]
        out[name] = pieces[0].strip()
        for i in range(1, len(pieces) - 1, 2):
            names = [n.strip() for n in pieces[i].split(",")]
            if not all(n in fields for n in names):
                for n in owners:
                    out[n] = f"{out[n]} {pieces[i]}: {pieces[i + 1]}".strip()
                continue
            owners = names
            for n in names:
                out[n] = pieces[i + 1].strip()
    return out


# Help for trainer-config fields whose docstrings describe them in prose rather than as
# `name: text` (used only where the docstring gives nothing).
_FALLBACK_HELP = {
    "PPOConfig": {
        "max_new_tokens": "response length limit of the sampler",
        "gamma": "GAE discount",
        "lam": "GAE lambda",
        "gae_method": "GAE implementation: auto, scan or associative",
        "kl_horizon": "horizon of the adaptive KL controller",
        "temperature": "sampling temperature (the training forward divides the logits by it too)",
        "top_k": "top-k sampling (0 = off)",
        "top_p": "nucleus sampling (1 = off)",
        "eos_token_id": "EOS id (null: the tokenizer's, filled in by the CLI)",
        "pad_token_id": "PAD id (the CLI sets the tokenizer's)",
        "whiten_rewards": "whiten the shaped rewards without shifting the mean (OpenAI)",
        "whiten_advantages": "whiten the advantages over valid tokens",
        "learning_rate": "policy learning rate",
        "value_learning_rate": "value-network learning rate (null: learning_rate)",
        "warmup_steps": "linear warm-up steps of the optimizer",
        "total_steps": "schedule length (null: filled in from the run length)",
        "schedule": "learning-rate decay after warm-up: constant, cosine or linear",
        "weight_decay": "AdamW weight decay",
        "max_grad_norm": "global gradient-norm clip (null: off)",
        "b1": "Adam beta1",
        "b2": "Adam beta2",
    },
}



# --------------------------------------------------------------------------- run configs


def _require(condition: bool, message: str):
    if not condition:
        raise ConfigError(message)


def _check_model(model: ModelSection, tokenizer: TokenizerSection, prefix: str = "model"):
    _require((model.path is None) != (model.random_init is None),
             f"`{prefix}.path`: give exactly one of `{prefix}.path` and `{prefix}.random_init`")
    if model.random_init is not None:
        _require("model_type" in model.random_init,
                 f"`{prefix}.random_init`: the config dict needs a `model_type` (e.g. gpt2, llama)")
        _require(tokenizer.path is not None,
                 "`tokenizer.path`: a randomly initialised model needs an explicit tokenizer path")


def _check_data(data: DataSection, *, prompts_only: bool = False):
    _require(len(data.train_files) > 0, "`data.train_files`: give at least one JSONL/Parquet file")
    _require(data.max_prompt_length >= 1, f"`data.max_prompt_length` must be >= 1, got {data.max_prompt_length}")
    _require(len(data.buckets) > 0 and min(data.buckets) >= 1, "`data.buckets` must be positive lengths")
    # Prompt sets (PPO, eval) only use max_prompt_length; sequences also need max_length.
    longest, name = (data.max_prompt_length, "max_prompt_length") if prompts_only else (data.max_length, "max_length")
    if not prompts_only:
        _require(data.max_length > data.max_prompt_length,
                 f"`data.max_length` ({data.max_length}) must exceed `data.max_prompt_length` "
                 f"({data.max_prompt_length})")
    _require(max(data.buckets) >= longest,
             f"`data.buckets`: the largest bucket ({max(data.buckets)}) is shorter than `data.{name}` ({longest})")
    _require(data.max_rows is None or data.max_rows >= 1, "`data.max_rows` must be >= 1 or null")
    _require(data.prompt_template is None or "{prompt}" in data.prompt_template,
             "`data.prompt_template` must contain `{prompt}` where the prompt goes")


def _check_common(cfg):
    _require(bool(cfg.output_dir), "`output_dir` must be a folder path")
    _require(cfg.checkpoint_every >= 1, f"`checkpoint_every` must be >= 1, got {cfg.checkpoint_every}")
    _require(cfg.keep >= 1, f"`keep` must be >= 1, got {cfg.keep}")
    _require(cfg.mesh.fsdp >= 1, f"`mesh.fsdp` must be >= 1, got {cfg.mesh.fsdp}")
    _require(cfg.mesh.data == -1 or cfg.mesh.data >= 1, f"`mesh.data` must be >= 1 or -1, got {cfg.mesh.data}")
    batch_size = getattr(cfg.train, "batch_size", None)
    if batch_size is not None and cfg.mesh.data > 0:
        _require(batch_size % cfg.mesh.data == 0,
                 f"`train.batch_size` ({batch_size}) must be divisible by `mesh.data` ({cfg.mesh.data})")


@dataclass(frozen=True)
class SFTRunConfig:
    """`rlhf-jax sft`: supervised fine-tuning on prompt/completion or messages rows."""

    model: ModelSection = _help("starting model", factory=ModelSection)
    tokenizer: TokenizerSection = _help("tokenizer", factory=TokenizerSection)
    data: DataSection = _help("data", factory=DataSection)
    train: SFTConfig = _help("SFT hyper-parameters (rlhf_jax.train.SFTConfig)", factory=lambda: SFTConfig())
    output_dir: str = _help("run folder: resolved config, checkpoints, metrics, hf/ export", "runs/sft")
    checkpoint_every: int = _help("save a checkpoint every N optimizer steps", 500)
    keep: int = _help("keep the newest K checkpoints", 2)
    mesh: MeshSection = _help("device mesh", factory=MeshSection)

    def validate(self):
        """Cross-field checks; raises ConfigError naming the keys."""
        _check_model(self.model, self.tokenizer)
        _check_data(self.data)
        _check_common(self)


@dataclass(frozen=True)
class RewardRunConfig:
    """`rlhf-jax reward`: a Bradley-Terry reward model on prompt/chosen/rejected rows."""

    model: ModelSection = _help("starting model (usually the SFT policy's hf/ folder)", factory=ModelSection)
    tokenizer: TokenizerSection = _help("tokenizer", factory=TokenizerSection)
    data: DataSection = _help("data", factory=DataSection)
    train: RewardConfig = _help("reward-model hyper-parameters (rlhf_jax.train.RewardConfig)",
                                factory=lambda: RewardConfig())
    normalize: bool = _help("after training, shift the head so scores on the training prompts' chosen "
                            "responses have mean 0", True)
    output_dir: str = _help("run folder", "runs/reward")
    checkpoint_every: int = _help("save a checkpoint every N optimizer steps", 500)
    keep: int = _help("keep the newest K checkpoints", 2)
    mesh: MeshSection = _help("device mesh", factory=MeshSection)

    def validate(self):
        """Cross-field checks; raises ConfigError naming the keys."""
        _check_model(self.model, self.tokenizer)
        _check_data(self.data)
        _check_common(self)


@dataclass(frozen=True)
class PPORunConfig:
    """`rlhf-jax ppo`: PPO against a reward model or a reward function, with a frozen reference."""

    model: ModelSection = _help("the policy's starting point (usually the SFT run's hf/ folder)",
                                factory=ModelSection)
    reference: str | None = _help("frozen reference model folder (null: a copy of the starting policy)", None)
    value_model: str | None = _help(
        "null: a value head on the policy trunk; `reward_model`: a separate value network initialised "
        "from reward.model_path (N+ recipe); or a model folder", None)
    tokenizer: TokenizerSection = _help("tokenizer", factory=TokenizerSection)
    data: DataSection = _help("prompts (`prompt`, optional `answer`)", factory=DataSection)
    reward: RewardSection = _help("reward source", factory=RewardSection)
    train: PPOConfig = _help("PPO hyper-parameters (rlhf_jax.train.PPOConfig)", factory=lambda: PPOConfig())
    num_iterations: int = _help("PPO iterations (each: sample, score, update)", 100)
    output_dir: str = _help("run folder", "runs/ppo")
    checkpoint_every: int = _help("save a checkpoint every N iterations", 20)
    keep: int = _help("keep the newest K checkpoints", 2)
    mesh: MeshSection = _help("device mesh", factory=MeshSection)

    def validate(self):
        """Cross-field checks; raises ConfigError naming the keys."""
        _check_model(self.model, self.tokenizer)
        _check_data(self.data, prompts_only=True)
        _check_common(self)
        _require((self.reward.model_path is None) != (self.reward.function is None),
                 "`reward.model_path`: give exactly one of `reward.model_path` and `reward.function`")
        if self.reward.function is not None:
            _require(":" in self.reward.function,
                     f"`reward.function` must be `module:function`, got {self.reward.function!r}")
        if self.value_model == "reward_model":
            _require(self.reward.model_path is not None,
                     "`value_model`: `reward_model` needs `reward.model_path`")
        _require(self.num_iterations >= 1, f"`num_iterations` must be >= 1, got {self.num_iterations}")


@dataclass(frozen=True)
class EvalModel:
    """One model to evaluate."""

    name: str = _help("label in the table and the plot", "model")
    path: str = _help("HF folder (e.g. a run's hf/ export)", "")


@dataclass(frozen=True)
class EvalConfig:
    """`rlhf-jax eval`: pass@k of one or more models on a prompt set with a verifier."""

    models: tuple[EvalModel, ...] = _help("models to compare: list of {name, path}", ())
    tokenizer: TokenizerSection = _help("tokenizer (default: the first model's folder)", factory=TokenizerSection)
    data: DataSection = _help("prompt set (`prompt` + `answer` columns)", factory=DataSection)
    verifier: str = _help("`module:function` scoring completions, as in reward.function; a score > 0 "
                          "counts as correct", "rlhf_jax.verifiers:math_reward")
    num_samples: int = _help("n, samples per prompt (pass@k for k = 1..n)", 16)
    max_new_tokens: int = _help("response length limit", 64)
    temperature: float = _help("sampling temperature", 1.0)
    ks: tuple[int, ...] = _help("the k to report (empty: powers of two up to n, and n)", ())
    batch_size: int = _help("prompts per sampling batch", 16)
    reward_model: str | None = _help("optional reward-model folder: also report its mean score", None)
    reference: str | None = _help("optional reference-model folder: also report KL(model || reference)", None)
    bootstrap: int = _help("bootstrap resamples for the pass@k confidence intervals", 1000)
    seed: int = _help("sampling seed", 0)
    output_dir: str = _help("folder for eval.json and pass_at_k.png", "runs/eval")

    def validate(self):
        """Cross-field checks; raises ConfigError naming the keys."""
        _require(len(self.models) > 0, "`models`: list at least one {name, path}")
        for i, m in enumerate(self.models):
            _require(bool(m.path), f"`models[{i}].path` is empty")
        names = [m.name for m in self.models]
        _require(len(set(names)) == len(names), f"`models`: names must be distinct, got {names}")
        _require(":" in self.verifier, f"`verifier` must be `module:function`, got {self.verifier!r}")
        _check_data(self.data, prompts_only=True)
        _require(self.num_samples >= 1, f"`num_samples` must be >= 1, got {self.num_samples}")
        _require(self.max_new_tokens >= 1, f"`max_new_tokens` must be >= 1, got {self.max_new_tokens}")
        _require(self.batch_size >= 1, f"`batch_size` must be >= 1, got {self.batch_size}")
        _require(self.temperature > 0, f"`temperature` must be > 0 for pass@k sampling, got {self.temperature}")
        _require(all(1 <= k <= self.num_samples for k in self.ks),
                 f"`ks` must lie in 1..num_samples ({self.num_samples}), got {list(self.ks)}")
        _require(self.bootstrap >= 0, f"`bootstrap` must be >= 0, got {self.bootstrap}")


@dataclass(frozen=True)
class ExportConfig:
    """`rlhf-jax export`: write a run's newest checkpoint as an HF folder."""

    run_dir: str = _help("the run folder of `rlhf-jax sft|reward|ppo` (holds resolved_config.yaml)", "")
    output_dir: str = _help("where to write config.json, model.safetensors and the tokenizer", "runs/export")
    dtype: Literal["float32", "bfloat16", "float16"] = _help("dtype of the written weights", "float32")

    def validate(self):
        """Cross-field checks; raises ConfigError naming the keys."""
        _require(bool(self.run_dir), "`run_dir`: name the run folder to export")


COMMAND_CONFIGS = {
    "sft": SFTRunConfig,
    "reward": RewardRunConfig,
    "ppo": PPORunConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
}
"""The config class of each subcommand that takes `--config`."""
