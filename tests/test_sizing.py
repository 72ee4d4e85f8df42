"""Engine sizing (gspo.rollout.sizing): eager/graphs default per device, KV-cache bytes from the config."""

from __future__ import annotations

import pytest

from gspo.rollout.sizing import (
    KV_FLOOR_BYTES,
    KV_MARGIN,
    kv_bytes_per_token,
    kv_cache_bytes,
    resolve_enforce_eager,
    utilization_for_check,
)

pytestmark = pytest.mark.timeout(60)

QWEN3_CUT = {"num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
             "hidden_size": 2048}


def test_enforce_eager_default_per_device():
    assert resolve_enforce_eager(None, on_gpu=True) is False
    assert resolve_enforce_eager(None, on_gpu=False) is True
    assert resolve_enforce_eager(True, on_gpu=True) is True and resolve_enforce_eager(False, on_gpu=False) is False


def test_kv_bytes_per_token_gqa_mla_and_unknown():
    assert kv_bytes_per_token(QWEN3_CUT, "bfloat16") == 2 * 4 * 4 * 128 * 2  # K+V x layers x kv heads x dim x 2 B
    no_head_dim = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    assert kv_bytes_per_token(no_head_dim, "float32") == 2 * 2 * 4 * 16 * 4
    mla = {"num_hidden_layers": 3, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "num_attention_heads": 128}
    assert kv_bytes_per_token(mla, "bfloat16") == 3 * (512 + 64) * 2
    assert kv_bytes_per_token({"num_hidden_layers": 2}, "bfloat16") is None
    assert kv_bytes_per_token(QWEN3_CUT, "int8") is None
    assert kv_bytes_per_token({"text_config": QWEN3_CUT}, "bfloat16") == 8192


def test_kv_cache_bytes_scales_with_the_run():
    need = 8192 * 64 * 328
    got = kv_cache_bytes(QWEN3_CUT, "bfloat16", num_seqs=64, max_model_len=328)
    assert got == int(need * KV_MARGIN) + KV_FLOOR_BYTES
    assert kv_cache_bytes(QWEN3_CUT, "bfloat16", num_seqs=128, max_model_len=328) > got
    assert got < 2**30  # the benchmark run needs well under a GiB, not 30% of a 141 GB card


def test_utilization_stays_under_free_memory():
    assert utilization_for_check(50, 100, None) == pytest.approx(0.45)
    assert utilization_for_check(90, 100, 0.3) == pytest.approx(0.3)
    assert utilization_for_check(0, 100, None) == pytest.approx(0.01)
