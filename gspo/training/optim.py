"""Optimizer and learning-rate schedule from the `optim` config section (shared by the RL and SFT stages)."""

from __future__ import annotations

from typing import Any

import torch


def scheduler_name(optim_cfg: Any) -> str:
    """transformers' scheduler name; its "constant" ignores warm-up steps, "constant_with_warmup" does not."""
    if optim_cfg.scheduler == "constant" and optim_cfg.warmup_steps > 0:
        return "constant_with_warmup"
    return optim_cfg.scheduler


def build_optimizer(model: torch.nn.Module, optim_cfg: Any, total_steps: int,
                    step_device: torch.device | None = None) -> tuple[Any, Any]:
    """AdamW over the trainable parameters and its schedule over `total_steps` optimizer steps.

    `step_device`: where the parameters live when the optimizer steps (the model may still be on the host
    here). On a GPU AdamW runs its fused kernel, transformers' Trainer default there ("adamw_torch_fused"):
    one kernel per step instead of foreach's several passes over parameters, gradients and moments. Elsewhere
    torch chooses, so CPU runs (and CPU-offloaded shards) keep their numbers."""
    from transformers import get_scheduler

    o = optim_cfg
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                  weight_decay=o.weight_decay,
                                  fused=True if step_device is not None and step_device.type == "cuda" else None)
    scheduler = get_scheduler(scheduler_name(o), optimizer, num_warmup_steps=o.warmup_steps,
                              num_training_steps=total_steps)
    return optimizer, scheduler
