#!/usr/bin/env bash
# Full-data reference (issue: core): ConvNet-3 trained on all 60k Fashion-MNIST images, last-epoch test accuracy.
# CPU: ~4 min per epoch per run on 1 core.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-runs/core}"
DATA="${DATA:-data}"
python validate.py --dataset FashionMNIST --data-path "$DATA" --model ConvNet-3 --baseline full \
  --full-epochs "${FULL_EPOCHS:-4}" --full-lr 0.01 --no-dsa --runs "${RUNS:-2}" --seed 0 \
  --results "$OUT/fmnist_full.json"
