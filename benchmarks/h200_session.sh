#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks.md's H200 tables, in parts that each fit one call of a few minutes on one
# H200 (torch 2.11 + CUDA 13, vLLM 0.26.0 and TRL 1.16 importable). Each part prints everything it measures and
# copies its logs to $OUT (default ./h200-out).
#
#   bash benchmarks/h200_session.sh bench      # gspo + vLLM, plain LLM.generate, TRL + vLLM: one process each
#                                              # (RUNS=... picks others of gpu_gspo_vs_trl.py's runs)
#   bash benchmarks/h200_session.sh profile    # one cycle split by hop (benchmarks/profile_cycle.py)
#   bash benchmarks/h200_session.sh families   # the GPU weight-sync test for DeepSeek-V3, GPT-OSS, Qwen2-MoE
#                                              # (FAMILIES="gpt_oss qwen2_moe" picks some)
#   bash benchmarks/h200_session.sh lora24     # the 24-layer Qwen3-30B-A3B LoRA rl stage, 5 rollouts
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-h200-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
# gspo itself (and rewards/ as gspo_rewards), without touching the image's packages
"$PY" -c "import gspo, gspo_rewards" 2>/dev/null ||
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
"$PY" -c "import torch, vllm, transformers; print('torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"

part() {  # name, command...: run it, keep its log, say how long it took and how it ended
  local name=$1; shift
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc, $((SECONDS - t0)) s"
  grep -E "^(HOPS|GPU |SYNCS|PAIRED|SAME_REQUESTS|ROLLOUT|SUMMARY|gspo_vllm|llm_generate|trl_vllm|gspo_hf|trl_hf|rollout hop)|passed|failed|Error|: gap at start" \
    "$OUT/$name.log" | cut -c1-1500 | tail -40
}

case "${1:?part: bench, profile, families or lora24}" in
  bench)
    part bench "$PY" benchmarks/gpu_gspo_vs_trl.py --runs "${RUNS:-gspo_vllm,llm_generate,trl_vllm}" --cycles 8 \
      --out "$OUT/bench.jsonl" ;;
  profile)
    part profile "$PY" benchmarks/profile_cycle.py --cycles 5 ;;
  families)  # vLLM's sleep-mode allocator: one engine per process, so one pytest process per family
    for family in ${FAMILIES:-deepseek_v3 gpt_oss qwen2_moe}; do
      part "sync-$family" "$PY" -m pytest -q -s -m gpu tests/test_gpu_sync.py -k "per_family and $family" -p no:cacheprovider
    done ;;
  lora24)
    part lora24 "$PY" benchmarks/multi_gpu.py --recipe recipes/qwen3_moe/lora/reasoning_rl.yaml --layers 24 \
      --rollouts 5 rollout.engine=hf_generate ;;
  *) echo "unknown part $1 (bench, profile, families, lora24)" >&2; exit 2 ;;
esac
