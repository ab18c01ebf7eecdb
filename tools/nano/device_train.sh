#!/usr/bin/env bash
# Optional accelerator path for the nano recipe: same recipe, --device cuda, then the eval; packs each
# model folder into one tar under $OUT (the device tool returns at most 8 files).
# Usage (on a machine with a GPU): OUT=/some/dir bash tools/nano/device_train.sh [TRAIN_TIMEOUT_S]
set -u
test -d pipeline/nano || { echo "WRONG_TREE: pipeline/nano missing"; pwd; ls; exit 3; }
export PYTHONPATH=. PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 TOKENIZERS_PARALLELISM=false
out="$OUT/nano"
mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout "${1:-420}" python3 -m pipeline.nano.train --all --device cuda --tokenizer models/nano/tokenizer \
    --out "$out" --no-eval 2>&1 | grep -v -i warn | tee "$out/train.log"
if [ -f "$out/MANIFEST.json" ]; then
  timeout "${2:-120}" python3 -m pipeline.nano.eval --models "$out" --device cuda --write-manifest 2>&1 \
      | grep -v -i warn | tee "$out/eval.log"
fi
cd "$out"
for d in nano-vl nano-filter nano-reader nano-vl-step300 nano-vl-step600; do [ -d "$d" ] && tar cf "$OUT/$d.tar" "$d"; done
ls _checkpoints > ckpts.txt 2>/dev/null
last() { ls -d _checkpoints/"$1"-step* 2>/dev/null | sort -t p -k3 -n | tail -1; }
[ -d nano-vl ] || { c=$(last nano-vl); [ -n "$c" ] && tar cf "$OUT/ckpt-vl.tar" "$c"; }
[ -d nano-reader ] || { c=$(last nano-reader); [ -n "$c" ] && tar cf "$OUT/ckpt-reader.tar" "$c"; }
tar cf "$OUT/meta.tar" MANIFEST.json ./*.log ckpts.txt tokenizer 2>/dev/null
ls -la "$OUT"
