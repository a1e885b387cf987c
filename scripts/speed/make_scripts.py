#!/usr/bin/env python3
"""Write one bash script per row of SPEED's results tables (speed.md §6): CIFAR-10, CIFAR-100 and TinyImageNet at
IPC 1, 10 and 50, and the six ImageNet subsets at IPC 1 and 10 (21 rows).

    python scripts/speed/make_scripts.py          # (re)write scripts/speed/<row>_ipc<IPC>.sh
    python scripts/speed/make_scripts.py --check  # exit 1 if a written script differs from what this file makes

Each script makes the experts (buffer.py), distils (distill.py, method speed, the row's preset) and evaluates
(validate.py --preset speed). The per-row settings are read from the toolkit itself (utils.speed.SPEED_PRESETS
through distill.resolve_config), so a header can never disagree with what distill.py runs. Edit the tables below,
never the generated scripts. Hand-written scripts in this folder (kill_resume_check.sh, cpu_*.sh) are not
touched.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(ROOT))
from generated import comment, generate  # noqa: E402  (scripts/generated.py)
from gpu_estimates import UNROLL_LIMIT_GB, eval_hours, hours, image_work, size, unroll_gb  # noqa: E402

import distill  # noqa: E402  (the repository root)
from utils.datasets import get_dataset_spec  # noqa: E402
from utils.speed import SPEED_PRESETS, budget_floats, derive_config, storage_floats  # noqa: E402
from utils.trajectory import expert_dir  # noqa: E402

SUBSETS = ("imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk", "imageyellow")

# key: (buffer.py / distill.py dataset arguments, readable name, registry name, default DATA, ZCA (speed.md §1.1:
# the README commands whiten CIFAR only))
DATASETS = {
    "cifar10": ("--dataset CIFAR10", "CIFAR-10", "CIFAR10", "data", True),
    "cifar100": ("--dataset CIFAR100", "CIFAR-100", "CIFAR100", "data", True),
    "tiny": ("--dataset TinyImageNet", "TinyImageNet", "TinyImageNet", "data", False),
    **{s: (f"--dataset ImageNet --subset {s}", f"Image{s[5:].capitalize()} (ImageNet subset, speed.md §8)", s,
           "data/imagenet", False) for s in SUBSETS},
}

# SPEED README, ConvNet accuracy % (speed.md §6).
PAPER = {
    "cifar10": {1: "63.2 ± 0.1", 10: "73.5 ± 0.2", 50: "77.7 ± 0.4"},
    "cifar100": {1: "40.0 ± 0.4", 10: "45.9 ± 0.3", 50: "49.1 ± 0.2"},
    "tiny": {1: "26.9 ± 0.3", 10: "28.8 ± 0.2", 50: "30.1 ± 0.3"},
    "imagenette": {1: "66.9 ± 0.7", 10: "72.9 ± 1.5"},
    "imagewoof": {1: "38.0 ± 0.9", 10: "44.1 ± 1.4"},
    "imagefruit": {1: "43.4 ± 0.6", 10: "50.0 ± 0.8"},
    "imagemeow": {1: "43.6 ± 0.7", 10: "52.0 ± 1.3"},
    "imagesquawk": {1: "60.9 ± 1.0", 10: "71.8 ± 1.3"},
    "imageyellow": {1: "62.6 ± 1.3", 10: "70.5 ± 1.5"},
}

# 100 experts x 50 epochs, fp32 (speed.md §1.6 table).
EXPERT_GB = {"cifar10": 6.5, "cifar100": 10.3, "tiny": 17.5, **{s: 12.6 for s in SUBSETS}}
# What MTT's maintainer said about MTT's own runs (not SPEED's; mtt-distillation issue #21, speed.md §6).
MTT_FIGURES = {
    "cifar100": "MTT's CIFAR-100 IPC 10 used 8x12 GB GPUs, 1-5 h",
    "tiny": "MTT's Tiny IPC 10 used 6x12 GB GPUs, 1-5 h",
    **{s: "MTT's ImageNet-subset IPC 10 used 2x24 GB GPUs, 1-5 h" for s in SUBSETS},
}

ROWS = [(k, ipc) for k in ("cifar10", "cifar100", "tiny") for ipc in (1, 10, 50)]
ROWS += [(s, ipc) for s in SUBSETS for ipc in (1, 10)]
MISSING = {("tiny", 50)}  # in the README table, but no configuration was published (speed.md §4, §7 bug 2)

# ------------------------------------------------------------------------ rough cost model (not measured on a GPU)
# Work of one image through a 128-wide ConvNet of the resolution's depth, relative to ConvNet-3 at 32 px: the sum
# of the blocks' map areas. Unroll memory (speed.md §3.9: linear in syn_steps x batch_syn): 3.2 MB per 32-px image
# and student step, the slope of peak memory between syn_steps 4 and 8 (batch 64, CIFAR-10 IPC 10 shapes) in
# `python bench/distill_speed.py --method speed --variants ours` on a CPU, scaled by map area. Times: a guess of
# 5-10 GPU-hours for the CIFAR-10 IPC 10 row (20,000 x 60 x 128 decoded 32-px images) scaled by that work, at
# least 5 ms per student step, and of 2-4 GPU-hours for 100 CIFAR experts of 50 epochs.
MB_PER_IMAGE_STEP = 3.2


def expert_hours(spec, experts: int = 100, epochs: int = 50) -> tuple[float, float]:
    train_images = {"CIFAR10": 50000, "CIFAR100": 50000, "TinyImageNet": 100000}.get(spec.name, 13000)
    w = experts * epochs * train_images * image_work(spec.resolution) / (100 * 50 * 50000)
    return 2 * w, 4 * w


# ---------------------------------------------------------------------------------------------- header

def row_config(key: str, ipc: int):
    spec = get_dataset_spec(DATASETS[key][2])
    return spec, distill.resolve_config("speed", spec, ipc, {})


def storage_line(cfg, spec) -> str:
    scfg = distill.speed_config(cfg, spec)
    cost = storage_floats(scfg, spec.num_classes, spec.channels)
    budget = budget_floats(spec.num_classes, cfg.ipc, spec.channels, spec.resolution)
    return (f"Storage: {cost:,.0f} floats of the {budget:,}-float budget of {cfg.ipc} image(s) per class "
            f"({100 * cost / budget:.1f} %; speed.md §3.4, the toolkit's accounting: SAET + FReeNet + 1.5 floats per "
            "kept SCM entry).")


def settings_line(cfg, spec) -> str:
    ref = SPEED_PRESETS[(spec.name, cfg.ipc)]
    n = spec.num_classes * cfg.n_per_class
    return (f"preset that --dataset/--subset/--ipc select, {ref.reference_name} (speed.md §4): {cfg.model}, "
            f"N/c {cfg.n_per_class} ({n:,} coded images), "
            f"K {cfg.num_saet}, D {cfg.dim}, T {cfg.depth}, h {cfg.heads}, k {cfg.top_k}, p {cfg.patch}, "
            f"l1 {cfg.l1_weight:g}, syn_steps {cfg.syn_steps}, batch_syn {cfg.batch_syn}, max_start_epoch "
            f"{cfg.max_start_epoch}; shared values expert_epochs {cfg.expert_epochs}, {cfg.iterations:,} "
            f"iterations, lr_saet {cfg.lr_saet:g}, lr_scm {cfg.lr_scm:g}, lr_freenet {cfg.lr_freenet:g}, "
            f"lr_lr {cfg.lr_lr:g}, inner momentum {cfg.inner_momentum:g}, lr clamped >= {cfg.lr_floor:g}, "
            f"outer momentum {cfg.outer_momentum:g}.")


def ckpt_gb(cfg, spec) -> float:
    """The resume checkpoint: the dense SCM and its momentum buffer dominate (speed.md §3.9)."""
    L = (spec.resolution // cfg.patch) ** 2
    return 2 * spec.num_classes * cfg.n_per_class * cfg.heads * L * cfg.num_saet * 4 / 1e9


def ckpt_every(gb: float) -> int:
    return 50 if gb < 1 else 100 if gb < 5 else 200


def experts_lines(key: str, spec, model: str, zca: bool, epochs_needed: int) -> list[str]:
    name = DATASETS[key][1].split(" (")[0]
    folder = expert_dir("$BUFFERS", spec.name if key not in SUBSETS else "ImageNet", model, zca,
                        subset=key if key in SUBSETS else None, res=spec.resolution if key in SUBSETS else None)
    space = "ZCA (eps 0.1, fitted on the train split)" if zca else "per-channel normalisation, no ZCA"
    return [
        f"1. Experts: buffer.py (speed.md §1.5): EXPERTS {model} networks x EPOCHS epochs, SGD lr 0.01, batch 256, "
        f"DSA, SPEED's per-batch standardisation, {space}, into {folder} (~{EXPERT_GB[key]} GB for 100 experts, "
        f"§1.6). The experts are shared by every {name} row and every SEED (buffer.py keeps its own seed 0); "
        "buffer.py keeps finished files and trains only missing experts, so once they exist this step only "
        "reloads the data and exits. Let one row make them before starting the other rows of the dataset (two "
        f"buffer.py runs on one folder train the same experts twice). EPOCHS must be at least {epochs_needed} "
        "(max_start_epoch + expert_epochs).",
    ]


def header(key: str, ipc: int, row: str) -> list[str]:
    dargs, name, _, data, zca = DATASETS[key]
    spec = get_dataset_spec(DATASETS[key][2])
    lines = [
        f"SPEED on {name}: storage budget IPC {ipc} ({spec.num_classes} classes, {spec.resolution} px), one row of "
        "the SPEED README's tables (speed.md §6).",
        f"paper: {PAPER[key][ipc]} (SPEED README)",
        "Generated by scripts/speed/make_scripts.py (edit that file, then re-run it; do not edit this script).",
        "",
    ]
    if (key, ipc) in MISSING:
        return lines + missing_header(key, ipc, row, spec)
    spec, cfg = row_config(key, ipc)
    n = spec.num_classes * cfg.n_per_class
    gb = unroll_gb(spec.resolution, cfg.syn_steps * cfg.batch_syn, MB_PER_IMAGE_STEP)
    ck = ckpt_gb(cfg, spec)
    lines += experts_lines(key, spec, cfg.model, zca, cfg.max_start_epoch + cfg.expert_epochs)
    lines += [
        f"2. Distillation: distill.py, method speed, with the {settings_line(cfg, spec)}",
        f"  {storage_line(cfg, spec)}",
        f"  Unroll memory: ~{gb:.0f} GB for {cfg.syn_steps} steps x {cfg.batch_syn} images [rough estimate, "
        "scaled from a CPU measurement; not measured on a GPU]"
        + ("; so this script passes --checkpoint-unroll (each student step recomputed in the backward pass: same "
           "gradients, memory independent of syn_steps, ~1.3x compute)." if gb > UNROLL_LIMIT_GB else
           "; if the GPU runs out of memory, add --checkpoint-unroll to the distill.py line (same gradients, "
           "~1.3x compute) and start again (it is part of the run's settings)."),
        f"  Resume checkpoint $OUT/set/ckpt.pt: ~{size(ck)} (dense SCM and its momentum), written every CKPT_EVERY "
        "iterations.",
        f"3. Evaluation: validate.py --preset speed (speed.md §5.2): {cfg.model}, 1001 epochs, lr = the learned lr, "
        "x0.1 after epoch 501, batch 256, DSA, per-batch standardisation, RUNS networks (SPEED's num_eval 5), "
        f"beside a random real subset of {ipc} image(s) per class (same recipe and seeds). Reports last-epoch "
        "accuracy; the README's numbers are the best of 10 checkpoints chosen on the test set (§7 bug 12).",
    ]
    w = cfg.iterations * cfg.syn_steps * cfg.batch_syn * image_work(spec.resolution) / (20000 * 60 * 128)
    w *= 1.3 if gb > UNROLL_LIMIT_GB else 1
    floor = cfg.iterations * cfg.syn_steps * 0.005 / 3600   # >= 5 ms a student step
    distil = hours(max(5 * w, floor), max(10 * w, floor))
    e_lo, e_hi = expert_hours(spec)
    ev = eval_hours(n, spec.num_classes * ipc, spec.resolution)
    mtt = f" For comparison only, {MTT_FIGURES[key]} per distillation (speed.md §6)." if key in MTT_FIGURES else ""
    lines += [
        "GPU-time hint [rough estimate, not measured; SPEED states no compute, speed.md §6]: on one modern GPU, "
        f"experts {hours(e_lo, e_hi)} (once per dataset), distillation {distil} ({w:.1f}x a guessed "
        f"5-10 h for the CIFAR-10 IPC 10 row, by unroll work), evaluation ~{ev:.2g} GPU-hours for RUNS=5.{mtt}",
    ]
    lines += usage(key, ipc, row, data, ckpt_every(ck), ck)
    return lines


def usage(key: str, ipc: int, row: str, data: str, every: int, ck: float) -> list[str]:
    return [
        "",
        f"Usage: bash scripts/speed/{row}.sh",
        f"   or: sbatch scripts/slurm/distill.sbatch scripts/speed/{row}.sh",
        f"  Environment: DATA ({data}), BUFFERS (buffers), OUT (results/speed/{row}),",
        "  PYTHON (python), SEED (0), RUNS (5, SPEED's num_eval), EXPERTS (100), EPOCHS (50),",
        f"  CKPT_EVERY ({every}: distill.py iterations between resume checkpoints of ~{size(ck)}).",
        "  Re-running the same command resumes (buffer.py from its finished files and partial.pt, distill.py from "
        "$OUT/set/ckpt.pt, validate.py from $OUT/results.csv).",
        "  Another SEED needs another OUT: distill.py and validate.py refuse a folder written with other settings.",
    ]


def distill_accepts_explicit_tiny50() -> bool:
    """Whether distill.py runs SPEED on TinyImageNet IPC 50 when every shape flag is given (it needs no preset row
    then); the early-exit script says so either way, and --check notices when this changes."""
    cfg, _ = tiny50_suggestion()
    explicit = dict(model=cfg.model, num_saet=cfg.num_saet, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                    patch=cfg.patch, top_k=cfg.top_k, l1_weight=cfg.l1_weight, batch_syn=cfg.batch_syn,
                    syn_steps=cfg.syn_steps, max_start_epoch=cfg.max_start_epoch)
    try:
        got = distill.resolve_config("speed", get_dataset_spec("TinyImageNet"), 50, explicit)
    except Exception:  # utils.errors.UserError: no preset row to start from
        return False
    return got.n_per_class == cfg.n_per_class


def tiny50_suggestion() -> tuple[object, str]:
    """A configuration for the missing Tiny IPC 50 row, as an example only: the published Tiny IPC 10 row's code
    shape and unroll, N/c derived from the IPC 50 budget (the rule that reproduces every published N/c)."""
    ref = SPEED_PRESETS[("TinyImageNet", 10)]
    spec = get_dataset_spec("TinyImageNet")
    cfg = derive_config("TinyImageNet", 50, spec.num_classes, spec.channels, spec.resolution, patch=ref.patch,
                        num_saet=ref.num_saet, dim=ref.dim, depth=ref.depth, heads=ref.heads, top_k=ref.top_k,
                        l1_weight=ref.l1_weight, batch_syn=ref.batch_syn, syn_steps=ref.syn_steps,
                        max_start_epoch=ref.max_start_epoch, model=ref.model)
    flags = (f"--num-saet {cfg.num_saet} --dim {cfg.dim} --decoder-depth {cfg.depth} --heads {cfg.heads} --patch "
             f"{cfg.patch} --top-k {cfg.top_k} --l1-weight {cfg.l1_weight:g} --batch-syn {cfg.batch_syn} "
             f"--syn-steps {cfg.syn_steps} --max-start-epoch {cfg.max_start_epoch}")
    return cfg, flags


def missing_header(key: str, ipc: int, row: str, spec) -> list[str]:
    cfg, _ = tiny50_suggestion()
    n = spec.num_classes * cfg.n_per_class
    scm_gb = n * cfg.heads * (spec.resolution // cfg.patch) ** 2 * cfg.num_saet * 4 / 1e9
    return [
        "NO PUBLISHED CONFIGURATION: SPEED's README reports this row but networks.py has no TinyImageNet IPC 50 "
        "FReeNet (speed.md §4, §7 bug 2; open question in §9), and this toolkit does not invent one. This script "
        "exists for the table row only: it prints how to run a configuration of your own and exits 1.",
        f"An example (not SPEED's, and not comparable with the {PAPER[key][ipc]}): the Tiny IPC 10 row's code shape "
        f"and unroll with N/c derived from the IPC 50 budget: N/c {cfg.n_per_class} ({n:,} coded images; the dense "
        f"SCM alone is ~{scm_gb:.0f} GB, x3 with its gradient and momentum). MTT's Tiny IPC 50 unroll (80 steps x "
        "300 images) is another choice for syn_steps / batch_syn.",
        "Experts as for the other Tiny rows: buffer.py --dataset TinyImageNet --num-experts 100 --train-epochs 50.",
        "",
        f"Usage: bash scripts/speed/{row}.sh prints those commands with DATA ({DATASETS[key][3]}), BUFFERS (buffers), "
        f"OUT (results/speed/{row}), PYTHON (python) and SEED (0) from the environment, then exits 1.",
    ]


# ---------------------------------------------------------------------------------------------- script

def variables(key: str, row: str, every: int | None) -> list[str]:
    """The environment block; `every` None: only what the early-exit script prints."""
    lines = [
        f'DATA="${{DATA:-{DATASETS[key][3]}}}"',
        'BUFFERS="${BUFFERS:-buffers}"',
        f'OUT="${{OUT:-results/speed/{row}}}"',
        'PYTHON="${PYTHON:-python}"',
        'SEED="${SEED:-0}"',
    ]
    if every is not None:
        lines += ['RUNS="${RUNS:-5}"', f'CKPT_EVERY="${{CKPT_EVERY:-{every}}}"', 'EXPERTS="${EXPERTS:-100}"',
                  'EPOCHS="${EPOCHS:-50}"']
    return lines


def missing_body(key: str, ipc: int, row: str) -> list[str]:
    dargs = DATASETS[key][0]
    _, flags = tiny50_suggestion()
    return [
        *variables(key, row, None),
        "",
        'echo "error: SPEED publishes no TinyImageNet IPC 50 configuration (speed.md §4, §7 bug 2), although its '
        f'README reports {PAPER[key][ipc]}." >&2',
        'echo "This script does not invent one. To distil this budget anyway, choose every SPEED setting yourself," '
        '>&2',
        'echo "e.g. the Tiny IPC 10 shapes with N/c derived from the IPC 50 budget (not SPEED\'s configuration):" >&2',
        f'echo "  $PYTHON buffer.py {dargs} --num-experts 100 --train-epochs 50 --data-path $DATA --buffer-path '
        '$BUFFERS" >&2',
        f'echo "  $PYTHON distill.py {dargs} --ipc {ipc} {flags} --data-path $DATA --buffer-path $BUFFERS --out '
        '$OUT/set --seed $SEED --checkpoint-unroll" >&2',
        ('echo "(shape flags without --n-per-class make distill.py derive N/c from the budget.)" >&2'
         if distill_accepts_explicit_tiny50() else
         'echo "Note: this version of distill.py refuses that command too (its SPEED preset lookup raises for '
         'TinyImageNet IPC 50 before the explicit flags are applied); it needs a change first." >&2'),
        "exit 1",
        "",
    ]


def script(key: str, ipc: int) -> tuple[str, str]:
    dargs, _, _, _, zca = DATASETS[key]
    row = f"{key}_ipc{ipc}"
    out = ["#!/usr/bin/env bash", *comment(header(key, ipc, row)),
           "set -euo pipefail",
           'cd "$(dirname "$0")/../.."',
           ""]
    if (key, ipc) in MISSING:
        return row, "\n".join(out + missing_body(key, ipc, row))
    spec, cfg = row_config(key, ipc)
    z = " --zca" if zca else ""
    gb = unroll_gb(spec.resolution, cfg.syn_steps * cfg.batch_syn, MB_PER_IMAGE_STEP)
    unroll = " --checkpoint-unroll" if gb > UNROLL_LIMIT_GB else ""
    out += [
        *variables(key, row, ckpt_every(ckpt_gb(cfg, spec))),
        "",
        "# 1. Expert trajectories (skipped when $BUFFERS already holds EXPERTS of them; resumes a partial run).",
        f'"$PYTHON" buffer.py {dargs}{z} --num-experts "$EXPERTS" --train-epochs "$EPOCHS" --data-path "$DATA" \\',
        '  --buffer-path "$BUFFERS"',
        "",
        "# 2. Distil with the row's SPEED preset (resumes from $OUT/set/ckpt.pt).",
        f'"$PYTHON" distill.py {dargs} --ipc {ipc}{z} --data-path "$DATA" --buffer-path "$BUFFERS" \\',
        f'  --out "$OUT/set" --seed "$SEED" --ckpt-every "$CKPT_EVERY"{unroll}',
        "",
        "# 3. Evaluate with SPEED's protocol, beside a random real subset of the same storage IPC.",
        '"$PYTHON" validate.py --syn "$OUT/set" --preset speed --runs "$RUNS" --seed "$SEED" \\',
        '  --data-path "$DATA" --baseline random --results "$OUT/results.json"',
        "",
    ]
    return row, "\n".join(out)


def main(argv: list[str]) -> int:
    return generate(ROWS, script, HERE, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
