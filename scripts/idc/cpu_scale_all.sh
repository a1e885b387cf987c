#!/usr/bin/env bash
# CPU-scale IDC vs DREAM vs random vs herding on Fashion-MNIST and the CIFAR-10 JPEG copy, IPC 1 and 10
# (the docs/RESULTS.md table). Two single-thread jobs at a time; ~1 h on 2 cores.
#   bash scripts/idc/cpu_scale_all.sh [OUT_DIR]
# Scale (documented in docs/RESULTS.md): 100 training images per class, ConvNet-3, paper hyperparameters
# (--reproduce) except: outer iterations 25 (IPC 1) / 15 (IPC 10) of 5 inner iterations, 16 real images per class
# per step (DREAM: 16 k-means centres), 64 samples per network update, base lr_img x10 (Fashion-MNIST) / x2 (CIFAR).
# validate.py --preset idc with 200 (IPC 1) / 50 (IPC 10) epochs, 3 seeds, 200 (100) test images per class.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/parallel.sh
OUT="${1:-runs/idc_cpu}"
PY="${PYTHON:-python}"
CIFAR="${CIFAR_PATH:-../shared/data/cifar10}"
export OMP_NUM_THREADS=1
mkdir -p "$OUT"

# dataset -> DATA_ARGS and LR_ARGS (arrays, so that a data path with spaces stays one argument)
data_args() { if [ "$1" = FashionMNIST ]; then DATA_ARGS=(--data-path data); else DATA_ARGS=(--data-path "$CIFAR"); fi; }
lr_args() { if [ "$1" = FashionMNIST ]; then LR_ARGS=(--lr-img 1e-3); else LR_ARGS=(--lr-img 1e-2); fi; }

condense() {  # dataset ipc method
  local ds="$1" ipc="$2" m="$3" outer=25 snaps="0,10,25" extra=()
  [ "$ipc" = 10 ] && outer=15 && snaps="0,15"
  [ "$m" = dream ] && extra=(--dream --batch-real 16)
  data_args "$ds"
  lr_args "$ds"
  par_run "$OUT/${m}_${ds}_ipc${ipc}.log" "$PY" condense.py -d "$ds" "${DATA_ARGS[@]}" --ipc "$ipc" -f 2 --reproduce \
    --train-subset 100 --outer-iterations "$outer" --inner-loop 5 --batch-real 16 --n-data 64 "${LR_ARGS[@]}" \
    "${extra[@]}" --seed 0 --snapshots "$snaps" --out "$OUT/${m}_${ds}_ipc${ipc}" --quiet
}

validate() {  # dataset syn-dir results-name ipc [more validate.py arguments]
  local ds="$1" syn="$2" res="$3" ipc="$4"
  shift 4
  local ep=200 tpc=200
  [ "$ipc" = 10 ] && ep=50 && tpc=100
  data_args "$ds"
  par_run "$OUT/$res.log" "$PY" validate.py --syn "$syn" --preset idc --epochs "$ep" --runs 3 --seed 0 \
    --train-subset 100 --test-per-class "$tpc" "${DATA_ARGS[@]}" "$@" --results "$OUT/$res.json" --quiet
}

# phase 1: condensation (longest first)
for ds in FashionMNIST CIFAR10; do for m in idc dream; do condense "$ds" 10 "$m"; done; done
for ds in FashionMNIST CIFAR10; do for m in idc dream; do condense "$ds" 1 "$m"; done; done
par_wait

# phase 2: validation of the final sets (+ random and herding with the IDC call); the accuracy-vs-iteration curve
# is scripts/idc/cpu_curve.sh
for ipc in 10 1; do for ds in FashionMNIST CIFAR10; do
  validate "$ds" "$OUT/idc_${ds}_ipc${ipc}" "val_idc_${ds}_ipc${ipc}" "$ipc" --baseline random --baseline herding
  validate "$ds" "$OUT/dream_${ds}_ipc${ipc}" "val_dream_${ds}_ipc${ipc}" "$ipc"
done; done
par_wait
echo "done: $OUT"
