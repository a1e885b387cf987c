#!/usr/bin/env bash
# Every stage's hot loop briefly in fp32 and in bf16 on one GPU: seconds per iteration and peak GPU memory of each,
# alternated in one process per stage (bench/amp_speed.py). About 5 minutes on one H100; every call is capped so the
# whole script stays under 8 minutes.
#
#   bash scripts/gpu/bench.sh [OUT]                 # default OUT=runs/gpu_bench
#   bash scripts/gpu/bench.sh --dry-run [OUT]       # print the commands, run nothing
#   bash scripts/gpu/bench.sh --device cpu [OUT]    # CPU fallback: the same calls at tiny sizes (checks the script)
#   MODE=fp16 bash scripts/gpu/bench.sh             # fp16 (with a GradScaler) instead of bf16 where a stage allows it
#
# Writes OUT/<name>.json (bench/amp_speed.py --json) and OUT/summary.tsv: name, stage, s/it fp32, s/it low
# precision, peak MiB fp32, peak MiB low precision, speedup. The data are random tensors of each dataset's shape (no
# download, nothing outside the repository), the networks randomly initialised (a teacher's BN statistics warmed on
# noise): speed and memory do not depend on the values.
#   condense  IDC inner iteration, CIFAR-10 shapes, ipc 10, f 2, the paper's 64 real / class and 500-sample update
#   distill   one SPEED outer iteration, CIFAR-10 IPC 10, syn_steps 20
#   recover   SRe2L pixel steps on a ResNet-18 at 224 px, 100 images (1000 classes)
#   train     one epoch of the evaluation / expert loop (utils.train, as validate.py and buffer.py), ConvNet-3
#   relabel   is a teacher forward only: recover's forward under the same autocast covers it
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python}"
DEVICE=cuda
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --device) DEVICE="$2"; shift 2 ;;
    -h|--help) sed -n 2,21p "$0"; exit 0 ;;
    -*) echo "error: unknown option $1 (--dry-run, --device cuda|cpu)" >&2; exit 2 ;;
    *) break ;;
  esac
done
OUT="${1:-runs/gpu_bench}"
MODE="${MODE:-bf16}"
CAP="${CAP:-90}"          # seconds per call on a GPU; 5 calls stay under 8 minutes with start-up included
[ "$DEVICE" = cpu ] && CAP="${CPU_CAP:-900}"   # the fallback checks the plumbing, on a CPU that may be shared

if [ "$DEVICE" = cpu ]; then   # tiny sizes: the script's plumbing, not a measurement
  CONDENSE=(--ipc 1 --per-class 4 --batch-real 4 --n-data 8)
  DISTILL=(--ipc 1 --syn-steps 2)
  RECOVER=(--res 32 --classes 10 --batch 10 --recover-iters 1)
  TRAIN=(--per-class 4)
  REPS=(--iters 1 --rounds 1 --threads 1)
else
  CONDENSE=(--dataset CIFAR10 --ipc 10 --per-class 200 --batch-real 64 --n-data 500)
  DISTILL=(--ipc 10 --syn-steps 20)
  RECOVER=(--res 224 --classes 1000 --batch 100 --recover-iters 10)
  TRAIN=(--per-class 500)
  REPS=(--iters 5 --rounds 2)
fi

run() {  # name, stage flags...
  local name="$1"; shift
  local cmd=("$PY" bench/amp_speed.py "$@" --device "$DEVICE" --mode "$MODE" "${REPS[@]}" --json "$OUT/$name.json")
  if [ "$DRY" = 1 ]; then
    printf '%q ' timeout "$CAP" "${cmd[@]}"; echo
    return 0
  fi
  echo "== $name" >&2
  timeout "$CAP" "${cmd[@]}" > "$OUT/$name.log" 2>&1 || echo "warning: $name failed or ran past ${CAP}s (see $OUT/$name.log)" >&2
  tail -1 "$OUT/$name.log" >&2
}

[ "$DRY" = 1 ] || mkdir -p "$OUT"
if [ "$DRY" = 0 ] && [ "$DEVICE" != cpu ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: no CUDA GPU visible; use --device cpu for the fallback run" >&2; exit 2; }
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true
fi
run condense --stage condense "${CONDENSE[@]}"
run distill --stage distill "${DISTILL[@]}"
run recover --stage recover "${RECOVER[@]}"
run recover_dwa --stage recover --method dwa "${RECOVER[@]}"
run train --stage train "${TRAIN[@]}"
[ "$DRY" = 1 ] && exit 0

"$PY" - "$OUT" "$MODE" <<'EOF'
import json, sys
from pathlib import Path
out, mode = Path(sys.argv[1]), sys.argv[2]
rows = ["name\tstage\ts_per_it_fp32\ts_per_it_" + mode + "\tpeak_mib_fp32\tpeak_mib_" + mode + "\tspeedup"]
for name in ("condense", "distill", "recover", "recover_dwa", "train"):
    f = out / f"{name}.json"
    if not f.is_file():
        rows.append(f"{name}\t-\tmissing\tmissing\t-\t-\t-")
        continue
    d = json.loads(f.read_text())
    s = d["summary"]
    peak = lambda k: "-" if s[k]["peak_mib"] is None else f"{s[k]['peak_mib']:.0f}"
    rows.append(f"{name}\t{d['args']['stage']}\t{s['off']['sec_per_it']:.4f}\t{s[mode]['sec_per_it']:.4f}\t"
                f"{peak('off')}\t{peak(mode)}\t{d['speedup']:.2f}")
(out / "summary.tsv").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
