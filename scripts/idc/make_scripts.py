#!/usr/bin/env python3
"""Write one bash script per row of IDC's results table (idc_dream.md §8.1; combinations from §3).

    python scripts/idc/make_scripts.py          # (re)write scripts/idc/<dataset>_f<F>_ipc<IPC>.sh
    python scripts/idc/make_scripts.py --check  # exit 1 if a written script differs from what this file makes

Plain Python, no dependencies. Edit the tables below, never the generated scripts. The hand-written scripts in this
folder (cpu_*.sh, cpu_scale_all.sh) are not touched.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from generated import comment, generate  # noqa: E402  (scripts/generated.py)

# key: (condense.py dataset arguments, readable name, classes, resolution, default DATA, evaluation network)
DATASETS = {
    "cifar10": ("-d cifar10", "CIFAR-10", 10, 32, "data", "ConvNet-3"),
    "svhn": ("-d svhn", "SVHN", 10, 32, "data", "ConvNet-3"),
    "mnist": ("-d mnist", "MNIST", 10, 28, "data", "ConvNet-3"),
    "fmnist": ("-d fashion", "Fashion-MNIST", 10, 28, "data", "ConvNet-3"),
    "cifar100": ("-d cifar100", "CIFAR-100", 100, 32, "data", "ConvNet-3"),
    "imagenet10": ("-d imagenet --nclass 10", "ImageNet-10", 10, 224, "data/imagenet", "ResNetAP-10"),
    "imagenet100": ("-d imagenet --nclass 100", "ImageNet-100", 100, 224, "data/imagenet", "ResNetAP-10"),
}

# The README table (idc_dream.md §8.1), top-1 %: PAPER[key][(factor, ipc)].
PAPER = {
    "cifar10": {(1, 1): 36.7, (2, 1): 50.6, (1, 10): 58.3, (2, 10): 67.5, (1, 50): 69.5, (2, 50): 74.5},
    "svhn": {(1, 1): 46.7, (2, 1): 68.5, (1, 10): 77.0, (2, 10): 87.5, (1, 50): 87.9, (2, 50): 90.1},
    "mnist": {(1, 1): 88.9, (2, 1): 94.2, (1, 10): 98.0, (2, 10): 98.4, (1, 50): 98.8, (2, 50): 99.1},
    "fmnist": {(1, 1): 70.7, (2, 1): 81.0, (1, 10): 85.3, (2, 10): 86.0, (1, 50): 89.1, (2, 50): 86.2},
    "cifar100": {(1, 10): 36.6, (2, 10): 45.1, (1, 20): 41.5, (2, 20): 49.0},
    "imagenet10": {(1, 10): 61.4, (3, 10): 72.8, (1, 20): 65.5, (3, 20): 76.6},
    "imagenet100": {(1, 10): 29.2, (3, 10): 46.7, (1, 20): 34.5, (3, 20): 53.7},
}

PAPER_NOTES = {
    ("cifar10", 2, 1): "[uncertain] later papers cite the IDC paper's value as 50.0 ± 0.4 (idc_dream.md §8.1)",
    ("fmnist", 2, 50): "as printed in the README, below IDC-I's 89.1 (idc_dream.md §8.1)",
}

# What `condense.py --reproduce` sets for the dataset (REPRODUCE in condense.py, idc_dream.md §3).
SETTINGS = {
    "cifar10": "ConvNet-3, metric mse, base lr_img 5e-3, n_data 2000, 2000 outer x 100 inner iterations",
    "svhn": "ConvNet-3, metric mse, base lr_img 5e-3, n_data 500, 2000 outer x 100 inner iterations",
    "mnist": "ConvNet-3, metric l1, base lr_img 1e-4, n_data 500, 2000 outer x 100 inner iterations",
    "fmnist": "ConvNet-3, metric l1, base lr_img 1e-4 (x (28/32)^2 by the reference's size rule), n_data 500, "
              "2000 outer x 100 inner iterations",
    "cifar100": "ConvNet-3, metric mse, base lr_img 5e-3, n_data 2000, 2000 outer x 100 inner iterations",
    "imagenet10": "ResNetAP-10, metric l1, base lr_img 3e-3, n_data 500, 10 real epochs after every network "
                  "re-init (early 10), 500 outer x 100 inner iterations",
    "imagenet100": "ResNetAP-10, metric l1, base lr_img 1e-3, net lr 0.1 / wd 1e-4, batch_real 128, n_data 500, "
                   "pretrained networks at epoch 5 (pt_from 5), 500 outer x 100 inner iterations",
}

# GPU-time hints. Published figures are cited; everything else is an order of magnitude, not a measurement.
GPU_HINT = {
    "cifar10": "no published condensation time; 2,000,000 class matching steps plus ~410M real samples of network "
               "updates: order of 10 GPU-hours on one modern GPU [rough estimate, not measured]",
    "svhn": "no published condensation time; 2,000,000 class matching steps plus ~100M real samples of network "
            "updates: several GPU-hours on one modern GPU [rough estimate, not measured]",
    "mnist": "no published condensation time; 2,000,000 class matching steps plus ~100M real samples of network "
             "updates: several GPU-hours on one modern GPU [rough estimate, not measured]",
    "fmnist": "no published condensation time; 2,000,000 class matching steps plus ~100M real samples of network "
              "updates: several GPU-hours on one modern GPU [rough estimate, not measured]",
    "cifar100": "no published condensation time; 20,000,000 class matching steps (10x CIFAR-10): order of days "
                "on one modern GPU [rough estimate, not measured]",
    "imagenet10": "IDC's author: about 8 h on one RTX 3090 to reach the best data (IDC issue #1, idc_dream.md "
                  "§8.3); the full preset (500 outer iterations, each with 10 real epochs) takes longer. The "
                  "ImageNet-10 train split is held on the GPU as uint8 (~2 GB)",
    "imagenet100": "IDC ran each of its 5 phases on one RTX 3090 with 23 GB (IDC issue #5, idc_dream.md §8.3); "
                   "this single run does the matching work of all 5 phases in sequence (~5x one phase) and "
                   "holds the whole ImageNet-100 train split on the GPU as uint8 (~19 GB): use an 80 GB-class GPU",
}

ROWS = [(k, f, ipc) for k in ("cifar10", "svhn", "mnist", "fmnist") for ipc in (1, 10, 50) for f in (1, 2)]
ROWS += [("cifar100", f, ipc) for ipc in (10, 20) for f in (1, 2)]
ROWS += [(k, f, ipc) for k in ("imagenet10", "imagenet100") for ipc in (10, 20) for f in (1, 3)]


def imagenet_epochs(decoded: int, classes: int) -> int:
    """IDC test.py's ImageNet epochs from the decoded images per class (idc_dream.md §5 item 7)."""
    e = 3000 if decoded <= 1 else 2000 if decoded <= 10 else 1500 if decoded <= 50 else 1000 if decoded <= 200 \
        else 500 if decoded <= 500 else 300
    return (2 * e // 3) // 100 * 100 if classes >= 100 else e


def special_notes(key: str, f: int, ipc: int) -> list[str]:
    notes = []
    if key == "mnist" and f > 1:
        notes.append("MNIST with f > 1: matching augmentation color_crop, no CutMix in network updates; "
                     "evaluation without CutMix (idc_dream.md §3)")
    if key == "svhn" and f == 1 and ipc == 1:
        notes.append("SVHN IDC-I ipc 1: evaluation keeps cutout and drops CutMix (idc_dream.md §3; validate.py "
                     "--preset idc does this)")
    if key.startswith("imagenet") and f >= 3 and ipc >= 20:
        notes.append("f 3, ipc 20 on ImageNet: bound decoding during condensation (at most 128 decoded images per "
                     "class per step); evaluation decodes single (idc_dream.md §1.2)")
    return notes


def header(key: str, f: int, ipc: int, row: str) -> list[str]:
    dargs, name, classes, res, data, model = DATASETS[key]
    method = "IDC" if f > 1 else "IDC-I"
    decoded = ipc * f * f
    epochs = imagenet_epochs(decoded, classes) if key.startswith("imagenet") else 1000
    paper = f"paper: {PAPER[key][(f, ipc)]} (IDC README)"
    note = PAPER_NOTES.get((key, f, ipc))
    lines = [
        f"{method} on {name}: factor {f}, {ipc} stored image(s) per class ({decoded} decoded per class), "
        f"{classes} classes.",
        paper + (f"; {note}" if note else ""),
        "Generated by scripts/idc/make_scripts.py (edit that file, then re-run it; do not edit this script).",
        "",
        f"Condensation: condense.py --reproduce (idc_dream.md §3): {SETTINGS[key]};",
        f"  init {'mix (real images tiled f x f)' if f > 1 else 'random (the first images of each class)'}.",
    ]
    lines += [f"  {n}." for n in special_notes(key, f, ipc)]
    lines += [
        f"Evaluation: validate.py --preset idc (idc_dream.md §5): {model}, {epochs} epochs, multistep lr, RUNS "
        "seeds,",
        f"  beside a random and a herding real subset of {ipc} image(s) per class (same recipe and seeds).",
    ]
    if key == "imagenet100":
        lines += [
            "ImageNet-100: IDC pre-trained 10 networks (pretrain.py, 5 epochs) and condensed in 5 independent "
            "20-class",
            "  phases (condense_mp.py). condense.py has no phase option: this script pre-trains the 10 networks "
            "once",
            "  (skipped for seeds whose checkpoint exists) and then condenses all 100 classes in ONE run, which is "
            "not",
            "  the same algorithm as five 20-class phases (idc_dream.md §9.1 item 15); the per-class real batch is "
            "also",
            "  128 here where condense_mp hard-codes 64. Needs a large GPU.",
        ]
    if key.startswith("imagenet"):
        lines += ["ImageNet evaluation: --model ResNetAP-10 is passed explicitly (validate.py's default at 224 px is",
                  "  torchvision ResNet-18), and DSA stands in for IDC's torchvision transforms (docs/IDC_DREAM.md)."]
    lines += [
        f"GPU-time hint: {GPU_HINT[key]}.",
        "",
        f"Usage: bash scripts/idc/{row}.sh",
        f"   or: sbatch scripts/slurm/condense.sbatch scripts/idc/{row}.sh",
        f"  Environment: DATA ({data}), OUT (results/idc/{row}), PYTHON (python), SEED (0), RUNS (3),",
        f"  CKPT_EVERY ({'1' if key.startswith('imagenet') else '10'}: outer iterations between resume checkpoints)"
        + (", PRETRAINED ($OUT/pretrained)." if key == "imagenet100" else "."),
        "  Re-running the same command resumes (condense.py from $OUT/set/ckpt.pt, validate.py from "
        "$OUT/results.csv).",
        "  Another SEED needs another OUT: both stages refuse a folder written with other settings.",
    ]
    return lines


def script(key: str, f: int, ipc: int) -> tuple[str, str]:
    dargs, _, _, _, data, model = DATASETS[key]
    row = f"{key}_f{f}_ipc{ipc}"
    ckpt = "1" if key.startswith("imagenet") else "10"
    out = ["#!/usr/bin/env bash"]
    out += comment(header(key, f, ipc, row))
    out += [
        "set -euo pipefail",
        'cd "$(dirname "$0")/../.."',
        "",
        f'DATA="${{DATA:-{data}}}"',
        f'OUT="${{OUT:-results/idc/{row}}}"',
        'PYTHON="${PYTHON:-python}"',
        'SEED="${SEED:-0}"',
        'RUNS="${RUNS:-3}"',
        f'CKPT_EVERY="${{CKPT_EVERY:-{ckpt}}}"',
    ]
    pretrained = ""
    if key == "imagenet100":
        out += [
            'PRETRAINED="${PRETRAINED:-$OUT/pretrained}"',
            "",
            "# 1. Pre-train the 10 matching networks once (skipped when $PRETRAINED already holds them).",
            'DATA="$DATA" PRETRAINED="$PRETRAINED" PYTHON="$PYTHON" bash scripts/idc/imagenet100_pretrain.sh',
            "",
            "# 2. Condense all 100 classes in one run, loading a random pretrained network (epoch 5) at every "
            "re-init.",
        ]
        pretrained = ' --pretrained "$PRETRAINED"'
    else:
        out += ["", "# 1. Condense."]
    out += [
        f'"$PYTHON" condense.py --reproduce {dargs} -f {f} --ipc {ipc} --data-path "$DATA" --seed "$SEED" \\',
        f'  --out "$OUT/set"{pretrained} --ckpt-every "$CKPT_EVERY"',
        "",
        f"# {'3' if key == 'imagenet100' else '2'}. Evaluate with IDC's test.py protocol, beside random and "
        "herding real subsets.",
        '"$PYTHON" validate.py --syn "$OUT/set" --preset idc'
        + (f" --model {model}" if model != "ConvNet-3" else "")
        + ' --runs "$RUNS" --seed "$SEED" \\',
        '  --data-path "$DATA" --baseline random --baseline herding --results "$OUT/results.json"',
        "",
    ]
    return row, "\n".join(out)


def main(argv: list[str]) -> int:
    return generate(ROWS, script, HERE, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
