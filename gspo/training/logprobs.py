"""Per-token log-probabilities of completions under the policy (hop 5, and the logp of the loss in hop 6).

GSPO's ratio s_i(θ) (paper Eq. 7) is built from per-token log-probabilities log π_θ(y_{i,t} | x, y_{i,<t});
this module computes them for N = B·G completions at once without materializing [N, T, V] fp32 logits:

- each prompt is left-padded and followed by its completions (prompt-major rows), with an attention_mask
  that is 0 on padding and position_ids = cumsum(attention_mask) - 1, so every real token sits at the same
  position as it would unpadded;
- only the decoder runs on the whole batch; `lm_head` is applied to the T hidden states that predict
  completion tokens, `chunk_size` rows at a time, and each chunk's logits are turned into log-probabilities
  (fp32 log_softmax + gather) and dropped. Under grad the chunk is checkpointed, so backward recomputes one
  chunk's logits at a time as well.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from gspo.devices import to_device


class CompletionForward(NamedTuple):
    """`completion_logprobs(..., return_outputs=True)`: the log-probabilities plus what the MoE code needs.

    logp:           [N, T] float32 (0 on padding).
    outputs:        the decoder's output (`router_logits` per layer when `output_router_logits=True`).
    attention_mask: [N, P + T] the mask the decoder ran with (left-padded prompt, then completion mask).
    """

    logp: torch.Tensor
    outputs: Any
    attention_mask: torch.Tensor


def build_inputs(
    prompt_ids: list[list[int]], completion_ids: torch.Tensor, mask: torch.Tensor, *, group_size: int,
    pad_token_id: int, prompt_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Left-padded prompt + completion rows: (input_ids, attention_mask, position_ids, P) with P the padded
    prompt length (the longest prompt, or `prompt_len` when given: passes over different row subsets of one
    rollout then share one [rows, P + T] layout, which routing replay needs). Row i uses prompt
    i // group_size (prompt-major order)."""
    n, _t = completion_ids.shape
    if len(prompt_ids) * group_size != n:
        raise ValueError(
            f"completion_logprobs: {len(prompt_ids)} prompts x group_size {group_size} != {n} completion rows"
        )
    if mask.shape != completion_ids.shape:
        raise ValueError(f"completion_logprobs: mask {tuple(mask.shape)} != completion_ids {tuple(completion_ids.shape)}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("completion_logprobs: every prompt needs at least one token (prompt i is empty)")
    device = completion_ids.device
    p_len = max(len(p) for p in prompt_ids)
    if prompt_len is not None:
        if prompt_len < p_len:
            raise ValueError(f"completion_logprobs: prompt_len={prompt_len} < longest prompt ({p_len} tokens)")
        p_len = prompt_len
    # Filled on the host and moved in one copy that does not wait for the GPU (gspo.devices): row by row on
    # the device, each row was a host wait.
    prompts = torch.full((len(prompt_ids), p_len), pad_token_id, dtype=torch.long)
    for b, ids in enumerate(prompt_ids):
        prompts[b, p_len - len(ids):] = torch.tensor(ids, dtype=torch.long)
    prompts = to_device(prompts, device)
    prompt_mask = (torch.arange(p_len) >= p_len - torch.tensor([len(p) for p in prompt_ids])[:, None]).long()
    prompt_mask = to_device(prompt_mask, device)
    prompts = prompts.repeat_interleave(group_size, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    input_ids = torch.cat([prompts, completion_ids.long()], dim=1)
    attention_mask = torch.cat([prompt_mask, (mask > 0).long()], dim=1)
    # Positions count real tokens only, so left padding does not shift them (RoPE sees the unpadded layout).
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids, p_len


def sampler_support(logits: torch.Tensor, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor | None:
    """Which tokens the sampler may draw after top-k then top-p on (temperature-scaled) `logits` [..., V]:
    a bool mask of the same shape, or None when nothing is truncated.

    transformers' own warpers decide the set, so the trainer and the HF engine truncate identically; vLLM's
    sampler applies the same rules in the same order (top-k keeps ties with the k-th value; top-p removes
    the low tail whose cumulative probability is <= 1 - top_p, never the top token).
    """
    if top_k <= 0 and top_p >= 1.0:
        return None
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    scores = logits.detach().reshape(-1, logits.shape[-1])
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.isfinite(scores).reshape(logits.shape)


def _chunk_logp(hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, temperature: float,
                softcap: float | None, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    # hidden [c, T, H] -> logits [c, T, V] (this chunk only) -> log π(target) [c, T] in fp32.
    logits = lm_head(hidden)
    if not softcap and temperature == 1.0 and top_k <= 0 and top_p >= 1.0:
        # The common case in one kernel: log_softmax reads the bf16 / fp16 logits and writes fp32, the same
        # values as an fp32 copy first (it accumulates in fp32 either way) without that [c, T, V] copy.
        return logits.log_softmax(dim=-1, dtype=torch.float32).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logits = logits.float()
    if softcap:  # architectures that soft-cap their final logits (Gemma-2 style)
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    logp = logits.log_softmax(dim=-1)
    out = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    kept = sampler_support(logits, top_k, top_p)
    if kept is None:
        return out
    # The sampler's renormalised distribution: log π(y) - log Σ_{v kept} π(v). The kept set is a
    # non-differentiable choice (as in the sampler); the gradient flows through both terms. A target
    # outside the set (only off-policy: θ moved, or padding) keeps this finite value instead of -inf.
    return out - logp.masked_fill(~kept, float("-inf")).logsumexp(dim=-1)


def completion_logprobs(model: torch.nn.Module, prompt_ids: list[list[int]], completion_ids: torch.Tensor,
                        mask: torch.Tensor, *, group_size: int, pad_token_id: int, chunk_size: int = 8,
                        temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
                        output_router_logits: bool = False, return_outputs: bool = False,
                        prompt_len: int | None = None) -> torch.Tensor | CompletionForward:
    """log π_θ(y_{i,t} | x_i, y_{i,<t}) / for every completion token: [N, T] float32, 0 where mask == 0.

    prompt_ids: B unpadded prompts; completion_ids, mask: [N, T] with N = B * group_size, prompt-major
    (row i continues prompt i // group_size), right-padded. Differentiable when grad is enabled.

    Temperature: logits are divided by `temperature` before the softmax, i.e. this is the log-probability
    under the distribution the sampler drew from (vLLM and HF generate both sample from softmax(z / τ)).
    Use the rollout's temperature for old_logp / logp so the ratio compares like with like.

    Top-k / top-p (-1 / 1.0 = off): the log-probability under the sampler's truncated, renormalised
    distribution (`sampler_support` picks the kept tokens from these logits), which is what the rollout
    engines report (vLLM `processed_logprobs`, the HF engine's capture) and what the tokens were drawn from.
    π_old and π_θ both computed this way make the on-policy importance ratio exactly 1 (docs/concepts.md).

    Memory: the decoder runs on the whole batch, but logits exist only for `chunk_size` rows × T completion
    positions at a time (lm_head is applied to the sliced hidden states), never [N, P + T, V] or [N, T, V].

    With `return_outputs=True` returns `CompletionForward(logp, outputs, attention_mask)`; pass
    `output_router_logits=True` to get the MoE routers' logits in `outputs.router_logits`.
    `prompt_len` pads every prompt to that many tokens (see `build_inputs`).
    """
    if chunk_size < 1:
        raise ValueError(f"completion_logprobs: chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"completion_logprobs: temperature must be > 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"completion_logprobs: top_p must be in (0, 1], got {top_p}")
    device = next(model.parameters()).device
    completion_ids = to_device(completion_ids, device)
    mask = to_device(mask, device)
    input_ids, attention_mask, position_ids, p_len = build_inputs(
        prompt_ids, completion_ids, mask, group_size=group_size, pad_token_id=pad_token_id, prompt_len=prompt_len
    )
    decoder = model.get_decoder()
    lm_head = model.get_output_embeddings()
    kwargs: dict[str, Any] = {"use_cache": False}
    if output_router_logits:
        kwargs["output_router_logits"] = True
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    hidden = outputs.last_hidden_state
    t = completion_ids.shape[1]
    # Hidden state at position p predicts token p + 1: completion token t is predicted from p_len - 1 + t.
    hidden = hidden[:, p_len - 1: p_len - 1 + t]
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    targets = completion_ids.long()
    chunks = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            # Recompute this chunk's logits in backward instead of keeping every chunk's [c, T, V] alive.
            chunks.append(checkpoint(_chunk_logp, h, y, lm_head, temperature, softcap, top_k, top_p,
                                     use_reentrant=False))
        else:
            chunks.append(_chunk_logp(h, y, lm_head, temperature, softcap, top_k, top_p))
    logp = torch.cat(chunks, dim=0) * (mask > 0)
    if return_outputs:
        return CompletionForward(logp, outputs, attention_mask)
    return logp
