#!/usr/bin/env bash
# Main job on an offline dataset, from a fresh clone, on CPU (measured times: docs/RESULTS.md, "README quick start"):
#   1. install the requirements into .venv and Fashion-MNIST from Debian (if missing);
#   2. condense Fashion-MNIST to 1 stored image per class with IDC (multi-formation factor 2, so 4 decoded
#      training images per class), at CPU scale: 100 training images per class, 25 x 5 iterations;
#   3. validate it with IDC's evaluation protocol (200 epochs instead of 1000): train fresh ConvNet-3s on it and,
#      with the same recipe and seeds, on random real subsets of 1 image per class, and print both accuracies.
# Re-running the same command continues where an interrupted run stopped (finished steps are skipped);
# FRESH=1 deletes this script's earlier outputs in $OUT and starts again.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "quickstart: about 6 minutes on an idle 2-core CPU, much longer on a busy one (measured: docs/RESULTS.md)"
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
SET="$OUT/idc_fmnist_ipc1"
RESULTS="$OUT/idc_fmnist_ipc1.json"
FRESH_FLAG=()
if [ "${FRESH:-0}" = 1 ]; then FRESH_FLAG=(--overwrite); fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
start=$(date +%s)
echo "step 1/2: condense.py (IDC) -> $SET"
python condense.py -d FashionMNIST --data-path "$DATA" --ipc 1 -f 2 --reproduce --train-subset 100 \
  --outer-iterations 25 --inner-loop 5 --batch-real 16 --n-data 64 --lr-img 1e-3 --seed 0 --ckpt-every 1 \
  --out "$SET" "${FRESH_FLAG[@]}"
echo "step 2/2: validate.py (IDC protocol, 200 epochs, 3 runs, random baseline) -> $RESULTS"
python validate.py --syn "$SET" --data-path "$DATA" --preset idc --epochs 200 --runs 3 --seed 0 \
  --train-subset 100 --baseline random --results "$RESULTS" "${FRESH_FLAG[@]}"
echo
echo "quickstart finished in $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s. Files:"
echo "  python environment:  $(pwd)/.venv"
echo "  Fashion-MNIST:       $DATA"
echo "  synthetic set:       $SET/ (synset.pt, meta.json; grid_stored.png = the stored images, grid.png = decoded)"
echo "  condense log:        $SET/log.csv"
echo "  accuracies (JSON):   $RESULTS (per run, per arm, DD-Ranking scores under \"dd_ranking\")"
echo "  accuracies (CSV):    ${RESULTS%.json}.csv (one row per finished run: a re-run skips them)"
echo "everything under $OUT:"
find "$OUT" -type f -printf '  %p (%s bytes)\n' | sort
