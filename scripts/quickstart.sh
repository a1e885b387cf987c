#!/usr/bin/env bash
# Main job on an offline dataset, from a fresh clone, on CPU in a few minutes:
#   1. install the requirements into .venv and Fashion-MNIST from Debian (if missing);
#   2. build a 1-image-per-class set of Fashion-MNIST;
#   3. validate it: train fresh ConvNet-3s on it and, with the same recipe and seeds, on random real subsets of
#      the same size, and print both test accuracies.
# The set is a random coreset until a distillation method is merged (condense.py / distill.py / recover.py
# replace step 2); the harness, format and report are the ones every method uses.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements.txt
DATA="${DATA:-/usr/share/datasets/fashion-mnist}"
if [ ! -e "$DATA/train-images-idx3-ubyte.gz" ] && [ "$DATA" = /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or set DATA=<folder with idx files>" >&2
    exit 2
  fi
fi
OUT="${OUT:-runs/quickstart}"
python coreset.py --dataset FashionMNIST --data-path "$DATA" --ipc 1 --seed 0 --out "$OUT/fmnist_ipc1" --overwrite
python validate.py --syn "$OUT/fmnist_ipc1" --data-path "$DATA" --model ConvNet-3 --epochs 300 --runs 3 \
  --baseline random --results "$OUT/fmnist_ipc1.json"
echo "grid of the set: $OUT/fmnist_ipc1/grid.png"
