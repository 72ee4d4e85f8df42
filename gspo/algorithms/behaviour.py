"""Behaviour-policy correction: truncated importance sampling (TIS) and mismatch masking between the engine
that sampled a rollout (behaviour policy mu) and the trainer's pi_old.

Why. The engine's sampler and the trainer compute the same distribution with different kernels (and, with
asynchronous rollouts, `rollout.max_staleness=1`, with weights one update older), so the tokens come from mu,
not from the pi_old the loss's ratio is taken against. Following Yao et al., "Your Efficient RL Framework
Secretly Brings You Off-Policy RL Training" (2025, TIS) and the decoupled PPO objective of AReaL (Fu et al.
2025, Eq. 5: the proximal policy in the ratio, a behaviour importance weight in front), each sequence's loss
term is weighted by

    s_i  = (1/|y_i|) * sum_t (log pi_old(y_i,t | x, y_i,<t) - log mu(y_i,t | x, y_i,<t))     (length-normalised,
                                                                                                as GSPO Eq. 7)
    w_i  = min(exp(s_i), C)                                                                   (TIS, cap C)
    m_i  = 1[|s_i| <= delta]                                                                  (mask, bound delta)

and the policy loss uses w_i * m_i * A_i in place of A_i. For a weight w >= 0 that equals weighting sequence
i's clipped term: min(r A w, clip(r) A w) = w * min(r A, clip(r) A). A masked sequence (m_i = 0) contributes
no gradient; it still counts in the losses' normalisers, as a sequence with a zero advantage does.

Pure functions of tensors (no trainer state): tests/test_behaviour.py checks their properties.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gspo.algorithms.ratios import as_bool_mask, masked_mean


@dataclass
class BehaviourCorrection:
    """Per-sequence factors (w_i * m_i) and their statistics, for one rollout."""

    factor: torch.Tensor  # [N] w_i * m_i, multiplies the advantages
    log_ratio: torch.Tensor  # [N] s_i
    metrics: dict[str, float]


def sequence_mismatch(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """s_i = masked mean over tokens of (log pi_old - log mu), one value per sequence ([N]); 0 for an empty
    completion. Padding (even inf / nan) never enters."""
    diff = torch.where(as_bool_mask(mask), old_logp.float() - behaviour_logp.float(), 0.0)
    return masked_mean(diff, mask, dim=1)


def tis_weights(log_ratio: torch.Tensor, cap: float) -> torch.Tensor:
    """w_i = min(exp(s_i), cap): the truncated importance weight of each sequence (cap > 0)."""
    if not cap > 0:
        raise ValueError(f"tis cap must be > 0, got {cap}")
    return torch.exp(log_ratio.clamp(max=torch.log(torch.tensor(float(cap))).item()))


def mismatch_mask(log_ratio: torch.Tensor, bound: float) -> torch.Tensor:
    """m_i = 1[|s_i| <= bound] as float ([N]); bound >= 0."""
    if not bound >= 0:
        raise ValueError(f"mismatch bound must be >= 0, got {bound}")
    return (log_ratio.abs() <= bound).float()


def behaviour_correction(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, *,
                         cap: float | None, bound: float | None) -> BehaviourCorrection:
    """The factors w_i * m_i (module docstring) with either part off (None), and the rollout's metrics:
    mismatch/mean_abs and max_abs (|log pi_old - log mu| over tokens), tis/weight_mean, weight_max,
    clipped_frac (sequences at the cap), tis/masked_frac."""
    m = as_bool_mask(mask)
    s = sequence_mismatch(old_logp, behaviour_logp, mask)
    factor = torch.ones_like(s)
    if cap is not None:
        factor = tis_weights(s, cap)
    keep = mismatch_mask(s, bound) if bound is not None else torch.ones_like(s)
    factor = factor * keep
    gap = (old_logp.float() - behaviour_logp.float())[m].abs()
    metrics = {
        "mismatch/mean_abs": float(gap.mean()) if gap.numel() else 0.0,
        "mismatch/max_abs": float(gap.max()) if gap.numel() else 0.0,
        "mismatch/seq_log_ratio_mean": float(s.mean()) if s.numel() else 0.0,
        "tis/weight_mean": float(factor.mean()) if factor.numel() else 0.0,
        "tis/weight_max": float(factor.max()) if factor.numel() else 0.0,
        "tis/clipped_frac": float((s > torch.log(torch.tensor(float(cap)))).float().mean()) if cap else 0.0,
        "tis/masked_frac": float(1.0 - keep.mean()) if keep.numel() else 0.0,
    }
    return BehaviourCorrection(factor=factor, log_ratio=s, metrics=metrics)
