#!/usr/bin/env bash
# GPU throughput check (see tools/gpu_check.py), for both model generations: random-weight models with the real
# Qwen2.5-VL-3B and Qwen3-VL-4B architectures on the hf engine, each on its own image grid (28 / 32 px):
# 512 images x 256 new tokens at the engine's own settings (compiled decode, batches from free memory,
# encoding ahead), the annotate stage over one shard, then seconds per TRL GRPO step (GPU_CHECK_GRPO=0 skips
# it); for the first family also the old settings (eager, batch 256), a decode profile and what recording token
# log-probabilities costs (the abstention gate's `logprobs_cost`, seconds with / without).
#   GPU_CHECK_FAMILIES=qwen3-vl tools/gpu_check.sh    # one family only (default: qwen2.5-vl,qwen3-vl)
# Installs nothing (the GPU machine may be offline); prints what is missing and runs what it can.
#   tools/gpu_check.sh                 # on the GPU machine, from anywhere
#   GPU_CHECK_TINY=1 tools/gpu_check.sh   # a tiny config on CPU: checks the script's logic
# Stops itself after GPU_CHECK_LIMIT_S seconds (default 540) so the whole check fits one 10-minute device call.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
else
  echo "nvidia-smi: not found"
fi
"$PY" --version
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
timeout --signal=INT --kill-after=20 "${GPU_CHECK_LIMIT_S:-540}" "$PY" tools/gpu_check.py
rc=$?
[ $rc -eq 124 ] && echo "gpu_check: stopped at the ${GPU_CHECK_LIMIT_S:-540}s limit"
exit $rc
