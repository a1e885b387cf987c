#!/usr/bin/env bash
# Harness check (issue: core): a random 10-IPC Fashion-MNIST subset used as the "synthetic" set must score
# like --baseline random (same recipe, same seeds). CPU: ~25 min on 1 core.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-runs/core}"
DATA="${DATA:-data}"   # falls back to /usr/share/datasets/fashion-mnist (Debian dataset-fashion-mnist)
EPOCHS="${EPOCHS:-300}"
python coreset.py --dataset FashionMNIST --data-path "$DATA" --ipc 10 --seed 100 --out "$OUT/fmnist_random_ipc10" --overwrite
python validate.py --syn "$OUT/fmnist_random_ipc10" --data-path "$DATA" --model ConvNet-3 --epochs "$EPOCHS" \
  --runs 5 --seed 0 --baseline random --results "$OUT/fmnist_harness.json"
