"""Turning reward specs into checked callables: the registry decorator, the three kinds of reference
(registered name | package.module:function | path/to/file.py:function) and the start-up parameter check."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gspo.registry import REWARDS, RegistryError, closest

# A reward call's time limit unless its spec says otherwise: generous for a reward model scoring a large
# rollout on a GPU, yet a reward that never returns stops the run after minutes, not never.
DEFAULT_REWARD_TIMEOUT_S = 300.0

# Arguments the trainer itself provides (TRL's names); everything else must be a column or a configured kwarg.
STANDARD_ARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
ON_ERROR_CHOICES = ("error", "zero", "skip")
logger = logging.getLogger("gspo")


class RewardLoadError(ValueError):
    """A reward reference or spec cannot be turned into a callable; the message names the reference and why."""


def register_reward(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a reward function under `name` in `gspo.registry.REWARDS`.

    Re-importing the same source file under another module name (`pytest --doctest-modules rewards`,
    importlib.reload) keeps the first registration; a different function under a taken name raises."""

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in REWARDS:
            old = REWARDS.get(name)
            same_source = getattr(getattr(old, "__code__", None), "co_filename", None) == getattr(
                getattr(fn, "__code__", None), "co_filename", 0
            )
            if same_source and getattr(old, "__qualname__", None) == getattr(fn, "__qualname__", None):
                return fn
        return REWARDS.register(name)(fn)

    return add


def _load_builtins() -> None:
    # Built-ins register themselves on import; a plain `pip install` ships them as `gspo_rewards`. Importing
    # every public submodule (not only the package) also works when an old editable install left
    # `gspo_rewards` as a namespace package whose __init__ never runs.
    import pkgutil

    package = importlib.import_module("gspo_rewards")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"gspo_rewards.{info.name}")


def _resolve_file(path: str, base_dir: str | os.PathLike | None) -> Path:
    # The config's rule for relative paths (gspo.config.resolve_input_path): its folder first, then the cwd.
    p = Path(path).expanduser()
    tried = [p] if p.is_absolute() else ([Path(base_dir) / p] if base_dir else []) + [Path.cwd() / p]
    for k, candidate in enumerate(tried):
        if candidate.is_file():
            if k and base_dir:
                logger.info("reward file %r is not next to the config file (%s); using %s", path, base_dir,
                            candidate.resolve())
            return candidate.resolve()
    raise RewardLoadError(f"reward file {path!r} not found; tried: {', '.join(str(t) for t in tried)}")


def _import_file(path: Path, ref: str) -> Any:
    # One module per file path, cached in sys.modules so functions defined there can be pickled and reloaded.
    mod_name = "gspo_user_reward_" + str(abs(hash(str(path))))
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise RewardLoadError(f"reward {ref!r}: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise RewardLoadError(f"reward {ref!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def load_reward_fn(ref: str, *, base_dir: str | os.PathLike | None = None) -> Callable[..., Any]:
    """Resolve a reward reference to a callable.

    `ref` is a registered name ("math_accuracy"), "package.module:function", or "path/to/file.py:function"
    (relative paths are tried against `base_dir`, the config file's folder, then against the current
    directory). Raises `RewardLoadError` naming the reference and the reason.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise RewardLoadError(f"reward reference must be a non-empty string, got {ref!r}")
    ref = ref.strip()
    if ":" not in ref:
        _load_builtins()
        try:
            return REWARDS.get(ref)
        except RegistryError as e:
            raise RewardLoadError(f"{e}; or use 'package.module:function' / 'path/to/file.py:function'") from None
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise RewardLoadError(f"reward reference {ref!r}: expected 'module:function' or 'file.py:function'")
    if target.endswith(".py") or "/" in target or os.sep in target:
        module = _import_file(_resolve_file(target, base_dir), ref)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RewardLoadError(f"reward {ref!r}: cannot import module {target!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        hint = closest(attr, names)
        raise RewardLoadError(
            f"reward {ref!r}: {target!r} has no attribute {attr!r}"
            + (f" (did you mean {hint!r}?)" if hint else f"; callables there: {', '.join(sorted(names)) or '-'}")
        )
    if not callable(fn):
        raise RewardLoadError(f"reward {ref!r}: {attr!r} is a {type(fn).__name__}, not a callable")
    return fn


def _field(spec: Any, name: str, default: Any = None) -> Any:
    if isinstance(spec, Mapping):
        return spec.get(name, default)
    return getattr(spec, name, default)


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


@dataclass
class Reward:
    """One loaded reward function with its spec resolved."""

    name: str
    fn: Callable[..., Any]
    weight: float
    on_error: str
    timeout_s: float | None
    kwargs: dict[str, Any]
    params: frozenset[str]  # keyword names the function accepts (besides **kwargs)
    var_kw: bool
    is_async: bool
    required_columns: frozenset[str] = frozenset()  # columns the call must provide


def _available(name: str, columns: Sequence[str]) -> str:
    hint = closest(name, list(columns))
    return (f"available columns: {', '.join(sorted(columns)) or '(none)'}"
            + (f" (did you mean {hint!r}?)" if hint else ""))


def _check_signature(name: str, fn: Callable[..., Any], columns: Sequence[str], kwargs: Mapping[str, Any]):
    """The start-up check. Returns (accepted keyword names, has **kwargs, columns every call must pass).

    Parameters that must be resolvable: every positional-or-keyword parameter (with or without a default:
    `solution=None` would otherwise silently stay None) and keyword-only parameters without a default.
    Keyword-only parameters WITH a default are options (filled from the spec's kwargs when given).
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise RewardLoadError(f"reward {name!r}: cannot inspect the signature of {fn!r}: {e}") from e
    available = set(STANDARD_ARGS) | set(columns) | set(kwargs)
    params: set[str] = set()
    required: set[str] = set()
    var_kw = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
            continue
        if p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.POSITIONAL_ONLY:
            raise RewardLoadError(
                f"reward {name!r}: parameter {p.name!r} is positional-only; rewards are called with keywords "
                f"({', '.join(STANDARD_ARGS[:3])}, and one keyword per dataset column)"
            )
        params.add(p.name)
        is_option = p.kind is p.KEYWORD_ONLY and p.default is not p.empty
        if not is_option and p.name not in STANDARD_ARGS and p.name not in kwargs:
            required.add(p.name)
        if not is_option and p.name not in available:
            raise RewardLoadError(
                f"reward {name!r}: parameter {p.name!r} is neither a standard argument "
                f"({', '.join(STANDARD_ARGS)}) nor a dataset column nor a configured kwarg; "
                + _available(p.name, columns))
    for key in kwargs:
        if key in STANDARD_ARGS:
            raise RewardLoadError(f"reward {name!r}: kwargs key {key!r} would override a standard argument")
        if key not in params and not var_kw:
            raise RewardLoadError(f"reward {name!r}: kwargs key {key!r} is not a parameter of the function; "
                                  f"its parameters: {', '.join(sorted(params)) or '(none)'}")
    # Built-ins that read a column through **columns declare it (e.g. the gold-answer column of math_accuracy).
    needed = getattr(fn, "__reward_columns__", None)
    for col in needed(dict(kwargs)) if callable(needed) else ():
        if col not in columns:
            raise RewardLoadError(f"reward {name!r} reads column {col!r}, which the dataset does not have; "
                                  + _available(col, columns))
    # Built-ins with a precondition (the code sandbox must be able to isolate) check it here, before training.
    check = getattr(fn, "__reward_check__", None)
    if callable(check):
        try:
            check(dict(kwargs))
        except Exception as e:
            raise RewardLoadError(f"reward {name!r}: {e}") from e
    required.update(needed(dict(kwargs)) if callable(needed) else ())
    return frozenset(params), var_kw, frozenset(required)


def reward_name(spec: Any) -> str:
    """The name a reward spec logs under (`rewards/<name>/mean`): its `name`, else the function's name."""
    name = _field(spec, "name")
    if name:
        return name
    ref = _field(spec, "fn")
    return ref.rpartition(":")[2] if ":" in ref else ref


def load_reward(spec: Any, k: int, columns: Sequence[str], base_dir: str | os.PathLike | None,
                taken: Sequence[str] = ()) -> Reward:
    """`rewards[k]` (an object or a dict with fn, weight, on_error, timeout_s, kwargs, name), loaded and
    checked against the dataset's `columns`; `taken`: the names of the rewards loaded before it."""
    fn = load_reward_fn(_field(spec, "fn"), base_dir=base_dir)
    name = reward_name(spec)
    on_error = _field(spec, "on_error", "error") or "error"
    if on_error not in ON_ERROR_CHOICES:
        raise RewardLoadError(
            f"reward {name!r} (rewards[{k}]): on_error={on_error!r}; valid: {', '.join(ON_ERROR_CHOICES)}"
        )
    weight = _field(spec, "weight", 1.0)
    weight = 1.0 if weight is None else weight
    if not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise RewardLoadError(f"reward {name!r} (rewards[{k}]): weight must be a finite number, got {weight!r}")
    # A spec without the key gets the default; only an explicit null turns the limit off.
    has_key = "timeout_s" in spec if isinstance(spec, Mapping) else hasattr(spec, "timeout_s")
    timeout_s = _field(spec, "timeout_s") if has_key else DEFAULT_REWARD_TIMEOUT_S
    if timeout_s is not None and not (isinstance(timeout_s, numbers.Real) and timeout_s > 0):
        raise RewardLoadError(f"reward {name!r} (rewards[{k}]): timeout_s must be > 0 or null, got {timeout_s!r}")
    kwargs = dict(_field(spec, "kwargs") or {})
    if name in taken:
        raise RewardLoadError(f"two rewards are named {name!r}; give one of them a distinct `name`")
    params, var_kw, required = _check_signature(name, fn, list(columns), kwargs)
    return Reward(name, fn, float(weight), on_error, timeout_s, kwargs, params, var_kw, _is_async(fn), required)
