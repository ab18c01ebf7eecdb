#!/usr/bin/env bash
# Install the project and what its tests need (idempotent). On this machine pip takes torch 2.14.1 +
# torchvision 0.29.1 from the local disk; elsewhere they come from PyPI (a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q -c tools/constraints.txt -e ".[dev]"
