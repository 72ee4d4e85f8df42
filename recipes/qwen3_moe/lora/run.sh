#!/usr/bin/env bash
# Qwen3-30B-A3B, LoRA: run the whole pipeline, or one stage, with the right `accelerate launch` line.
#
#   recipes/qwen3_moe/lora/run.sh [key=value ...]           # pipeline.yaml (resumes where it stopped)
#   recipes/qwen3_moe/lora/run.sh STAGE [key=value ...]     # one stage: gspo train STAGE.yaml
#   recipes/qwen3_moe/lora/run.sh eval [key=value ...]      # gspo eval ../full/eval.yaml
#
# Overrides pass through: `stages.<stage>.<key>=value` for the pipeline, `<key>=value` for a stage.
# Environment: NUM_GPUS (1, 2, 4 or 8; default 1: one card with >= 141 GB, e.g. an H200), DRY_RUN=1 (print the
# command and validate the config(s) instead of running).
# Stages here: cold_start reasoning_rl rs_sft alignment_rl (reward_model and rejection_sampling: ../full).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NUM_GPUS="${NUM_GPUS:-1}"
exec "$HERE/../launch.sh" "$HERE" "$NUM_GPUS" "$@"
