"""Timers, the metrics file, trackers, progress and completion samples.

`OUTPUT_DIR/metrics.jsonl` gets one JSON object per optimizer step (design.md's public contract);
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


class HopTimer:
    """Wall time per named hop of one RL step (`timing/<hop>` in the metrics)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, hop: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[hop] = self.seconds.get(hop, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        out = {f"timing/{hop}": s for hop, s in self.seconds.items()}
        out["timing/step"] = sum(self.seconds.values())
        return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


def read_metrics(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
                rows = [r for r in read_metrics(path) if r.get("rollout", 0) <= keep_until_rollout]
                self._rewrite(path, rows)
        elif os.path.exists(self.path):
            os.remove(self.path)
            if os.path.exists(self.samples_path):
                os.remove(self.samples_path)

    @staticmethod
    def _rewrite(path: str, rows: list[dict[str, Any]]) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, path)

    def write(self, row: dict[str, Any]) -> None:
        row = {k: _jsonable(v) for k, v in row.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}
            self.accelerator.log(numeric, step=int(row["step"]))

    def write_samples(self, rollout: int, samples: list[dict[str, Any]]) -> None:
        with open(self.samples_path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"rollout": rollout, **s}) + "\n" for s in samples)
        lines = [f"  reward={s['reward']:+.3f}  {s['prompt']!r} -> {s['completion']!r}" for s in samples]
        logger.info("rollout %d samples:\n%s", rollout, "\n".join(lines))


def format_summary(row: dict[str, Any]) -> str:
    """A short progress-bar postfix from a metrics row."""
    keys = [("reward", "reward"), ("loss", "loss"), ("clip_frac/high", "clip_hi"),
            ("completions/mean_length", "len"), ("timing/step", "s/step")]
    parts = [f"{short}={row[k]:.3g}" for k, short in keys if isinstance(row.get(k), (int, float))]
    return " ".join(parts)
