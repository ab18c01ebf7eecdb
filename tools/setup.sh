#!/usr/bin/env bash
# Install the project and what its tests need on a fresh Debian machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch/torchvision are pinned to the pair on this disk (pyproject.toml); pip takes them from there.
"$PY" -m pip install -q -e ".[dev]"
