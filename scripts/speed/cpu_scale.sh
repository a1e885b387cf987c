#!/usr/bin/env bash
# The CPU-scale MTT and SPEED runs behind docs/RESULTS.md: Fashion-MNIST and the CIFAR-10 JPEG copy (ZCA), IPC 1 and
# 10, each set validated with its method's protocol (--preset mtt|speed) next to a random real subset of the same
# storage IPC, 3 seeds. Two single-threaded jobs at a time (JOBS).
#
#   bash scripts/speed/cpu_scale.sh                      # everything: buffers, 12 distillations, 12 validations
#   bash scripts/speed/cpu_scale.sh one fmnist speed 1   # one distillation + its validation
#
# The CPU scale (the paper's is in scripts/speed/<row>.sh):
# - networks: ConvNet-3-w32 (width 32 instead of 128) for experts, student and evaluation;
# - experts: 1000 training images per class, 5 experts x 15 epochs (paper: all images, 100 x 50);
# - distillation: ITERS (300) iterations, syn_steps 15, max_start_epoch 10, expert_epochs 2, lr_lr 1e-7; batch_syn
#   32 (IPC 1) / 50 (IPC 10); SPEED keeps its preset's code shape and budget (Fashion-MNIST: the derived
#   defaults, CIFAR-10: the published rows); MTT lr_img 100 on Fashion-MNIST, its CIFAR-10 preset's 1000 in ZCA space;
# - SPEED twice: its defaults (CIFAR-10's published rows: the reference, dense codes trained, pruned to top-k when
#   saved; Fashion-MNIST's derived rows: the same for the first half, then --topk-share 0.5, docs/SPEED_MTT.md) and
#   speed-tk, --topk-from ITERS/2 given explicitly (SPEED_EXTRA="--topk-share 0" gives the reference on a derived row);
# - validation: 300 epochs of the method's protocol (x0.1 after epoch 150), 2000 test images (200 per class).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib/parallel.sh
PY="${PYTHON:-python}"
OUT="${OUT:-runs/cpu_speed}"
ITERS="${ITERS:-300}"
JOBS="${JOBS:-2}"
SPEED_EXTRA="${SPEED_EXTRA:-}"   # more distill.py arguments for the SPEED rows, separated by blanks
export OMP_NUM_THREADS=1
NET=ConvNet-3-w32

data_args() {  # dataset key -> DATA_ARGS, the distill/validate dataset arguments (an array: paths may hold spaces)
  case "$1" in
    fmnist) DATA_ARGS=(--dataset FashionMNIST --data-path "${FMNIST:-data}") ;;
    cifar10) DATA_ARGS=(--dataset CIFAR10 --data-path "${CIFAR:-../shared/data/cifar10}") ;;
    *) echo "unknown dataset '$1' (fmnist or cifar10)" >&2; exit 2 ;;
  esac
}

buffers() {
  local d zca
  for d in fmnist cifar10; do
    zca=(); [ "$d" = cifar10 ] && zca=(--zca)
    data_args "$d"
    "$PY" buffer.py "${DATA_ARGS[@]}" "${zca[@]}" --model "$NET" --train-subset 1000 --num-experts 5 \
      --train-epochs 15 --save-interval 5 --test-per-class 100 --eval-every 5 --buffer-path "$OUT/buffers" --quiet
  done
}

one() {  # dataset method ipc; method: mtt, speed (the reference) or speed-tk (speed with --topk-from ITERS/2)
  local d="$1" m="$2" ipc="$3" zca=() batch=50 extra=() method="$2" speed_extra=()
  # SPEED_EXTRA is split at blanks (newlines included) into separate arguments, without glob expansion
  read -r -d '' -a speed_extra <<< "$SPEED_EXTRA" || true
  [ "$d" = cifar10 ] && zca=(--zca)
  [ "$ipc" = 1 ] && batch=32
  if [ "$m" = mtt ]; then
    extra=(--lr-img 100); [ "$d" = cifar10 ] && extra=(--lr-img 1000)
  elif [ "$m" = speed-tk ]; then
    method=speed; extra=(--topk-from "$((ITERS / 2))" "${speed_extra[@]}")
  else
    extra=("${speed_extra[@]}")
  fi
  local set="$OUT/$d/${m}_ipc$ipc"
  data_args "$d"
  "$PY" distill.py "${DATA_ARGS[@]}" "${zca[@]}" --method "$method" --ipc "$ipc" --model "$NET" \
    --buffer-path "$OUT/buffers" --iterations "$ITERS" --syn-steps 15 --max-start-epoch 10 --batch-syn "$batch" \
    --lr-lr 1e-7 "${extra[@]}" --seed 0 --ckpt-every 25 --out "$set" --quiet
  "$PY" validate.py --syn "$set" "${DATA_ARGS[@]}" --preset "$method" --model "$NET" --epochs 300 --runs 3 --seed 0 \
    --baseline random --test-per-class 200 --quiet
}

case "${1:-all}" in
  buffers) buffers ;;
  one) shift; one "$@" ;;
  all)
    buffers
    # the 12 rows, JOBS at a time, in this order: IPC 1 before 10, speed-tk, speed, mtt, Fashion-MNIST first;
    # their output goes to the terminal as before
    PAR_JOBS="$JOBS"
    for ipc in 1 10; do for m in speed-tk speed mtt; do for d in fmnist cifar10; do
      par_run - one "$d" "$m" "$ipc"
    done; done; done
    par_wait
    ;;
  *) echo "usage: $0 [all|buffers|one DATASET METHOD IPC]" >&2; exit 2 ;;
esac
