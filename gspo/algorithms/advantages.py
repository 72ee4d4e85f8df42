"""Group-relative advantages (GSPO Eq. 6, GRPO; Dr.GRPO's mean-only variant).

Layout: rewards [N], N = B * G prompt-major, so rows b*G .. b*G + G - 1 are the G completions of
prompt b (the order `gspo.rollout.base.RolloutBatch` uses).

Which std. "std" divides by the SAMPLE standard deviation (Bessel-corrected, divisor G - 1), the
`torch.std` default that TRL's GRPOTrainer and verl use, so our advantages equal theirs for the same
rewards and learning curves can be compared side by side. The paper's Eq. 6 writes std() without saying
which; the two differ by the constant factor sqrt(G / (G - 1)) (3% at G = 16), which only rescales the
step size. Consequence: within a group the normalized advantages have sample std 1 (up to eps).

Missing rewards. A NaN reward means "missing" (every reward function abstained for that completion). It is
left out of its group's mean and std and gets advantage 0, so it pushes the policy neither way. A group
with fewer than two present rewards, or whose present rewards are all equal, has no learning signal: all of
its advantages are exactly 0 (not r - mean, which float rounding can leave at 1e-17). Never nan.
"""

from __future__ import annotations

import torch

from gspo.registry import ADVANTAGES

# TRL's GRPOTrainer divides by (std + 1e-4): the same default keeps advantages (and learning curves) comparable
# with TRL for the same rewards. Configurable as algorithm.adv_eps.
DEFAULT_EPS = 1e-4


def _grouped(rewards: torch.Tensor, group_size: int, fn: str) -> torch.Tensor:
    """rewards [N] -> [B, G] float64, after checking the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"{fn}: rewards must be 1-D [N], got shape {list(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{fn}: group_size must be a positive int, got {group_size!r}")
    n = rewards.shape[0]
    if n % group_size != 0:
        raise ValueError(f"{fn}: number of rewards N={n} is not a multiple of group_size={group_size} "
                         "(rows must be B groups of G completions, prompt-major)")
    r = rewards.detach().to(torch.float64)
    bad = torch.isinf(r)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().tolist()[:10]
        raise ValueError(f"{fn}: rewards are infinite at rows {rows}; use NaN (or None) for a missing reward")
    return r.view(n // group_size, group_size)


def _group_moments(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group statistics over present (non-NaN) rewards.

    r: [B, G] -> present [B, G] bool, mean [B, 1], sample std [B, 1] (0 when < 2 present),
    no_signal [B, 1] bool (fewer than 2 present rewards, or all present rewards equal).
    """
    present = ~torch.isnan(r)
    count = present.sum(-1, keepdim=True)  # [B, 1]
    r0 = torch.where(present, r, 0.0)
    mean = r0.sum(-1, keepdim=True) / count.clamp(min=1)
    dev = torch.where(present, r - mean, 0.0)
    var = (dev * dev).sum(-1, keepdim=True) / (count - 1).clamp(min=1)  # Bessel: divisor G - 1
    std = torch.where(count >= 2, var.sqrt(), 0.0)
    hi = torch.where(present, r, float("-inf")).amax(-1, keepdim=True)
    lo = torch.where(present, r, float("inf")).amin(-1, keepdim=True)
    # Equality of the extremes, not std < eps: a tiny but real spread still carries a ranking.
    no_signal = (count < 2) | (hi == lo)
    return present, mean, std, no_signal


def _normalize(rewards: torch.Tensor, group_size: int, divide_by_std: bool, eps: float, fn: str) -> torch.Tensor:
    r = _grouped(rewards, group_size, fn)  # [B, G]
    present, mean, std, no_signal = _group_moments(r)
    adv = r - mean  # [B, G]
    if divide_by_std:
        adv = adv / (std + eps)  # Eq. 6; eps keeps a near-constant group finite
    adv = torch.where(present & ~no_signal, adv, 0.0)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return adv.reshape(-1).to(out_dtype)


@ADVANTAGES.register("std")
def std_advantages(rewards: torch.Tensor, group_size: int, *, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """adv_i = (r_i - mean(r)) / (std(r) + eps) over each group (GSPO Eq. 6, GRPO). [N] -> [N]."""
    return _normalize(rewards, group_size, True, eps, "std_advantages")


@ADVANTAGES.register("none")
def mean_advantages(rewards: torch.Tensor, group_size: int, *, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """adv_i = r_i - mean(r) over each group, no std division (Dr.GRPO). [N] -> [N]. eps is unused."""
    del eps
    return _normalize(rewards, group_size, False, DEFAULT_EPS, "mean_advantages")


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "std", eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Group-relative advantages. rewards [N] (prompt-major, NaN = missing) -> adv [N].

    scale="std":  (r - mean) / (sample std + eps)   GSPO Eq. 6 / GRPO
    scale="none": r - mean                          Dr.GRPO
    `scale` is looked up in `gspo.registry.ADVANTAGES`, so a registered estimator is usable by name.
    """
    return ADVANTAGES.get(scale)(rewards, group_size, eps=eps)


def group_reward_stats(rewards: torch.Tensor, group_size: int) -> dict[str, float]:
    """Logging statistics of a batch of grouped rewards [N] (NaN = missing).

    frac_reward_zero_std: fraction of groups with no learning signal (all present rewards equal, or fewer
                          than two present), i.e. groups whose advantages are all 0.
    reward_std:           mean over groups of the within-group sample std (0 for such groups).
    """
    r = _grouped(rewards, group_size, "group_reward_stats")
    _, _, std, no_signal = _group_moments(r)
    std = torch.where(no_signal, 0.0, std)
    return {
        "frac_reward_zero_std": float(no_signal.to(torch.float64).mean()),
        "reward_std": float(std.mean()),
    }
