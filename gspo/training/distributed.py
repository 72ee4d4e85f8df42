"""Data parallelism of the rl stage: the process group, each rank's share of a rollout, and the collectives that
turn per-rank results into global-batch ones.

The process group is initialised here, not by accelerate: accelerate's own count misses torchrun on a machine
without CUDA (gspo/launch.py), so `WORLD_SIZE` (what every launcher sets) decides. gloo on CPU; nccl on CUDA,
one GPU per process (`LOCAL_RANK`).

Gathering rows: every rank holds the global rollout's row layout (N completions, prompt-major) and computes
some of its rows; `gather_rows` puts each rank's rows into a zero tensor of the global shape and sums over the
ranks (all-reduce). A row belongs to exactly one rank, so the sum is that rank's values, bit for bit, for any
dtype gloo and nccl can sum, and one collective serves ranks with different row counts (a minibatch's rows
are split unevenly, possibly not at all, across ranks).

Failing together: code that runs on each rank's own share (reward functions) can raise on one rank only, while
the others go on into the next collective and wait there until the backend's timeout (nccl: 10 minutes) or the
launcher notices. `fail_together` around such code makes every rank stop at its end: the failing rank raises its
own error, every other rank `PeerFailed` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

import torch

from gspo.launch import launch_processes


@dataclass(frozen=True)
class Dist:
    """This process's place in the launch: `world` processes, this one `rank`, computing on `device`."""

    world: int = 1
    rank: int = 0
    device: torch.device | None = None  # None: one process (accelerate picks the device)

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, total: int) -> tuple[int, int]:
        """[lo, hi) of `total` items (prompts) that this rank takes: contiguous, equal shares."""
        if total % self.world:
            raise ValueError(f"{total} prompts cannot be split evenly over {self.world} processes")
        per = total // self.world
        return self.rank * per, (self.rank + 1) * per


def init_distributed() -> Dist:
    """The process group of this launch (initialised here when the launcher started more than one process),
    or `Dist()` for a single process."""
    n, _ = launch_processes()
    if n <= 1:
        return Dist()
    import torch.distributed as dist

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        # env:// rendezvous (MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE), which torchrun and accelerate set.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Dist(dist.get_world_size(), dist.get_rank(), device)


def gather_rows(local: torch.Tensor, rows: list[int], total: int, d: Dist) -> torch.Tensor:
    """[total, ...] tensor whose `rows` hold this rank's `local` [len(rows), ...] and whose other rows hold the
    other ranks' (module docstring); on `local`'s device. One process: `local` scattered into zeros."""
    import torch.distributed as dist

    src = local.detach()
    dtype = src.dtype
    work = torch.uint8 if dtype == torch.bool else dtype
    full = torch.zeros((total, *src.shape[1:]), dtype=work, device=d.device or src.device)
    if rows:
        full[torch.as_tensor(rows, dtype=torch.long, device=full.device)] = src.to(full.device, work)
    if d.sharded:
        dist.all_reduce(full)
    return full.to(src.device, dtype)


def all_gather_objects(obj: Any, d: Dist) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable objects: texts, small CPU tensors)."""
    if not d.sharded:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce(values: list[float], d: Dist, op: str = "sum") -> list[float]:
    """Element-wise sum / max / min of a list of floats over the ranks (fp64)."""
    if not d.sharded:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.sharded:
        import torch.distributed as dist

        dist.barrier()


class PeerFailed(RuntimeError):
    """Another process of this launch failed in a step every rank agrees on (`fail_together`, the sharded
    saves); the message is its error, one line. That process prints its own; `gspo` prints this one on rank 0
    only."""


def _one_line(e: BaseException) -> str:
    """The error as one line; gspo's own errors (RuntimeError / ValueError / OSError kinds) carry their whole
    story in the message, anything else is named by its type (a bare KeyError's message is just the key)."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    text = " ".join(str(e).split())
    if not text or not isinstance(e, (RuntimeError, ValueError, OSError)):
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text


@contextmanager
def fail_together(d: Dist, what: str) -> Iterator[None]:
    """Run the block on every rank, then exchange whether it raised (one small all-gather): the rank(s) that
    raised re-raise their error, the others raise `PeerFailed` naming the first failing rank and its error.
    Every rank must enter it the same number of times (it is a collective). One process: nothing added."""
    if not d.sharded:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 (shared below, then re-raised: no rank goes on alone)
        error = e
    agree(error, what, d)


def agree(error: BaseException | None, what: str, d: Dist) -> None:
    """Collective: every rank says whether its step failed (one small all-gather); the rank(s) that failed
    re-raise their own error, the others raise `PeerFailed` naming the first failing rank and its error, so no
    rank is left waiting in a later collective. One process: raises `error` if given."""
    reports = all_gather_objects(None if error is None else _one_line(error), d) if d.sharded else []
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise PeerFailed(f"{what} failed on rank {rank} of {d.world}: {msg}")


def main_first(d: Dist, what: str, fn: Callable[[], T]) -> T:
    """`fn()` on rank 0, then on the other ranks (a `tiny:` model is built into output_dir once, by rank 0, and
    the others load what it wrote); a failure on any rank stops every rank (`fail_together`). One process:
    `fn()`."""
    result: Any = None
    with fail_together(d, what):
        if d.main:
            result = fn()
    with fail_together(d, what):
        if not d.main:
            result = fn()
    return result
