#!/usr/bin/env bash
# Pre-train IDC's 10 ImageNet-100 matching networks (IDC's pretrain.py: ResNetAP-10, 5 epochs, lr 0.1, wd 1e-4,
# batch 128; condense.py --reproduce supplies these). Each lands in $PRETRAINED/ResNetAP-10_seed<s>/checkpoint5.pt;
# seeds that already have it are skipped, so an interrupted pre-training continues where it stopped.
# Shared by the four scripts/idc/imagenet100_*.sh rows (one pretrained folder can serve all of them).
#   DATA=data/imagenet PRETRAINED=results/idc/pretrained bash scripts/idc/imagenet100_pretrain.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-data/imagenet}"
PRETRAINED="${PRETRAINED:-results/idc/imagenet100_pretrained}"
PYTHON="${PYTHON:-python}"
missing=()
for s in 0 1 2 3 4 5 6 7 8 9; do
  if [ ! -f "$PRETRAINED/ResNetAP-10_seed$s/checkpoint5.pt" ]; then missing+=("$s"); fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  seeds="$(IFS=,; echo "${missing[*]}")"
  "$PYTHON" condense.py --pretrain --reproduce -d imagenet --nclass 100 --pt-from 5 --pretrain-seeds "$seeds" \
    --data-path "$DATA" --out "$PRETRAINED"
else
  echo "pretrained networks found in $PRETRAINED; skipping pre-training"
fi
