"""Where the trainer's rollouts come from: generated when asked (`rollout.max_staleness=0`, the synchronous
loop) or generated in the background while the previous rollout trains (`max_staleness=1`).

With staleness 1 (one-step-off asynchronous RL, as in verl's one-step-off policy and AReaL with eta=1):
rollout k+1 is requested from the engine right after rollout k is handed to the trainer, so its generation
overlaps rollout k's rewards, pi_old pass and optimizer steps. The weight push after rollout k's update waits for
that generation to finish (`before_weight_sync`), so rollout k+1 always comes from the weights before update k:
the trainer, at version k, trains on a rollout sampled at version k-1, a staleness of exactly 1 (the first
rollout of a run, or of a resumed run, has staleness 0). The engine must sample on its own device and process
(`vllm_server`); the config check refuses anything else.

Resume: a checkpoint stores the sampler's state from before any draw whose rollout was not trained on yet
(`sampler_state_for_checkpoint`), so a resumed run draws those prompts again and generates them with the resumed
weights.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from gspo.rollout.base import RolloutBatch, RolloutEngine, SamplingSpec


@dataclass
class _Pending:
    rollout: int
    sampler_state: dict[str, Any]  # the sampler before this rollout's prompts were drawn
    rows: list[dict[str, Any]]
    version: int  # weight updates pushed when the generation was requested
    future: Future


class RolloutProducer:
    """Hands rollout k to the trainer (`take`) and, with staleness 1, starts rollout k+1 at once.

    draw() -> (rows, prompt_ids) advances the prompt sampler; sampling(k) is rollout k's `SamplingSpec`;
    sampler_state() snapshots the sampler. `version` counts the weight pushes (`after_weight_sync`)."""

    def __init__(self, engine: RolloutEngine, *, max_staleness: int, last_rollout: int,
                 draw: Callable[[], tuple[list[dict[str, Any]], list[list[int]]]],
                 sampling: Callable[[int], SamplingSpec], sampler_state: Callable[[], dict[str, Any]]) -> None:
        if max_staleness not in (0, 1):
            raise ValueError(f"rollout.max_staleness={max_staleness}: 0 or 1 are supported")
        self.engine, self.max_staleness, self.last_rollout = engine, max_staleness, last_rollout
        self.draw, self.sampling, self.sampler_state = draw, sampling, sampler_state
        self.version = 0
        self.pending: _Pending | None = None
        self.current_state: dict[str, Any] | None = None  # sampler before the rollout being trained was drawn
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gspo-rollout") if max_staleness else None

    def take(self, rollout: int) -> tuple[list[dict[str, Any]], RolloutBatch, int]:
        """(rows, batch, staleness) of rollout `rollout`; starts the next one when asynchronous."""
        p = self.pending
        if p is not None and p.rollout == rollout:
            self.pending = None
            batch = p.future.result()
            rows, version, self.current_state = p.rows, p.version, p.sampler_state
        else:
            self.current_state = self.sampler_state()
            rows, prompt_ids = self.draw()
            version = self.version
            batch = self.engine.generate(prompt_ids, self.sampling(rollout))
        if self._pool is not None and rollout < self.last_rollout:
            state = self.sampler_state()
            next_rows, next_ids = self.draw()
            future = self._pool.submit(self.engine.generate, next_ids, self.sampling(rollout + 1))
            self.pending = _Pending(rollout + 1, state, next_rows, self.version, future)
        return rows, batch, self.version - version

    def before_weight_sync(self) -> None:
        """Wait for the background generation (it must sample with the weights before this push)."""
        if self.pending is not None:
            self.pending.future.result()

    def after_weight_sync(self) -> None:
        self.version += 1

    def sampler_state_for_checkpoint(self, *, trained: bool) -> dict[str, Any]:
        """The sampler state a checkpoint keeps: before the pending draw (its rollout was not trained on), and,
        when the current rollout was not trained on either (`trained=False`), before that one's draw."""
        if not trained and self.current_state is not None:
            return self.current_state
        if self.pending is not None:
            return self.pending.sampler_state
        return self.sampler_state()

    def close(self) -> None:
        if self.pending is not None:  # a background rollout nobody will train on (its error, if any, too)
            self.pending.future.cancel()
            self.pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
