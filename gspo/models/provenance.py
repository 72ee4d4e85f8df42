"""What `load_policy` records about a model (`gspo_model.json`): read and written by every gspo save.

Its own module so that the LoRA code (which saves models) and the loading code (which sends LoRA weights
merged) both depend on it and not on each other.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

PROVENANCE_FILE = "gspo_model.json"  # written next to config.json by every gspo save


def provenance(model: torch.nn.Module) -> dict[str, Any]:
    """What `load_policy` recorded about `model` (see there); {} for a model it did not load. Reads through
    accelerate and peft wrappers (peft forwards attribute lookups to the wrapped model)."""
    return dict(getattr(_unwrap(model), "gspo_provenance", None) or {})


def write_provenance(model: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write `provenance(model)` as `directory/gspo_model.json` (nothing when there is none)."""
    info = provenance(model)
    if info:
        with open(os.path.join(directory, PROVENANCE_FILE), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)


def read_provenance(directory: str | os.PathLike) -> dict[str, Any]:
    """The `gspo_model.json` of a saved model folder; {} when it has none."""
    path = os.path.join(directory, PROVENANCE_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # accelerate / DDP wrappers keep the HF model under `.module`.
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model
