#!/usr/bin/env bash
# Install the Ray executor's extra (ray[default], pinned in pyproject.toml) for `submit --executor ray` and
# its tests (idempotent). The test fixture (tests/ray_cluster.py) starts and stops its own local cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if "$PY" -c "import ray, ray.job_submission; assert ray.__version__ == '2.60.0'" 2>/dev/null; then
    echo "ray already installed: $("$PY" -c 'import ray; print(ray.__version__)')"
    exit 0
fi
"$PY" -m pip install -q -c tools/constraints.txt -e ".[ray]"
echo "installed: ray $("$PY" -c 'import ray; print(ray.__version__)')"
