#!/usr/bin/env bash
# kill -9 a DREAM condensation after its third checkpoint, re-run the same command, and compare the final set with
# an uninterrupted run of the same seed (they must be bitwise equal). Fashion-MNIST, tiny scale, ~30 s.
#   bash scripts/idc/kill_resume_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-runs/killtest}"
PY="${PYTHON:-python}"
ARGS=(-d FashionMNIST --data-path data --ipc 1 -f 2 --reproduce --train-subset 20 --outer-iterations 6
      --inner-loop 2 --batch-real 8 --n-data 16 --lr-img 1e-3 --dream --seed 3 --ckpt-every 1 --quiet)
rm -rf "$OUT"; mkdir -p "$OUT"
"$PY" condense.py "${ARGS[@]}" --out "$OUT/straight"
"$PY" condense.py "${ARGS[@]}" --out "$OUT/killed" &
pid=$!
until [ -f "$OUT/killed/log.csv" ] && [ "$(wc -l < "$OUT/killed/log.csv")" -ge 4 ]; do sleep 0.2; done
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
"$PY" - "$OUT" <<'PY'
import sys, torch
ck = torch.load(f"{sys.argv[1]}/killed/ckpt.pt", weights_only=True)
print(f"killed with -9; checkpoint at outer iteration {ck['it']}")
PY
"$PY" condense.py "${ARGS[@]}" --out "$OUT/killed"
"$PY" - "$OUT" <<'PY'
import sys, torch
a = torch.load(f"{sys.argv[1]}/straight/synset.pt", weights_only=True)["tensors"]["images"]
b = torch.load(f"{sys.argv[1]}/killed/synset.pt", weights_only=True)["tensors"]["images"]
print("resumed set bitwise equal to the uninterrupted one:", torch.equal(a, b))
sys.exit(0 if torch.equal(a, b) else 1)
PY
echo "log rows: $(cut -d, -f1 "$OUT/killed/log.csv" | tail -n +2 | tr '\n' ' ')"
