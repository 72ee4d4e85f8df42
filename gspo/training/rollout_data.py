"""One rollout as the update hops see it: the sampled batch, its rewards and advantages, and the log-probability
passes filled in hop by hop (π_old, the KL reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gspo.algorithms import group_reward_stats
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

    def reward_and_length_metrics(self) -> dict[str, float]:
        """Reward (mean over finite rewards, group std, share of groups without spread) and completion lengths."""
        b = self.batch
        lengths = b.lengths.float()
        stats = group_reward_stats(self.rewards, b.group_size)
        finite = self.rewards[torch.isfinite(self.rewards)]
        return {
            "reward": float(finite.mean()) if finite.numel() else float("nan"),
            "reward_std": stats["reward_std"],
            "frac_reward_zero_std": stats["frac_reward_zero_std"],
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/truncated_frac": sum(r == "length" for r in b.finish_reasons) / len(b.finish_reasons),
        }

    def logp_gap_metrics(self) -> dict[str, float]:
        """Engine vs trainer log-probability of the sampled tokens (|sampler - π_old recompute|), when both exist."""
        if self.batch.logp is None or self.trainer_logp is None:
            return {}
        gap = (self.batch.logp.float() - self.trainer_logp)[self.batch.mask.bool()].abs()
        return {"logp_gap/mean": float(gap.mean()), "logp_gap/max": float(gap.max())}

    def samples(self, n: int) -> list[dict[str, Any]]:
        """The first `n` completions with their prompt, reward, advantage and finish reason (samples.jsonl)."""
        g, b = self.batch.group_size, self.batch
        return [{"prompt": self.rows[i // g]["prompt"], "completion": b.completions[i], "reward": float(self.rewards[i]),
                 "adv": float(self.adv[i]), "finish_reason": b.finish_reasons[i]}
                for i in range(min(n, b.num_completions))]


def repeat_each(values: list[Any], g: int) -> list[Any]:
    """Each value g times in a row: per-prompt values laid out like the prompt-major completions."""
    return [v for v in values for _ in range(g)]
