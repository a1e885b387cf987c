#!/usr/bin/env bash
# kill -9 a SPEED distillation (and buffer.py while it trains) mid-run, re-run the same commands, and compare the
# final artefacts with uninterrupted runs of the same seed (they must be bitwise equal). Fashion-MNIST, tiny scale.
#   bash scripts/speed/kill_resume_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-runs/killtest_speed}"
PY="${PYTHON:-python}"
BUF=(--dataset FashionMNIST --data-path data --model ConvNet-2-w16 --train-subset 30 --num-experts 3
     --train-epochs 4 --save-interval 2 --test-per-class 10 --quiet)
DIS=(--dataset FashionMNIST --ipc 1 --model ConvNet-2-w16 --iterations 12 --syn-steps 4 --max-start-epoch 2
     --batch-syn 20 --seed 3 --ckpt-every 2 --quiet)
rm -rf "$OUT"; mkdir -p "$OUT"

wait_rows() {  # file, minimum number of lines
  until [ -f "$1" ] && [ "$(wc -l < "$1")" -ge "$2" ]; do sleep 0.1; done
}

# 1. buffer.py: kill while the second expert trains (the first is then only in partial.pt)
"$PY" buffer.py "${BUF[@]}" --buffer-path "$OUT/buf_straight"
"$PY" buffer.py "${BUF[@]}" --buffer-path "$OUT/buf_killed" &
pid=$!
wait_rows "$OUT/buf_killed/FashionMNIST/ConvNet-2-w16/log.csv" 5
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
echo "buffer.py killed with -9; files then: $(ls "$OUT/buf_killed/FashionMNIST/ConvNet-2-w16" | tr '\n' ' ')"
"$PY" buffer.py "${BUF[@]}" --buffer-path "$OUT/buf_killed"
"$PY" - "$OUT" <<'PY'
import sys
import torch
from utils.trajectory import buffer_files, load_buffer_file
a = buffer_files(f"{sys.argv[1]}/buf_straight/FashionMNIST/ConvNet-2-w16")
b = buffer_files(f"{sys.argv[1]}/buf_killed/FashionMNIST/ConvNet-2-w16")
same = [x.name for x in a] == [y.name for y in b] and all(
    all(torch.equal(p, q) for s1, s2 in zip(t1, t2) for p, q in zip(s1, s2))
    for x, y in zip(a, b) for t1, t2 in zip(load_buffer_file(x), load_buffer_file(y)))
print("resumed buffer files equal to the uninterrupted ones:", same)
sys.exit(0 if same else 1)
PY

# 2. distill.py: kill after the third checkpoint
EXP=(--buffer-path "$OUT/buf_straight")
"$PY" distill.py "${DIS[@]}" "${EXP[@]}" --out "$OUT/straight"
"$PY" distill.py "${DIS[@]}" "${EXP[@]}" --out "$OUT/killed" &
pid=$!
wait_rows "$OUT/killed/log.csv" 8
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
"$PY" - "$OUT" <<'PY'
import sys, torch
ck = torch.load(f"{sys.argv[1]}/killed/ckpt.pt", weights_only=True)
print(f"distill.py killed with -9; checkpoint at iteration {ck['it']}")
PY
"$PY" distill.py "${DIS[@]}" "${EXP[@]}" --out "$OUT/killed"
"$PY" - "$OUT" <<'PY'
import sys, torch
a = torch.load(f"{sys.argv[1]}/straight/synset.pt", weights_only=True)["tensors"]
b = torch.load(f"{sys.argv[1]}/killed/synset.pt", weights_only=True)["tensors"]
same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
print("resumed SPEED set bitwise equal to the uninterrupted one:", same)
sys.exit(0 if same else 1)
PY
echo "log rows: $(cut -d, -f1 "$OUT/killed/log.csv" | tail -n +2 | tr '\n' ' ')"
