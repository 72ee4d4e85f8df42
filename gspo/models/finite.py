"""Non-finite weights, gradients and logits: found cheaply and reported as one line naming where.

A NaN or inf in a policy's weights reaches sampling as non-finite logits; CUDA's multinomial then stops the
process with a device-side assert ("probability tensor contains either `inf`, `nan` or element < 0") that names
neither the rollout nor the tensor, and leaves the CUDA context unusable. `NonFiniteError` is what gspo raises
instead, before the sampler sees the scores: "non-finite values at rollout 2, hop rollout: parameter
model.layers.3.mlp.experts.gate_up_proj (first of 1; logits at generation step 5, rows [0, 3])".

Here (below `gspo.rollout`, which raises it from the HF engine's logits processor) live the error and the
finder; `gspo.training.finite` has the trainer-side checks (gradients, parameters, log-probabilities).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

HOPS = ("rollout", "old_logprobs", "ref_logprobs", "update", "weight_sync")
MAX_ROWS = 8  # rows named in a message (the count says how many there are)


class NonFiniteError(RuntimeError):
    """A NaN / inf found in the run: `rollout` (None until the trainer knows it), `hop` (one of HOPS) and
    `tensor` (a parameter or gradient name, or e.g. "logits at generation step 5, rows [0, 3]"). The message is
    one line."""

    def __init__(self, tensor: str, *, hop: str, rollout: int | None = None) -> None:
        self.tensor, self.hop, self.rollout = tensor, hop, rollout
        where = f"rollout {rollout}" if rollout is not None else "rollout ?"
        super().__init__(" ".join(f"non-finite values at {where}, hop {hop}: {tensor}".split()))

    def at_rollout(self, rollout: int) -> NonFiniteError:
        """The same error with the rollout filled in (an engine raises it without knowing the rollout)."""
        return NonFiniteError(self.tensor, hop=self.hop, rollout=rollout)


def _local(t: torch.Tensor) -> torch.Tensor:
    # A DTensor's own shard: the check stays local (no collective per tensor); see `first_non_finite`.
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _flags(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[n] bool on the host, True where the tensor is all finite: one isfinite().all() reduction per tensor on
    its device, then one transfer per device (no host sync per tensor)."""
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    per_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        per_device.setdefault(t.device, []).append(i)
    out = torch.ones(len(tensors), dtype=torch.bool)
    for device, idx in per_device.items():
        flags = torch.stack([torch.isfinite(tensors[i]).all() if tensors[i].numel() else
                             torch.ones((), dtype=torch.bool, device=device) for i in idx])
        out[idx] = flags.cpu()
    return out


def first_non_finite(named: Iterable[tuple[str, torch.Tensor | None]], *,
                     collective: bool = True) -> tuple[str | None, int]:
    """(name of the first tensor holding a NaN / inf, how many do) over `named` (e.g. `model.named_parameters()`,
    or gradients); (None, 0) when all are finite. None entries (a parameter without a gradient) are skipped.

    Sharded (DTensor) tensors are checked shard by shard; with a process group and `collective` the flags are
    then combined over the processes in one all-reduce, so every process names the same tensor, and every
    process must call it (`collective=False`: this process's shards only, for a caller that runs on one rank).
    """
    names, tensors = [], []
    for name, t in named:
        if t is not None:
            names.append(name)
            tensors.append(_local(t.detach()))
    bad = ~_flags(tensors)
    import torch.distributed as dist

    if collective and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # One collective for all tensors: any process's shard non-finite makes the tensor non-finite.
        counts = bad.to(torch.int32)
        if dist.get_backend() == "nccl":
            counts = counts.cuda()
        dist.all_reduce(counts)
        bad = counts.cpu() > 0
    hits = bad.nonzero().flatten().tolist()
    return (names[hits[0]] if hits else None), len(hits)


def non_finite_rows(scores: torch.Tensor) -> list[int]:
    """Rows of a [rows, ...] tensor holding a NaN / inf (one host transfer)."""
    return (~torch.isfinite(scores)).flatten(1).any(dim=1).nonzero().flatten().tolist()


def rows_text(rows: list[int]) -> str:
    shown = ", ".join(map(str, rows[:MAX_ROWS]))
    return f"rows [{shown}{', ...' if len(rows) > MAX_ROWS else ''}] ({len(rows)} row{'s' * (len(rows) != 1)})"


def describe_parameters(model: torch.nn.Module) -> str:
    """'parameter NAME (first of K non-finite)' for the first non-finite parameter of `model` (this process's
    shards: it runs where one process found bad logits, so it must not wait for the others), or 'all parameters
    finite' (then the NaN / inf arose in the forward pass: an overflow, e.g. in bf16)."""
    name, count = first_non_finite(model.named_parameters(), collective=False)
    if name is None:
        return "all parameters finite"
    return f"parameter {name} (first of {count} non-finite)"
