"""FSDP2 sharding of the policy for a multi-process launch, and its full weights one parameter at a time.

`shard_policy` applies torch's `fully_shard` (FSDP2, the well-kept implementation; accelerate's FSDP plugin v2
wraps the same call) with one unit per decoder layer (the model's `_no_split_modules`, as accelerate's
transformer auto-wrap picks them) and the root last. Mixed precision is the standard recipe: parameters kept
(and the optimizer stepping) in their load dtype (fp32 master weights), compute in `param_dtype` (bf16 on
GPUs), gradients reduced in fp32.

`full_state_items` is what an engine needs after an update: every tensor of the state dict as a full tensor,
gathered (`DTensor.full_tensor`) one parameter at a time, so no process ever holds a full copy of the model
beyond the engine's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP wraps as units: instances of the HF model's `_no_split_modules` classes."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(model).__name__} names no decoder-layer classes (_no_split_modules): "
                         "cannot choose FSDP units")
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no module of the classes {sorted(names)} found")
    return layers


def shard_policy(model: torch.nn.Module, *, param_dtype: torch.dtype | None = None, mesh=None,
                 cpu_offload: bool = False) -> torch.nn.Module:
    """Shard `model` in place over the default process group (or `mesh`): one FSDP2 unit per decoder
    layer, then the root (embeddings, norm, head). `param_dtype`: the compute dtype (None: the parameters'
    own, e.g. fp32 on CPU); gradients are always reduced in fp32. `cpu_offload`: shards, gradients and so
    the optimizer state live in CPU memory (FSDP2's CPUOffloadPolicy)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    kw = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
          "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)  # a LoRA policy: the peft model (its generate bypasses it: see hf_generate)
    return model


def fsdp_root(model: torch.nn.Module) -> torch.nn.Module | None:
    """The outermost FSDP2 module of `model` (the one `shard_policy` made the root), or None."""
    from torch.distributed.fsdp import FSDPModule

    return next((m for m in model.modules() if isinstance(m, FSDPModule)), None)


def full_state_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every entry of the (possibly sharded) model's state dict, gathered one at a
    time. Every process must iterate it to the end: each gather is a collective."""
    from torch.distributed.tensor import DTensor

    for name, t in model.state_dict().items():
        yield name, (t.full_tensor() if isinstance(t, DTensor) else t)


@torch.no_grad()
def copy_full_weights(src: torch.nn.Module, dst: torch.nn.Module) -> int:
    """Copy the sharded (or plain) `src`'s weights into the unsharded `dst` (an engine's copy of the same
    architecture) one tensor at a time; returns how many tensors were copied. A name `dst` lacks is an error:
    the engine would silently sample with stale weights."""
    target = dst.state_dict()
    n = 0
    for name, full in full_state_items(src):
        if name not in target:
            raise KeyError(f"copy_full_weights: {name!r} is not in the engine's model ({type(dst).__name__})")
        target[name].copy_(full.to(target[name].dtype))
        n += 1
    return n


def init_root(model: torch.nn.Module) -> None:
    """Make the sharded model's top-level module FSDP's root before any forward.

    The log-probability passes call the decoder and `lm_head` directly (gspo/training/logprobs.py keeps logits
    off the prompt positions), so the first FSDP module to run forward would be decoder layer 0, which FSDP2
    would then take as the root; `generate` (through the top-level forward) would fail afterwards. FSDP2 has
    no public call for this, so the private `_lazy_init` of the torch version pinned in pyproject.toml."""
    fsdp_root(model)._get_fsdp_state()._lazy_init()


@contextmanager
def root_unsharded(model: torch.nn.Module) -> Iterator[None]:
    """Gather the root unit's own parameters (embeddings, final norm, lm_head) around a pass that bypasses the
    top-level forward (see `init_root`). Under grad they stay gathered until backward, whose final callback
    reduce-scatters their gradients and reshards them (FSDP2 runs post-backward for every group still
    unsharded); a no-grad pass reshards them on exit."""
    root = fsdp_root(model)
    if root is None:
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        if not torch.is_grad_enabled():
            root.reshard()
