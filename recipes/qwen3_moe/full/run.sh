#!/usr/bin/env bash
# Qwen3-30B-A3B, full weights: run the whole pipeline, or one stage, with the right `accelerate launch` line.
#
#   recipes/qwen3_moe/full/run.sh [key=value ...]           # pipeline.yaml (resumes where it stopped)
#   recipes/qwen3_moe/full/run.sh STAGE [key=value ...]     # one stage: gspo train STAGE.yaml
#   recipes/qwen3_moe/full/run.sh eval [key=value ...]      # gspo eval eval.yaml (e.g. model.name_or_path=...)
#
# Overrides pass through: `stages.<stage>.<key>=value` for the pipeline, `<key>=value` for a stage.
# Environment: NUM_GPUS (1, 2, 4 or 8; default 8: full weights of a 30B model with Adam's state need FSDP over
# 8 GPUs; fewer would need the rl stages' train.fsdp_cpu_offload=true, not measured), DRY_RUN=1 (print the
# command and validate the config(s) instead of running).
# Stages: cold_start reasoning_rl rejection_sampling rs_sft reward_model alignment_rl.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NUM_GPUS="${NUM_GPUS:-8}"
exec "$HERE/../launch.sh" "$HERE" "$NUM_GPUS" "$@"
