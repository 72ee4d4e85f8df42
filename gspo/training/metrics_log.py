"""Timers, the metrics file, trackers, progress and completion samples.

`OUTPUT_DIR/metrics.jsonl` gets one JSON object per optimizer step (a public contract, docs/architecture.md);
`OUTPUT_DIR/samples.jsonl` gets a few completions with their rewards every `logging.sample_every` rollouts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger("gspo")


def _wait_for_device() -> None:
    # CUDA kernels run asynchronously: without waiting at a hop's edges, the tail of one hop's GPU work
    # (e.g. the last optimizer step of `update`) is billed to whichever later hop synchronizes first.
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class HopTimer:
    """Wall time per named hop of one RL step (`timing/<hop>` in the metrics); on a GPU each hop waits for
    its own kernels, so a hop's time is its own. Each hop is also a `gspo/<hop>` range in a torch profiler
    trace (benchmarks/profile_cycle.py splits a step's GPU time by hop with it)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, hop: str) -> Iterator[None]:
        import torch

        _wait_for_device()
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(f"gspo/{hop}"):
                yield
        finally:
            _wait_for_device()
            self.seconds[hop] = self.seconds.get(hop, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        out = {f"timing/{hop}": s for hop, s in self.seconds.items()}
        out["timing/step"] = sum(self.seconds.values())
        return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def read_metrics(path: str, *, repair_last: bool = False) -> list[dict[str, Any]]:
    """Rows of a JSONL metrics / samples file. A line that does not parse is an error naming the file and the
    line, except, with `repair_last`, the last line: a crash mid-write tears only that one, and it is dropped
    with a warning (the caller rewrites the file without it)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    rows = []
    for k, (lineno, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if repair_last and k == len(lines) - 1:
                logger.warning("%s:%d: dropped a torn last line (a crash mid-write): %r", path, lineno,
                               line[:80])
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return rows


class MetricsWriter:
    """Appends metric rows to metrics.jsonl and forwards them to accelerate trackers."""

    def __init__(self, output_dir: str, accelerator: Any | None = None, *, keep_until_rollout: int | None = None):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.samples_path = os.path.join(output_dir, "samples.jsonl")
        self.accelerator = accelerator
        if keep_until_rollout is not None:
            # A resumed run drops rows written after its checkpoint, so the file reads as one unbroken run.
            for path in (self.path, self.samples_path):
                rows = [r for r in read_metrics(path, repair_last=True)
                        if r.get("rollout", 0) <= keep_until_rollout]
                self._rewrite(path, rows)
        else:
            # A fresh run starts fresh files; `gspo train` / `gspo pipeline` only get here in a folder that was
            # empty or whose earlier run was deleted with overwrite=true (gspo/pipeline/run_record.py). Never silently.
            for path in (self.path, self.samples_path):
                if os.path.exists(path):
                    logger.warning("a fresh run replaces %s (%d rows of an earlier run)", path,
                                   len(read_metrics(path)))
                    os.remove(path)

    @staticmethod
    def _rewrite(path: str, rows: list[dict[str, Any]]) -> None:
        tmp = path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        except OSError as e:
            raise OSError(e.errno, e.strerror or str(e), path) from e
        os.replace(tmp, path)

    @staticmethod
    def _append(path: str, lines: list[str]) -> None:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.writelines(lines)
        except OSError as e:  # a bare write error names no file ("[Errno 28] No space left on device")
            raise OSError(e.errno, e.strerror or str(e), path) from e

    def write(self, row: dict[str, Any]) -> None:
        row = {k: _jsonable(v) for k, v in row.items()}
        self._append(self.path, [json.dumps(row) + "\n"])
        if self.accelerator is not None and self.accelerator.trackers:
            numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}
            self.accelerator.log(numeric, step=int(row["step"]))

    def write_samples(self, rollout: int, samples: list[dict[str, Any]]) -> None:
        self._append(self.samples_path, [json.dumps({"rollout": rollout, **s}) + "\n" for s in samples])
        lines = [f"  reward={s['reward']:+.3f}  {s['prompt']!r} -> {s['completion']!r}" for s in samples]
        logger.info("rollout %d samples:\n%s", rollout, "\n".join(lines))


def tracker_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The run's config as trackers take it: one level of dotted keys (`rollout.group_size`) with int / float /
    str / bool values. TensorBoard's hparams refuse nested sections, None and lists (wandb and trackio take these
    as well)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(tracker_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:  # None, lists (rewards, pass@k values): their JSON text
            out[name] = json.dumps(value, default=str)
    return out


def format_summary(row: dict[str, Any]) -> str:
    """A short progress-bar postfix from a metrics row."""
    keys = [("reward", "reward"), ("loss", "loss"), ("clip_frac/high", "clip_hi"),
            ("completions/mean_length", "len"), ("timing/step", "s/step")]
    parts = [f"{short}={row[k]:.3g}" for k, short in keys if isinstance(row.get(k), (int, float))]
    return " ".join(parts)
