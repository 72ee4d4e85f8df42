"""Token and sequence log importance ratios, and the masked reductions they are built from.

Shapes: N completions, T the padded completion length. `logp` and `old_logp` are per-token
log-probabilities of the sampled completion tokens under the current policy pi_theta and the policy that
sampled them (pi_old); `mask` marks the completion's tokens (1 / True) versus padding (0 / False).

Padding never enters any result here: padded positions are replaced with `torch.where` (not multiplied by
the mask), so they may hold anything, including inf or nan, without changing a value or a gradient.
"""

from __future__ import annotations

import torch

DEFAULT_MAX_LOG_RATIO = 10.0


def as_bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """A float (0/1) or bool mask as bool; any nonzero float counts as a valid token."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over positions where `mask` is set; padded values (even inf/nan) are ignored.

    x, mask: same shape. dim=None sums everything (a scalar).
    """
    m = as_bool_mask(mask)
    kept = torch.where(m, x, 0.0)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is set. An all-padding slice gives 0 (not nan)."""
    m = as_bool_mask(mask)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp(min=1).to(x.dtype)


def token_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log w_it = log pi_theta(y_it) - log pi_old(y_it), the token-level (GRPO) log-ratio.

    logp, old_logp, mask: [N, T] -> [N, T], 0 on padding. The inputs are cleaned before the subtraction
    so that inf - inf at a padded position cannot produce nan, in the value or in the gradient.
    """
    m = as_bool_mask(mask)
    return torch.where(m, logp, 0.0) - torch.where(m, old_logp.to(logp.dtype), 0.0)


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, *,
                       max_log_ratio: float = DEFAULT_MAX_LOG_RATIO) -> torch.Tensor:
    """log s_i, the GSPO sequence-level log importance ratio (Eq. 7).

    s_i = (pi_theta(y_i|x) / pi_old(y_i|x)) ** (1/|y_i|)
        = exp( (1/|y_i|) * sum_t (log pi_theta(y_it) - log pi_old(y_it)) )

    logp, old_logp, mask: [N, T] -> [N]. The mean runs over the |y_i| valid tokens only; a completion
    with no valid token gives 0 (s_i = 1). The result is clamped to [-max_log_ratio, max_log_ratio] so
    one far-off-policy completion cannot turn exp() into inf and the batch into nan (frameworks clamp at
    10 to 20). Beyond the clamp the gradient is 0: a safety stop for a sequence so far off-policy (e^10 ~ 2e4)
    that it signals a sync bug, not a learning signal. Within the paper's clip range clipping acts long before
    (it keeps a negative-advantage term unclipped above 1 + eps, which is why the clamp matters).
    """
    if max_log_ratio <= 0:
        raise ValueError(f"sequence_log_ratio: max_log_ratio must be > 0, got {max_log_ratio}")
    log_w = token_log_ratio(logp, old_logp, mask)  # [N, T], 0 on padding
    return masked_mean(log_w, mask, dim=-1).clamp(-max_log_ratio, max_log_ratio)  # [N]
