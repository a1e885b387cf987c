#!/usr/bin/env bash
# DELT's ImageNet-1K synthesis with ResNet-18 (decoupled.md §5.6: DELT's scripts/resnet18_imagenet1k_synthesis.sh).
# paper (§7.2, ResNet-18 student): IPC 50: 59.2 ± 0.4, IPC 10: 45.8 ± 0.1; evaluate with
# scripts/resnet18_imagenet1k_validation.sh (same environment).
#
#   bash scripts/resnet18_imagenet1k_synthesis.sh                # IPC 50
#   IPC=10 bash scripts/resnet18_imagenet1k_synthesis.sh         # IPC 10, from the same medium folder
#   DATA=/datasets/imagenet OUT=/scratch/delt bash scripts/resnet18_imagenet1k_synthesis.sh
#
# Steps (each skipped or resumed when its output exists, so the same command continues an interrupted run):
# 1. Teacher: squeeze.py wraps torchvision's ResNet-18 IMAGENET1K_V1 weights ($WEIGHTS = resnet18-f37072fd.pth, the
#    "DEFAULT" weights DELT loads; 69.76 % top-1) into $TEACHER with ImageNet statistics, after measuring its top-1
#    on the 50,000 val images (the pre-flight check of §9.1 item 19). This machine may be offline: fetch the file
#    where there is internet (python -c "import torchvision; torchvision.models.resnet18(weights='IMAGENET1K_V1')"
#    leaves it in ~/.cache/torch/hub/checkpoints/) and copy it here. Skipped when $TEACHER exists.
# 2. Init: rank_select.py --selection medium ranks every training image by the teacher's true-class probability
#    (ranking kept in $RANKING) and copies, per class, the 50 images closest in rank to the median (§5.1) to
#    $OUT/medium_ipc50. As in DELT, smaller IPCs use the same folder: recover.py takes the first IPC files of each
#    class in name order, i.e. the IPC closest to the median. IPC > 50 selects that many instead.
# 3. Recover: recover.py --preset delt-in1k (§5.6): 4000 iterations in EarlyLate rounds of 500 (IPC 50: images
#    0-6 of a class get 4000 iterations ... 44-49 get 500, §5.3), Adam lr 0.25, batch 100 class-major, r-bn 0.01,
#    first-BN x10, RRC with the cosine crop floor 1 -> 0.08 + flip, no jitter; IPC 1 runs without EarlyLate. Output
#    $OUT/IPC<IPC>_4K_500_medium (DELT's experiment name; IPC1_4K_medium for IPC 1), JPEG quality 75 as DELT.
# Cost [rough estimate, not measured; scaled from CDA's 29 h for SRe2L-style IPC 50 x 4K on one RTX 4090, §3.2]:
# recover ~17 GPU-hours at IPC 50 (57.75 % of the image-iterations, §5.3), ~3.7 at IPC 10; ranking ~0.5 h.
#
# Sharding recover over GPUs (every split gives the same images; finished units are skipped):
#   one node:    LAUNCH="torchrun --standalone --nproc_per_node 8" bash scripts/resnet18_imagenet1k_synthesis.sh
#   Slurm array: run this script once with STEPS="teacher init", then
#                sbatch --array=0-7 scripts/slurm/recover_array.sbatch --preset delt-in1k \
#                  --teacher teachers/imagenet_resnet18_v1.pt --init-path results/delt_imagenet1k/medium_ipc50 \
#                  --ipc 50 --out results/delt_imagenet1k/IPC50_4K_500_medium
#
# Environment: DATA (data/imagenet: train/<wnid>/ and val/<wnid>/), OUT (results/delt_imagenet1k), WEIGHTS
# (~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth), TEACHER (teachers/imagenet_resnet18_v1.pt), RANKING
# (<TEACHER without .pt>_ranking.csv), IPC (50), SEED (0: each work unit's seed derives from it), PYTHON (python),
# LAUNCH (PYTHON; e.g. "torchrun --standalone --nproc_per_node 8" for squeeze and recover), WORKERS (8),
# STEPS (teacher init recover).
# A missing ImageNet folder or weights file stops the script at once with a one-line error (exit 2).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${DATA:-data/imagenet}"
OUT="${OUT:-results/delt_imagenet1k}"
WEIGHTS="${WEIGHTS:-${TORCH_HOME:-$HOME/.cache/torch}/hub/checkpoints/resnet18-f37072fd.pth}"
TEACHER="${TEACHER:-teachers/imagenet_resnet18_v1.pt}"
RANKING="${RANKING:-${TEACHER%.pt}_ranking.csv}"
IPC="${IPC:-50}"
SEED="${SEED:-0}"
PYTHON="${PYTHON:-python}"
WORKERS="${WORKERS:-8}"
STEPS="${STEPS:-teacher init recover}"

fail() { echo "error: $1" >&2; exit 2; }

# Every check before any work starts.
case "$IPC" in
  '' | *[!0-9]* | 0*) fail "IPC must be a positive integer (DELT publishes 50, 10 and 1), got '$IPC'" ;;
esac
read -r -a STEP_LIST <<< "$STEPS"
for s in "${STEP_LIST[@]}"; do
  case "$s" in teacher|init|recover) ;; *) fail "unknown step '$s' in STEPS (known: teacher init recover)" ;; esac
done
has_step() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
if ! compgen -G "$DATA/train/*/" > /dev/null || [ ! -d "$DATA/val" ]; then
  fail "no ImageNet-1K folder at '$DATA': it needs train/<wnid>/ and val/<wnid>/ (set DATA=<folder>)"
fi
if has_step teacher && [ ! -f "$TEACHER" ] && [ ! -f "$WEIGHTS" ]; then
  fail "torchvision ResNet-18 weights not found at '$WEIGHTS' (resnet18-f37072fd.pth, IMAGENET1K_V1): download them where there is internet and set WEIGHTS=<file>"
fi
if [ -n "${LAUNCH:-}" ]; then read -r -a RUN <<< "$LAUNCH"; else RUN=("$PYTHON"); fi

SELECT=$(( IPC > 50 ? IPC : 50 ))
INIT="$OUT/medium_ipc$SELECT"
if [ "$IPC" -eq 1 ]; then SYN="$OUT/IPC1_4K_medium"; else SYN="$OUT/IPC${IPC}_4K_500_medium"; fi

# 1. Teacher: the torchvision weights wrapped with their normalisation and class order (one process).
if has_step teacher && [ ! -f "$TEACHER" ]; then
  "$PYTHON" squeeze.py --arch ResNet-18 --dataset ImageNet --weights "$WEIGHTS" --data-path "$DATA" \
    --out "$TEACHER" --workers "$WORKERS"
fi

# 2. Medium-ranked real images (always one process); skipped once the selection manifest exists.
if has_step init && [ ! -f "$INIT/selection.json" ]; then
  "$PYTHON" rank_select.py --teacher "$TEACHER" --data-path "$DATA" --out "$INIT" --selection medium \
    --ipc "$SELECT" --ranking-file "$RANKING" --workers "$WORKERS"
fi

# 3. DELT synthesis (finished units are skipped).
if has_step recover; then
  "${RUN[@]}" recover.py --preset delt-in1k --teacher "$TEACHER" --init-path "$INIT" --ipc "$IPC" --out "$SYN" \
    --seed "$SEED"
  echo "synthetic set: $SYN (evaluate: IPC=$IPC bash scripts/resnet18_imagenet1k_validation.sh)"
fi
