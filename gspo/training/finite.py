"""The rl trainer's non-finite checks: each stops the run with a one-line `NonFiniteError` naming the rollout,
the hop and the first non-finite tensor (gspo.models.finite), instead of training on, or sampling from, NaNs.

Where the trainer calls them (each is collective under FSDP2: every process calls it at the same point):
- `gradient_norm(model)` then `check_gradient_norm(value, model, rollout)`: after `backward()`, before clipping
  (`clip_gradients`) and the optimizer step (a NaN gradient would otherwise turn every weight it touches into NaN
  in one Adam step). The norm that clipping needs anyway is finite exactly when every gradient is, so the check
  costs no pass over the gradients of its own; only a non-finite norm looks for the tensor to name;
- `check_parameters(model, rollout, hop)`: after the optimizer step (hop "update"), and before a weight sync
  (hop "weight_sync"), so the engine never receives a NaN weight;
- `check_logprobs(logp, mask, rollout, hop)`: after π_old (hop "old_logprobs") and the reference
  (hop "ref_logprobs") are computed;
- `at_rollout(rollout)`: a context around every hop, filling in the rollout of an error raised by code that
  does not know it (the HF engine's logits guard raises with the hop "rollout" and no rollout number).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gspo.models.finite import NonFiniteError, first_non_finite, non_finite_rows, rows_text


def _with_grad(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.grad is not None]


def gradient_norm(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients' global L2 norm as `torch.nn.utils.clip_grad_norm_` computes it: (the norm for
    `clip_gradients`, a DTensor when the model is sharded; the same as a plain scalar tensor, still on the device).
    Collective under FSDP2 (the plain value is the reduction over every process's shards)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in _with_grad(model)], 2.0)
    return norm, (norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def check_gradient_norm(value: float, model: torch.nn.Module, rollout: int) -> None:
    """Raise NonFiniteError (hop "update") when the gradients' norm `value` is not finite, naming the first
    parameter whose gradient holds a NaN / inf. Every process sees the same norm, so under FSDP2 either all of
    them look for the tensor (a collective) or none does."""
    if math.isfinite(value):
        return
    name, count = first_non_finite((n, p.grad) for n, p in model.named_parameters() if p.requires_grad)
    what = f"gradient of {name} (first of {count} non-finite)" if name is not None else \
        f"gradient norm {value} (every gradient is finite: their norm overflowed)"
    raise NonFiniteError(what, hop="update", rollout=rollout)


def clip_gradients(model: torch.nn.Module, max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients to global norm <= `max_norm`, given their `norm` from `gradient_norm` (the second half
    of `torch.nn.utils.clip_grad_norm_`)."""
    torch.nn.utils.clip_grads_with_norm_(_with_grad(model), max_norm, norm)


def check_parameters(model: torch.nn.Module, rollout: int, hop: str = "update") -> None:
    """Raise NonFiniteError naming the first parameter holding a NaN / inf. Call after the optimizer step
    (hop "update") and before the engine gets the weights (hop "weight_sync")."""
    name, count = first_non_finite(model.named_parameters())
    if name is not None:
        raise NonFiniteError(f"parameter {name} (first of {count} non-finite)", hop=hop, rollout=rollout)


def check_logprobs(logp: torch.Tensor, mask: torch.Tensor, rollout: int, hop: str = "old_logprobs") -> None:
    """Raise NonFiniteError naming the completions (rows) whose log-probabilities hold a NaN / inf on a
    completion token (`mask`; padding is ignored). Call after π_old (hop "old_logprobs") or the reference's
    log-probabilities (hop "ref_logprobs"). Per process: rows are this process's rows."""
    masked = torch.where(mask.bool(), logp.detach(), torch.zeros((), dtype=logp.dtype, device=logp.device))
    rows = non_finite_rows(masked)
    if rows:
        raise NonFiniteError(f"{hop} of completion {rows_text(rows)}", hop=hop, rollout=rollout)


@contextmanager
def at_rollout(rollout: int) -> Iterator[None]:
    """Re-raise a NonFiniteError raised without a rollout number (the HF engine's) with `rollout` filled in."""
    try:
        yield
    except NonFiniteError as e:
        if e.rollout is not None:
            raise
        raise e.at_rollout(rollout) from None
