"""The rl trainer's non-finite checks: each stops the run with a one-line `NonFiniteError` naming the rollout,
the hop and the first non-finite tensor (gspo.models.finite), instead of training on, or sampling from, NaNs.

Where the trainer calls them (each is collective under FSDP2: every process calls it at the same point):
- `check_gradients(model, rollout)`: after `backward()`, before clipping and the optimizer step (a NaN gradient
  would otherwise turn every weight it touches into NaN in one Adam step);
- `check_parameters(model, rollout, hop)`: after the optimizer step (hop "update"), and before a weight sync
  (hop "weight_sync"), so the engine never receives a NaN weight;
- `check_logprobs(logp, mask, rollout, hop)`: after π_old (hop "old_logprobs") and the reference
  (hop "ref_logprobs") are computed;
- `at_rollout(rollout)`: a context around every hop, filling in the rollout of an error raised by code that
  does not know it (the HF engine's logits guard raises with the hop "rollout" and no rollout number).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gspo.models.finite import NonFiniteError, first_non_finite, non_finite_rows, rows_text


def check_gradients(model: torch.nn.Module, rollout: int) -> None:
    """Raise NonFiniteError (hop "update") naming the first parameter whose gradient holds a NaN / inf. Call
    after `backward()` and before the optimizer step. One isfinite reduction per gradient, one host transfer."""
    name, count = first_non_finite((n, p.grad) for n, p in model.named_parameters() if p.requires_grad)
    if name is not None:
        raise NonFiniteError(f"gradient of {name} (first of {count} non-finite)", hop="update", rollout=rollout)


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
