"""Atomic checkpoints: model + tokenizer (HF format), optimizer, scheduler, RNG states, data position, step.

Layout under `OUTPUT_DIR/checkpoints/`:
    rollout-000012/            one finished checkpoint
        model/                 save_pretrained (config, safetensors, tokenizer); LoRA: the merged model
        adapter/               LoRA runs only: the peft adapter (what a LoRA resume loads)
        optimizer.pt, scheduler.pt, rng.pt
        trainer_state.json     rollout, optimizer step, sampler state, ...
    latest                     a text file naming the newest finished checkpoint

A checkpoint is written into a temporary sibling directory and renamed into place only once complete, and
`latest` is replaced atomically afterwards, so a crash (even SIGKILL) mid-save never leaves a broken "latest".
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str, rollout: int, *, model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer,
                    scheduler: Any, trainer_state: dict[str, Any], keep: int = 2, lora_save: str = "both") -> str:
    """Write checkpoint `rollout-<rollout>` atomically and point `latest` at it. Returns its path.

    A LoRA (peft) policy writes `adapter/` and/or `model/` (merged) per `lora_save` (gspo.models.lora).
    """
    root = os.path.join(output_dir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    name = f"rollout-{rollout:06d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _write_contents(tmp, model, tokenizer, optimizer, scheduler, trainer_state, lora_save)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing behind
        raise write_error(e, final) from e
    publish(root, tmp, name, keep)
    return final


def publish(root: str, tmp: str, name: str, keep: int) -> None:
    """Make the finished temporary folder `tmp` the checkpoint `root/name`, point `latest` at it, prune."""
    final = os.path.join(root, name)
    if os.path.exists(final):
        # Re-saving the same rollout (the trainer avoids it): move the old copy aside, then rename the new one
        # in; only a kill between these two renames would leave `latest` without its directory.
        old = os.path.join(root, f".tmp-old-{name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _write_latest(root, name)
    _prune(root, keep, latest=name)


# Below this many free bytes a failed write is put down to a full disk (torch.save reports one as
# "[enforce fail at inline_container.cc] . unexpected pos ...", naming neither the cause nor the file).
LOW_DISK_BYTES = 64 * 2**20


def write_error(e: BaseException, path: str) -> BaseException:
    """The exception to raise for a failed write of `path`: an OSError naming the path and the cause
    ("No space left on device: runs/x/checkpoints/rollout-000004"), or `e` itself when it is not an I/O
    failure (an interrupt, a bug)."""
    import errno

    if isinstance(e, OSError) and e.errno is not None:
        return OSError(e.errno, e.strerror or os.strerror(e.errno), e.filename or path)
    if isinstance(e, RuntimeError):  # torch's C++ writer: no errno; ask the file system
        probe = path
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe)
        try:
            free = shutil.disk_usage(probe or ".").free
        except OSError:
            free = None
        if free is not None and free < LOW_DISK_BYTES:
            return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({free} bytes free)", path)
        if "unexpected pos" in str(e) or "file write failed" in str(e):
            return OSError(errno.EIO, f"write failed ({' '.join(str(e).split())})", path)
    return e


def _write_contents(tmp: str, model: Any, tokenizer: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    trainer_state: dict[str, Any], lora_save: str) -> None:
    from gspo.models.policy import save_checkpoint_model

    save_checkpoint_model(model, tokenizer, tmp, lora_save=lora_save)
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
        json.dump(trainer_state, f, indent=1)
    _fsync_dir(tmp)


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, f".{LATEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))
    _fsync_dir(root)


def _rollout_number(name: str) -> int:
    try:
        return int(name[len("rollout-"):])
    except ValueError:
        return -1


def _prune(root: str, keep: int, *, latest: str) -> None:
    """Remove killed saves' leftovers and all but the `keep` newest checkpoints up to `latest`.

    `latest` (the one just written) is always kept, and checkpoints numbered after it are left alone: they
    are not this run's history (an earlier run's, in a folder reused with overwrite off in the Python API).
    """
    for entry in os.listdir(root):  # leftovers of saves that were killed midway
        if entry.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
    if keep <= 0:
        return
    limit = _rollout_number(latest)
    older = sorted((e for e in os.listdir(root) if e.startswith("rollout-") and e != latest
                    and 0 <= _rollout_number(e) < limit), key=_rollout_number)
    for old in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def resolve_checkpoint(output_dir: str, resume_from: str) -> str:
    """`resume_from`: "latest" (newest finished checkpoint in output_dir) or a checkpoint directory."""
    if resume_from != "latest":
        if not os.path.isfile(os.path.join(resume_from, "trainer_state.json")):
            raise FileNotFoundError(f"resume_from={resume_from!r} is not a checkpoint (no trainer_state.json)")
        return resume_from
    root = os.path.join(output_dir, CHECKPOINTS)
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        raise FileNotFoundError(f"resume_from=latest but {pointer} does not exist: no finished checkpoint yet")
    with open(pointer, encoding="utf-8") as f:
        return os.path.join(root, f.read().strip())


def load_training_state(path: str, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG states; return trainer_state.json's contents. A sharded checkpoint
    (written by N processes) is a ValueError naming the function that loads it, on any number of processes."""
    from gspo.models.policy import is_sharded_checkpoint

    if is_sharded_checkpoint(path):
        raise ValueError(f"{path} is a sharded checkpoint (torch.distributed.checkpoint, no optimizer.pt): load "
                         "it with gspo.training.dist_checkpoint.load_distributed_checkpoint, which also resumes "
                         "it on one process")
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), weights_only=False))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    set_rng_state(torch.load(os.path.join(path, "rng.pt"), weights_only=False))
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)
