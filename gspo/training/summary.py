"""Lines of `gspo validate`'s summary shared by several stages (each stage's `StageSpec.summary` uses them)."""

from __future__ import annotations

from typing import Any

from gspo.registry import LOSSES


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


def rl_summary(cfg: Any) -> list[str]:
    """The rl stage's lines: sampling, the loss and its clip range, the updates per rollout, the run's length."""
    a = cfg.algorithm
    low, high = cfg.clip_range()
    default = " (algorithm default)" if a.clip_low is None and a.clip_high is None else ""
    k = cfg.optimizer_steps_per_rollout
    return [
        sampling_line(cfg),
        (f"algorithm:  {a.name} ({LOSSES.get(a.name).level} level), "
         f"clip range [1 - {low:g}, 1 + {high:g}]{default}")
        + (f", beta {a.beta:g} ({a.kl_estimator})" if a.beta > 0 else ""),
        f"updates:    {k} optimizer steps per rollout ({a.num_minibatches} minibatches of "
        f"{cfg.completions_per_rollout // a.num_minibatches} completions x {a.num_epochs} epoch(s))"
        + ("  [on-policy: ratio = 1, clipping never fires]" if k == 1 else ""),
        (f"length:     {cfg.train.num_rollouts} rollouts = {cfg.total_optimizer_steps} optimizer steps, "
         f"lr {cfg.optim.lr:g} ({cfg.optim.scheduler}, warm-up {cfg.optim.warmup_steps})"),
    ]
