#!/usr/bin/env bash
# Shared by recipes/qwen3_moe/*/run.sh: launch.sh RECIPE_DIR NUM_GPUS [STAGE | eval] [key=value ...]
# Builds `accelerate launch --config_file accelerate/<N>gpu.json -m gspo <pipeline|train|eval> CONFIG [...]`.
# Stages that only sample (rejection_sampling) and `eval` run as one process (vLLM, no training).
set -euo pipefail
RECIPE_DIR="$1"; NUM_GPUS="$2"; shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "$NUM_GPUS" in
  1|2|4|8) ACCEL="$ROOT/accelerate/${NUM_GPUS}gpu.json" ;;  # 1: one process; 2, 4, 8: FSDP2 over that many
  *) echo "NUM_GPUS must be 1, 2, 4 or 8 (one accelerate config each in $ROOT/accelerate), got '$NUM_GPUS'" >&2
     exit 2 ;;
esac
config_of() {  # the stage's config: this recipe's, else the full-weight variant's (stages that train no policy)
  for dir in "$RECIPE_DIR" "$ROOT/full"; do
    if [[ -f "$dir/$1.yaml" ]]; then echo "$dir/$1.yaml"; return; fi
  done
  echo "unknown stage '$1'; configs: $(cd "$RECIPE_DIR" && ls *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
  exit 2
}
if [[ $# -eq 0 || "$1" == *=* ]]; then
  COMMAND=(pipeline "$RECIPE_DIR/pipeline.yaml")
elif [[ "$1" == "eval" ]]; then
  COMMAND=(eval "$(config_of eval)"); shift; ACCEL="$ROOT/accelerate/1gpu.json"
else
  COMMAND=(train "$(config_of "$1")")
  [[ "$1" == "rejection_sampling" ]] && ACCEL="$ROOT/accelerate/1gpu.json"
  shift
fi
LINE=(accelerate launch --config_file "$ACCEL" -m gspo "${COMMAND[@]}" "$@")
echo "+ ${LINE[*]}" >&2
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  exec gspo validate "${COMMAND[1]}" "$@"
fi
exec "${LINE[@]}"
