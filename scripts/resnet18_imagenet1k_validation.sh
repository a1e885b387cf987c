#!/usr/bin/env bash
# Evaluate the set of scripts/resnet18_imagenet1k_synthesis.sh with DELT's protocol (decoupled.md §6.5).
# paper (§7.2, ResNet-18 student): IPC 50: 59.2 ± 0.4, IPC 10: 45.8 ± 0.1, IPC 100: 62.4 ± 0.2.
#
#   bash scripts/resnet18_imagenet1k_validation.sh               # the IPC 50 set
#   IPC=10 bash scripts/resnet18_imagenet1k_validation.sh
#   MODEL=ResNet-101 bash scripts/resnet18_imagenet1k_validation.sh   # the ResNet-101 column (66.1 ± 0.5 at IPC 50)
#
# validate.py --preset delt: a fresh $MODEL learns KL(teacher/T || student/T) with T 20 on every view (RandAugment
# m6 n2, RRC(0.25-1), flip, CutMix every batch) of the synthetic images, 300 epochs, AdamW lr 1e-3 wd 0.01 (none on
# norm/bias), half cosine, batch by DELT's IPC rule (IPC 50: 200, IPC 10: 100); test view Resize 256 -> CenterCrop
# 224. The teacher is the synthesis teacher ($TEACHER). Beside the set, the same recipe trains on a random real
# subset of the same IPC (--baseline random), so the gain over real images is measured with the same seeds.
# One validate.py call per seed of DELT's scripts (3407, 4663, 2897; validate.py run i uses seed + i, so explicit
# seeds need one call each), results in $OUT/validate_<MODEL>_ipc<IPC>_seed<seed>.json; a summary of all the seeds
# follows. Reported: top-1 after the last epoch (DELT prints the best of its periodic evaluations, §6.6).
# Cost [rough estimate, not measured]: ~6 GPU-hours per seed at IPC 50 (set + baseline), ~1.2 at IPC 10.
#
# Environment: DATA (data/imagenet), OUT (results/delt_imagenet1k), TEACHER (teachers/imagenet_resnet18_v1.pt),
# IPC (50), SYN (the synthesis script's $OUT/IPC<IPC>_4K_500_medium), SEEDS ("3407 4663 2897"), MODEL (ResNet-18),
# PYTHON (python), LAUNCH (PYTHON; e.g. "torchrun --standalone --nproc_per_node 8": DDP students), WORKERS (8).
# Re-running resumes: a seed whose run is recorded in its results CSV is not trained again.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${DATA:-data/imagenet}"
OUT="${OUT:-results/delt_imagenet1k}"
TEACHER="${TEACHER:-teachers/imagenet_resnet18_v1.pt}"
IPC="${IPC:-50}"
PYTHON="${PYTHON:-python}"
MODEL="${MODEL:-ResNet-18}"
SEEDS="${SEEDS:-3407 4663 2897}"
WORKERS="${WORKERS:-8}"

fail() { echo "error: $1" >&2; exit 2; }

case "$IPC" in
  '' | *[!0-9]* | 0*) fail "IPC must be a positive integer, got '$IPC'" ;;
esac
if [ "$IPC" -eq 1 ]; then DEFAULT_SYN="$OUT/IPC1_4K_medium"; else DEFAULT_SYN="$OUT/IPC${IPC}_4K_500_medium"; fi
SYN="${SYN:-$DEFAULT_SYN}"
read -r -a SEED_LIST <<< "$SEEDS"
[ "${#SEED_LIST[@]}" -gt 0 ] || fail "SEEDS is empty"
for s in "${SEED_LIST[@]}"; do
  case "$s" in '' | *[!0-9]*) fail "SEEDS must be integers, got '$s'" ;; esac
done
[ -f "$SYN/meta.json" ] || fail "no synthetic set at '$SYN' (run IPC=$IPC bash scripts/resnet18_imagenet1k_synthesis.sh first, or set SYN=<folder>)"
[ -f "$TEACHER" ] || fail "teacher '$TEACHER' not found (the synthesis script writes it; or set TEACHER=<file>)"
[ -d "$DATA/val" ] || fail "no ImageNet-1K validation split at '$DATA/val' (set DATA=<folder>)"
if [ -n "${LAUNCH:-}" ]; then read -r -a RUN <<< "$LAUNCH"; else RUN=("$PYTHON"); fi

RESULTS=()
for seed in "${SEED_LIST[@]}"; do
  result="$OUT/validate_${MODEL}_ipc${IPC}_seed$seed.json"
  "${RUN[@]}" validate.py --syn "$SYN" --teacher "$TEACHER" --preset delt --model "$MODEL" --ipc "$IPC" \
    --data-path "$DATA" --baseline random --runs 1 --seed "$seed" --workers "$WORKERS" --results "$result"
  RESULTS+=("$result")
done

# Mean ± population std over the seeds, per arm (the set and the random baseline).
"$PYTHON" - "${RESULTS[@]}" <<'PY'
import json
import statistics
import sys

arms = {}
for path in sys.argv[1:]:
    with open(path) as f:
        report = json.load(f)
    for arm, summary in report["by_model"][report["model"]].items():
        arms.setdefault(arm, []).extend(summary["runs"])
for arm, accs in arms.items():
    print(f"{arm:8s} {100 * statistics.mean(accs):6.2f} ± {100 * statistics.pstdev(accs):.2f} %  "
          f"({len(accs)} seeds, last epoch)")
PY
