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
    # The index of the call's first prompt in the whole rollout: a process that samples a slice of a rollout
    # passes the slice's offset, so each prompt gets the seeds it gets in the unsplit call (`derive_seed`).
    first_prompt: int = 0
    # Whether the batch carries the sampler's logprobs (RolloutBatch.logp). Off where nothing reads them:
    # returning them costs host time per token in vLLM's engine loop (docs/benchmarks.md).
    logprobs: bool = True


@dataclass
class RolloutBatch:
    """Completions of one rollout. Shapes: N = B * G completions, T = longest completion length.

    completion_ids: [N, T] long, right-padded with `pad_token_id`.
    mask:           [N, T] float, 1.0 on the completion's tokens (EOS included when generated), 0 on padding.
    logp:           [N, T] float32, the sampler's log-probability of each generated token (0 on padding),
                    or None when the engine cannot return them or the call did not ask (SamplingSpec.logprobs).
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


@dataclass(frozen=True)
class EngineInputs:
    """What an engine is built for besides its config section (`rollout`): the facts of this run."""

    model_path: str  # the weights the engine loads (the trainer's starting point)
    tokenizer: Any
    dtype: str  # rollout.dtype, else model.dtype
    seed: int
    max_model_len: int  # rollout.max_model_len, else derived from the prompts
    model: torch.nn.Module | None = None  # the trainer's policy (hf_generate samples with it directly)
    max_num_seqs: int | None = None  # sequences per generate call: sizes vLLM's KV cache and CUDA graphs


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


def assemble_batch(prompt_ids: list[list[int]], completions: list[list[int]], logps: list[list[float]] | None,
                   finish_reasons: list[str], texts: list[str], *, group_size: int, pad_token_id: int,
                   **extras: Any) -> RolloutBatch:
    """Pad N prompt-major completions (token lists, sampler logprobs) into a `RolloutBatch`.

    Every engine ends with this call, so the padding/mask/ordering rules live in one place.
    """
    n = len(completions)
    if n != len(prompt_ids) * group_size:
        raise ValueError(f"assemble_batch: {n} completions != {len(prompt_ids)} prompts x group_size {group_size}")
    t = max((len(c) for c in completions), default=0)
    completion_ids = torch.full((n, t), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.float32)
    logp = torch.zeros((n, t), dtype=torch.float32) if logps is not None else None
    for i, ids in enumerate(completions):
        completion_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1.0
        if logp is not None:
            logp[i, : len(ids)] = torch.tensor(logps[i], dtype=torch.float32)
    return RolloutBatch(prompt_ids=[list(p) for p in prompt_ids], completion_ids=completion_ids, mask=mask,
                        logp=logp, finish_reasons=list(finish_reasons), completions=list(texts),
                        group_size=group_size, extras=dict(extras))


def derive_seed(seed: int | None, prompt_index: int, group_size: int) -> int | None:
    """Per-prompt sampling seed from the call's seed: prompt b gets seeds base + b*G .. base + b*G + G - 1
    (vLLM gives the k-th of n samples seed + k), so no two completions of one call share a seed."""
    if seed is None:
        return None
    base = (int(seed) * 1_000_003) % (2**31 - 2**24)
    return base + prompt_index * group_size
