"""Reading configs: YAML files, `key.sub=value` overrides, and the pydantic base of the config sections.

`gspo.config.schema` defines the sections (`Section` subclasses whose fields carry their documentation and
bounds, `field(default, help, ...)`); this module turns plain data into them: `read_yaml` (rejects
duplicate keys), `apply_overrides` (values parsed as YAML, list items by index, a bare-string list item
expanded to its mapping form) and `build` (pydantic validation; every problem becomes a `ConfigError`
naming the dotted key, the expected type or choices, the closest valid key and the value given).
"""

from __future__ import annotations

import copy
import os
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from gspo.registry import closest


class ConfigError(ValueError):
    """A config problem. `key` is the dotted key of the (first) offending field; `keys` lists all of them."""

    def __init__(self, message: str, key: str | None = None, keys: list[str] | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.keys = keys if keys is not None else ([key] if key else [])


# -- YAML and overrides --------------------------------------------------------------------------------------


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
# Sections that may be written as a bare string, and the field the string fills (sections.py fills it:
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


# -- Building sections with type checks ----------------------------------------------------------------------


def _raise(errors: list[ConfigError]) -> None:
    if not errors:
        return
    if len(errors) == 1:
        raise errors[0]
    lines = "\n".join(f"  - {e}" for e in errors)
    keys = [k for e in errors for k in e.keys]
    raise ConfigError(f"{len(errors)} config errors:\n{lines}", errors[0].key, keys)


# Sections are pydantic models: pydantic checks types (strictly: no bool for an int, no number for a str),
# bounds, finiteness and unknown keys (extra="forbid"), and reports every problem at once. What is written
# here is only what pydantic cannot know: the lenient spellings YAML and the command line produce
# (`_lenient`), our error messages (`_message`), and non-empty required keys (`_required`).


def field(default: Any, help: str, *, required: bool = False, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None) -> Any:
    """A section field: its default, its one-place documentation (`help`), and bounds on a numeric value (None
    is not bounded), as a pydantic Field. pydantic copies a mutable default ([], {}, a section) per instance."""
    return Field(default=default, description=help, json_schema_extra={"required": required}, ge=ge, gt=gt,
                 le=le, lt=lt)


def section(cls: type) -> Any:
    """A sub-section field of `Config`: defaults to the section's defaults, documented by its docstring."""
    return field(cls(), cls.__doc__)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, types are strict but for `_lenient`."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=False)

    def check(self) -> list[tuple[str, str]]:
        """The section's own rules across its fields: (key within the section, problem); `check_config`
        prefixes the section's name. Types, bounds and unknown keys are pydantic's, before this runs."""
        return []

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {SHORTHAND_FIELD[cls]: data} if isinstance(data, str) and cls in SHORTHAND_FIELD else data

    @field_validator("*", mode="before")
    @classmethod
    def _lenient_value(cls, value: Any, info: ValidationInfo) -> Any:
        return _lenient(value, cls.model_fields[info.field_name].annotation)


def is_required(f: FieldInfo) -> bool:
    """Whether a field is a key that must be set, and non-empty (`field(..., required=True)`)."""
    return bool((f.json_schema_extra or {}).get("required"))


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _optional_inner(tp: Any) -> Any:
    """X for `X | None`, else None."""
    if get_origin(tp) in (Union, types.UnionType):
        return next(a for a in get_args(tp) if a is not type(None))
    return None


def _lenient(value: Any, tp: Any) -> Any:
    inner = _optional_inner(tp)
    if inner is not None:
        # `key=None` on the command line arrives as the text "None": for an optional field it means null (a
        # model or tokenizer literally named "None" is far less likely than this slip).
        if value is None or (isinstance(value, str) and value in _NULL_WORDS):
            return None
        tp = inner
    numeric_text = isinstance(value, str) and _NUMBER.fullmatch(value.strip())
    if tp is int and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if numeric_text and float(value).is_integer():  # "4e9" (PyYAML reads it as a string)
            return int(value) if re.fullmatch(r"[+-]?\d+", value.strip()) else int(float(value))
    if tp is float and not isinstance(value, bool) and (isinstance(value, int) or numeric_text):
        return float(value)  # YAML 1.1 (PyYAML) reads 1e-6 as a string
    if get_origin(tp) is list and isinstance(value, str) and not _is_section(get_args(tp)[0]):
        return [value]  # `logging.trackers=wandb` means [wandb]
    return value


def _annotation_at(cls: type, loc: list[Any]) -> tuple[Any, int]:
    """The annotation at `loc` (field names and list indices) below section `cls`, and how many parts of
    `loc` it consumed (pydantic adds parts like '[key]' below a value)."""
    tp: Any = cls
    for n, part in enumerate(loc):
        tp = _optional_inner(tp) or tp
        if _is_section(tp) and isinstance(part, str) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        elif get_origin(tp) is list and isinstance(part, int):
            tp = get_args(tp)[0]
        else:
            return tp, n
    return tp, len(loc)


_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
           "less_than": ("lt", "<")}


def _message(cls: type, err: dict[str, Any]) -> ConfigError:
    """Our wording of one pydantic error: the dotted key, what was expected, the value given."""
    loc = list(err["loc"])
    kind, value = err["type"], err["input"]
    if kind == "extra_forbidden":
        owner, _ = _annotation_at(cls, loc[:-1])
        owner = _optional_inner(owner) or owner
        prefix = ".".join(map(str, loc[:-1]))
        key = ".".join(map(str, loc))
        known = list(owner.model_fields)
        where = f"section {prefix!r}" if prefix else "the top level"
        hint = closest(str(loc[-1]), known)
        msg = f"unknown key {key!r}"
        if hint:
            msg += f" (did you mean {(prefix + '.' if prefix else '') + hint!r}?)"
        return ConfigError(f"{msg}; valid keys in {where}: {', '.join(known)}", key)
    tp, used = _annotation_at(cls, loc)
    key = ".".join(map(str, loc[:used]))
    if used < len(loc):  # below a value (a dict's key): the value as a whole is wrong
        value = _value_at(err, used)
    tp = _optional_inner(tp) or tp
    if kind in _BOUNDS:
        op, sign = _BOUNDS[kind]
        return ConfigError(f"{key}: must be {sign} {err['ctx'][op]}, got {value!r}", key)
    if kind == "finite_number":
        return ConfigError(f"{key}: expected a finite float, got {value!r}", key)
    if kind == "literal_error":
        choices = [str(a) for a in get_args(tp)]
        hint = closest(str(value), choices)
        return ConfigError(f"{key}: {value!r} is not one of: {', '.join(choices)}"
                           + (f" (did you mean {hint!r}?)" if hint else ""), key)
    if _is_section(tp) and kind in ("model_type", "dict_type", "model_attributes_type"):
        return ConfigError(f"{key}: expected a mapping of the keys of section {key!r}, got {_describe(value)}", key)
    if tp is str:
        return ConfigError(f"{key}: expected str, got {_describe(value)} (quote it in YAML to pass text)", key)
    return ConfigError(f"{key}: expected {type_name(tp)}, got {_describe(value)}", key)


def _value_at(err: dict[str, Any], used: int) -> Any:
    value = err.get("_data")
    for part in err["loc"][:used]:
        value = value[part]
    return value


def _required(cls: type, data: Any, prefix: str, errors: list[ConfigError]) -> None:
    """Required keys must be non-empty, also when their section is absent."""
    if not isinstance(data, dict):
        return
    for name, f in cls.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = f.annotation
        if _is_section(tp):
            _required(tp, data.get(name, {}), key, errors)
        elif get_origin(tp) is list and _is_section(get_args(tp)[0]) and isinstance(data.get(name), list):
            for i, item in enumerate(data[name]):
                item = {SHORTHAND_FIELD[get_args(tp)[0]]: item} if isinstance(item, str) else item
                _required(get_args(tp)[0], item, f"{key}.{i}", errors)
        elif is_required(f) and not data.get(name) and not any(e.key == key for e in errors):
            errors.append(ConfigError(f"{key} is required: {f.description}", key))


def build(cls: type, data: Any) -> Any:
    """A checked section `cls` from plain data; raises one ConfigError listing every problem."""
    errors: list[ConfigError] = []
    try:
        obj = cls.model_validate(data)
    except ValidationError as e:
        obj = None
        errors = [_message(cls, {**err, "_data": data}) for err in e.errors(include_url=False)]
    _required(cls, data, "", errors)
    _raise(errors)
    return obj


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
