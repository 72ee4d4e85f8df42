"""Rewards (hop 3 of a step): the plug-in contract, loading, weighting and the failure policy.

Contract (TRL's, so functions written for TRL work unchanged):
    fn(prompts, completions, completion_ids, **columns) -> list[float | None]
Every dataset column arrives as a keyword (already repeated per completion, length N); `None` means the
function abstains for that sample; `async def` functions run concurrently. Completions are strings or
conversational message lists ([{"role": "assistant", "content": ...}]); `completion_text` reads both.

On top of TRL:
- a start-up check: a parameter that is neither a standard argument, a dataset column nor a configured
  keyword is an error naming the function, the parameter and the columns (TRL lets it vanish into **kwargs);
- a per-function failure policy (`on_error`: error | zero | skip) for exceptions, NaN/inf, wrong lengths,
  wrong types and time-outs, with the affected samples counted in `rewards/<name>/errors`.

Weighting: the reward of sample i is sum_f w_f r_f(i) over the functions that did not abstain on i, NOT
renormalized by the weights present (TRL does the same nansum). Renormalizing would silently rescale the
remaining functions: a format reward of weight 0.1 would become worth 1.0 on the samples where accuracy
abstains, so those samples would outrank correct ones in their group. When every function abstains the reward
is NaN, which the advantage code treats as missing (advantage 0, never NaN).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gspo.registry import REWARDS, RegistryError, closest

# A reward call's time limit unless its spec says otherwise: generous for a reward model scoring a large
# rollout on a GPU, yet a reward that never returns stops the run after minutes, not never.
DEFAULT_REWARD_TIMEOUT_S = 300.0

# Arguments the trainer itself provides (TRL's names); everything else must be a column or a configured kwarg.
STANDARD_ARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
ON_ERROR_CHOICES = ("error", "zero", "skip")
EXCERPT_CHARS = 160
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
logger = logging.getLogger("gspo")


class RewardLoadError(ValueError):
    """A reward reference or spec cannot be turned into a callable; the message names the reference and why."""


class RewardError(RuntimeError):
    """A reward function failed under `on_error: error`; the message names the function and the sample."""


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


# ----------------------------------------------------------------------------------------------------------
# Reading completions and prompts in either format
# ----------------------------------------------------------------------------------------------------------


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a plain or conversational completion (the contents of its messages, concatenated).

    >>> completion_text("4")
    '4'
    >>> completion_text([{"role": "assistant", "content": "<answer>4</answer>"}])
    '<answer>4</answer>'
    """
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion)


def prompt_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a plain or conversational prompt (the last user message for conversations).

    >>> prompt_text([{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}])
    '2+2?'
    """
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"]
    return str((users or list(prompt) or [{"content": ""}])[-1].get("content") or "")


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


# ----------------------------------------------------------------------------------------------------------
# Loading: registered name | package.module:function | path/to/file.py:function
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Specs and the start-up parameter check
# ----------------------------------------------------------------------------------------------------------


def _field(spec: Any, name: str, default: Any = None) -> Any:
    if isinstance(spec, Mapping):
        return spec.get(name, default)
    return getattr(spec, name, default)


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


@dataclass
class _Reward:
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
            hint = closest(p.name, list(columns))
            raise RewardLoadError(
                f"reward {name!r}: parameter {p.name!r} is neither a standard argument "
                f"({', '.join(STANDARD_ARGS)}) nor a dataset column nor a configured kwarg; available columns: "
                f"{', '.join(sorted(columns)) or '(none)'}" + (f" (did you mean {hint!r}?)" if hint else "")
            )
    for key in kwargs:
        if key in STANDARD_ARGS:
            raise RewardLoadError(f"reward {name!r}: kwargs key {key!r} would override a standard argument")
        if key not in params and not var_kw:
            raise RewardLoadError(
                f"reward {name!r}: kwargs key {key!r} is not a parameter of the function; "
                f"its parameters: {', '.join(sorted(params)) or '(none)'}"
            )
    # Built-ins that read a column through **columns declare it (e.g. the gold-answer column of math_accuracy).
    needed = getattr(fn, "__reward_columns__", None)
    for col in needed(dict(kwargs)) if callable(needed) else ():
        if col not in columns:
            hint = closest(col, list(columns))
            raise RewardLoadError(
                f"reward {name!r} reads column {col!r}, which the dataset does not have; available columns: "
                f"{', '.join(sorted(columns)) or '(none)'}" + (f" (did you mean {hint!r}?)" if hint else "")
            )
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


# ----------------------------------------------------------------------------------------------------------
# Running: concurrency, time-outs, validation, policy
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RewardResult:
    """Rewards of one rollout. rewards: [N] float32, NaN where every function abstained.
    per_function: name -> [N] float32 (NaN = abstained or skipped). metrics: rewards/<name>/{mean,std,
    abstain_rate,errors} plus whatever functions logged through `log_metric`. extra: `log_extra` columns."""

    rewards: torch.Tensor
    per_function: dict[str, torch.Tensor]
    metrics: dict[str, float]
    extra: dict[str, list[Any]] = field(default_factory=dict)


class _Failure(Exception):
    """A whole call failed (raised / timed out / returned the wrong shape)."""


async def _await_in_thread(fn: Callable[..., Any], kw: dict[str, Any], timeout_s: float | None) -> Any:
    """Run a sync function in a daemon thread and await it with a deadline.

    A daemon thread, not an executor: a function stuck past its deadline cannot be killed (Python threads
    cannot be), so it must not hold up interpreter exit; it runs on in the background and its late result
    is dropped.
    """
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if not fut.done():  # done = cancelled by the deadline
            fut.set_result(value) if ok else fut.set_exception(value)

    def target() -> None:
        try:
            outcome = (True, fn(**kw))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            outcome = (False, e)
        try:
            loop.call_soon_threadsafe(deliver, *outcome)
        except RuntimeError:
            pass  # the loop is closed: the caller gave up long ago

    threading.Thread(target=target, daemon=True, name=f"reward-{getattr(fn, '__name__', 'fn')}").start()
    return await asyncio.wait_for(fut, timeout_s)


async def _run_async(r: _Reward, kw: dict[str, Any]) -> Any:
    try:
        if r.is_async:
            coro = r.fn(**kw)
            return await (asyncio.wait_for(coro, r.timeout_s) if r.timeout_s else coro)
        return await _await_in_thread(r.fn, kw, r.timeout_s)
    except TimeoutError as e:
        raise _Failure(f"exceeded its time budget timeout_s={r.timeout_s}") from e
    except Exception as e:
        raise _Failure(f"raised {type(e).__name__}: {e}") from e


def _run_coroutines(factory: Callable[[], Any]) -> Any:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    # Called from inside a running loop (a notebook, an async trainer): run ours in a fresh thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _validate(raw: Any, n: int) -> tuple[list[float], list[tuple[int, str]]]:
    """Returned value -> (N floats with NaN for None, [(index, problem)]). Raises _Failure for shape errors."""
    if hasattr(raw, "tolist") and not isinstance(raw, (list, tuple)):
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise _Failure(f"returned {type(raw).__name__}, expected a list of float | None")
    if len(raw) != n:
        raise _Failure(f"returned {len(raw)} values for {n} completions")
    values: list[float] = []
    bad: list[tuple[int, str]] = []
    for i, v in enumerate(raw):
        problem = None
        if isinstance(v, numbers.Real):  # bool and numpy scalars included
            v = float(v)
            if not math.isfinite(v):
                problem = f"returned {v} (non-finite)"
            elif abs(v) > FLOAT32_MAX:  # finite here, inf once stored as float32: caught here, not later
                problem = f"returned {v:g} (beyond float32's range, |r| <= {FLOAT32_MAX:.3g})"
        elif v is not None:
            problem = f"returned a {type(v).__name__} ({_excerpt(repr(v))}), expected float | None"
        values.append(math.nan if v is None or problem else v)
        if problem:
            bad.append((i, problem))
    return values, bad


class RewardSet:
    """The configured reward functions: loaded and checked once, called once per rollout."""

    def __init__(self, rewards: list[_Reward]) -> None:
        if not rewards:
            raise RewardLoadError("no reward functions configured; add at least one entry under `rewards`")
        self.rewards = rewards
        self._warned_abstain: set[str] = set()

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @classmethod
    def from_specs(
        cls, specs: Sequence[Any], *, columns: Sequence[str], base_dir: str | os.PathLike | None = None
    ) -> RewardSet:
        """Load every spec (objects or dicts with fn, weight, on_error, timeout_s, kwargs, name) and run the
        start-up parameter check against the dataset's `columns`."""
        rewards: list[_Reward] = []
        for k, spec in enumerate(specs):
            ref = _field(spec, "fn")
            fn = load_reward_fn(ref, base_dir=base_dir)
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
            if name in (r.name for r in rewards):
                raise RewardLoadError(f"two rewards are named {name!r}; give one of them a distinct `name`")
            params, var_kw, required = _check_signature(name, fn, list(columns), kwargs)
            rewards.append(
                _Reward(name, fn, float(weight), on_error, timeout_s, kwargs, params, var_kw, _is_async(fn), required)
            )
        return cls(rewards)

    def _kwargs(self, r: _Reward, standard: dict[str, Any], columns: Mapping[str, list]) -> dict[str, Any]:
        accepts = (lambda key: True) if r.var_kw else (lambda key: key in r.params)
        kw = {k: v for k, v in standard.items() if accepts(k)}
        kw.update({k: v for k, v in columns.items() if accepts(k) and k not in STANDARD_ARGS})
        kw.update(r.kwargs)
        return kw

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        columns: Mapping[str, list] | None = None,
        *,
        trainer_state: Any = None,
    ) -> RewardResult:
        columns = dict(columns or {})
        n = len(completions)
        for key, values in [("prompts", prompts), ("completion_ids", completion_ids), *columns.items()]:
            if len(values) != n:
                raise ValueError(f"rewards: {key!r} has {len(values)} entries for {n} completions")
        for r in self.rewards:  # a wiring bug, not a reward failure: not subject to on_error
            missing = sorted(r.required_columns - set(columns))
            if missing:
                raise ValueError(f"reward {r.name!r} needs column(s) {', '.join(missing)}, which this call does not "
                                 f"pass; passed: {', '.join(sorted(columns)) or '(none)'}")
        metrics: dict[str, float] = {}
        extra: dict[str, list[Any]] = {}
        calls: dict[str, dict[str, Any]] = {}
        for r in self.rewards:

            def log_metric(key: str, value: float, _name: str = r.name) -> None:
                metrics[f"rewards/{_name}/{key}"] = float(value)

            def log_extra(key: str, values: list[Any]) -> None:
                extra[key] = list(values)

            standard = {
                "prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                "trainer_state": trainer_state, "log_metric": log_metric, "log_extra": log_extra,
            }
            calls[r.name] = self._kwargs(r, standard, columns)

        outcomes: dict[str, Any] = {}
        # Plain sync functions without a time budget run here, one after another, in the calling thread
        # (math-verify's own signal-based time-outs only work in the main thread).
        for r in self.rewards:
            if not r.is_async and r.timeout_s is None:
                try:
                    outcomes[r.name] = r.fn(**calls[r.name])
                except Exception as e:  # noqa: BLE001 - the failure policy decides (`_apply_policy`)
                    outcomes[r.name] = e
        concurrent_rewards = [r for r in self.rewards if r.name not in outcomes]
        if concurrent_rewards:

            async def gather() -> list[Any]:
                return await asyncio.gather(
                    *(_run_async(r, calls[r.name]) for r in concurrent_rewards), return_exceptions=True
                )

            for r, out in zip(concurrent_rewards, _run_coroutines(gather)):
                outcomes[r.name] = out

        per_function: dict[str, torch.Tensor] = {}
        for r in self.rewards:
            per_function[r.name] = self._apply_policy(r, outcomes[r.name], prompts, completions, metrics)
        stacked = torch.stack([per_function[r.name] for r in self.rewards])  # [F, N]
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)[:, None]
        present = ~torch.isnan(stacked)
        # nansum without renormalization (see the module docstring); NaN where nobody scored the sample.
        total = torch.where(present, stacked * weights, torch.zeros_like(stacked)).sum(0)
        total[~present.any(0)] = math.nan
        overflow = torch.isinf(total).nonzero().flatten().tolist()
        if overflow:  # each value fits float32, their weighted sum does not
            i = overflow[0]
            raise RewardError(f"the weighted sum of the rewards overflows float32 at sample {i} of {n} "
                              f"({', '.join(f'{r.name}={per_function[r.name][i].item():g} x {r.weight:g}' for r in self.rewards)}); "
                              "scale the rewards or their weights down")
        return RewardResult(total.float(), per_function, metrics, extra)

    def _apply_policy(
        self, r: _Reward, outcome: Any, prompts: list[Any], completions: list[Any], metrics: dict[str, float]
    ) -> torch.Tensor:
        n = len(completions)
        if isinstance(outcome, BaseException) and not isinstance(outcome, _Failure):
            # An exception the function raised: a failure of the whole call, its traceback kept for RewardError.
            cause, outcome = outcome, _Failure(f"raised {type(outcome).__name__}: {outcome}")
            outcome.__cause__ = cause
        cause = outcome.__cause__ if isinstance(outcome, _Failure) else None
        try:
            if isinstance(outcome, _Failure):
                raise outcome
            values, bad = _validate(outcome, n)
        except _Failure as e:
            values, bad = [math.nan] * n, [(i, str(e)) for i in range(n)]
        if bad and r.on_error == "error":
            i, problem = bad[0]
            where = f"sample {i} of {n}" if len(bad) < n or n == 1 else f"all {n} samples (first: sample {i})"
            raise RewardError(
                f"reward function {r.name!r} {problem} at {where}; prompt: {_excerpt(prompt_text(prompts[i]))!r}; "
                f"completion: {_excerpt(completion_text(completions[i]))!r}. "
                f"Set on_error: zero or skip for this reward to continue past such samples."
            ) from cause
        fill = 0.0 if r.on_error == "zero" else math.nan
        for i, _ in bad:
            values[i] = fill
        t = torch.tensor(values, dtype=torch.float32)
        present = t[~torch.isnan(t)]
        metrics[f"rewards/{r.name}/mean"] = present.mean().item() if present.numel() else math.nan
        metrics[f"rewards/{r.name}/std"] = present.std(unbiased=False).item() if present.numel() else math.nan
        metrics[f"rewards/{r.name}/abstain_rate"] = (1.0 - present.numel() / n) if n else 0.0
        metrics[f"rewards/{r.name}/errors"] = float(len(bad))
        if n and not present.numel() and not bad and r.name not in self._warned_abstain:
            # Usually a format or column mismatch (the function never recognises an answer), not a choice.
            self._warned_abstain.add(r.name)
            logger.warning("reward %r abstained on every sample of a rollout (returned None for all %d); it "
                           "contributes nothing to the reward. Check that it can parse these completions and "
                           "columns (warned once)", r.name, n)
        return t
