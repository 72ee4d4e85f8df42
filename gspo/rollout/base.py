"""The rollout-engine contract: prompts in, a group of completions per prompt out.

Engines are registered by name in `gspo.registry.ROLLOUT_ENGINES` and built by the trainer through
`build_engine(name, ...)`. The trainer depends only on this module, never on vLLM.

Ordering: a batch of B prompts with group size G yields N = B * G completions, prompt-major: the G
completions of prompt b are rows b*G .. b*G + G - 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample one rollout. `n` is the group size G."""

    n: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    seed: int | None = None  # per-call seed; engines derive per-completion seeds from it
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's EOS


@dataclass
class RolloutBatch:
    """Completions of one rollout. Shapes: N = B * G completions, T = longest completion length.

    completion_ids: [N, T] long, right-padded with `pad_token_id`.
    mask:           [N, T] float, 1.0 on the completion's tokens (EOS included when generated), 0 on padding.
    logp:           [N, T] float32, the sampler's log-probability of each generated token (0 on padding),
                    or None when the engine cannot return them.
    finish_reasons: N strings, "stop" (EOS or a stop token) or "length" (hit max_new_tokens).
    prompt_ids:     B lists of prompt token ids (unpadded), in the order the prompts were given.
    completions:    N decoded completion texts (special tokens skipped).
    routed_experts: optional engine-side routing per completion token, when the engine can return it.
    """

    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor
    mask: torch.Tensor
    logp: torch.Tensor | None
    finish_reasons: list[str]
    completions: list[str]
    group_size: int
    routed_experts: Any | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_completions(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1).long()


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from an engine."""

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSpec) -> RolloutBatch:
        """Sample `sampling.n` completions for each prompt."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Load the trainer's current parameters into the engine (and drop any cached KV / prefixes)."""
        ...

    def sleep(self) -> None:
        """Release engine memory between rollouts where the platform supports it (no-op otherwise)."""
        ...

    def wake_up(self) -> None: ...

    def close(self) -> None: ...
