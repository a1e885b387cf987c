#!/usr/bin/env bash
# recover.py survives kill -9: kill a DWA run after its first units are written, re-run the same command, and compare
# every image with an uninterrupted run's (byte for byte).
#
#   bash scripts/cpu/recover_kill_resume.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python}"
DATA="${DATA:-../shared/data/cifar10}"
W="${1:-/tmp/recover_kill}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" DDT_CACHE="${DDT_CACHE:-/tmp/ddtcache}"
rm -rf "$W" && mkdir -p "$W"
"$PY" squeeze.py --dataset CIFAR10 --data-path "$DATA" --arch ConvNet-2-BN-w16 --train-per-class 100 \
  --test-per-class 20 --epochs 1 --out "$W/teacher.pt" --quiet --device cpu
"$PY" rank_select.py --teacher "$W/teacher.pt" --data-path "$DATA" --ipc 6 --selection random --out "$W/init" --quiet
run() { "$PY" recover.py --teacher "$W/teacher.pt" --method dwa --init-path "$W/init" --ipc 6 --iterations 300 \
          --out "$1" --quiet; }
run "$W/straight"
run "$W/killed" & pid=$!
while [ "$(find "$W/killed/.units" -name '*.json' 2>/dev/null | wc -l)" -lt 2 ]; do sleep 0.2; done
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
echo "killed after $(find "$W/killed/.units" -name '*.json' | wc -l) of 6 units; $(find "$W/killed" -name '*.jpg' | wc -l) images on disk"
run "$W/killed"
if diff -r "$W/straight" "$W/killed" -x '*.csv' -x '.units' -x 'meta.json' -x grid.png > /dev/null; then
  echo "resumed images byte-identical to the uninterrupted run: True ($(find "$W/killed" -name '*.jpg' | wc -l) images)"
else
  echo "resumed images byte-identical to the uninterrupted run: False"; exit 1
fi
