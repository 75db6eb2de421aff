"""Strict YAML <-> frozen-dataclass conversion: the machinery under `rlhf_jax.cli.config`.

Generic (it knows no rlhf_jax config class): `from_dict` builds any nested
dataclass from plain data, checking every key and type against the
annotations; `load_config` adds the YAML file, dotted `a.b=c` overrides and
error messages that name the file, line and key; `dump_config`,
`config_hash` and `field_help` serve the CLI (resolved_config.yaml, resume
checks, `--help`).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from typing import Any, Literal

import yaml

from rlhf_jax.errors import ConfigError

__all__ = ["ConfigError", "from_dict", "to_dict", "flat_dict", "dump_config", "config_hash", "apply_overrides",
           "load_config", "field_help"]


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


def _convert(value, tp, key: str, base=None):
    """Check `value` against the annotation `tp` and convert it; `key` names it in errors.

    `base` is the default instance of a section: keys a mapping leaves out keep its values
    (so `run: {seed: 1}` keeps the command's own `run.output_dir`)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]) and isinstance(value, dict):
            return _convert(value, options[0], key, base)  # a section: its own error names the key inside
        for arg in options:
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise _type_error(key, tp, value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"`{key}`: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(key, tp, value, "a mapping")
        return _build(tp, value, key + ".", defaults=base if isinstance(base, tp) else None)
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


def _suggest(cls, hints: dict, name: str, prefix: str) -> list[str]:
    """Keys close to the unknown `name`: in `cls` itself, or one section down (a key that moved)."""
    here = [f.name for f in dataclasses.fields(cls) if f.init]
    found = [prefix + n for n in difflib.get_close_matches(name, here, n=3, cutoff=0.75)]
    for field_name in here:
        tp = hints[field_name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if _is_optional(tp) else [tp]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            names = [f.name for f in dataclasses.fields(inner[0]) if f.init]
            found += [f"{prefix}{field_name}.{n}" for n in difflib.get_close_matches(name, names, n=2, cutoff=0.75)]
    return found[:4]


def _build(cls, data: dict, prefix: str = "", defaults=None):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            hint = _suggest(cls, hints, str(name), prefix)
            hint = f" (did you mean {', '.join(hint)}?)" if hint else ""
            raise ConfigError(f"unknown key `{prefix}{name}`{hint}; known keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if defaults is not None:
            base = getattr(defaults, name)
        elif f.default_factory is not dataclasses.MISSING:
            base = f.default_factory()
        else:
            base = None
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name, base)
        elif defaults is not None:
            kwargs[name] = base
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key `{prefix}{name}`")
    try:
        return cls(**kwargs)
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


def flat_dict(data: dict, prefix: str = "") -> dict:
    """Nested dicts as `{"a.b.c": leaf}` (an empty dict is a leaf)."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_hash(cfg, *, ignore: tuple[str, ...] = ("output_dir", "run.output_dir")) -> str:
    """A short SHA-256 fingerprint of the config, ignoring the dotted keys in `ignore`.

    Two configs with the same hash train the same thing in the same way (only
    where the run is written may differ).
    """
    data = {k: v for k, v in flat_dict(to_dict(cfg)).items() if k not in ignore}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _key_lines(text: str, path) -> dict[str, int]:
    """Map every dotted key of a YAML mapping to its 1-based line number.

    Raises:
      ConfigError: a key appears twice in one mapping (YAML would silently keep the last).
    """
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise ConfigError(f"{path}, line {line}: duplicate key `{key}` (first set on line {lines[key]})")
                lines[key] = line
                walk(value_node, key + ".")

    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    walk(node, "")
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
        lines = _key_lines(text, path)
    else:
        data = {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys, got {type(data).__name__}")
    overridden = {".".join(_parse_override(o)[0]): o for o in overrides}
    data = apply_overrides(data, list(overrides))
    try:
        preprocess = getattr(cls, "preprocess", None)  # e.g. `rl`: the algorithm's preset under `train:`
        if preprocess is not None:
            data = preprocess(data)
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


def field_help(cls, prefix: str = "", defaults=None) -> list[tuple[str, str, str]]:
    """`(dotted key, type, help)` for every leaf field of a config class (for `--help`).

    The help text is the field's `metadata["help"]` (see `rlhf_jax.train.options.hyper`)
    followed by its default (a section's defaults are those of the instance its parent
    creates, e.g. PPO's own learning rate); a section (a nested dataclass, also
    `X | None`) lists its own fields.
    """
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        text = f.metadata.get("help", "")
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if _is_optional(tp) else [tp]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            if _is_optional(tp):  # an optional section: say what null means
                rows.append((prefix + f.name, "section | null", f"{text} [default: {to_dict(default)!r}]"))
            section_defaults = default if isinstance(default, inner[0]) else None
            rows.extend(field_help(inner[0], prefix + f.name + ".", section_defaults))
            continue
        rows.append((prefix + f.name, _type_name(tp), f"{text} [default: {to_dict(default)!r}]".strip()))
    return rows
