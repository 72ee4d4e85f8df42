"""Host-to-device copies that do not make the host wait.

A copy from ordinary (pageable) host memory to a GPU returns only when the GPU has run everything queued before
it. In the update's minibatch loop that means the host stops at each input it moves (the prompts row by row,
the mask, π_old, the advantages, the routing rows) until the previous optimizer step is done, and the GPU then
idles while the host prepares the next forward: benchmarks/profile_cycle.py counted 34 such waits per
minibatch on an H200 (docs/benchmarks.md). A pinned copy with non_blocking=True is queued like a kernel.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`; a CPU tensor bound for a GPU through pinned memory, without a host wait. `pin_memory()`
    copies `t`, so changing `t` afterwards cannot race the transfer (PyTorch's pinned-memory cache keeps the
    buffer until the copy has run)."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
