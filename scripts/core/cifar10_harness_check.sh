#!/usr/bin/env bash
# Harness check on CIFAR-10 (the offline JPEG copy, read straight from its tarball) in ZCA space (MTT's CIFAR
# protocol): a random 10-IPC subset used as the "synthetic" set must score like --baseline random.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-runs/core}"
DATA="${DATA:-../shared/data/cifar10}"
python coreset.py --dataset CIFAR10 --data-path "$DATA" --ipc 10 --seed 100 --out "$OUT/cifar10_random_ipc10" --overwrite
python validate.py --syn "$OUT/cifar10_random_ipc10" --data-path "$DATA" --zca --model ConvNet-3 \
  --epochs "${EPOCHS:-300}" --runs "${RUNS:-3}" --seed 0 --baseline random --results "$OUT/cifar10_zca_harness.json"
