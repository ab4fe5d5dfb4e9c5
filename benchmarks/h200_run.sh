#!/usr/bin/env bash
# What one H200 session ran (through the device tool), in order: the demo model's training run, the
# training benchmark, the decode benchmark. Results land in $OUT (or ./out/h200). Each part has its own
# time limit so that one failure cannot eat the others' time.
#   bash benchmarks/h200_run.sh [demo] [train] [decode]      (default: all three)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 PY=python3
OUT=${OUT:-out/h200}
mkdir -p "$OUT"
parts=${*:-demo train decode}
log="$OUT/h200.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$log"

if [[ " $parts " == *" demo "* ]]; then
  start=$(date +%s)
  TRAIN_FLAGS="--no-progress --save-every 250 --keep-checkpoints 2" timeout 270 bash scripts/demo/train_demo.sh train 2>&1 | grep -v Warning | tee -a "$log"
  echo "demo training wall time: $(( $(date +%s) - start )) s" | tee -a "$log"
  ckpt="out/demo/$(cat out/demo/last)"
  # bf16, in shards small enough for the device tool to bring back; package_demo.py joins them.
  python3 -c "import sys, torch, qwen3; qwen3.save_model(qwen3.load_model(sys.argv[1], dtype=torch.bfloat16), sys.argv[2], max_shard_bytes=12_000_000)" "$ckpt" "$OUT/demo" 2>&1 | tee -a "$log"
  cp out/demo/metrics.jsonl "$OUT/demo_metrics.jsonl"
fi
if [[ " $parts " == *" train "* ]]; then
  timeout 200 python3 benchmarks/train.py --results "$OUT/train_results.md" 2>&1 | grep -v Warning | tee -a "$log"
fi
if [[ " $parts " == *" decode "* ]]; then
  spec=demo; [[ -f out/demo/last ]] && spec="out/demo/$(cat out/demo/last)"
  timeout 540 python3 benchmarks/decode.py --device cuda --skip-compile-peer --speculative-model "$spec" \
    --results "$OUT/decode_results.md" 2>&1 \
    | grep -v "Warning\|^W1\|^ " | tee -a "$log"
fi
