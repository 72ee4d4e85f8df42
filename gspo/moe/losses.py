"""Auxiliary router losses, computed from recorded router logits and added to the policy loss by the trainer.

Why here and not through transformers' `output_router_logits`: see `gspo.moe`'s module docstring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # runtime import would be circular: gspo.moe re-exports this module
    from gspo.moe.routing import RoutingRecords


def load_balancing_loss(records: RoutingRecords) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, mean over router layers.

    Per layer (Fedus et al. 2021, Eq. 4-6): aux = E * sum_i f_i * P_i over valid tokens, with f_i the fraction
    of tokens whose top-k includes expert i (experts actually used, so replay counts the forced ones) and P_i
    the mean router probability of i (one softmax of the raw logits; softmax-ing twice made the loss nearly
    constant in an old transformers release). Balanced: aux = k; all tokens on the same k experts: aux -> E.
    Differentiable through P_i only (f_i is a count). Needs records made with keep_logits=True.
    """
    _need_logits(records, "load_balancing_loss")
    mask = records.mask.reshape(-1)
    m = mask.float()
    n = m.sum().clamp_min(1.0)
    per_layer = []
    for pos, logits in enumerate(records.logits):
        idx = records.indices[pos].reshape(-1, records.top_k).clamp_min(0)
        probs = records.families[pos].probs(records.routers[pos], logits)  # [N, E] fp32
        counts = torch.zeros(records.num_experts, device=probs.device).index_add_(
            0, idx.reshape(-1), m.to(probs.device).repeat_interleave(records.top_k)
        )
        f = counts / n
        p = (probs * m.to(probs.device)[:, None]).sum(0) / n
        per_layer.append(records.num_experts * (f * p).sum())
    return torch.stack(per_layer).mean()


def router_z_loss(records: RoutingRecords) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, Eq. 5): mean over valid tokens of logsumexp(logits)^2, mean
    over layers. Keeps router logits small (fp stability). Needs records made with keep_logits=True."""
    _need_logits(records, "router_z_loss")
    m = records.mask.reshape(-1).float()
    n = m.sum().clamp_min(1.0)
    per_layer = [
        ((torch.logsumexp(lg.float(), dim=-1) ** 2) * m.to(lg.device)).sum() / n for lg in records.logits
    ]
    return torch.stack(per_layer).mean()


def _need_logits(records: RoutingRecords, fn: str) -> None:
    if records.logits is None or records.families is None:
        raise ValueError(f"{fn}: records carry no logits; record with RoutingRecorder(model, keep_logits=True)")


def moe_aux_losses(records: RoutingRecords, moe_cfg: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """aux_loss_coef * load_balancing_loss + router_z_loss_coef * router_z_loss, and their values as
    `moe/aux_loss`, `moe/z_loss`. Returns a zero tensor (no graph) when both coefficients are 0."""
    aux_coef = float(getattr(moe_cfg, "aux_loss_coef", 0.0) or 0.0)
    z_coef = float(getattr(moe_cfg, "router_z_loss_coef", 0.0) or 0.0)
    total = torch.zeros((), device=records.mask.device)
    metrics: dict[str, float] = {}
    if aux_coef > 0:
        aux = load_balancing_loss(records)
        total = total + aux_coef * aux
        metrics["moe/aux_loss"] = float(aux.detach())
    if z_coef > 0:
        z = router_z_loss(records)
        total = total + z_coef * z
        metrics["moe/z_loss"] = float(z.detach())
    return total, metrics
