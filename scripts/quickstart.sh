#!/usr/bin/env bash
# Main job on an offline dataset, from a fresh clone, on CPU in about ten minutes:
#   1. install the requirements into .venv and Fashion-MNIST from Debian (if missing);
#   2. condense Fashion-MNIST to 1 stored image per class with IDC (multi-formation factor 2, so 4 decoded
#      training images per class), at CPU scale: 100 training images per class, 25 x 5 iterations;
#   3. validate it with IDC's evaluation protocol (200 epochs instead of 1000): train fresh ConvNet-3s on it and,
#      with the same recipe and seeds, on random real subsets of 1 image per class, and print both accuracies.
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
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python condense.py -d FashionMNIST --data-path "$DATA" --ipc 1 -f 2 --reproduce --train-subset 100 \
  --outer-iterations 25 --inner-loop 5 --batch-real 16 --n-data 64 --lr-img 1e-3 --seed 0 \
  --out "$OUT/idc_fmnist_ipc1" --overwrite
python validate.py --syn "$OUT/idc_fmnist_ipc1" --data-path "$DATA" --preset idc --epochs 200 --runs 3 --seed 0 \
  --train-subset 100 --baseline random --results "$OUT/idc_fmnist_ipc1.json" --overwrite
echo "grids of the set: $OUT/idc_fmnist_ipc1/grid_stored.png (stored), $OUT/idc_fmnist_ipc1/grid.png (decoded)"
