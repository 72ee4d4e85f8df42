"""Transformers `generate` engine: no vLLM needed; samples with the trainer's policy itself.

Same outputs as the vLLM engine: prompt-major rows, sampler logprobs of the drawn tokens after the same
temperature / top-k / top-p processing, finish reasons "stop" / "length". The logprobs are read by a logits
processor placed after the temperature / top-k / top-p warpers (whose output is the distribution the sampler
draws from); it keeps one step's [rows, V] log-probabilities at a time instead of generate's `output_scores`,
which would hold every step's scores (64 rows x 256 steps x a 152k vocabulary = 10 GB in fp32).

Batching: all B*G rows go through one `generate` call (each prompt repeated G times, prompt-major), or
`batch_prompts` prompts at a time when set. Seeds: with `SamplingSpec.seed` set, each such call runs under
a forked RNG seeded with `derive_seed(seed, first_prompt_index, G)`, so the same prompts, seed and
`batch_prompts` give the same completions and the caller's global RNG is left untouched. `first_prompt_index`
counts from `SamplingSpec.first_prompt`, so with `batch_prompts=1` a slice of a rollout sampled on its own
gets the completions it gets in the whole call. (Unlike vLLM, a
prompt's samples depend on the other prompts of its call: one sampler draws for the whole batch.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from gspo.models.finite import NonFiniteError, describe_parameters, non_finite_rows, rows_text
from gspo.registry import ROLLOUT_ENGINES
from gspo.rollout.base import EngineInputs, RolloutBatch, SamplingSpec, assemble_batch, derive_seed


class _FiniteGuard:
    """Logits processor, first in the chain: raises `NonFiniteError` on NaN / inf in the model's raw logits,
    before a warper or the sampler sees them (CUDA's multinomial would stop the process with a device-side assert
    naming nothing). It names the step, the rows and the model's first non-finite parameter when there is one.
    Raw logits only: top-k / top-p set -inf on purpose, after this check. Its one host transfer per step adds
    little to `generate`, which synchronises every step anyway (its stopping check reads a device value)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.step += 1
        if not bool(torch.isfinite(scores).all()):
            logits = f"logits at generation step {self.step}, {rows_text(non_finite_rows(scores))}"
            raise NonFiniteError(f"{describe_parameters(self.model)}; {logits}", hop="rollout")
        return scores


class _DrawnTokenLogprobs:
    """Logits processor, last in the chain: log π(token) of every drawn token, one step's scores at a time.

    At step t it receives the processed scores of step t and the ids drawn up to step t - 1: it gathers
    token t - 1 from the previous step's log-probabilities and keeps this step's for the next call.
    """

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def logprobs(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[rows, steps] log-probabilities of `new_tokens` (generate's output past the prompt)."""
        n = new_tokens.shape[1]
        steps = list(self.steps[:n])
        if len(steps) < n and self.prev is not None:  # the last drawn token is never fed back
            steps.append(self.prev.gather(-1, new_tokens[:, len(steps):len(steps) + 1].to(self.prev.device)).squeeze(-1))
        self.prev = None
        if not steps:
            return torch.zeros(new_tokens.shape, dtype=torch.float32)
        return torch.stack(steps, dim=1)


def _sharded(model: torch.nn.Module) -> bool:
    """Several processes and an FSDP-sharded policy (the rl stage's): every forward is a collective, so
    `generate` keeps each rank stepping until every rank's sequences are done (`synced_gpus`, made for ZeRO-3 /
    FSDP). The sharded policy itself samples: an unsharded copy per rank would be a full copy of the model. A
    finished rank's extra steps sample nothing, so its completions and RNG stream are those of a lone run. A
    whole model per rank (rejection_sampling, an evaluation: each rank samples its own share, possibly in
    fewer calls or none) generates on its own."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    return (isinstance(model, FSDPModule) and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


@contextmanager
def _root_gathered(model: torch.nn.Module) -> Iterator[None]:
    """An FSDP2-sharded peft (LoRA) policy: peft's `generate` calls the inner HF model's, bypassing the root's
    forward hooks, so the root's own parameters (embeddings, norm, head; the decoder layers are units with
    their own hooks) are gathered around it. A no-op for any other model."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


class HFGenerateEngine:
    """Samples with `model.generate`. With `model` = the trainer's policy no weight sync is needed;
    `update_weights` copies parameters when the engine holds a separate copy."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_prompts: int = 0) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batch_prompts = batch_prompts  # 0 = all prompts in one generate call
        self.last_sync_seconds: float | None = None

    def _generation_config(self, sampling: SamplingSpec):
        from transformers import GenerationConfig

        greedy = sampling.temperature == 0
        eos = sorted({*sampling.stop_token_ids, *([self.eos_token_id] if self.eos_token_id is not None else [])})
        # Neutral warper settings: the warpers run in our own processor list (`_processors`), ahead of the
        # logprob capture. top_k=0 (not None: None falls back to transformers' default of 50).
        return GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else 1.0,
            top_p=None if greedy else 1.0,
            top_k=None if greedy else 0,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=self.pad_token_id,
            num_return_sequences=1,  # prompts are repeated G times instead (also valid for greedy)
            return_dict_in_generate=True,
            # Neutral values for every processor a checkpoint's generation_config could switch on (transformers
            # fills unset fields from it): the trainer's logprobs know none of them, so rollouts must not either.
            repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_repetition_penalty=1.0, min_p=None,
            typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, bad_words_ids=None, suppress_tokens=None,
            begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None, min_new_tokens=None,
            min_length=0, length_penalty=1.0, renormalize_logits=False,
        ), set(eos)

    def _processors(self, sampling: SamplingSpec) -> tuple[Any, _DrawnTokenLogprobs | None]:
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        procs: list[Any] = [_FiniteGuard(self.model)]
        if sampling.temperature not in (0, 1.0):  # transformers' own order: temperature, top-k, top-p
            procs.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.temperature != 0 and sampling.top_k > 0:
            procs.append(TopKLogitsWarper(sampling.top_k))
        if sampling.temperature != 0 and sampling.top_p < 1.0:
            procs.append(TopPLogitsWarper(sampling.top_p))
        capture = _DrawnTokenLogprobs() if sampling.logprobs else None  # a full-vocab log_softmax per step
        return LogitsProcessorList([*procs, *([capture] if capture else [])]), capture

    @torch.no_grad()
    def _sample(self, prompts: list[list[int]], sampling: SamplingSpec,
                gen_cfg) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Each prompt G times, prompt-major; left-padded so generated tokens start at the same column.
        prompts = [p for p in prompts for _ in range(sampling.n)]
        device = next(self.model.parameters()).device
        p_len = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), p_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), p_len), dtype=torch.long)
        for b, ids in enumerate(prompts):
            input_ids[b, p_len - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, p_len - len(ids):] = 1
        processors, capture = self._processors(sampling)
        with _root_gathered(self.model):
            out = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=gen_cfg,
                logits_processor=processors, synced_gpus=_sharded(self.model),
            )
        new_tokens = out.sequences[:, p_len:]  # [b*G, steps]
        return new_tokens.cpu(), capture.logprobs(new_tokens).cpu() if capture else None

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSpec) -> RolloutBatch:
        gen_cfg, stop_ids = self._generation_config(sampling)
        was_training = self.model.training
        self.model.eval()
        try:
            step = self.batch_prompts or len(prompt_ids)
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            parts = []
            for start in range(0, len(prompt_ids), step):
                chunk = prompt_ids[start:start + step]
                if sampling.seed is None:
                    parts.append(self._sample(chunk, sampling, gen_cfg))
                    continue
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(derive_seed(sampling.seed, sampling.first_prompt + start, sampling.n))
                    parts.append(self._sample(chunk, sampling, gen_cfg))
        finally:
            self.model.train(was_training)
        completions, reasons = [], []
        logps: list[list[float]] | None = [] if sampling.logprobs else None
        for tokens, lp in parts:
            lp_rows = lp.tolist() if lp is not None else [None] * len(tokens)
            for row, row_lp in zip(tokens.tolist(), lp_rows, strict=True):
                # Cut at the first stop token (kept, like vLLM); the rest is generate's padding.
                end = next((k + 1 for k, tok in enumerate(row) if tok in stop_ids), None)
                completions.append(row[:end] if end is not None else row)
                if logps is not None:
                    logps.append(row_lp[:end] if end is not None else row_lp)
                reasons.append("stop" if end is not None else "length")
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return assemble_batch(prompt_ids, completions, logps, reasons, texts, group_size=sampling.n,
                              pad_token_id=self.pad_token_id)

    def update_weights(self, model: torch.nn.Module) -> None:
        """No-op when sampling with the trainer's own module; else copy its parameters in."""
        start = time.perf_counter()
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())
        self.last_sync_seconds = time.perf_counter() - start

    def sleep(self) -> None:  # the policy is the trainer's: nothing to release
        pass

    def wake_up(self) -> None:
        pass

    def close(self) -> None:
        self.model = None


@ROLLOUT_ENGINES.register("hf_generate")
def build_hf_generate(section: Any, run: EngineInputs) -> HFGenerateEngine:
    """Engine builder. Samples with `run.model` (the trainer's policy, no sync needed) when given; otherwise
    loads its own copy from `run.model_path` in `run.dtype` (then `update_weights` copies the trainer's
    weights). Its config section has no keys of its own (the sampling settings come with each call)."""
    model = run.model
    if model is None:
        from transformers import AutoModelForCausalLM

        from gspo.models.loading import torch_dtype_of

        model = AutoModelForCausalLM.from_pretrained(run.model_path, dtype=torch_dtype_of(run.dtype, "rollout.dtype"))
        model.requires_grad_(False)
    return HFGenerateEngine(model, run.tokenizer, batch_prompts=getattr(section, "hf_batch_prompts", 0))


__all__ = ["HFGenerateEngine", "build_hf_generate"]
