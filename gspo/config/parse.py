"""Reading configs: YAML files, `key.sub=value` overrides and typed construction of the config dataclasses.

`gspo.config` defines the sections (dataclasses whose fields carry their documentation and bounds); this module
turns plain data into them: `read_yaml` (rejects duplicate keys), `apply_overrides` (values parsed as YAML, list
items by index, a bare-string list item expanded to its mapping form), `build_section` (type coercion and bounds,
every problem collected as a `ConfigError` naming the dotted key) and `to_plain` (back to YAML-safe data).
Every public name is re-exported by `gspo.config`.
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
import types
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from gspo.registry import closest


class ConfigError(ValueError):
    """A config problem. `key` is the dotted key of the (first) offending field; `keys` lists all of them."""

    def __init__(self, message: str, key: str | None = None, keys: list[str] | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.keys = keys if keys is not None else ([key] if key else [])


# ----------------------------------------------------------------------------------------------------------
# YAML and overrides
# ----------------------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML silently keeps the last)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(f"key {key!r} appears twice in one mapping (line {line})", str(key))
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", e.key) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


# List items that may be written as a bare string, and the key the string stands for.
_SHORTHAND = {"rewards": "fn"}
# Dataclasses that may be written as a bare string, and the field the string fills (config.py fills it:
# RewardSpec -> "fn").
SHORTHAND_FIELD: dict[type, str] = {}


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.sub=value` set (value parsed as YAML; list items by index)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not key=value (e.g. algorithm.clip_high=4e-4)",
                              key or None)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {e}", key) from None
        _set_path(data, key, value)
    return data


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            i = _index(node, part, key, ".".join(parts[:depth]))
            if last:
                node[i] = value
                return
            node[i] = _expand(node[i], parts[depth - 1])
            node = node[i]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[:depth])!r} is not a mapping "
                              f"(it holds {_describe(node)})", key)


def _index(items: list[Any], part: str, key: str, list_key: str) -> int:
    if not re.fullmatch(r"-?\d+", part) or not -len(items) <= int(part) < len(items):
        raise ConfigError(f"cannot set {key!r}: {part!r} is not an index of {list_key!r} ({len(items)} "
                          f"item(s)); set the whole list with {list_key}=[...]", key)
    return int(part)


def _expand(item: Any, list_name: str) -> Any:
    """A bare-string list item about to receive a sub-key becomes its mapping form (`fn: <string>`)."""
    if isinstance(item, str) and list_name in _SHORTHAND:
        return {_SHORTHAND[list_name]: item}
    return item


# ----------------------------------------------------------------------------------------------------------
# Building sections with type checks
# ----------------------------------------------------------------------------------------------------------


def _raise(errors: list[ConfigError]) -> None:
    if not errors:
        return
    if len(errors) == 1:
        raise errors[0]
    lines = "\n".join(f"  - {e}" for e in errors)
    keys = [k for e in errors for k in e.keys]
    raise ConfigError(f"{len(errors)} config errors:\n{lines}", errors[0].key, keys)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]))
    return _HINTS[cls]


def public_fields(cls: type) -> list[Any]:
    return [f for f in fields(cls) if not f.metadata.get("internal")]


def _build(cls: type, data: Any, prefix: str, errors: list[ConfigError]) -> Any:
    """Instantiate dataclass `cls` from `data`, appending every problem to `errors` (defaults stand in)."""
    where = f"section {prefix!r}" if prefix else "the top level"
    if not isinstance(data, dict):
        errors.append(ConfigError(f"{prefix or 'config'}: expected a mapping of the keys of {where}, got "
                                  f"{_describe(data)}", prefix or None))
        return cls()
    known = {f.name: f for f in public_fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in known:
            hint = closest(str(name), list(known))
            msg = f"unknown key {key!r}"
            if hint:
                msg += f" (did you mean {(prefix + '.' if prefix else '') + hint!r}?)"
            errors.append(ConfigError(f"{msg}; valid keys in {where}: {', '.join(known)}", key))
            continue
        try:
            kwargs[name] = _check_bounds(_coerce(value, _hints(cls)[name], key, errors), known[name], key)
        except ConfigError as e:
            errors.append(e)
    for name, f in known.items():
        tp = _hints(cls)[name]
        if name not in data and is_dataclass(tp):  # an absent section still has required keys
            kwargs[name] = _build(tp, {}, f"{prefix}.{name}" if prefix else name, errors)
        if f.metadata.get("required") and not kwargs.get(name):
            key = f"{prefix}.{name}" if prefix else name
            if not any(e.key == key for e in errors):
                errors.append(ConfigError(f"{key} is required: {f.metadata['help']}", key))
    return cls(**kwargs)


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_NULL_WORDS = ("null", "none", "None", "~")


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def type_name(tp: Any) -> str:
    """Human-readable type, as in the errors and the reference doc."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(f'"{a}"' for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is dict or tp is dict:
        return "dict"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, errors: list[ConfigError]) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    bad = ConfigError(f"{key}: expected {type_name(tp)}, got {_describe(value)}", key)
    if origin in (Union, types.UnionType):  # always `X | None` here
        inner = next(a for a in args if a is not type(None))
        # `key=None` on the command line arrives as the text "None": for an optional field it means null (a
        # model or tokenizer literally named "None" is far less likely than this slip).
        if value is None or (isinstance(value, str) and value in _NULL_WORDS):
            return None
        return _coerce(value, inner, key, errors)
    if value is None:
        raise bad
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        hint = closest(str(value), [str(a) for a in args])
        raise ConfigError(f"{key}: {value!r} is not one of: {', '.join(map(str, args))}"
                          + (f" (did you mean {hint!r}?)" if hint else ""), key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):  # "4e9" (PyYAML reads it as a string)
            number = float(value)
            if number.is_integer():
                return int(value) if re.fullmatch(r"[+-]?\d+", value.strip()) else int(number)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        # YAML 1.1 (PyYAML) reads 1e-6 as a string: accept numeric strings.
        numeric_text = isinstance(value, str) and _NUMBER.fullmatch(value.strip())
        if not isinstance(value, (int, float)) and not numeric_text:
            raise bad
        number = float(value)
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite float, got {value!r}", key)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {_describe(value)} (quote it in YAML to pass text)", key)
    if origin is dict or tp is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise bad
    if origin is list:
        if isinstance(value, str) and not is_dataclass(args[0]):
            value = [value]  # `logging.trackers=wandb` means [wandb]
        if not isinstance(value, list):
            raise bad
        out = []
        for i, item in enumerate(value):
            try:
                out.append(_coerce(item, args[0], f"{key}.{i}", errors))
            except ConfigError as e:
                errors.append(e)
        return out
    if is_dataclass(tp):
        if isinstance(value, str) and tp in SHORTHAND_FIELD:
            value = {SHORTHAND_FIELD[tp]: value}
        return _build(tp, value, key, errors)
    raise bad  # a field type this module does not handle: a bug here, not in the config


def _check_bounds(value: Any, f: Any, key: str) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for op, limit in f.metadata.get("bounds", {}).items():
            ok = {"ge": value >= limit, "gt": value > limit, "le": value <= limit, "lt": value < limit}[op]
            if not ok:
                sign = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[op]
                raise ConfigError(f"{key}: must be {sign} {limit}, got {value!r}", key)
    return value


def _to_plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in public_fields(type(obj))}
    if isinstance(obj, list | tuple):
        return [_to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj
