#!/usr/bin/env bash
# CPU-scale DREAM (factor 2) on Fashion-MNIST, 1 stored image per class (4 decoded per class): finishes in
# minutes on a laptop-class CPU. Not the paper setting (that is scripts/dream/fmnist_f2_ipc1.sh): the same
# --reproduce --dream row shrunk to 100 training images per class, 25 outer x 5 inner iterations, 16 real images
# per class per matching step (= 16 k-means centres), 64 real samples per network update, base lr_img 1e-3 (10x
# the paper's, for the short run). The matching run without --dream is scripts/idc/cpu_fmnist_ipc1.sh.
# Evaluation: validate.py --preset dream with 200 epochs, RUNS seeds, the random and herding baselines drawn from
# the same 100-per-class pool, 200 test images per class. Compare the syn arm with the baselines and the IDC run.
#
# Usage: bash scripts/dream/cpu_fmnist_ipc1.sh
#   Environment: DATA (data; Fashion-MNIST falls back to /usr/share/datasets/fashion-mnist), OUT
#   (results/dream/cpu_fmnist_ipc1), PYTHON (python), SEED (0), RUNS (3), OMP_NUM_THREADS (2), DEVICE (auto).
#   Re-running the same command resumes; another SEED needs another OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."

DATA="${DATA:-data}"
OUT="${OUT:-results/dream/cpu_fmnist_ipc1}"
PYTHON="${PYTHON:-python}"
SEED="${SEED:-0}"
RUNS="${RUNS:-3}"
DEVICE="${DEVICE:-auto}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

"$PYTHON" condense.py --reproduce --dream -d fashion -f 2 --ipc 1 --data-path "$DATA" --seed "$SEED" \
  --train-subset 100 --outer-iterations 25 --inner-loop 5 --batch-real 16 --n-data 64 --lr-img 1e-3 \
  --device "$DEVICE" --out "$OUT/set"

"$PYTHON" validate.py --syn "$OUT/set" --preset dream --epochs 200 --runs "$RUNS" --seed "$SEED" \
  --data-path "$DATA" --train-subset 100 --test-per-class 200 --baseline random --baseline herding \
  --device "$DEVICE" --results "$OUT/results.json"
