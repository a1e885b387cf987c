#!/usr/bin/env python3
"""Write one bash script per row of the decoupled methods' result tables (decoupled.md §7): DWA (§7.1: CIFAR-10
and CIFAR-100 at IPC 10/50, Tiny-ImageNet at 50/100, ImageNet-1K at 10/50/100), DELT (§7.2: CIFAR-10, ImageNette
and Tiny-ImageNet at 1/10/50, ImageNet-100 and ImageNet-1K at 10/50/100) and SRe2L (§7.3: Tiny-ImageNet 50/100,
ImageNet-1K 10/50/100/200, and the CIFAR-100 IPC 50 number quoted there): 31 rows.

    python scripts/decoupled/make_scripts.py          # (re)write scripts/decoupled/<method>_<dataset>_ipc<N>.sh
    python scripts/decoupled/make_scripts.py --check  # exit 1 if a written script differs from what this file makes

Each script runs the row's whole pipeline: the teacher (squeeze.py), the real-image initialisation (rank_select.py,
DWA and DELT), the synthesis (recover.py --preset <row>), for SRe2L on ImageNet-1K the stored FKD soft labels
(relabel.py), and the knowledge-distillation validation (validate.py --preset <row>, beside a random real subset).
The settings quoted in the headers are read from the toolkit's own tables (recover.PRESETS through
recover.resolve_config, validate.KD_PRESETS through validate.kd_protocol, squeeze.RECIPES), so a header cannot
disagree with what the stages run. Edit the tables below, never the generated scripts.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(ROOT))
from generated import comment, generate  # noqa: E402  (scripts/generated.py)

import recover  # noqa: E402  (the repository root)
import squeeze  # noqa: E402
import validate  # noqa: E402
from utils.datasets import get_dataset_spec  # noqa: E402

METHODS = {"sre2l": "SRe2L", "dwa": "DWA", "delt": "DELT"}
TABLES = {"dwa": "§7.1 (DWA README results = paper Tables 1-2)", "delt": "§7.2 (DELT README results image)",
          "sre2l": "§7.3 (SRe2L README results image)"}


@dataclass(frozen=True)
class Data:
    registry: str          # utils.datasets name
    label: str             # readable name
    data: str              # default DATA
    train_images: int      # for the cost hints
    res: int | None = None  # a resolution other than the registry's (passed as --res where a stage needs it)


DATASETS = {
    "cifar10": Data("CIFAR10", "CIFAR-10", "data", 50_000),
    "cifar100": Data("CIFAR100", "CIFAR-100", "data", 50_000),
    "tiny": Data("TinyImageNet", "Tiny-ImageNet", "data", 100_000),
    # DELT/RDED train and evaluate ResNet-18 on ImageNette at 224 px (§6.5 "Input size R"); the registry's
    # ImageNette is the 128-px ConvNet variant, hence --res 224.
    "imagenette": Data("imagenette", "ImageNette", "data/imagenet", 13_000, res=224),
    "imagenet100": Data("ImageNet100", "ImageNet-100", "data/imagenet", 130_000),
    "in1k": Data("ImageNet", "ImageNet-1K", "data/imagenet", 1_281_167),
}


@dataclass(frozen=True)
class Teacher:
    path: str              # default TEACHER (rows with the same teacher share the file)
    flags: str             # squeeze.py flags besides --data-path/--out/--workers ("" = wrap $WEIGHTS)
    arch: str              # the teacher's (and the default student's) architecture
    note: str              # what the recipe is and where it comes from


# The ImageNet-1K teacher of all three papers: torchvision's ResNet-18 IMAGENET1K_V1, wrapped, not trained (§1.2, §2).
IN1K_TEACHER = Teacher("teachers/imagenet_resnet18_v1.pt", "", "ResNet-18",
                       "torchvision ResNet-18 IMAGENET1K_V1 (69.76 % top-1), the teacher of SRe2L, DWA and DELT "
                       "(§1.2), wrapped from $WEIGHTS with ImageNet statistics; squeeze.py measures its top-1 on the "
                       "50,000 val images first (the pre-flight check of §9.1 item 19)")
TEACHERS = {
    ("sre2l", "cifar100"): Teacher("teachers/cifar100_sre2l_resnet18m.pt", "--dataset CIFAR100 --recipe sre2l-cifar100",
                                   "ResNet-18-modified", "squeeze.py --recipe sre2l-cifar100 (§2, SRe2L "
                                   "squeeze_cifar.py; reported 78.72 % top-1)"),
    ("dwa", "cifar100"): Teacher("teachers/cifar100_dwa_resnet18m.pt", "--dataset CIFAR100 --recipe dwa-cifar100",
                                 "ResNet-18-modified", "squeeze.py --recipe dwa-cifar100 (§2, DWA "
                                 "squeeze_cifar100.py)"),
    ("dwa", "cifar10"): Teacher("teachers/cifar10_dwa_resnet18m.pt", "--dataset CIFAR10 --recipe dwa-cifar10",
                                "ResNet-18-modified", "squeeze.py --recipe dwa-cifar10 (§2, DWA squeeze_cifar10.py)"),
    ("sre2l", "tiny"): Teacher("teachers/tiny_sre2l_resnet18m_e50.pt", "--dataset TinyImageNet --recipe sre2l-tiny",
                               "ResNet-18-modified", "squeeze.py --recipe sre2l-tiny (§2, zeyuanyin/tiny-imagenet; "
                               "SRe2L used the 50-epoch model, 59.57 % top-1)"),
    ("dwa", "tiny"): Teacher("teachers/tiny_dwa_resnet18m_e100.pt",
                             "--dataset TinyImageNet --recipe sre2l-tiny --epochs 100", "ResNet-18-modified",
                             "squeeze.py --recipe sre2l-tiny --epochs 100 (§2: DWA's resnet18_E100 is probably the "
                             "100-epoch model of that recipe [inferred]; reported 60.23 %)"),
    ("delt", "cifar10"): Teacher("teachers/cifar10_rded_resnet18m.pt",
                                 "--dataset CIFAR10 --recipe rded --arch ResNet-18-modified", "ResNet-18-modified",
                                 "squeeze.py --recipe rded --arch ResNet-18-modified: RDED's observer recipe is "
                                 "unpublished (§2 [uncertain]); the toolkit's stand-in (SGD 0.1/0.9/5e-4, batch 128, "
                                 "200 epochs, cosine, crop+flip, ImageNet statistics; RDED reports 93.86 %)"),
    ("delt", "tiny"): Teacher("teachers/tiny_rded_resnet18m.pt",
                              "--dataset TinyImageNet --recipe rded --arch ResNet-18-modified --aug rrc-flip",
                              "ResNet-18-modified", "squeeze.py --recipe rded --arch ResNet-18-modified --aug "
                              "rrc-flip: RDED's observer recipe is unpublished (§2 [uncertain]); the toolkit's "
                              "stand-in with RandomResizedCrop as in the torchvision recipe RDED says it follows "
                              "(RDED reports 61.98 %)"),
    ("delt", "imagenette"): Teacher("teachers/imagenette224_rded_resnet18.pt",
                                    "--dataset imagenette --res 224 --recipe rded --arch ResNet-18 --aug rrc-flip",
                                    "ResNet-18", "squeeze.py --recipe rded --arch ResNet-18 --aug rrc-flip at 224 px: "
                                    "RDED's observer recipe is unpublished (§2 [uncertain]); the toolkit's stand-in "
                                    "(RDED reports 90.00 %)"),
    ("delt", "imagenet100"): Teacher("teachers/imagenet100_rded_resnet18.pt",
                                     "--dataset ImageNet100 --recipe rded --arch ResNet-18 --aug rrc-flip",
                                     "ResNet-18", "squeeze.py --recipe rded --arch ResNet-18 --aug rrc-flip at 224 "
                                     "px: RDED's observer recipe is unpublished (§2 [uncertain]); the toolkit's "
                                     "stand-in (RDED reports 83.40 %)"),
    **{(m, "in1k"): IN1K_TEACHER for m in METHODS},
}

RECOVER_PRESETS = {
    ("sre2l", "cifar100"): "sre2l-cifar100", ("sre2l", "tiny"): "sre2l-tiny", ("sre2l", "in1k"): "sre2l-in1k",
    ("dwa", "cifar10"): "dwa-cifar10", ("dwa", "cifar100"): "dwa-cifar100", ("dwa", "tiny"): "dwa-tiny",
    ("dwa", "in1k"): "dwa-in1k",
    ("delt", "cifar10"): "delt-cifar", ("delt", "tiny"): "delt-tiny", ("delt", "imagenette"): "delt-in1k",
    ("delt", "imagenet100"): "delt-in1k", ("delt", "in1k"): "delt-in1k",
}
VALIDATE_PRESETS = {
    ("sre2l", "cifar100"): "sre2l-cifar", ("sre2l", "tiny"): "sre2l-tiny", ("sre2l", "in1k"): "sre2l-in1k",
    ("dwa", "cifar10"): "dwa-cifar", ("dwa", "cifar100"): "dwa-cifar", ("dwa", "tiny"): "dwa-tiny",
    ("dwa", "in1k"): "dwa-in1k",
    **{("delt", k): "delt" for k in ("cifar10", "tiny", "imagenette", "imagenet100", "in1k")},
}
FKD_ROWS = {("sre2l", "in1k")}   # SRe2L's ImageNet protocol: stored soft labels (relabel.py, §6.1-6.2)

# Published accuracy, % (decoupled.md §7). Validation student in brackets; synthesis with ResNet-18 throughout.
PAPER = {
    ("dwa", "cifar10", 10): "DWA 32.6 ± 0.4 (ResNet-18); SRe2L 27.2 ± 0.4 in the same table",
    ("dwa", "cifar10", 50): "DWA 53.1 ± 0.3 (ResNet-18); SRe2L 47.5 ± 0.5 in the same table",
    ("dwa", "cifar100", 10): "DWA 39.6 ± 0.6 (ResNet-18); SRe2L 31.6 ± 0.5 in the same table",
    ("dwa", "cifar100", 50): "DWA 60.9 ± 0.5 (ResNet-18); SRe2L 52.2 ± 0.3 in the same table",
    ("dwa", "tiny", 50): "DWA 52.8 ± 0.2 (ResNet-18), 53.7 ± 0.2 (ResNet-50), 54.7 ± 0.3 (ResNet-101)",
    ("dwa", "tiny", 100): "DWA 56.0 ± 0.2 (ResNet-18), 56.9 ± 0.4 (ResNet-50), 57.4 ± 0.3 (ResNet-101)",
    ("dwa", "in1k", 10): "DWA 37.9 ± 0.2 (ResNet-18), 43.0 ± 0.5 (ResNet-50), 46.9 ± 0.4 (ResNet-101)",
    ("dwa", "in1k", 50): "DWA 55.2 ± 0.2 (ResNet-18), 62.3 ± 0.1 (ResNet-50), 63.3 ± 0.7 (ResNet-101)",
    ("dwa", "in1k", 100): "DWA 59.2 ± 0.3 (ResNet-18), 65.7 ± 0.4 (ResNet-50), 66.7 ± 0.2 (ResNet-101)",
    ("delt", "cifar10", 1): "DELT 24.0 ± 0.8 (ResNet-18), 20.4 ± 1.0 (ResNet-101); RDED 22.9 ± 0.4 (ResNet-18)",
    ("delt", "cifar10", 10): "DELT 43.0 ± 0.9 (ResNet-18), 37.4 ± 1.2 (ResNet-101); RDED 37.1 ± 0.3 (ResNet-18)",
    ("delt", "cifar10", 50): "DELT 64.9 ± 0.9 (ResNet-18), 54.1 ± 0.8 (ResNet-101); RDED 62.1 ± 0.1 (ResNet-18)",
    ("delt", "imagenette", 1): "DELT 24.1 ± 1.8 (ResNet-18), 19.4 ± 1.7 (ResNet-101); RDED 35.8 ± 1.0 (ResNet-18)",
    ("delt", "imagenette", 10): "DELT 66.0 ± 1.4 (ResNet-18), 55.4 ± 6.2 (ResNet-101); RDED 61.4 ± 0.4 "
                                "(ResNet-18)",
    ("delt", "imagenette", 50): "DELT 88.2 ± 1.2 (ResNet-18), 83.3 ± 1.1 (ResNet-101); RDED 80.4 ± 0.4 "
                                "(ResNet-18)",
    ("delt", "tiny", 1): "DELT 9.3 ± 0.5 (ResNet-18), 5.6 ± 1.0 (ResNet-101); RDED 9.7 ± 0.4 (ResNet-18)",
    ("delt", "tiny", 10): "DELT 43.0 ± 0.1 (ResNet-18), 42.8 ± 0.9 (ResNet-101); RDED 41.9 ± 0.2 (ResNet-18)",
    ("delt", "tiny", 50): "DELT 55.7 ± 0.5 (ResNet-18), 58.5 ± 0.3 (ResNet-101); RDED 58.2 ± 0.1 (ResNet-18)",
    ("delt", "imagenet100", 10): "DELT 28.2 ± 1.5 (ResNet-18), 22.4 ± 3.3 (ResNet-101); RDED 36.0 ± 0.3 "
                                 "(ResNet-18)",
    ("delt", "imagenet100", 50): "DELT 67.9 ± 0.6 (ResNet-18), 70.8 ± 2.3 (ResNet-101); RDED 61.6 ± 0.1 "
                                 "(ResNet-18)",
    ("delt", "imagenet100", 100): "DELT 75.1 ± 0.2 (ResNet-18), 77.6 ± 1.8 (ResNet-101); RDED 74.5 ± 0.4 "
                                  "(ResNet-18)",
    ("delt", "in1k", 10): "DELT 45.8 ± 0.1 (ResNet-18), 48.5 ± 1.6 (ResNet-101); RDED 42.0 ± 0.1 (ResNet-18)",
    ("delt", "in1k", 50): "DELT 59.2 ± 0.4 (ResNet-18), 66.1 ± 0.5 (ResNet-101); RDED 56.5 ± 0.1 (ResNet-18)",
    ("delt", "in1k", 100): "DELT 62.4 ± 0.2 (ResNet-18), 67.6 ± 0.3 (ResNet-101); RDED 59.8 ± 0.1 (ResNet-18)",
    ("sre2l", "cifar100", 50): "SRe2L 49.37 (ResNet-18; the paper's number as quoted in SRe2L issue #10, where a "
                               "user reproduced 47.57; the DWA table lists SRe2L at 52.2 ± 0.3)",
    ("sre2l", "tiny", 50): "SRe2L 41.1 ± 0.4 (ResNet-18), 42.2 ± 0.5 (ResNet-50), 42.5 ± 0.2 (ResNet-101)",
    ("sre2l", "tiny", 100): "SRe2L 49.7 ± 0.3 (ResNet-18), 51.2 ± 0.4 (ResNet-50), 51.5 ± 0.3 (ResNet-101)",
    ("sre2l", "in1k", 10): "SRe2L 21.3 ± 0.6 (ResNet-18), 28.4 ± 0.1 (ResNet-50), 30.9 ± 0.1 (ResNet-101)",
    ("sre2l", "in1k", 50): "SRe2L 46.8 ± 0.2 (ResNet-18), 55.6 ± 0.3 (ResNet-50), 60.8 ± 0.5 (ResNet-101)",
    ("sre2l", "in1k", 100): "SRe2L 52.8 ± 0.3 (ResNet-18), 61.0 ± 0.4 (ResNet-50), 62.8 ± 0.2 (ResNet-101)",
    ("sre2l", "in1k", 200): "SRe2L 57.0 ± 0.4 (ResNet-18), 64.6 ± 0.3 (ResNet-50), 65.9 ± 0.3 (ResNet-101)",
}
ROWS = [(m, k, ipc) for (m, k, ipc) in PAPER]

# Settings this toolkit had to choose (no published value), by (method, dataset); "*" = every dataset.
CHOICES = {
    ("dwa", "*"): "DWA's init images are a download (§4.4); here rank_select.py --selection random draws a seeded "
                  "real subset (seed SEED) instead [inferred from the README]. Every (ipc, class block) unit is "
                  "recovered independently from the unperturbed teacher (the clean mode of §8.2; recover.py has no "
                  "switch for the reference's carry-over of the ImageNet perturbation across class blocks, §4.2, "
                  "§9.1 item 3).",
    ("dwa", "cifar10"): "DWA publishes no CIFAR-10 synthesis settings (§4.5): preset dwa-cifar10 is the CIFAR-100 "
                        "values on one batch of the 10 classes. The teacher keeps its own normalisation (CIFAR-10 "
                        "true std) through every stage, where the reference switches statistics (§9.1 item 6).",
    ("delt", "cifar10"): "DELT publishes no CIFAR settings (§5.6): preset delt-cifar = SRe2L's CIFAR lr 0.25 / "
                         "r-bn 0.01 with DELT's ITR 4000 / RI 500, crop schedule and medium init.",
    ("delt", "tiny"): "DELT publishes no Tiny-ImageNet settings (§5.6): preset delt-tiny = lr 0.1, r-bn 0.01 with "
                      "DELT's ITR 4000 / RI 500, crop schedule and medium init.",
    ("delt", "imagenette"): "DELT publishes no ImageNette settings (§5.6): this row uses the ImageNet-1K preset "
                            "delt-in1k at 224 px; the ImageNette classes are the registry's 10 wnids (DELT's list is "
                            "not in the repo, §2 [uncertain]).",
    ("delt", "imagenet100"): "DELT publishes no ImageNet-100 settings (§5.6): this row uses the ImageNet-1K preset "
                             "delt-in1k; the 100 classes are the registry's list (DELT's is not in the repo, §2 "
                             "[uncertain]).",
    ("delt", "in1k"): "The ImageNet-1K settings are DELT's published resnet18_imagenet1k_synthesis script (§5.6).",
    ("sre2l", "tiny"): "recover uses the script's 4000 iterations for both IPCs (the HF release has '1K, IPC 50' "
                       "and '4K, IPC 100', §3.2).",
    ("sre2l", "cifar100"): "Validation runs the script's 400 epochs (SRe2L's authors point to 800, CDA appendix "
                           "B.1, for the 49.37).",
    ("sre2l", "in1k"): "LABELS=stored (default) is SRe2L's FKD protocol: relabel.py stores 300 epochs of teacher "
                       "logits on recorded crops/flips/CutMix (§6.1) and validate.py replays them (§6.2); "
                       "LABELS=online labels every view with the live teacher instead (train_KD.py, DWA's "
                       "protocol). The random baseline always uses the live teacher.",
}

# ----------------------------------------------------------------------------------- rough cost model (not measured)
# GPU-hours per image-iteration of recovery (teacher forward + backward to the pixels), from the only published
# timings (CDA README, the same loop, §3.2): ImageNet-1K IPC 50 x 4K iterations ~ 29 h and Tiny IPC 50 x 4K ~ 4.5 h
# on one RTX 4090. 32-px CIFAR has a quarter of Tiny's map area. Training a network costs about the same per
# image-epoch; a forward alone about a third. A forward of one small group cannot go below ~10 ms.
HOURS_PER_IMAGE_STEP = {224: 29 / (50_000 * 4000), 64: 4.5 / (200 * 50 * 4000), 32: 4.5 / (200 * 50 * 4000) / 4}
MIN_STEP_S = 0.010
JPEG_PER_S = 1000      # ImageNet-size JPEGs decoded per second by the data-loading workers (a guess)


def fmt_hours(h: float) -> str:
    if h < 0.05:
        return "<0.1"
    return "~" + (f"{h:.2g}" if h < 10 else f"{h:.0f}")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# --------------------------------------------------------------------------------------------------- resolved rows

def resolution(key: str) -> int:
    d = DATASETS[key]
    return d.res or get_dataset_spec(d.registry).resolution


def recover_config(method: str, key: str, ipc: int):
    return recover.resolve_config(RECOVER_PRESETS[(method, key)], {}, ipc)


def recover_units(method: str, key: str, ipc: int):
    """The row's work units and their groups on a GPU (recover.py --group 0: ~256 images per forward; DWA 1)."""
    cfg = recover_config(method, key, ipc)
    classes = get_dataset_spec(DATASETS[key].registry).num_classes
    units = recover.plan_units(cfg, classes, (0, ipc), (0, classes), ipc)
    group = 1 if cfg.method == "dwa" else max(1, 256 // len(units[0].classes))
    return cfg, units, recover.group_units(units, group)


def validate_options(method: str, key: str, ipc: int) -> dict:
    """The KD recipe validate.py resolves for the row (KD_DEFAULTS under the preset), for the default student."""
    spec = get_dataset_spec(DATASETS[key].registry)
    arch = TEACHERS[(method, key)].arch
    return {**validate.KD_DEFAULTS, **validate.kd_protocol(VALIDATE_PRESETS[(method, key)], spec, ipc, arch, arch)}


def describe_recover(cfg) -> str:
    unit = "images per unit, class-major" if cfg.method == "delt" else "classes per unit, one image each"
    parts = [f"{cfg.iterations} iterations" + (f" in EarlyLate rounds of {cfg.round_iterations}"
                                                 if cfg.early_late else ""),
             f"Adam lr {cfg.lr:g} (cosine)", f"batch {cfg.batch_size} ({unit})", f"r-bn {cfg.r_bn:g}",
             f"first-BN x{cfg.first_bn_multiplier:g}"]
    if cfg.r_var != 1:
        parts.append(f"r-var {cfg.r_var:g}")
    if cfg.method == "dwa":
        parts.append(f"DWA K {cfg.dwa_steps}, rho {cfg.rho:g}")
    aug = []
    if cfg.rrc:
        aug.append(f"RRC(crop floor {cfg.crop_schedule} 1 -> {cfg.crop_min:g})" if cfg.crop_schedule != "none"
                   else f"RRC({cfg.crop_min:g}-{cfg.crop_max:g})")
    if cfg.flip:
        aug.append("flip")
    if cfg.jitter:
        aug.append(f"roll {'-' if cfg.jitter_mode == 'symmetric' else '0..'}{cfg.jitter}"
                   + (f"..{cfg.jitter}" if cfg.jitter_mode == "symmetric" else ""))
    parts.append("aug " + (" + ".join(aug) if aug else "none"))
    parts.append("init " + ("N(0, 1) noise" if cfg.init == "noise" else f"real ({cfg.init_resize} resize)"))
    return ", ".join(parts)


def describe_validate(opt: dict) -> str:
    opt_text = (f"SGD lr {opt['lr']:g}/{opt['momentum']:g}/wd {opt['weight_decay']:g}" if opt["optimizer"] == "sgd"
                else f"AdamW lr {opt['lr']:g} wd {opt['weight_decay']:g}")
    mix = "no mix" if opt["mix"] == "none" else f"{opt['mix']} every batch"
    crop = {"rrc": f"RRC({opt['crop_scale'][0]:g}-{opt['crop_scale'][1]:g})", "random-crop-pad4": "random crop pad 4",
            "none": "no crop"}[opt["crop"]]
    return (f"{opt['epochs']} epochs, batch {opt['batch_size']}, {opt_text}, {opt['schedule']} schedule"
            + (f" after {opt['warmup_epochs']} warm-up epochs" if opt["warmup_epochs"] else "")
            + f", T {opt['temperature']:g}{' x T²' if opt['t_squared'] else ''}, {mix}, {crop} + flip"
            + (" + RandAugment" if opt["rand_augment"] else "") + f", teacher BN {opt['teacher_bn_mode']}")


def cost_line(method: str, key: str, ipc: int, opt: dict) -> str:
    res = resolution(key)
    c = HOURS_PER_IMAGE_STEP[res]
    d = DATASETS[key]
    classes = get_dataset_spec(d.registry).num_classes
    teacher = TEACHERS[(method, key)]
    if teacher.flags:
        epochs = 100 if "--epochs 100" in teacher.flags else squeeze.get_recipe(
            teacher.flags.split("--recipe ")[1].split()[0])[1].epochs
        t_hours = fmt_hours(epochs * d.train_images * c)
        t_text = f"teacher {t_hours} ({epochs} epochs; once per TEACHER)"
    else:
        t_text = "teacher <0.5 (one pass over the val split)"
    cfg, units, groups = recover_units(method, key, ipc)
    image_steps = sum(sum(recover.unit_iterations(u)) for u in units)
    steps = sum(g[0].iterations for g in groups)
    r_hours = max(image_steps * c, steps * MIN_STEP_S / 3600)
    parts = [t_text]
    if method == "delt":
        # one forward per training image, but JPEG decoding of the 224-px datasets caps it at ~1000 images/s
        rank = max(d.train_images * c / 3, d.train_images / JPEG_PER_S / 3600 if res == 224 else 0)
        parts.append(f"ranking {fmt_hours(rank)} (one forward over the train split)")
    parts.append(f"recover {fmt_hours(r_hours)}")
    n = classes * ipc
    if (method, key) in FKD_ROWS:
        parts.append(f"relabel {fmt_hours(300 * n * c / 3)} (LABELS=stored)")
    v_hours = 3 * 2 * opt["epochs"] * n * c * 4 / 3
    parts.append(f"validation {fmt_hours(v_hours)} (RUNS=3, set and random baseline)")
    return ("GPU-time hint [rough estimate, not measured: scaled by image-iterations from CDA's 29 h for ImageNet-1K "
            "IPC 50 x 4K iterations and 4.5 h for Tiny IPC 50 x 4K on one RTX 4090, §3.2]: " + ", ".join(parts)
            + " GPU-hours.")


def shard_lines(method: str, key: str, ipc: int, row: str) -> list[str]:
    cfg, units, groups = recover_units(method, key, ipc)
    n = len(units[0].classes)
    what = ("class-major blocks of (class, index) pairs" if cfg.method == "delt"
            else "(ipc index, class block) pairs")
    steps = steps_of(method, key)
    before = " ".join(steps[:steps.index("recover")])
    after = " ".join(steps[steps.index("recover") + 1:])
    lines = [
        f"Sharding recover (§8.2; every split gives the same images, each unit is seeded from SEED and its key): "
        f"{len(units)} units ({what}) of {n} images, {plural(len(groups), 'group')} on a GPU (--group 0 puts up to ~256 "
        "images in one forward). Finished units are skipped, so any shard can be re-run.",
        f"  Slurm array: STEPS=\"{before}\" bash scripts/decoupled/{row}.sh, then sbatch --array=0-7 "
        f"scripts/slurm/recover_array.sbatch scripts/decoupled/{row}.sh (up to {plural(len(groups), 'task')}), then "
        f"STEPS=\"{after}\" bash scripts/decoupled/{row}.sh.",
        "  One node, several GPUs: LAUNCH=\"torchrun --standalone --nproc_per_node 8\" bash ... (recover shards by "
        "rank; squeeze, relabel and validate train with DDP; rank_select always runs as one process).",
    ]
    if cfg.method == "delt":
        per = max(1, cfg.batch_size // ipc)
        lines.append(f"  By hand: add --class-range a:b (a, b multiples of {per} keep the blocks of the full run) or "
                     "--shard-index i --num-shards n to the recover.py line.")
    else:
        lines.append("  By hand (SRe2L's way, §8.1): --ipc-range a:b (e.g. 0:25, 25:50, ...) or --shard-index i "
                     "--num-shards n on the recover.py line, one process per GPU, all writing the same folder.")
    return lines


def header(method: str, key: str, ipc: int, row: str) -> list[str]:
    d, t = DATASETS[key], TEACHERS[(method, key)]
    spec = get_dataset_spec(d.registry)
    res = resolution(key)
    cfg = recover_config(method, key, ipc)
    opt = validate_options(method, key, ipc)
    rp, vp = RECOVER_PRESETS[(method, key)], VALIDATE_PRESETS[(method, key)]
    fkd = (method, key) in FKD_ROWS
    lines = [
        f"{METHODS[method]} on {d.label}, IPC {ipc} ({spec.num_classes} classes, {res} px, ResNet-18 synthesis): one "
        f"row of decoupled.md {TABLES[method]}.",
        f"paper: {PAPER[(method, key, ipc)]}",
        "Generated by scripts/decoupled/make_scripts.py (edit that file, then re-run it; do not edit this script).",
        "",
        f"1. Teacher (squeeze.py, §2), skipped when $TEACHER exists: {t.note}. Rows with the same TEACHER share it: "
        "let one row make it before starting the others"
        + ("." if key == "in1k" else " (squeeze.py resumes from <TEACHER>.ckpt after every epoch)."),
    ]
    if key == "in1k":
        lines.append("  $WEIGHTS is torchvision's resnet18-f37072fd.pth (ResNet18_Weights.IMAGENET1K_V1). This "
                     "machine may be offline: fetch it where there is internet (python -c \"import torchvision; "
                     "torchvision.models.resnet18(weights='IMAGENET1K_V1')\" leaves it in "
                     "~/.cache/torch/hub/checkpoints/) and copy it here.")
    if method == "delt":
        lines.append(f"2. Init (rank_select.py --selection medium, §5.1): the {plural(ipc, 'training image')} per "
                     "class closest "
                     "in teacher confidence to the class median, ranked once per teacher into $RANKING (re-used "
                     "by the other rows of that teacher) and copied to $OUT/init.")
    elif method == "dwa":
        fmt = (" as DWA's CIFAR tensor_<k>.pt files (--format tensor, §4.4)" if key.startswith("cifar")
               else " as class folders (recover stretches them to a square, §4.4)")
        lines.append(f"2. Init (rank_select.py --selection random, §4.4): {ipc} seeded random training images per "
                     f"class{fmt}, in $OUT/init.")
    step = 2 if method == "sre2l" else 3   # SRe2L needs no real images: it starts from N(0, 1) noise (§3.1)
    sec = {"sre2l": "§3.2", "dwa": "§4.5", "delt": "§5.6"}[method]
    lines.append(f"{step}. Recover (recover.py --preset {rp}, {sec}) into $OUT/syn: {describe_recover(cfg)}.")
    if method == "delt" and ipc == 1:
        lines.append("  IPC 1 runs without EarlyLate (DELT's IPC-1 scripts; they also try 1K-3K iterations).")
    step += 1
    if fkd:
        gb = spec.num_classes * ipc * 300 * spec.num_classes * 2 / 1e9
        lines.append(f"{step}. Relabel (relabel.py, §6.1; only with LABELS=stored) into $OUT/labels: 300 epochs of "
                     f"batch-1024 records (crops, flips, CutMix, fp16 logits), ~{gb:.0f} GB with all 1000 logits; "
                     "TOPK=100 keeps the 100 largest (~10x less). Resumes per stored batch.")
        step += 1
    seeds = ("DELT used seeds 3407, 4663, 2897; validate.py takes a base seed" if method == "delt"
             else "the papers do not state their runs")
    lines.append(f"{step}. Validate (validate.py --preset {vp}, §6): student $MODEL learns the teacher's soft labels "
                 f"({describe_validate(opt)}); RUNS students with seeds SEED..SEED+RUNS-1 ({seeds}), beside a random "
                 f"real subset of {plural(ipc, 'image')} per class with the same teacher, recipe and seeds. Reports last-epoch "
                 "top-1 (the references report the best of their periodic evaluations, §6.6).")
    choices = [CHOICES[k] for k in ((method, "*"), (method, key)) if k in CHOICES]
    if choices:
        lines.append("Choices: " + " ".join(choices))
    lines.append(cost_line(method, key, ipc, opt))
    lines += shard_lines(method, key, ipc, row)
    env = [f"DATA ({d.data}{': a full ImageNet-1K folder, train/<wnid>/ + val/<wnid>/' if d.data != 'data' else ''})",
           f"OUT (results/decoupled/{row})", f"TEACHER ({t.path})"]
    if key == "in1k":
        env.append("WEIGHTS (~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth)")
    if method == "delt":
        env.append("RANKING (<TEACHER without .pt>_ranking.csv)")
    env += ["PYTHON (python)", "LAUNCH (PYTHON; e.g. \"torchrun --standalone --nproc_per_node 8\")",
            "SEED (0: " + ("init pick, " if method == "dwa" else "") + "recover units, validation runs)",
            "RUNS (3)", f"MODEL ({t.arch}: the student)",
            "WORKERS (8: data-loading workers)"]
    if fkd:
        env += ["LABELS (stored | online)", "TOPK (0 = all logits)"]
    env.append(f"STEPS ({' '.join(steps_of(method, key))})")
    lines += [
        "",
        f"Usage: bash scripts/decoupled/{row}.sh",
        f"   or: sbatch scripts/slurm/torchrun.sbatch scripts/decoupled/{row}.sh  (one node, all its GPUs)",
        "  Environment: " + ", ".join(env) + ".",
        "  Re-running the same command resumes: the teacher and the init are skipped when present, recover skips "
        "finished units, validate.py trains only the runs missing from its results CSV. Another SEED needs another "
        "OUT.",
    ]
    return lines


def steps_of(method: str, key: str) -> list[str]:
    steps = ["teacher"] + (["init"] if method != "sre2l" else []) + ["recover"]
    steps += ["relabel"] if (method, key) in FKD_ROWS else []
    return steps + ["validate"]


# --------------------------------------------------------------------------------------------------------- script

def body(method: str, key: str, ipc: int, row: str) -> list[str]:
    d, t = DATASETS[key], TEACHERS[(method, key)]
    fkd = (method, key) in FKD_ROWS
    steps = steps_of(method, key)
    out = [
        f'DATA="${{DATA:-{d.data}}}"',
        f'OUT="${{OUT:-results/decoupled/{row}}}"',
        f'TEACHER="${{TEACHER:-{t.path}}}"',
    ]
    if key == "in1k":
        out.append('WEIGHTS="${WEIGHTS:-${TORCH_HOME:-$HOME/.cache/torch}/hub/checkpoints/resnet18-f37072fd.pth}"')
    if method == "delt":
        out.append('RANKING="${RANKING:-${TEACHER%.pt}_ranking.csv}"')
    out += [
        'PYTHON="${PYTHON:-python}"',
        'SEED="${SEED:-0}"',
        'RUNS="${RUNS:-3}"',
        f'MODEL="${{MODEL:-{t.arch}}}"',
        'WORKERS="${WORKERS:-8}"',
    ]
    if fkd:
        out += ['LABELS="${LABELS:-stored}"', 'TOPK="${TOPK:-0}"']
    out += [
        f'STEPS="${{STEPS:-{" ".join(steps)}}}"',
        "",
        "# LAUNCH (e.g. torchrun) runs the stages that can use several GPUs; rank_select.py is always one process.",
        'if [ -n "${LAUNCH:-}" ]; then read -r -a RUN <<< "$LAUNCH"; else RUN=("$PYTHON"); fi',
        'read -r -a STEP_LIST <<< "$STEPS"',
        'for s in "${STEP_LIST[@]}"; do',
        f'  case "$s" in {"|".join(steps)}) ;;',
        f'    *) echo "error: unknown step \'$s\' in STEPS (known: {" ".join(steps)})" >&2; exit 2 ;;',
        "  esac",
        "done",
        'has_step() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }',
    ]
    if fkd:
        out += [
            'case "$LABELS" in stored|online) ;;',
            '  *) echo "error: LABELS must be stored (SRe2L\'s FKD soft labels) or online (live teacher), got '
            '\'$LABELS\'" >&2; exit 2 ;;',
            "esac",
        ]
    out += ["", "# 1. Teacher (skipped when the file exists)."]
    if key == "in1k":
        out += [
            'if has_step teacher && [ ! -f "$TEACHER" ]; then',
            '  if [ ! -f "$WEIGHTS" ]; then',
            '    echo "error: torchvision ResNet-18 weights not found at $WEIGHTS (resnet18-f37072fd.pth, '
            'IMAGENET1K_V1); download them elsewhere and set WEIGHTS=<file>" >&2',
            "    exit 2",
            "  fi",
            '  "$PYTHON" squeeze.py --arch ResNet-18 --dataset ImageNet --weights "$WEIGHTS" --data-path "$DATA" \\',
            '    --out "$TEACHER" --workers "$WORKERS"',
            "fi",
        ]
    else:
        out += [
            'if has_step teacher && [ ! -f "$TEACHER" ]; then',
            f'  "${{RUN[@]}}" squeeze.py {t.flags} \\',
            '    --data-path "$DATA" --out "$TEACHER" --workers "$WORKERS"',
            "fi",
        ]
    init = ""
    if method == "delt":
        out += [
            "",
            "# 2. Medium-ranked real images per class (DELT); skipped once $OUT/init/selection.json exists.",
            'if has_step init && [ ! -f "$OUT/init/selection.json" ]; then',
            '  "$PYTHON" rank_select.py --teacher "$TEACHER" --data-path "$DATA" --out "$OUT/init" '
            '--selection medium \\',
            f'    --ipc {ipc} --ranking-file "$RANKING" --workers "$WORKERS"',
            "fi",
        ]
        init = ' --init-path "$OUT/init"'
    elif method == "dwa":
        fmt = " --format tensor" if key.startswith("cifar") else ""
        out += [
            "",
            "# 2. Seeded random real images per class (DWA's init); skipped once $OUT/init/selection.json exists.",
            'if has_step init && [ ! -f "$OUT/init/selection.json" ]; then',
            '  "$PYTHON" rank_select.py --teacher "$TEACHER" --data-path "$DATA" --out "$OUT/init" '
            '--selection random \\',
            f'    --ipc {ipc} --seed "$SEED"{fmt} --workers "$WORKERS"',
            "fi",
        ]
        init = ' --init-path "$OUT/init"'
    n = 3 if method != "sre2l" else 2
    out += [
        "",
        f"# {n}. Synthesis with the row's preset (finished units are skipped; shards: see the header).",
        "if has_step recover; then",
        f'  "${{RUN[@]}}" recover.py --preset {RECOVER_PRESETS[(method, key)]} --teacher "$TEACHER"{init} '
        f'--ipc {ipc} --out "$OUT/syn" \\',
        '    --seed "$SEED"',
        "fi",
    ]
    if fkd:
        out += [
            "",
            f"# {n + 1}. SRe2L's stored soft labels (LABELS=stored), then {n + 2}. validation (the random baseline "
            "is labelled by the live teacher).",
            'if [ "$LABELS" = stored ]; then',
            "  if has_step relabel; then",
            '    "${RUN[@]}" relabel.py --syn "$OUT/syn" --teacher "$TEACHER" --out "$OUT/labels" --topk "$TOPK"',
            "  fi",
            "  if has_step validate; then",
            *validate_lines(method, key, "    ", ' --soft-labels "$OUT/labels"'),
            "  fi",
            "elif has_step validate; then",
            *validate_lines(method, key, "  "),
            "fi",
            "",
        ]
    else:
        out += [
            "",
            f"# {n + 1}. Knowledge-distillation validation, beside a random real subset of the same IPC.",
            "if has_step validate; then",
            *validate_lines(method, key, "  "),
            "fi",
            "",
        ]
    return out


def validate_lines(method: str, key: str, indent: str, extra: str = "") -> list[str]:
    res = DATASETS[key].res
    return [
        f'{indent}"${{RUN[@]}}" validate.py --syn "$OUT/syn" --teacher "$TEACHER"{extra} '
        f'--preset {VALIDATE_PRESETS[(method, key)]} \\',
        f'{indent}  --model "$MODEL"{f" --res {res}" if res else ""} --data-path "$DATA" --baseline random '
        '--runs "$RUNS" --seed "$SEED" \\',
        f'{indent}  --workers "$WORKERS" --results "$OUT/results_$MODEL.json"',
    ]


def script(method: str, key: str, ipc: int) -> tuple[str, str]:
    row = f"{method}_{key}_ipc{ipc}"
    out = ["#!/usr/bin/env bash", *comment(header(method, key, ipc, row)),
           "set -euo pipefail",
           'cd "$(dirname "$0")/../.."',
           "",
           *body(method, key, ipc, row)]
    return row, "\n".join(out)


def main(argv: list[str]) -> int:
    return generate(ROWS, script, HERE, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
