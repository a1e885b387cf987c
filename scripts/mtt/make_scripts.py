#!/usr/bin/env python3
"""Write one bash script per MTT row this toolkit has a preset for (distill.MTT_PRESETS): CIFAR-10, CIFAR-100 and
TinyImageNet at IPC 1, 10 and 50 (9 rows), pixels distilled with plain MTT (`distill.py --method mtt`).

    python scripts/mtt/make_scripts.py          # (re)write scripts/mtt/<row>_ipc<IPC>.sh
    python scripts/mtt/make_scripts.py --check  # exit 1 if a written script differs from what this file makes

Each script makes MTT's experts (buffer.py --no-batch-standardize, with --zca exactly where distill.MTT_ZCA says,
which also decides the expert folder), distils (distill.py --method mtt) and evaluates (validate.py --preset mtt).
The settings are read from distill.py (MTT_PRESETS, MTT_ZCA, resolve_config), so a header can never disagree with
what distill.py runs. Edit the tables below, never the generated scripts.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(ROOT))
from generated import comment, write_or_check  # noqa: E402  (scripts/generated.py)

import distill  # noqa: E402  (the repository root)
from utils.datasets import get_dataset_spec  # noqa: E402
from utils.trajectory import expert_dir  # noqa: E402

# key: (buffer.py / distill.py dataset arguments, readable name, registry name, default DATA, 100-expert size in GB
# (speed.md §1.6), train images)
DATASETS = {
    "cifar10": ("--dataset CIFAR10", "CIFAR-10", "CIFAR10", "data", 6.5, 50000),
    "cifar100": ("--dataset CIFAR100", "CIFAR-100", "CIFAR100", "data", 10.3, 50000),
    "tiny": ("--dataset TinyImageNet", "TinyImageNet", "TinyImageNet", "data", 17.5, 100000),
}

# MTT paper (Cazenavette et al., CVPR 2022), Table 1, ConvNet accuracy %. Not in speed.md (which covers only what
# SPEED shares with MTT); the same cells are quoted by later papers' comparison tables.
PAPER = {
    "cifar10": {1: "46.3 ± 0.8", 10: "65.3 ± 0.7", 50: "71.6 ± 0.2"},
    "cifar100": {1: "24.3 ± 0.3", 10: "40.1 ± 0.4", 50: "47.7 ± 0.2"},
    "tiny": {1: "8.8 ± 0.3", 10: "23.2 ± 0.2", 50: "28.0 ± 0.3"},
}

# What MTT's maintainer said about these runs (mtt-distillation issue #21, speed.md §6).
MTT_FIGURES = {
    ("cifar100", 10): "MTT's maintainer: this row used 8x12 GB GPUs, 1-5 h per distillation (speed.md §6)",
    ("tiny", 10): "MTT's maintainer: this row used 6x12 GB GPUs, 1-5 h per distillation (speed.md §6)",
}

ROWS = [(k, ipc) for k in DATASETS for ipc in (1, 10, 50)]
assert {(DATASETS[k][2], ipc) for k, ipc in ROWS} == set(distill.MTT_PRESETS), "rows and MTT_PRESETS disagree"

# ------------------------------------------------------------------------ rough cost model (not measured on a GPU)
# As in scripts/speed/make_scripts.py: work and memory scale with the ConvNet's summed map area. Unroll memory:
# 2.3 MB per 32-px image and student step, the slope of peak memory between syn_steps 4 and 8 (batch 64) in
# `python bench/distill_speed.py --method mtt --variants ours` on a CPU. Times: a guess of 5-10 GPU-hours per
# 20,000 x 60 x 128 32-px image-steps (SPEED's CIFAR-10 IPC 10 unroll), at least 5 ms per student step, and of
# 2-4 GPU-hours for 100 CIFAR experts of 50 epochs.
MB_PER_IMAGE_STEP = 2.3
UNROLL_LIMIT_GB = 60    # above this estimate the script passes --checkpoint-unroll


def map_area(res: int) -> int:
    depth = int(round(math.log2(res / 4)))
    return sum((res >> i) ** 2 for i in range(depth))


def image_work(res: int) -> float:
    return map_area(res) / map_area(32)


def unroll_gb(res: int, images_per_iteration: int) -> float:
    return images_per_iteration * MB_PER_IMAGE_STEP * image_work(res) / 1000


def hours(lo: float, hi: float) -> str:
    def f(x: float) -> str:
        return f"{x:.2g}" if x < 10 else f"{x:.0f}"
    return f"~{f(lo)} GPU-hours" if f(lo) == f(hi) else f"{f(lo)}-{f(hi)} GPU-hours"


def size(gb: float) -> str:
    return f"{gb * 1000:.2g} MB" if gb < 0.1 else f"{gb:.2g} GB"


def eval_hours(n_images: int, baseline_images: int, res: int, runs: int = 5) -> float:
    """RUNS x 1001 epochs over the set and over the random baseline, at ~23k 32-px images/s, >= 5 ms a step."""
    steps = runs * 1001 * (math.ceil(n_images / 256) + math.ceil(baseline_images / 256))
    return max(runs * 1001 * (n_images + baseline_images) * image_work(res) / 23000, steps * 0.005) / 3600


# ---------------------------------------------------------------------------------------------- header

def row_config(key: str, ipc: int):
    spec = get_dataset_spec(DATASETS[key][2])
    return spec, distill.resolve_config("mtt", spec, ipc, {}), distill.MTT_ZCA[(spec.name, ipc)]


def sharing(key: str, zca: bool) -> str:
    """The MTT rows of this dataset whose experts live in the same folder (same ZCA choice)."""
    name = DATASETS[key][2]
    same = [ipc for (d, ipc), z in sorted(distill.MTT_ZCA.items()) if d == name and z == zca]
    return f"IPC {', '.join(map(str, same))}"


def ckpt_gb(cfg, spec) -> float:
    """The resume checkpoint: the images and their momentum buffer."""
    return 2 * spec.num_classes * cfg.ipc * spec.channels * spec.resolution ** 2 * 4 / 1e9


def header(key: str, ipc: int, row: str) -> list[str]:
    dargs, name, _, data, expert_gb, train_images = DATASETS[key]
    spec, cfg, zca = row_config(key, ipc)
    n = spec.num_classes * ipc
    batch = cfg.batch_syn or n
    gb = unroll_gb(spec.resolution, cfg.syn_steps * batch)
    ck = ckpt_gb(cfg, spec)
    folder = expert_dir("$BUFFERS", spec.name, cfg.model, zca)
    space = "ZCA (eps 0.1, fitted on the train split)" if zca else "per-channel normalisation, no ZCA"
    lines = [
        f"MTT on {name}: IPC {ipc} ({spec.num_classes} classes, {spec.resolution} px), pixels distilled by plain "
        "trajectory matching with MTT's published settings.",
        f"paper: {PAPER[key][ipc]} (MTT paper, Table 1; not in speed.md)",
        "Generated by scripts/mtt/make_scripts.py (edit that file, then re-run it; do not edit this script).",
        "",
        f"1. Experts: buffer.py with MTT's recipe (speed.md §1.5 minus SPEED's §1.3): EXPERTS {cfg.model} networks "
        f"x EPOCHS epochs, SGD lr 0.01, batch 256, DSA, no per-batch standardisation (--no-batch-standardize), "
        f"{space} as distill.MTT_ZCA says for this row (the --zca of MTT's command), into {folder} "
        f"(~{expert_gb} GB for 100 experts, §1.6). BUFFERS defaults to buffers/mtt, not SPEED's buffers: the folder "
        "names are the same but SPEED's experts standardise every batch, and buffer.py refuses to mix settings in "
        "one folder. The "
        f"experts are shared by the MTT {name} rows {sharing(key, zca)} and every SEED (buffer.py keeps its own "
        "seed 0); buffer.py keeps finished files and trains only missing experts, so once they exist this step "
        "only reloads the data and exits. Let one row make them before starting the others that share them. EPOCHS "
        f"must be at least {cfg.max_start_epoch + cfg.expert_epochs} (max_start_epoch + expert_epochs).",
        f"2. Distillation: distill.py --method mtt with the preset that --dataset/--ipc select (distill.MTT_PRESETS, "
        f"from MTT's README commands / hyperparameter table): syn_steps {cfg.syn_steps}, expert_epochs "
        f"{cfg.expert_epochs}, max_start_epoch {cfg.max_start_epoch}, lr_img {cfg.lr_img:g}, lr_lr {cfg.lr_lr:g}, "
        f"lr_teacher {cfg.lr_teacher:g}, batch_syn "
        + (f"{cfg.batch_syn}" if cfg.batch_syn else f"all {n:,} images")
        + f"; {cfg.iterations:,} iterations, plain SGD in the unroll, outer momentum {cfg.outer_momentum:g}, no lr "
        f"floor, {cfg.model}, images initialised from random real images of each class (so DATA is read).",
        f"  Storage: {ipc} image(s) per class, {n * spec.channels * spec.resolution ** 2:,} floats (the budget "
        "SPEED's rows of the same IPC are held to).",
        f"  Unroll memory: ~{gb:.0f} GB for {cfg.syn_steps} steps x {batch} images [rough estimate, scaled from a "
        "CPU measurement; not measured on a GPU]"
        + ("; so this script passes --checkpoint-unroll (each student step recomputed in the backward pass: same "
           "gradients, memory independent of syn_steps, ~1.3x compute)." if gb > UNROLL_LIMIT_GB else
           "; if the GPU runs out of memory, add --checkpoint-unroll to the distill.py line (same gradients, "
           "~1.3x compute) and start again (it is part of the run's settings)."),
        f"3. Evaluation: validate.py --preset mtt (MTT's evaluate_synset, speed.md §5.2 without SPEED's "
        f"standardisation): {cfg.model}, 1001 epochs, lr = the learned lr, x0.1 after epoch 501, batch 256, DSA, "
        f"RUNS networks (MTT's num_eval 5), beside a random real subset of {ipc} image(s) per class (same recipe "
        "and seeds). Reports last-epoch accuracy.",
    ]
    w = cfg.iterations * cfg.syn_steps * batch * image_work(spec.resolution) / (20000 * 60 * 128)
    w *= 1.3 if gb > UNROLL_LIMIT_GB else 1
    floor = cfg.iterations * cfg.syn_steps * 0.005 / 3600   # >= 5 ms a student step
    distil = hours(max(5 * w, floor), max(10 * w, floor))
    ew = 100 * 50 * train_images * image_work(spec.resolution) / (100 * 50 * 50000)
    ev = eval_hours(n, n, spec.resolution)
    published = MTT_FIGURES.get((key, ipc))
    lines += [
        "GPU-time hint: " + (f"{published}. Rough" if published else "rough")
        + " estimate for one modern GPU [not measured]: experts "
        f"{hours(2 * ew, 4 * ew)} (once per expert folder), distillation {distil}, "
        f"evaluation ~{ev:.2g} GPU-hours for RUNS=5.",
        "",
        f"Usage: bash scripts/mtt/{row}.sh",
        f"   or: sbatch scripts/slurm/distill.sbatch scripts/mtt/{row}.sh",
        f"  Environment: DATA ({data}), BUFFERS (buffers/mtt), OUT (results/mtt/{row}),",
        "  PYTHON (python), SEED (0), RUNS (5, MTT's num_eval), EXPERTS (100), EPOCHS (50),",
        f"  CKPT_EVERY (50: distill.py iterations between resume checkpoints of ~{size(ck)}).",
        "  Re-running the same command resumes (buffer.py from its finished files and partial.pt, distill.py from "
        "$OUT/set/ckpt.pt, validate.py from $OUT/results.csv).",
        "  Another SEED needs another OUT: distill.py and validate.py refuse a folder written with other settings.",
    ]
    return lines


# ---------------------------------------------------------------------------------------------- script

def script(key: str, ipc: int) -> tuple[str, str]:
    dargs, _, _, data, _, _ = DATASETS[key]
    spec, cfg, zca = row_config(key, ipc)
    row = f"{key}_ipc{ipc}"
    z = " --zca" if zca else ""
    unroll = " --checkpoint-unroll" if unroll_gb(spec.resolution, cfg.syn_steps * (cfg.batch_syn or
                                                                                    spec.num_classes * ipc)) \
        > UNROLL_LIMIT_GB else ""
    out = ["#!/usr/bin/env bash", *comment(header(key, ipc, row)),
           "set -euo pipefail",
           'cd "$(dirname "$0")/../.."',
           "",
           f'DATA="${{DATA:-{data}}}"',
           'BUFFERS="${BUFFERS:-buffers/mtt}"',
           f'OUT="${{OUT:-results/mtt/{row}}}"',
           'PYTHON="${PYTHON:-python}"',
           'SEED="${SEED:-0}"',
           'RUNS="${RUNS:-5}"',
           'CKPT_EVERY="${CKPT_EVERY:-50}"',
           'EXPERTS="${EXPERTS:-100}"',
           'EPOCHS="${EPOCHS:-50}"',
           "",
           "# 1. MTT's expert trajectories (skipped when $BUFFERS already holds EXPERTS of them; resumes a partial "
           "run).",
           f'"$PYTHON" buffer.py {dargs}{z} --no-batch-standardize --num-experts "$EXPERTS" --train-epochs "$EPOCHS" '
           '\\',
           '  --data-path "$DATA" --buffer-path "$BUFFERS"',
           "",
           "# 2. Distil pixels with the row's MTT preset (resumes from $OUT/set/ckpt.pt).",
           f'"$PYTHON" distill.py {dargs} --ipc {ipc}{z} --method mtt --data-path "$DATA" --buffer-path "$BUFFERS" \\',
           f'  --out "$OUT/set" --seed "$SEED" --ckpt-every "$CKPT_EVERY"{unroll}',
           "",
           "# 3. Evaluate with MTT's protocol, beside a random real subset of the same IPC.",
           '"$PYTHON" validate.py --syn "$OUT/set" --preset mtt --runs "$RUNS" --seed "$SEED" \\',
           '  --data-path "$DATA" --baseline random --results "$OUT/results.json"',
           ""]
    return row, "\n".join(out)


def main(argv: list[str]) -> int:
    scripts = {}
    for key, ipc in ROWS:
        row, text = script(key, ipc)
        scripts[f"{row}.sh"] = text
    return write_or_check(scripts, HERE, "--check" in argv, "scripts/mtt/make_scripts.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
