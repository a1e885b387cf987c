#!/usr/bin/env bash
# DREAM vs IDC: accuracy against condensation iteration on Fashion-MNIST, IPC 1, factor 2 (CPU scale, as in
# scripts/idc/cpu_scale_all.sh but 60 outer iterations), snapshots validated with the same protocol and seeds.
#   bash scripts/idc/cpu_curve.sh [OUT_DIR]          (~40 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/parallel.sh
OUT="${1:-runs/idc_curve}"
PY="${PYTHON:-python}"
export OMP_NUM_THREADS=1
SNAPS=(0 5 10 20 40 60)
snapshot_list="$(IFS=,; echo "${SNAPS[*]}")"
mkdir -p "$OUT"
for m in idc dream; do
  extra=(); [ "$m" = dream ] && extra=(--dream)
  par_run "$OUT/${m}.log" "$PY" condense.py -d FashionMNIST --data-path data --ipc 1 -f 2 --reproduce \
    --train-subset 100 --outer-iterations 60 --inner-loop 5 --batch-real 16 --n-data 64 --lr-img 1e-3 "${extra[@]}" \
    --seed 0 --snapshots "$snapshot_list" --out "$OUT/${m}_FashionMNIST_ipc1" --quiet
done
par_wait
for it in "${SNAPS[@]}"; do for m in idc dream; do
  par_run "$OUT/curve_${m}_it$it.log" "$PY" validate.py --syn "$OUT/${m}_FashionMNIST_ipc1/snapshots/it$it" \
    --preset idc --epochs 200 --runs 3 --seed 0 --train-subset 100 --test-per-class 200 --data-path data \
    --results "$OUT/curve_${m}_it$it.json" --quiet
done; done
par_wait
echo "done: $OUT"
