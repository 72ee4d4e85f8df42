"""Sharded checkpoints of an FSDP2 policy (torch.distributed.checkpoint), and consolidated HF model folders.

Layout under `OUTPUT_DIR/checkpoints/` (the same spirit as `gspo.training.checkpoint`):
    rollout-000012/
        dcp/                   torch.distributed.checkpoint: {"model", "optim"} as each process holds them
                               (every rank writes its own shards; DCP reshards on load, so any number of
                               processes, or one plain model, can resume it)
        scheduler.pt           rank 0
        rng.pt                 a list: rank r's RNG states at index r
        tokenizer/             rank 0
        trainer_state.json     rank 0, the caller's dict
        distributed.json       {"format": "torch.distributed.checkpoint", "world_size": N, "lora": bool}
        adapter/, model/       LoRA only, per `lora.save`: the peft adapter and the merged model (consolidated)
    latest                     names the newest finished checkpoint

Why a full-fine-tuning checkpoint has no consolidated `model/`: the shards already hold the fp32 master weights
(what a resume needs), and at Qwen3-30B-A3B's size a consolidated copy is another 61 GB (bf16) or 122 GB (fp32)
per checkpoint, gathered tensor by tensor and written by rank 0 alone while every other GPU waits, for a folder
nothing in gspo reads (a resume reads the shards; the next stage reads `final/`, always consolidated by
`save_consolidated`). A LoRA checkpoint's shards hold the adapters only (the frozen base is `model.name_or_path`),
so there `lora.save` keeps its meaning: `adapter/` is small, `model/` (merged) is the user's explicit request.

Atomicity as in `gspo.training.checkpoint`: every rank writes into one temporary sibling directory; once every
rank reports success (an all-gather of errors, so a failure on one rank raises on all instead of hanging the
others) rank 0 renames it into place, replaces `latest` atomically and prunes; a SIGKILL anywhere before the
rename leaves `latest` on the previous checkpoint.

Everything works on one process without a process group (a plain model): the collectives become no-ops, so one
code path serves one and N processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from gspo.models import lora
from gspo.models.policy import SHARDED_DIR, is_sharded_checkpoint
from gspo.models.provenance import _unwrap, write_provenance
from gspo.rollout.weight_sync import full_tensor as _full
from gspo.training.checkpoint import (
    CHECKPOINTS,
    _fsync_dir,
    publish,
    rng_state,
    set_rng_state,
    write_error,
)
from gspo.training.distributed import Dist, agree, all_gather_objects, barrier

DIST_INFO = "distributed.json"
FORMAT = "torch.distributed.checkpoint"
TOKENIZER_DIR = "tokenizer"
# Bound on one safetensors file of a consolidated model (rank 0 holds at most one file's tensors plus one
# decoder layer in host memory); transformers' and vLLM's loaders read the index of several files.
MAX_SHARD_BYTES = 5 * 2**30
_LAYER = re.compile(r"^(.*?\blayers\.\d+)\.")


# -- Process group helpers: with no process group every call is the one-process answer. ----------------------


def _here() -> Dist:
    """This process's place in the process group: `Dist()` (one process) when there is none."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    return Dist(dist.get_world_size(), dist.get_rank())


def _broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _here().sharded:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _agree(error: BaseException | None, what: str) -> None:
    """`distributed.agree` over this process's group (see there): no rank is left waiting after a failure."""
    agree(error, what, _here())


def _options(model: torch.nn.Module):
    """DCP state-dict options: a LoRA policy saves only what trains (its adapters); the frozen base is the
    stage's `model.name_or_path` and is loaded from there on resume."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    is_lora = lora.is_lora(model)
    return StateDictOptions(ignore_frozen_params=is_lora, strict=not is_lora)


@contextmanager
def _one_process_quiet() -> Iterator[None]:
    """DCP warns that it "assumes the intent is to save in a single process" without a process group: that is
    the intent here (one code path for 1 and N processes), so the warning is silenced."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _hook_before_publish(tmp: str) -> None:
    """Called on every rank after all of a checkpoint is written and before it is renamed into place (a test
    replaces it to simulate a crash at exactly that point)."""


# -- Save / load ---------------------------------------------------------------------------------------------


def save_distributed_checkpoint(output_dir: str, rollout: int, *, model: torch.nn.Module,
                                optimizer: torch.optim.Optimizer, scheduler: Any, tokenizer: Any,
                                trainer_state: dict[str, Any], keep: int = 2, lora_save: str = "both") -> str:
    """Collective (every rank calls it): write checkpoint `rollout-<rollout>` (module docstring) and point
    `latest` at it once every rank finished. Returns its path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = _here().rank
    root = os.path.join(output_dir, CHECKPOINTS)
    name = f"rollout-{rollout:06d}"
    final = os.path.join(root, name)
    tmp = _broadcast(os.path.join(root, f".tmp-{name}-{os.getpid()}"))  # one directory, named by rank 0
    error = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as e:
            error = write_error(e, final)
    _agree(error, f"checkpoint {final}")
    is_lora = lora.is_lora(model)
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(model))
        # DCP's save is collective and raises on every rank when one rank's write fails.
        with _one_process_quiet():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(tmp, SHARDED_DIR))
        del model_sd, optim_sd
        if is_lora:
            if lora_save not in lora.SAVE_CHOICES:
                raise ValueError(f"lora.save={lora_save!r} is not valid; choose one of {lora.SAVE_CHOICES}")
            if lora_save in ("adapter", "both"):
                save_sharded_adapter(model, tokenizer, os.path.join(tmp, lora.ADAPTER_DIR))
            if lora_save in ("merged", "both"):
                save_consolidated(model, tokenizer, os.path.join(tmp, lora.MERGED_DIR))
        rngs = all_gather_objects(rng_state(), _here())
        error = None
        if rank == 0:
            try:
                torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
                torch.save(rngs, os.path.join(tmp, "rng.pt"))
                tokenizer.save_pretrained(os.path.join(tmp, TOKENIZER_DIR))
                with open(os.path.join(tmp, DIST_INFO), "w", encoding="utf-8") as f:
                    json.dump({"format": FORMAT, "world_size": _here().world, "lora": is_lora}, f, indent=1)
                with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
                    json.dump(trainer_state, f, indent=1)
                _fsync_dir(tmp)
            except BaseException as e:  # noqa: BLE001 (every rank must hear of it, then it is re-raised)
                error = e
        _agree(error, f"checkpoint {final}")
    except BaseException as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing behind
        raise write_error(e, final) from e
    _hook_before_publish(tmp)
    barrier(_here())  # every rank's shards are on disk before the rename makes them the checkpoint
    if rank == 0:
        publish(root, tmp, name, keep)
    barrier(_here())  # no rank returns (and maybe resumes from `latest`) before it names this checkpoint
    return final


def read_dist_info(path: str) -> dict[str, Any]:
    """`distributed.json` of a sharded checkpoint; a FileNotFoundError naming the path for any other folder."""
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a sharded checkpoint (no {SHARDED_DIR}/ folder); a one-process "
                                "checkpoint loads with gspo.training.checkpoint.load_training_state")
    with open(os.path.join(path, DIST_INFO), encoding="utf-8") as f:
        return json.load(f)


def load_distributed_checkpoint(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                scheduler: Any) -> dict[str, Any]:
    """Collective: restore the model's trained weights, the optimizer, the scheduler and this rank's RNG states
    from the sharded checkpoint `path`; returns trainer_state.json's contents.

    `model` is sharded (FSDP2) on any number of processes, or a plain model on one process: DCP reshards the
    saved shards to whatever each process holds. A rank beyond the saving world size takes the RNG states of
    rank `r % N` (sampling is then reproducible only on the same N)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    info = read_dist_info(path)
    if info.get("lora") != lora.is_lora(model):
        kind = {True: "a LoRA", False: "a full fine-tuning"}
        raise ValueError(f"{path} is {kind[bool(info.get('lora'))]} checkpoint but the policy is "
                         f"{kind[lora.is_lora(model)]} one: set lora.enabled as in the run that saved it")
    options = _options(model)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=os.path.join(path, SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    rngs = torch.load(os.path.join(path, "rng.pt"), weights_only=False)
    set_rng_state(rngs[_here().rank % len(rngs)])
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)


# -- Consolidated HF folders ---------------------------------------------------------------------------------


def _plan(hf: torch.nn.Module, raw: dict[str, torch.Tensor]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Rank 0's plan of what to gather: groups (one per decoder layer, one per other tensor) of (saved name,
    state-dict name), peft entries dropped and `.base_layer` removed, tied weights once (as save_pretrained)."""
    from torch.distributed.tensor import DTensor
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    clean = {}
    for name, t in raw.items():
        if any(part.startswith("lora_") for part in name.split(".")):
            continue
        # Tied weights share storage in the local shards too, which is what transformers looks at.
        clean[lora._BASE_LAYER.sub("", name)] = (name, t.to_local() if isinstance(t, DTensor) else t)
    kept = remove_tied_weights_from_state_dict({k: v[1] for k, v in clean.items()}, hf)
    groups: dict[str, list[tuple[str, str]]] = {}
    for key in clean:
        if key in kept:
            m = _LAYER.match(key)
            groups.setdefault(m.group(1) if m else key, []).append((key, clean[key][0]))
    return list(groups.items())


@contextmanager
def _full_factors(layer: Any, adapter: str) -> Iterator[None]:
    """Within the block, `layer`'s LoRA factors for `adapter` are full tensors (gathered: a collective), so
    peft's own `get_delta_weight` computes ΔW; the sharded parameters are put back afterwards."""
    mods = [layer.lora_A[adapter], layer.lora_B[adapter]]
    saved = [m._parameters["weight"] for m in mods]
    try:
        for m, p in zip(mods, saved, strict=True):
            m._parameters["weight"] = _full(p.detach())
        yield
    finally:
        for m, p in zip(mods, saved, strict=True):
            m._parameters["weight"] = p


def consolidated_items(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Collective: the (possibly sharded, possibly peft) model's weights as a plain HF checkpoint holds them,
    one group at a time (a decoder layer, or one other tensor): full tensors under the saved names (transformers'
    `revert_weight_conversion`, as save_pretrained), LoRA merged (W + ΔW, peft's `get_delta_weight`), on rank 0;
    the other ranks get empty groups. Every rank must iterate to the end; the groups are rank 0's plan, so the
    gathers match on every rank."""
    from transformers.core_model_loading import revert_weight_conversion

    is_lora = lora.is_lora(model)
    hf = lora.hf_model_of(model) if is_lora else _unwrap(model)
    raw = hf.state_dict()
    plan = _broadcast(_plan(hf, raw) if _here().main else None)
    adapted = dict(lora._lora_layers(hf)) if is_lora else {}
    rank0 = _here().main
    with torch.no_grad():
        for _, entries in plan:
            group = {key: _full(raw[name].detach()) for key, name in entries}
            for key, weight in list(group.items()):
                layer = adapted.get(key)
                if layer is None or layer.merged or layer.disable_adapters:
                    continue
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        with _full_factors(layer, adapter):  # gathers on every rank; only rank 0 merges
                            if rank0:
                                weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
                group[key] = weight
            # Only rank 0 writes: the others gathered for the collectives' sake and yield nothing.
            yield revert_weight_conversion(hf, group) if rank0 else {}


class _ShardWriter:
    """Safetensors files of at most `limit` bytes (a tensor larger than the limit gets a file of its own),
    named as transformers names them, with `model.safetensors.index.json` when there is more than one."""

    def __init__(self, directory: str, limit: int) -> None:
        self.directory, self.limit = directory, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        if self.pending and self.size + n > self.limit:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.size += n
        self.total += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        part = os.path.join(self.directory, f".part-{len(self.files):05d}.safetensors")
        save_file(self.pending, part, metadata={"format": "pt"})
        self.files.append((part, list(self.pending)))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        count = len(self.files)
        if count == 1:
            os.replace(self.files[0][0], os.path.join(self.directory, "model.safetensors"))
            return
        weight_map = {}
        for i, (part, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(part, os.path.join(self.directory, final))
            weight_map.update(dict.fromkeys(names, final))
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)


def save_consolidated(model: torch.nn.Module, tokenizer: Any, directory: str, *,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Collective: rank 0 writes `directory` as a plain HF checkpoint (config.json, generation_config.json,
    model*.safetensors with an index when there are several files, tokenizer, gspo_model.json) that
    `from_pretrained` and vLLM load. The weights are gathered one decoder layer at a time
    (`consolidated_items`) and streamed into files of at most `max_shard_bytes`: no process ever holds the full
    model. A LoRA (peft) policy is written merged under the base model's names. Returns `directory`."""
    is_lora = lora.is_lora(model)
    hf = lora.hf_model_of(model) if is_lora else _unwrap(model)
    rank0 = _here().main
    writer = None
    error: BaseException | None = None
    if rank0:
        try:
            os.makedirs(directory, exist_ok=True)
            writer = _ShardWriter(directory, max_shard_bytes)
        except OSError as e:
            error = e
    for group in consolidated_items(model):  # every rank gathers, even after rank 0 failed to write
        if writer is not None and error is None:
            try:
                for name, tensor in group.items():
                    writer.add(name, tensor)
            except BaseException as e:  # noqa: BLE001 (reported to every rank by _agree below)
                error = e
    if writer is not None and error is None:
        try:
            writer.close()
            hf.config.architectures = [architecture_name(hf)]
            hf.config.save_pretrained(directory)
            if getattr(hf, "generation_config", None) is not None and hf.can_generate():
                hf.generation_config.save_pretrained(directory)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
            write_provenance(hf, directory)
        except BaseException as e:  # noqa: BLE001
            error = e
    _agree(error, f"writing {directory}")
    return directory


def architecture_name(model: torch.nn.Module) -> str:
    """The model's own class name for config.json: FSDP2's `fully_shard` swaps the class for a generated
    subclass (`FSDPQwen3MoeForCausalLM`) that transformers tolerates and vLLM refuses."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def save_sharded_adapter(model: torch.nn.Module, tokenizer: Any, directory: str) -> str:
    """Collective: rank 0 writes the peft adapter (adapter_config.json + adapter_model.safetensors, as
    `gspo.models.lora.save_adapter`) of a (possibly sharded) LoRA policy; only the adapter factors are
    gathered, one at a time."""
    root = lora._peft_root(model)
    rank0 = _here().main
    full = {}
    for name, t in root.state_dict().items():
        if any(part.startswith("lora_") for part in name.split(".")):
            gathered = _full(t.detach())  # a collective: every rank gathers, rank 0 keeps (in host memory)
            if rank0:
                full[name] = gathered.cpu()
    error = None
    if rank0:
        try:
            root.save_pretrained(directory, state_dict=full)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
        except BaseException as e:  # noqa: BLE001
            error = e
    del full
    _agree(error, f"writing {directory}")
    return directory
