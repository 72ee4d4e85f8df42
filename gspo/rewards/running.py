"""Calling the reward functions of one rollout: concurrency, time-outs, validation of what they return, the
failure policy (`on_error`) and the weighted sum (the package docstring says why it is not renormalized)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import numbers
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gspo.rewards.loading import STANDARD_ARGS, Reward, RewardLoadError, load_reward
from gspo.rewards.text import completion_text, excerpt, prompt_text

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
logger = logging.getLogger("gspo")


class RewardError(RuntimeError):
    """A reward function failed under `on_error: error`; the message names the function and the sample."""


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


async def _run_async(r: Reward, kw: dict[str, Any]) -> Any:
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
            problem = f"returned a {type(v).__name__} ({excerpt(repr(v))}), expected float | None"
        values.append(math.nan if v is None or problem else v)
        if problem:
            bad.append((i, problem))
    return values, bad


class RewardSet:
    """The configured reward functions: loaded and checked once, called once per rollout."""

    def __init__(self, rewards: list[Reward]) -> None:
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
        rewards: list[Reward] = []
        for k, spec in enumerate(specs):
            rewards.append(load_reward(spec, k, columns, base_dir, taken=[r.name for r in rewards]))
        return cls(rewards)

    def _kwargs(self, r: Reward, standard: dict[str, Any], columns: Mapping[str, list]) -> dict[str, Any]:
        accepts = (lambda key: True) if r.var_kw else (lambda key: key in r.params)
        kw = {k: v for k, v in standard.items() if accepts(k)}
        kw.update({k: v for k, v in columns.items() if accepts(k) and k not in STANDARD_ARGS})
        kw.update(r.kwargs)
        return kw

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 columns: Mapping[str, list] | None = None, *, trainer_state: Any = None) -> RewardResult:
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
        self, r: Reward, outcome: Any, prompts: list[Any], completions: list[Any], metrics: dict[str, float]
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
                f"reward function {r.name!r} {problem} at {where}; prompt: {excerpt(prompt_text(prompts[i]))!r}; "
                f"completion: {excerpt(completion_text(completions[i]))!r}. "
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
