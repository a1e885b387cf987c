#!/usr/bin/env bash
# Accuracy parity of DWA with its original code (issue 14, point 2): CIFAR-10, IPC 1, 100 iterations, the same
# teacher and initial images; the original's set (bench/dwa_original_recover.py) and recover.py's set validated
# with the same validate.py KD protocol and seeds, beside a random real subset of the same size.
#
#   ORIGINAL=/path/to/Diversity-Driven-Synthesis TEACHER=teacher.pt OUT=/tmp/dwa_parity \
#       bash scripts/cpu/dwa_parity_cifar10.sh
#
# TEACHER must be a 10-class ResNet-18-modified teacher file (squeeze.py --arch ResNet-18-modified; DWA's CIFAR
# model). Each step is skipped when its output exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python}"
DATA="${DATA:-../shared/data/cifar10}"
OUT="${OUT:-runs/dwa_parity}"
ITERS="${ITERS:-100}"
EPOCHS="${EPOCHS:-300}"
SEED="${SEED:-0}"
: "${ORIGINAL:?set ORIGINAL to a Diversity-Driven-Synthesis checkout}"
: "${TEACHER:?set TEACHER to a ResNet-18-modified CIFAR-10 teacher file}"
mkdir -p "$OUT"

[ -f "$OUT/init/tensor_0.pt" ] || "$PY" rank_select.py --teacher "$TEACHER" --data-path "$DATA" --ipc 1 \
  --selection random --seed "$SEED" --format tensor --out "$OUT/init" --quiet
[ -d "$OUT/dwa_original" ] || "$PY" bench/dwa_original_recover.py --original "$ORIGINAL" --teacher "$TEACHER" \
  --init-path "$OUT/init" --ipc 1 --iterations "$ITERS" --seed "$SEED" --out "$OUT/dwa_original"
[ -f "$OUT/dwa_ours/meta.json" ] || "$PY" recover.py --preset dwa-cifar10 --teacher "$TEACHER" --ipc 1 \
  --iterations "$ITERS" --init-path "$OUT/init" --seed "$SEED" --out "$OUT/dwa_ours" --quiet

validate() {  # set folder, results file, extra flags
  local syn="$1" res="$2"; shift 2
  [ -f "$res" ] || "$PY" validate.py --syn "$syn" --dataset CIFAR10 --teacher "$TEACHER" --preset dwa-cifar \
    --model ConvNet-3-BN-w64 --epochs "$EPOCHS" --runs 3 --seed 0 --data-path "$DATA" --results "$res" --quiet "$@"
}
validate "$OUT/dwa_original" "$OUT/dwa_original.json"
validate "$OUT/dwa_ours" "$OUT/dwa_ours.json" --baseline random --ipc 1
