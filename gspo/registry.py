"""Name -> object registries.

Every pluggable piece (losses, advantage estimators, KL estimators, rollout engines, reward functions,
synthetic tasks, tiny-model families) is found by name through one of these. Extending gspo means
registering a new name, never editing a dispatch chain. An unknown name raises an error that lists the
valid choices and the closest one; registering a name twice raises.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown or duplicate registry name. The message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def closest(name: str, choices: list[str] | tuple[str, ...] | set[str]) -> str | None:
    """Closest valid spelling of `name` among `choices`, or None when nothing is close."""
    match = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.5)
    return match[0] if match else None


class Registry(Generic[T]):
    """A named collection of objects of one kind (`kind` appears in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        """Register `obj` under `name`; usable as a decorator: `@REG.register("name")`."""

        def add(o: T) -> T:
            if name in self._items:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._items[name] = o
            return o

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        hint = closest(name, list(self._items))
        msg = f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._items)) or '(none registered)'}"
        return msg + (f" (did you mean {hint!r}?)" if hint else "")

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())


# The project's registries. Modules register into them at import time; `gspo.plugins.load_builtins()`
# imports every built-in module so the registries are complete before a config is validated.
LOSSES: Registry[Callable[..., Any]] = Registry("loss")
ADVANTAGES: Registry[Callable[..., Any]] = Registry("advantage estimator")
KL_ESTIMATORS: Registry[Callable[..., Any]] = Registry("KL estimator")
ROLLOUT_ENGINES: Registry[Any] = Registry("rollout engine")
REWARDS: Registry[Callable[..., Any]] = Registry("reward function")
TASKS: Registry[Any] = Registry("task")
MODEL_FAMILIES: Registry[Any] = Registry("tiny model family")


@dataclass(frozen=True)
class StageSpec:
    """One stage `gspo train` and `gspo pipeline` can run, registered in `STAGES` by the module of its runner.

    Everything that differs between stages is here, so adding a stage is registering one spec: the pipeline
    wires inputs from `consumes` / `produces` / `output`, `gspo validate` prints `summary(cfg)`, the config
    checks read `needs_rewards`, preflight reads `data_rows`, and docs/stages.md's table is generated from
    the registered specs (`gspo stages`).

    Artifact kinds: "policy" (a model folder the next policy stage starts from), "data" (an SFT data file),
    "reward_model" (a reward model folder, wired into `reward_model` rewards).
    """

    name: str
    runner: Callable[[Any], str] | None  # fn(cfg) -> the artifact's path; None: accepted, nothing runs yet
    help: str  # one line for docs/stages.md
    sections: tuple[str, ...] = ()  # the config sections the stage reads (besides model, data, rewards)
    consumes: tuple[str, ...] = ()  # artifact kinds wired from the nearest earlier producer in a pipeline
    produces: str | None = None  # the kind of artifact its runner returns
    output: str = "final"  # the artifact's path in the stage's output_dir (known before the stage has run)
    needs_rewards: bool = False  # a config of this stage without `rewards` is an error
    # The rows preflight checks (prompt format, reward columns) without loading a model: fn(cfg) -> rows, or
    # None (not checkable here). Unset: the `data` section's rows (gspo.data.build_dataset).
    data_rows: Callable[[Any], list[dict[str, Any]] | None] | None = None
    summary: Callable[[Any], list[str]] | None = None  # `gspo validate`'s lines about this stage's settings
    # The most processes of one launch (torchrun, accelerate launch) the runner handles; None: any (the runner
    # is a distributed job). Preflight refuses a larger launch before anything loads (gspo/launch.py).
    max_processes: int | None = None


STAGES: Registry[StageSpec] = Registry("stage")
