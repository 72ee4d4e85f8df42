"""How big the colocated engine is, decided from the run instead of a fixed share of the device.

- `resolve_enforce_eager`: CUDA graphs on GPU (decode is launch-bound there: with eager kernels the rollout of
  docs/benchmarks.md's 4-layer cut took 2.6x longer), eager on CPU (graph capture only adds start-up time there).
- `kv_cache_bytes`: the KV cache one rollout needs, `num_seqs` sequences of up to `max_model_len` tokens each,
  from the model config's attention shapes, with a margin. vLLM then holds weights + this cache + its activation
  and CUDA-graph buffers, instead of `gpu_memory_utilization` x the whole card.

Pure functions of a config dict / object: no vLLM import, testable on any machine.
"""

from __future__ import annotations

import math
from typing import Any

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# vLLM allocates the cache in blocks of 16 tokens and keeps a few blocks spare; 25% + 64 MiB covers that and
# the block rounding of every sequence with room left (the cache is ~0.2 GB for docs/benchmarks.md's run).
KV_MARGIN = 1.25
KV_FLOOR_BYTES = 64 * 2**20


def resolve_enforce_eager(value: bool | None, *, on_gpu: bool) -> bool:
    """`rollout.enforce_eager`: an explicit value wins; null = eager on CPU, CUDA graphs on GPU."""
    return (not on_gpu) if value is None else bool(value)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def kv_bytes_per_token(config: Any, dtype: str) -> int | None:
    """KV-cache bytes one token costs across all layers, or None for attention shapes this does not know.

    Standard / grouped-query attention: 2 (K and V) x layers x kv_heads x head_dim x bytes. MLA (DeepSeek-V2/V3,
    `kv_lora_rank`): one latent of kv_lora_rank + qk_rope_head_dim per layer. Sliding-window layers are counted
    at full length (an overestimate: the engine gets more cache than it can use, never less).
    """
    text = _get(config, "text_config") or config
    layers = _get(text, "num_hidden_layers")
    size = _DTYPE_BYTES.get(dtype)
    if not layers or size is None:
        return None
    rank = _get(text, "kv_lora_rank")
    if rank:
        return int(layers * (rank + (_get(text, "qk_rope_head_dim") or 0)) * size)
    heads = _get(text, "num_attention_heads")
    kv_heads = _get(text, "num_key_value_heads") or heads
    head_dim = _get(text, "head_dim") or (_get(text, "hidden_size") // heads if heads else None)
    if not kv_heads or not head_dim:
        return None
    return int(2 * layers * kv_heads * head_dim * size)


def kv_cache_bytes(config: Any, dtype: str, *, num_seqs: int, max_model_len: int) -> int | None:
    """Bytes of KV cache for `num_seqs` concurrent sequences of up to `max_model_len` tokens (with margin)."""
    per_token = kv_bytes_per_token(config, dtype)
    if per_token is None:
        return None
    return math.ceil(per_token * num_seqs * max_model_len * KV_MARGIN) + KV_FLOOR_BYTES


def utilization_for_check(free_bytes: int, total_bytes: int, requested: float | None) -> float:
    """The `gpu_memory_utilization` handed to vLLM when the KV cache is sized explicitly.

    vLLM ignores the fraction for sizing once `kv_cache_memory_bytes` is set, but still refuses to start when
    the card's free memory is below fraction x total (vllm/v1/worker/utils.py `request_memory`); the trainer's
    weights are already on the card, so the fraction must stay under what is free.
    """
    cap = 0.9 * free_bytes / total_bytes
    return max(0.01, min(cap, requested if requested is not None else 0.9))
