"""Rollout engines: prompts in, G completions per prompt out (see `gspo.rollout.base` for the contract).

Engines register in `gspo.registry.ROLLOUT_ENGINES`; `build_engine(name, **kwargs)` builds one by name.
Importing this package never imports vLLM (engines import it in their constructors).
"""

from __future__ import annotations

from typing import Any

from gspo.registry import ROLLOUT_ENGINES
from gspo.rollout import hf_generate, vllm_colocate  # noqa: F401  (register the built-in engines)
from gspo.rollout.base import RolloutBatch, RolloutEngine, SamplingSpec

__all__ = ["RolloutBatch", "RolloutEngine", "SamplingSpec", "build_engine"]


def build_engine(name: str, **kwargs: Any) -> RolloutEngine:
    """Build the rollout engine registered as `name` (unknown names list the valid ones).

    kwargs: model_path, tokenizer, dtype, seed, max_model_len, gpu_memory_utilization,
    kv_cache_memory_bytes, enforce_eager, model (the trainer's policy; used by "hf_generate"), max_num_seqs
    (sequences per generate call: sizes vLLM's KV cache and CUDA graphs).
    """
    return ROLLOUT_ENGINES.get(name)(**kwargs)
