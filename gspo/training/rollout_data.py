"""One rollout as the update hops see it: the sampled batch, its rewards and advantages, and the log-probability
passes filled in hop by hop (π_old, the KL reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gspo.rollout.base import RolloutBatch
from gspo.training.moe_monitor import completion_layout_mask


@dataclass
class RolloutData:
    """Everything the update hops need from one rollout (N completions)."""

    batch: RolloutBatch
    rows: list[dict[str, Any]]  # B dataset rows
    rewards: torch.Tensor  # [N]
    adv: torch.Tensor  # [N]
    old_logp: torch.Tensor | None = None  # [N, T]
    ref_logp: torch.Tensor | None = None  # [N, T], only when algorithm.beta > 0
    trainer_logp: torch.Tensor | None = None  # [N, T], the trainer's π_old pass, when it ran

    @property
    def prompt_len(self) -> int:
        """Every logprob pass of this rollout pads prompts to this length: one token layout for all passes."""
        return max(len(p) for p in self.batch.prompt_ids)

    def layout_mask(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Completion tokens in that layout, [rows, P + T] (what MoE routing statistics count)."""
        mask = self.batch.mask if rows is None else self.batch.mask[rows]
        return completion_layout_mask(mask, self.prompt_len)


def repeat_each(values: list[Any], g: int) -> list[Any]:
    """Each value g times in a row: per-prompt values laid out like the prompt-major completions."""
    return [v for v in values for _ in range(g)]
