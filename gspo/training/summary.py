"""Lines of `gspo validate`'s summary shared by several stages (each stage's `StageSpec.summary` uses them)."""

from __future__ import annotations

from typing import Any


def sampling_line(cfg: Any) -> str:
    """How the rollout engine samples: engine, batch shape, length and dtype."""
    r = cfg.rollout
    return (f"rollout:    {r.engine}, {r.prompts_per_step} prompts x {r.group_size} completions = "
            f"{cfg.completions_per_rollout} per call, <= {r.max_new_tokens} new tokens, "
            f"dtype {cfg.rollout_dtype}")


def length_line(cfg: Any, section: Any) -> str:
    """How long a TRL-trained stage runs (`section`: its config section, with max_steps / num_epochs)."""
    steps = f"{section.max_steps} steps" if section.max_steps > 0 else f"{section.num_epochs:g} epoch(s)"
    return (f"length:     {steps}, batch {section.batch_size}, max_length {section.max_length}, "
            f"lr {cfg.optim.lr:g} ({cfg.optim.scheduler}, warm-up {cfg.optim.warmup_steps})")
