"""squeeze.py: the first stage of SRe2L / DWA / DELT: train a teacher classifier on the real training split and
write it as a teacher file (utils/teacher.py), so its normalisation and class order travel with the weights.

    python squeeze.py --recipe sre2l-cifar100 --data-path data/cifar100 --out teachers/cifar100_rn18.pt
    python squeeze.py --dataset CIFAR10 --data-path ../shared/data/cifar10 --arch ConvNet-3-BN-w64 \\
        --train-per-class 1000 --epochs 5 --batch-size 128 --lr 0.05 --out teachers/cifar10_conv3w64.pt
    torchrun --nproc_per_node 4 squeeze.py --recipe sre2l-tiny --data-path data/tiny-imagenet-200 --out t.pt
    python squeeze.py --dataset ImageNet --pretrained --data-path data/imagenet --out teachers/in1k_rn18.pt
    python squeeze.py --weights ckpt.pth --dataset CIFAR100 --arch resnet18_modified --norm cifar10 --out t.pt
    python squeeze.py --eval-only teachers/cifar100_rn18.pt --data-path data/cifar100

Spec: docs/methods/decoupled.md, section numbers below refer to it. Three modes:
- training (default): a recipe of §2 (`--recipe`, every value overridable) or a dataset-derived default. Real images
  stay uint8 in memory (streamed from files for ImageNet-size splits) and are augmented batch by batch with the run's
  own torch.Generator. The test split is evaluated every --eval-every epochs and after the last one; the teacher is
  always the LAST epoch's weights (no checkpoint is ever chosen on the test set, §9.1 item 18).
  Resume: `<out>.ckpt` (weights, optimiser, the run's generator, global RNG states, the epoch's running sums) is
  written atomically after every epoch, every `--ckpt-every` optimiser steps and, on SIGTERM/SIGUSR1, after the step
  in flight (exit 143); re-running the same command continues from it, inside an epoch too, with the same teacher
  bit for bit (CPU, same thread count). A NaN/inf loss stops the run (exit 2, naming --lr) before it is saved, so
  the checkpoint on disk is the last good one.
- wrapping (`--weights PATH` or `--pretrained`): no training; existing weights (torchvision, SRe2L/DWA `ckpt.pth`,
  RDED `{dataset}_{arch}.pth`) are loaded into --arch and written in the teacher format with the chosen --norm.
- `--eval-only TEACHER`: the pre-flight check of §9.1 item 19: top-1 of a teacher on the real test split with its
  stored normalisation and class order.

Outputs of a run: the teacher file `--out`, `<out stem>_log.csv` (one row per epoch) and `<out stem>_config.json`.
Under torchrun every rank trains on a disjoint slice of each epoch's (identical, seeded) permutation inside DDP and
only rank 0 writes files; after every step the ranks agree (a CPU all-reduce) whether any of them got a stop
request, so all stop after the same step.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
import typer
from torch import nn

from networks.registry import canonical_name, get_network, load_weights, parse_name
from utils.amp import AMP_HELP, OFF, Amp, fp32, resolve_amp
from utils.augment import apply_flip, crop_resize, draw_pad_offsets, flip_mask, pad_crop, rrc_boxes
from utils.checkpoint import (capture_rng, check_finite, first_nonfinite, load_state, restore_rng, save_state,
                              settings_fingerprint)
from utils.datasets import (DatasetSpec, dataset_labels, decode_files, get_dataset_spec, normalize, open_split,
                            per_class_indices, read_split)
from utils.distributed import DistInfo, all_reduce_sum, barrier, cleanup, device_for, init_distributed
from utils.errors import UserError
from utils.io import atomic_write_json, check_writable, run_lock, safe_torch_load
from utils.misc import require_at_least, RunLog, cli_errors, progress, resolve_device, seed_everything
from utils.signals import StopRequest, Stopped
from utils.teacher import NORMALIZATIONS, load_teacher, resolve_normalization, save_teacher

# ------------------------------------------------------------------------------------------------ recipes


@dataclass(frozen=True)
class Recipe:
    """One teacher-training recipe (decoupled.md §2). `None` fields are derived from the data at run time."""
    description: str
    dataset: Optional[str] = None       # the dataset the recipe was published for (default for --dataset)
    arch: Optional[str] = None          # None: ResNet-18-modified up to 64 px, ResNet-18 above (`default_arch`)
    epochs: int = 200
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "cosine"            # a SCHEDULES key, stepped per epoch after the warm-up
    warmup_epochs: int = 0
    warmup_factor: float = 0.01         # lr factor of the first warm-up epoch (torch LinearLR start_factor)
    aug: Optional[str] = None           # an AUGMENTATIONS key; None: crop-flip below 64 px, rrc-flip from 64 px
    norm: Optional[str] = None          # a utils.teacher.NORMALIZATIONS key; None: the dataset's mean/std
    eval_every: int = 10


# §2: SRe2L `squeeze_cifar.py` (CIFAR-100 trained with the CIFAR-10 "kuangliu" statistics, §1.1), DWA's
# `squeeze_cifar100.py` / `squeeze_cifar10.py` (same recipe, other statistics, §9.1 item 6), the Tiny-ImageNet
# recipe of zeyuanyin/tiny-imagenet (torchvision reference script: 5-epoch linear warm-up from 0.01, then cosine
# over the remaining epochs, RandomResizedCrop), and RDED's unpublished observer recipe (§2 [uncertain]: we use
# the SRe2L CIFAR recipe, SGD 0.1 / 5e-4 / cosine / crop+flip, with ImageNet statistics as RDED/DELT normalise
# every dataset that way, §1.1; a documented choice, not a reproduction).
RECIPES: dict[str, Recipe] = {
    "sre2l-cifar100": Recipe("SRe2L squeeze_cifar.py: ResNet-18-modified, SGD 0.1/0.9/5e-4, batch 128, 200 epochs, "
                             "cosine, crop+flip, CIFAR-10 kuangliu statistics", dataset="CIFAR100",
                             arch="ResNet-18-modified", aug="crop-flip", norm="cifar10"),
    "dwa-cifar100": Recipe("DWA squeeze_cifar100.py: as sre2l-cifar100 with CIFAR-100 statistics", dataset="CIFAR100",
                           arch="ResNet-18-modified", aug="crop-flip", norm="cifar100"),
    "dwa-cifar10": Recipe("DWA squeeze_cifar10.py: as sre2l-cifar100, 10 classes, CIFAR-10 true-std statistics",
                          dataset="CIFAR10", arch="ResNet-18-modified", aug="crop-flip", norm="cifar10-true"),
    "sre2l-tiny": Recipe("SRe2L Tiny-ImageNet (zeyuanyin/tiny-imagenet): ResNet-18-modified, SGD 0.2/0.9/1e-4, "
                         "batch 256, 50 epochs, 5-epoch linear warm-up from 0.01 then cosine, RRC(64)+flip, Tiny "
                         "statistics", dataset="TinyImageNet", arch="ResNet-18-modified", epochs=50, lr=0.2,
                         weight_decay=1e-4, batch_size=256, warmup_epochs=5, aug="rrc-flip", norm="tiny",
                         eval_every=1),
    "rded": Recipe("RDED/DELT observer teachers (recipe unpublished; our choice): ConvNet-D-BN sized to the "
                   "resolution (conv3 at 32 px, conv4 at 64, conv5 at 128) or --arch, SGD 0.1/0.9/5e-4, batch 128, "
                   "200 epochs, cosine, crop+flip, ImageNet statistics", aug="crop-flip", norm="imagenet"),
}
DEFAULT_RECIPE = Recipe("dataset-derived default: SGD 0.1/0.9/5e-4, batch 128, 200 epochs, cosine, crop+flip below "
                        "64 px and RRC+flip from 64 px, the dataset's statistics")


def get_recipe(name: Optional[str]) -> tuple[str, Recipe]:
    key = (name or "default").strip().lower().replace("_", "-")
    if key == "default":
        return "default", DEFAULT_RECIPE
    if key not in RECIPES:
        raise UserError(f"unknown recipe '{name}'; known: {', '.join(RECIPES)}, default")
    return key, RECIPES[key]


def default_arch(recipe_name: str, resolution: int) -> str:
    """§1.2: the modified ResNet-18 up to 64 px, torchvision ResNet-18 above; RDED's ConvNet-D-BN for `rded`
    (D = log2(R/4): conv3 at 32 px, conv4 at 64, conv5 at 128)."""
    if recipe_name == "rded":
        return f"ConvNet-{min(8, max(1, round(math.log2(max(resolution, 8) / 4))))}-BN"
    return "ResNet-18-modified" if resolution <= 64 else "ResNet-18"


# The lr factor after the warm-up, from (t, T) = (epochs since the warm-up, epochs after the warm-up).
SCHEDULES = {
    "cosine": lambda t, T: 0.5 * (1 + math.cos(math.pi * t / max(T, 1))),   # CosineAnnealingLR(T_max=T) per epoch
    "step": lambda t, T: 0.1 ** (t // 30),                                   # torchvision reference: x0.1 every 30
    "constant": lambda t, T: 1.0,
}
SCHEDULE_ALIASES = {"cosineannealinglr": "cosine", "steplr": "step", "none": "constant"}   # torchvision spellings


@dataclass
class SqueezeConfig:
    """Every resolved setting of one teacher-training run (written to <stem>_config.json and the teacher's meta)."""
    dataset: str
    recipe: str
    arch: str
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    schedule: str
    warmup_epochs: int
    warmup_factor: float
    aug: str
    crop_padding: int
    norm: Optional[str]                  # None: the dataset's registry statistics
    mean: tuple
    std: tuple
    train_per_class: Optional[int] = None
    test_per_class: Optional[int] = None
    seed: int = 0
    eval_every: int = 10
    amp: str = "off"                     # --amp: off | bf16 | fp16 (fp16 with a GradScaler)
    resolution: int = 0
    channels: int = 3
    num_classes: int = 0

    def fingerprint_fields(self) -> dict:
        """The settings that decide the weights (a resumed run must match them); logging cadence and the
        test subset do not."""
        d = asdict(self)
        for k in ("eval_every", "test_per_class"):
            d.pop(k)
        if d["amp"] in ("off", False):   # the fingerprint of fp32 runs from before --amp took a mode
            d["amp"] = False
        return d


def resolve_config(dataset: str, recipe: Optional[str], overrides: dict, resolution: int, channels: int,
                   num_classes: int) -> SqueezeConfig:
    """Explicit values (not None) > the recipe's > values derived from the data."""
    name, rec = get_recipe(recipe)
    values = {k: v for k, v in asdict(rec).items() if k not in ("description", "dataset")}
    values.update({k: v for k, v in overrides.items() if v is not None and k in SqueezeConfig.__dataclass_fields__})
    values["schedule"] = SCHEDULE_ALIASES.get(str(values["schedule"]).lower(), str(values["schedule"]).lower())
    values["arch"] = canonical_name(values.get("arch") or default_arch(name, resolution))
    values["aug"] = values.get("aug") or ("rrc-flip" if resolution >= 64 else "crop-flip")
    if values.get("crop_padding") is None:
        values["crop_padding"] = max(1, round(resolution / 8))   # 4 at 32 px, as RandomCrop(32, padding=4)
    norm = values.get("norm")
    mean, std = resolve_normalization(norm, dataset)
    values.update(norm=norm.lower() if norm else None, mean=tuple(mean), std=tuple(std))
    cfg = SqueezeConfig(dataset=get_dataset_spec(dataset).name, recipe=name, resolution=resolution, channels=channels,
                        num_classes=num_classes, **{k: v for k, v in values.items()
                                                    if k in SqueezeConfig.__dataclass_fields__
                                                    and k not in ("dataset", "recipe", "resolution", "channels",
                                                                  "num_classes")})
    check_config(cfg)
    return cfg


def check_config(cfg: SqueezeConfig) -> None:
    if cfg.epochs < 1:
        raise UserError("--epochs must be at least 1")
    if cfg.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UserError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.momentum < 0 or cfg.weight_decay < 0:
        raise UserError("--momentum and --weight-decay must not be negative")
    if not 0 <= cfg.warmup_epochs < cfg.epochs:
        raise UserError(f"--warmup-epochs must be in [0, epochs={cfg.epochs}), got {cfg.warmup_epochs}")
    if not 0 < cfg.warmup_factor <= 1:
        raise UserError(f"--warmup-factor must be in (0, 1], got {cfg.warmup_factor}")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"unknown --schedule '{cfg.schedule}'; known: {', '.join(SCHEDULES)}")
    if cfg.aug not in AUGMENTATIONS:
        raise UserError(f"unknown --aug '{cfg.aug}'; known: {', '.join(AUGMENTATIONS)}")
    if cfg.crop_padding < 0:
        raise UserError("--crop-padding must not be negative")
    if cfg.eval_every < 0:
        raise UserError("--eval-every must be 0 (only after the last epoch) or more")
    for what, n in (("--train-per-class", cfg.train_per_class), ("--test-per-class", cfg.test_per_class)):
        if n is not None and n < 1:
            raise UserError(f"{what} must be at least 1")


def lr_at(cfg: SqueezeConfig, epoch: int) -> float:
    """The lr of 0-based `epoch`: linear warm-up from `warmup_factor` (torch LinearLR, total_iters = warmup), then
    the schedule over the remaining epochs (SequentialLR: T_max = epochs - warmup), stepped per epoch (§2)."""
    w = cfg.warmup_epochs
    if epoch < w:
        return cfg.lr * (cfg.warmup_factor + (1 - cfg.warmup_factor) * epoch / w)
    return cfg.lr * SCHEDULES[cfg.schedule](epoch - w, cfg.epochs - w)


# ------------------------------------------------------------------------------------------ augmentation
# Drawn per sample from the run's generator for the whole GLOBAL batch (every rank draws the same numbers and
# applies its own slice), so the augmented data does not depend on the number of processes. Applied to float
# pixels in [0, 1] before normalisation: the zero padding of RandomCrop is black, as on a PIL image.

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)


def draw_pad_crop(n: int, res: int, pad: int, g: torch.Generator) -> dict:
    """RandomCrop(res, padding=pad): top-left corners in the padded image, uniform over 0..2*pad."""
    top, left = draw_pad_offsets(n, pad, g)
    return {"top": top, "left": left}


def apply_pad_crop(x: torch.Tensor, p: dict, pad: int) -> torch.Tensor:
    return pad_crop(x, p["top"], p["left"], pad)


def draw_rrc(n: int, res: int, pad: int, g: torch.Generator) -> dict:
    """torchvision RandomResizedCrop.get_params per sample (`utils.augment.rrc_boxes`): 10 tries of area ~
    U(scale)·HW and log-aspect ~ U(log 3/4, log 4/3); the first box that fits wins; else the whole (square) image."""
    top, left, h, w = rrc_boxes(n, res, res, RRC_SCALE, g, RRC_RATIO).unbind(1)
    return {"top": top, "left": left, "h": h, "w": w}


def apply_rrc(x: torch.Tensor, p: dict, pad: int) -> torch.Tensor:
    """Crop and resize back to the full size, one image at a time (bilinear with antialiasing, as PIL does)."""
    boxes = torch.stack([p["top"], p["left"], p["h"], p["w"]], 1)
    return crop_resize(x, boxes, x.shape[-1], antialias=True)


# name -> (draw(n, res, pad, generator), apply(x, params, pad)) for the crop part
CROPS = {"pad": (draw_pad_crop, apply_pad_crop), "rrc": (draw_rrc, apply_rrc)}


@dataclass(frozen=True)
class Augmentation:
    crop: Optional[str]   # a CROPS key or None
    flip: bool


AUGMENTATIONS: dict[str, Augmentation] = {
    "crop-flip": Augmentation("pad", True),    # RandomCrop(R, padding) + RandomHorizontalFlip (CIFAR recipes)
    "rrc-flip": Augmentation("rrc", True),     # RandomResizedCrop(R) + RandomHorizontalFlip (Tiny / ImageNet)
    "crop": Augmentation("pad", False),
    "flip": Augmentation(None, True),
    "none": Augmentation(None, False),
}


def draw_augmentation(aug: str, n: int, res: int, pad: int, g: torch.Generator) -> dict:
    """Parameters of `n` augmented views (crop first, then flips: the draw order is part of reproducibility)."""
    spec = AUGMENTATIONS[aug]
    params = CROPS[spec.crop][0](n, res, pad, g) if spec.crop else {}
    if spec.flip:
        params["flip"] = flip_mask(n, g)
    return params


def apply_augmentation(aug: str, x: torch.Tensor, params: dict, pad: int) -> torch.Tensor:
    spec = AUGMENTATIONS[aug]
    if spec.crop:
        x = CROPS[spec.crop][1](x, params, pad)
    if spec.flip:
        x = apply_flip(x, params["flip"])
    return x


def slice_params(params: dict, pos: torch.Tensor) -> dict:
    return {k: v[pos] for k, v in params.items()}


def augment(aug: str, x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Draw and apply in one call (float pixels [N, C, R, R])."""
    return apply_augmentation(aug, x, draw_augmentation(aug, len(x), x.shape[-1], pad, g), pad)


# -------------------------------------------------------------------------------------------------- data

@dataclass
class Data:
    """A split ready for training or evaluation: uint8 images in memory, or a streamed Dataset of (uint8, label)."""
    labels: torch.Tensor
    class_names: tuple
    channels: int
    resolution: int                      # size the network sees
    images: Optional[torch.Tensor] = None
    dataset: Optional[torch.utils.data.Dataset] = None
    center_crop: Optional[int] = None    # evaluation: decode larger, centre-crop to this (torchvision 256 -> 224)

    def __len__(self) -> int:
        return len(self.labels)


# torchvision's ImageNet evaluation: Resize(256) + CenterCrop(224), the protocol of the 69.76 % of §1.2.
EVAL_RESIZE = {"ImageNet": 256, "ImageNet10": 256, "ImageNet100": 256}


def load_data(dataset: str, data_path: str | Path, split: str, per_class: Optional[int] = None, seed: int = 0,
              resolution: Optional[int] = None, eval_resize: Optional[int] = None, max_memory_gb: float = 4.0,
              show_progress: bool = False, workers: int = 0) -> tuple[Data, DatasetSpec]:
    """One split via `open_split` (in memory when it fits in `max_memory_gb`, else streamed from its files), with
    `per_class` seeded random images per class (the same selection as `load_split(per_class=...)`)."""
    decode_res = eval_resize or resolution
    ds, spec = open_split(dataset, data_path, split, resolution=decode_res, max_memory_gb=max_memory_gb,
                          progress=show_progress)
    labels = dataset_labels(ds)
    idx = per_class_indices(labels, spec.num_classes, per_class, seed) if per_class else None
    res = spec.resolution
    crop = None
    if eval_resize:
        crop = resolution or get_dataset_spec(dataset).resolution
        if not crop or crop > res:
            raise UserError(f"--eval-resize {eval_resize} must be at least the network's input size ({crop})")
    out = Data(labels, tuple(spec.class_names), spec.channels, crop or res, center_crop=crop)
    if isinstance(ds, torch.utils.data.TensorDataset):
        images = ds.tensors[0]
        out.images, out.labels = (images[idx], labels[idx]) if idx is not None else (images, labels)
    elif idx is not None and len(idx) * spec.channels * res * res <= max_memory_gb * 2 ** 30:
        # a per-class subset of a large split fits in memory: decode it once, in parallel
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx.tolist()), batch_size=256,
                                             num_workers=workers)
        out.images, out.labels = torch.cat([x for x, _ in loader]), labels[idx]
    else:
        out.dataset = torch.utils.data.Subset(ds, idx.tolist()) if idx is not None else ds
        out.labels = labels[idx] if idx is not None else labels
    return out, spec


def batches_of(data: Data, batches: list[torch.Tensor], workers: int, pin: bool
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) for each index tensor in `batches`, in order; streamed splits decode in workers."""
    if data.images is not None:
        for b in batches:
            yield data.images[b], data.labels[b]
        return
    loader = torch.utils.data.DataLoader(data.dataset, batch_sampler=[b.tolist() for b in batches],
                                         num_workers=workers, pin_memory=pin)
    for x, y in loader:
        yield x, torch.as_tensor(y, dtype=torch.int64)


def to_input(x: torch.Tensor, mean, std, device: torch.device, center_crop: Optional[int] = None) -> torch.Tensor:
    """uint8 pixels -> float [0, 1] on the device (centre-cropped for the 256 -> 224 evaluation)."""
    x = x.to(device, non_blocking=True)
    if center_crop:
        h, w = x.shape[-2:]
        top, left = (h - center_crop) // 2, (w - center_crop) // 2
        x = x[..., top:top + center_crop, left:left + center_crop]
    return x.float().div_(255.0)


# ------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(net: nn.Module, data: Data, mean, std, device: torch.device, info: DistInfo = DistInfo(),
             batch_size: int = 500, workers: int = 0, amp: Amp | str | bool = OFF,
             label_map: Optional[torch.Tensor] = None,
             channels_last: bool = False) -> float:
    """Top-1 (a fraction) on `data`; under torchrun each rank takes every world_size-th image and the counts are
    summed over ranks. `label_map[data label]` is the teacher's index of that class."""
    amp = amp if isinstance(amp, Amp) else resolve_amp(amp, device)
    was_training = net.training
    net.eval()
    idx = torch.arange(len(data))[info.rank::info.world_size]
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches_of(data, list(idx.split(batch_size)), workers, device.type == "cuda"):
        x = normalize(to_input(x, mean, std, device, data.center_crop), mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = (label_map[y] if label_map is not None else y).to(device)
        with amp.autocast():
            pred = net(x).argmax(1)
        counts[0] += (pred == y).sum()
        counts[1] += len(y)
    all_reduce_sum(counts, info)
    net.train(was_training)
    return float(counts[0] / counts[1].clamp_min(1))


# -------------------------------------------------------------------------------------------- training

# Resume checkpoints: format 2 can stop inside an epoch; format 1 (end of an epoch only, its own RNG layout) is
# still read, so a run interrupted under the previous version continues.
CKPT_FORMAT = "ddtoolkit-squeeze-ckpt-2"
CKPT_FORMAT_V1 = "ddtoolkit-squeeze-ckpt-1"


@dataclass
class TrainState:
    """What a resumed run needs: plain tensors/containers only (weights_only=True readable). A state taken inside
    an epoch (`step` > 0) also holds what decides the rest of that epoch: the generator as it was before the
    epoch's permutation was drawn (the permutation is drawn again from it) and the epoch's running sums."""
    epoch: int                       # completed epochs
    step: int                        # optimiser steps done inside epoch `epoch` (0: at its start)
    model: dict
    optimizer: dict
    generator: torch.Tensor          # the run's torch.Generator now (batch order and augmentation)
    epoch_generator: torch.Tensor    # the run's generator at the start of epoch `epoch`, before its permutation
    stats: torch.Tensor              # float64 [loss sum, correct, count] of epoch `epoch` so far, summed over ranks
    rng: dict                        # utils.checkpoint.capture_rng(): torch / numpy / python global states
    history: list = field(default_factory=list)   # the log rows of the completed epochs
    elapsed: float = 0.0


def load_checkpoint(path: Path, fingerprint: str) -> TrainState:
    """A resume checkpoint of these settings (format 2, or format 1 converted: it was always at an epoch end)."""
    d = safe_torch_load(path, "squeeze.py checkpoint")
    if not (isinstance(d, dict) and d.get("format") == CKPT_FORMAT_V1):
        return load_state(path, TrainState, CKPT_FORMAT, fingerprint, "squeeze.py")
    if d.get("fingerprint") != fingerprint:
        raise UserError(f"{path} belongs to a run with other settings; pass --overwrite to start afresh or use "
                        "another --out")
    bad = first_nonfinite(d)
    if bad is not None:
        raise UserError(f"{path} holds NaN/Inf values in '{bad}': the checkpoint is damaged; pass --overwrite to "
                        "start afresh or use another --out")
    return TrainState(epoch=d["epoch"], step=0, model=d["model"], optimizer=d["optimizer"],
                      generator=d["generator"], epoch_generator=d["generator"],
                      stats=torch.zeros(3, dtype=torch.float64),
                      rng={"torch": d["torch_rng"], "python": d["python_rng"], "numpy": d["numpy_rng"]},
                      history=d["history"], elapsed=d["elapsed"])


def unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def broadcast_buffers(net: nn.Module, info: DistInfo) -> None:
    """BatchNorm running statistics are updated from each rank's own slice; make every rank hold rank 0's, so
    evaluation and the saved teacher are the same on every rank."""
    if info.enabled and dist.is_initialized():
        for b in unwrap(net).buffers():
            dist.broadcast(b, src=0)


def ranks_agree(net: nn.Module, info: DistInfo) -> Optional[bool]:
    """Whether every rank holds exactly rank 0's weights and buffers (None in one process)."""
    if not (info.enabled and dist.is_initialized()):
        return None
    flat = torch.cat([t.detach().float().flatten() for t in unwrap(net).state_dict().values()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = torch.tensor([float((flat != ref).any())], device=flat.device)
    all_reduce_sum(diff, info)
    return bool(diff.item() == 0)


def control_group(info: DistInfo):
    """A gloo group for the per-step stop vote: a CPU all-reduce of one number, so asking "did any rank get a
    stop request?" after every step never waits for the GPU (under NCCL a CUDA tensor would force a sync)."""
    if not (info.enabled and dist.is_initialized()):
        return None
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def any_rank(flag: bool, info: DistInfo, group) -> bool:
    """True on every rank when `flag` is true on at least one (a collective: every rank calls it at the same
    step, so all of them stop after the same optimiser step)."""
    if not (info.enabled and dist.is_initialized()):
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return bool(t.item() > 0)


def epoch_batches(n: int, batch_size: int, g: torch.Generator, world_size: int) -> list[torch.Tensor]:
    """This epoch's global batches: a seeded permutation cut into batch_size pieces (the last one short, as
    drop_last=False). Under torchrun a last batch smaller than the world size is dropped (a rank would be empty)."""
    order = torch.randperm(n, generator=g)
    batches = list(order.split(batch_size))
    if world_size > 1 and batches and len(batches[-1]) < world_size:
        batches.pop()
    return batches


def cpu_copy(obj):
    """A copy of a (nested) state dict with every tensor on the CPU: a checkpoint must not keep referring to
    tensors the next step changes in place, nor hold a second copy in GPU memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def weights_finite(net: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in unwrap(net).state_dict().values() if t.is_floating_point())


def train_teacher(cfg: SqueezeConfig, train: Data, test: Optional[Data], device: torch.device, log: RunLog, *,
                  info: DistInfo = DistInfo(), state: Optional[TrainState] = None, stop_after: Optional[int] = None,
                  on_checkpoint=None, ckpt_every: int = 0, stop: Optional[StopRequest] = None,
                  ckpt_path: Optional[Path] = None, workers: int = 0, show_progress: bool = True
                  ) -> tuple[nn.Module, TrainState]:
    """Train cfg.arch on `train` (decoupled.md §2); evaluate on `test` every cfg.eval_every epochs and after the
    last. `state` continues an interrupted run exactly, also from inside an epoch; `stop_after` stops once that
    many epochs are complete (to interrupt on purpose).

    `on_checkpoint(state, stopping)` is called on every rank after every epoch, after every `ckpt_every`-th
    optimiser step (0: epochs only) and after the step in flight when `stop` reports a request on any rank (then
    `stopping` is True and the callback is expected to raise utils.signals.Stopped once the state is on disk).
    A non-finite loss or weights stop the run (utils.checkpoint.Diverged, naming --lr) before such a state is
    handed over, so `ckpt_path` (named in that message) keeps the last good one. Returns the (unwrapped) network
    and the final state."""
    g = seed_everything(cfg.seed)
    net = get_network(cfg.arch, cfg.channels, cfg.num_classes, cfg.resolution)
    cuda = device.type == "cuda"
    net.to(device)
    if cuda:  # §9.3: channels_last convolutions on GPU
        net.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    amp = resolve_amp(cfg.amp, device)
    scaler = amp.scaler()
    if state is not None:
        net.load_state_dict(state.model)
        opt.load_state_dict(state.optimizer)
        restore_rng(state.rng)
    else:
        state = TrainState(0, 0, {}, {}, g.get_state(), g.get_state(), torch.zeros(3, dtype=torch.float64),
                           capture_rng())
    model = net
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if cuda else None)
    model.train()
    group = control_group(info)
    n, world = len(train), info.world_size
    t_start = time.time() - state.elapsed
    history = list(state.history)
    start_epoch, start_step = state.epoch, state.step
    # the generator as it is at the start of the first epoch run here: a mid-epoch state re-draws that epoch's
    # permutation from its epoch_generator, then continues from the generator as it was after its last step
    g.set_state(state.epoch_generator if start_step else state.generator)

    def global_stats(stats: torch.Tensor) -> torch.Tensor:
        """[loss sum, correct, count] over ranks, NaN in the loss when any rank's weights are no longer finite."""
        s = torch.cat([stats, torch.tensor([float(not weights_finite(model))], dtype=torch.float64,
                                           device=stats.device)])
        all_reduce_sum(s, info)
        s = s.cpu()
        if s[3] > 0:
            s[0] = float("nan")
        return s[:3]

    def snapshot(epoch: int, step: int, epoch_gen: torch.Tensor, stats: torch.Tensor) -> TrainState:
        return TrainState(epoch, step, cpu_copy(net.state_dict()), cpu_copy(opt.state_dict()), g.get_state(),
                          epoch_gen, stats, capture_rng(), history=list(history), elapsed=time.time() - t_start)

    for epoch in range(start_epoch, cfg.epochs):
        if stop_after is not None and epoch >= stop_after:
            break
        lr = lr_at(cfg, epoch)
        for group_ in opt.param_groups:
            group_["lr"] = lr
        epoch_gen = g.get_state()
        batches = epoch_batches(n, cfg.batch_size, g, world)
        skip = 0
        stats = torch.zeros(3, dtype=torch.float64, device=device)   # loss sum, correct, count
        if epoch == start_epoch and start_step:
            # continue inside the epoch: same permutation, the generator after the last done step, the sums so far
            # (rank 0 carries the sums of all ranks, so the epoch's all-reduce gives the same totals)
            skip = start_step
            g.set_state(state.generator)
            if info.is_main:
                stats += state.stats.to(device)
        # every rank takes a contiguous 1/world of each global batch (disjoint; together the whole batch)
        shares = [torch.tensor_split(torch.arange(len(b)), world)[info.rank] for b in batches]
        todo = list(range(skip, len(batches)))
        source = batches_of(train, [batches[i][shares[i]] for i in todo], workers, cuda)
        bar = progress(zip(todo, source), total=len(todo), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=None if (show_progress and info.is_main) else True)
        for i, (x, y) in bar:
            b, share = batches[i], shares[i]
            params = draw_augmentation(cfg.aug, len(b), cfg.resolution, cfg.crop_padding, g)  # the global batch's
            x = to_input(x, cfg.mean, cfg.std, device)
            x = normalize(apply_augmentation(cfg.aug, x, slice_params(params, share), cfg.crop_padding),
                          cfg.mean, cfg.std)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with amp.autocast():
                logits = fp32(model(x))
            loss_sum = F.cross_entropy(logits, y, reduction="sum")
            # DDP averages gradients over ranks, so scale by world / global batch: the update is that of the
            # mean loss over the whole global batch even when the slices differ in size.
            loss = loss_sum * (world / len(b))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            stats += torch.stack([loss_sum.detach().double(), (logits.argmax(1) == y).sum().double(),
                                  torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
            step = i + 1
            stopping = any_rank(stop is not None and stop.requested, info, group)
            if step == len(batches) and not stopping:
                continue   # the epoch's end below checkpoints after its evaluation; a stop does not wait for that
            if stopping or (ckpt_every > 0 and (epoch * len(batches) + step) % ckpt_every == 0):
                sums = global_stats(stats)
                check_finite(float(sums[0]), f"epoch {epoch + 1} step {step}", "--lr", ckpt_path)
                if on_checkpoint is not None:
                    on_checkpoint(snapshot(epoch, step, epoch_gen, sums), stopping)
        sums = global_stats(stats)
        broadcast_buffers(model, info)
        check_finite(float(sums[0]), f"epoch {epoch + 1}", "--lr", ckpt_path)
        train_loss, train_acc = float(sums[0] / sums[2]), float(sums[1] / sums[2])
        done = epoch + 1
        row = {"epoch": done, "lr": round(lr, 8), "train_loss": round(train_loss, 6), "train_acc": round(train_acc, 6),
               "test_acc": ""}
        due = done == cfg.epochs or (cfg.eval_every > 0 and done % cfg.eval_every == 0)
        if test is not None and due:
            row["test_acc"] = round(evaluate(net, test, cfg.mean, cfg.std, device, info, workers=workers,
                                             amp=amp, channels_last=cuda), 6)
        row["seconds"] = round(time.time() - t_start, 3)
        log.row(**row)
        history.append(row)
        test_text = f", test {row['test_acc']:.2%}" if row["test_acc"] != "" else ""
        log.info(f"epoch {done}/{cfg.epochs}: lr {lr:.4g}, loss {train_loss:.4f}, train {train_acc:.2%}{test_text} "
                 f"({row['seconds']:.1f}s)")
        state = snapshot(done, 0, g.get_state(), torch.zeros(3, dtype=torch.float64))
        if on_checkpoint is not None:
            on_checkpoint(state, any_rank(stop is not None and stop.requested, info, group))
    return net, state


# ---------------------------------------------------------------------------------------------- outputs

def output_paths(out: Path) -> dict[str, Path]:
    """<out>, <out>.ckpt, <stem>_log.csv, <stem>_config.json."""
    out = Path(out)
    return {"teacher": out, "ckpt": out.with_name(out.name + ".ckpt"),
            "log": out.with_name(out.stem + "_log.csv"), "config": out.with_name(out.stem + "_config.json")}


def squeeze(dataset: Optional[str], data_path: str | Path, out: str | Path, recipe: Optional[str] = None,
            overrides: Optional[dict] = None, *, device: str | torch.device = "cpu", resume: bool = True,
            overwrite: bool = False, stop_after: Optional[int] = None, quiet: bool = False, workers: int = 0,
            resolution: Optional[int] = None, evaluate_test: bool = True, eval_resize: Optional[int] = None,
            max_memory_gb: float = 4.0, ckpt_every: int = 0) -> Optional[dict]:
    """The training mode end to end: load data, resolve the settings, resume or start, train, write the teacher,
    log and config (rank 0). Returns the teacher's meta, or None when stopped early by `stop_after`.

    `overrides` holds SqueezeConfig fields (None = the recipe's value). `<out>.ckpt` is written after every epoch,
    after every `ckpt_every`-th optimiser step (0: epochs only) and, on SIGTERM/SIGUSR1, after the step in flight
    (then utils.signals.Stopped is raised)."""
    overrides = dict(overrides or {})
    if ckpt_every < 0:
        raise UserError(f"--ckpt-every must be 0 (a checkpoint at the end of every epoch only) or more, got "
                        f"{ckpt_every}")
    rec_name, rec = get_recipe(recipe)
    dataset = dataset or rec.dataset
    if dataset is None:
        raise UserError("--dataset is required (the chosen recipe does not name one)")
    spec = get_dataset_spec(dataset)
    if overrides.get("arch"):
        parse_name(overrides["arch"])   # an unknown name fails before any data is read
    if overrides.get("norm"):
        resolve_normalization(overrides["norm"], spec.name)
    dev = resolve_device(device) if isinstance(device, str) else device
    resolve_amp(overrides.get("amp"), dev)   # a bad mode fails before any data is read
    paths = output_paths(Path(out))
    if paths["teacher"].exists() and not paths["ckpt"].exists() and not overwrite \
            and finished_squeeze_fingerprint(paths["teacher"]) is None:
        raise UserError(f"{paths['teacher']} already exists; pass --overwrite to replace it or choose another --out")
    info = init_distributed(dev)
    dev = device_for(info, dev)
    # one writer per teacher file (rank 0 holds the lock for the job)
    lock = run_lock(paths["teacher"].parent, "squeeze.py", f".{paths['teacher'].name}.lock") if info.is_main \
        else contextlib.nullcontext()
    try:
        with lock:
            return _squeeze(spec, rec_name, rec, data_path, paths, overrides, dev, info, resume, overwrite,
                            stop_after, quiet, workers, resolution, evaluate_test, eval_resize, max_memory_gb,
                            ckpt_every)
    finally:
        cleanup(info)


def finished_squeeze_fingerprint(teacher_path: Path) -> Optional[str]:
    """The settings fingerprint a teacher file written by squeeze.py's training records (None for any other file:
    wrapped weights, foreign or unreadable files), so a re-run can tell its own finished result from another's."""
    try:
        obj = safe_torch_load(teacher_path, "teacher checkpoint")
    except UserError:
        return None
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or meta.get("source") != "squeeze.py":
        return None
    return meta.get("fingerprint") if isinstance(meta.get("fingerprint"), str) else None


def _squeeze(spec, rec_name, rec, data_path, paths, overrides, dev, info, resume, overwrite, stop_after, quiet,
             workers, resolution, evaluate_test, eval_resize, max_memory_gb, ckpt_every) -> Optional[dict]:
    main_rank = info.is_main
    log = RunLog(paths["log"] if main_rank else None, quiet=quiet or not main_rank)
    seed = overrides.get("seed") or 0
    if rec.dataset and get_dataset_spec(rec.dataset).name != spec.name:
        log.info(f"note: recipe {rec_name} was published for {rec.dataset}; using it on {spec.name}")
    train, tspec = load_data(spec.name, data_path, "train", overrides.get("train_per_class"), seed, resolution,
                             max_memory_gb=max_memory_gb, show_progress=not quiet and main_rank, workers=workers)
    test = None
    if evaluate_test:
        er = EVAL_RESIZE.get(spec.name) if eval_resize is None else (eval_resize or None)
        test, _ = load_data(spec.name, data_path, "test", overrides.get("test_per_class"), seed,
                            resolution or tspec.resolution, eval_resize=er, max_memory_gb=max_memory_gb,
                            show_progress=not quiet and main_rank, workers=workers)
        if test.class_names != train.class_names:
            raise UserError(f"{spec.name}: the test split's classes differ from the training split's "
                            f"({len(test.class_names)} vs {len(train.class_names)} classes, or another order)")
    cfg = resolve_config(spec.name, rec_name, overrides, tspec.resolution, tspec.channels, tspec.num_classes)
    get_network(cfg.arch, cfg.channels, cfg.num_classes, cfg.resolution)   # a bad arch/size fails before writing
    fingerprint = settings_fingerprint({**cfg.fingerprint_fields(), "train_images": len(train),
                                        "world_size": info.world_size})
    if paths["teacher"].exists() and not paths["ckpt"].exists() and not overwrite:
        # A finished run (its checkpoint is removed right after the teacher is written, so a kill in between, or a
        # plain re-run, lands here): the same settings mean there is nothing left to do, and nothing is rewritten.
        if finished_squeeze_fingerprint(paths["teacher"]) != fingerprint:
            raise UserError(f"{paths['teacher']} already exists (from other settings); pass --overwrite to replace "
                            f"it or choose another --out")
        log.info(f"{paths['teacher']} is already complete for these settings; nothing to do")
        return dict(safe_torch_load(paths["teacher"], "teacher checkpoint").get("meta", {}))
    state = None
    if paths["ckpt"].exists() and resume and not overwrite:
        state = load_checkpoint(paths["ckpt"], fingerprint)
        inside = f" and step {state.step} of epoch {state.epoch + 1}" if state.step else ""
        log.info(f"resuming from {paths['ckpt']} after epoch {state.epoch}/{cfg.epochs}{inside}")
        log.rows = list(state.history)   # the CSV is rewritten from the checkpoint's rows (later rows re-run)
    barrier(info)   # every rank has decided before rank 0 writes anything
    if main_rank:
        if state is None:   # --overwrite / --no-resume: a stale checkpoint must not outlive the fresh start
            paths["ckpt"].unlink(missing_ok=True)
        atomic_write_json({**asdict(cfg), "fingerprint": fingerprint, "train_images": len(train),
                           "test_images": len(test) if test is not None else 0, "world_size": info.world_size,
                           "ckpt_every": ckpt_every,
                           "device": str(dev), "data_path": str(data_path), "out": str(paths["teacher"])},
                          paths["config"])
    log.info(f"squeeze: {cfg.arch} on {spec.name} ({len(train)} train images, {cfg.num_classes} classes, "
             f"{cfg.resolution} px), recipe {cfg.recipe}, {cfg.epochs} epochs, lr {cfg.lr:g}, batch {cfg.batch_size}"
             f", aug {cfg.aug}, norm {cfg.norm or 'dataset'}, {info.world_size} process(es) on {dev}")

    def on_checkpoint(st: TrainState, stopping: bool) -> None:
        if main_rank:
            save_state(st, paths["ckpt"], CKPT_FORMAT, fingerprint)
        if stopping:
            barrier(info)   # the checkpoint is whole on disk before any rank exits (torchrun then ends the rest)
            at = f"epoch {st.epoch}" if not st.step else f"step {st.step} of epoch {st.epoch + 1}"
            raise Stopped(f"stopped by {stop.name or 'a stop request on another rank'}; checkpoint written after "
                          f"{at} ({paths['ckpt']}); re-run the same command to continue")

    with StopRequest() as stop:   # SIGTERM/SIGUSR1: checkpoint after the optimiser step in flight, exit 143
        net, state = train_teacher(cfg, train, test, dev, log, info=info, state=state, stop_after=stop_after,
                                   on_checkpoint=on_checkpoint, ckpt_every=ckpt_every, stop=stop,
                                   ckpt_path=paths["ckpt"], workers=workers, show_progress=not quiet)
    if state.epoch < cfg.epochs:
        return None
    agree = ranks_agree(net, info)
    if agree is False:
        raise UserError("the ranks ended with different weights (a DDP problem); no teacher was written")
    last = state.history[-1] if state.history else {}
    meta = {"recipe": cfg.recipe, "settings": asdict(cfg), "test_acc": last.get("test_acc") if test else None,
            "epochs": cfg.epochs, "train_images": len(train), "train_loss": last.get("train_loss"),
            "train_acc": last.get("train_acc"), "wall_seconds": round(state.elapsed, 3),
            "world_size": info.world_size, "ranks_agree": agree, "fingerprint": fingerprint, "source": "squeeze.py"}
    if meta["test_acc"] == "":
        meta["test_acc"] = None
    if main_rank:
        save_teacher(paths["teacher"], net, arch=cfg.arch, dataset=cfg.dataset, num_classes=cfg.num_classes,
                     channels=cfg.channels, resolution=cfg.resolution, mean=cfg.mean, std=cfg.std,
                     class_names=train.class_names, meta=meta)
        paths["ckpt"].unlink(missing_ok=True)
        acc = f"test top-1 {meta['test_acc']:.2%}" if meta["test_acc"] is not None else "not evaluated"
        print(f"wrote {paths['teacher']} ({cfg.arch}, {cfg.epochs} epochs, {acc})")
    barrier(info)
    return meta


# ---------------------------------------------------------------------------------- wrapping weights

# --pretrained: the torchvision weights the references use (§1.2; IMAGENET1K_V1 for every depth: careful,
# torchvision's "DEFAULT" is V2 for ResNet-50).
PRETRAINED = {"ResNet-18": "ResNet18_Weights.IMAGENET1K_V1", "ResNet-34": "ResNet34_Weights.IMAGENET1K_V1",
              "ResNet-50": "ResNet50_Weights.IMAGENET1K_V1", "ResNet-101": "ResNet101_Weights.IMAGENET1K_V1"}


def pretrained_state(arch: str) -> tuple[dict, str]:
    """torchvision's ImageNet weights for `arch` (downloaded into the torch hub cache, needs internet once)."""
    name = canonical_name(arch)
    if name not in PRETRAINED:
        raise UserError(f"--pretrained has torchvision weights only for {', '.join(PRETRAINED)}, not {name}; "
                        "pass --weights PATH instead")
    import torchvision
    weights = torchvision.models.get_weight(PRETRAINED[name])
    try:
        state = torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True, weights_only=True)
    except Exception as e:  # offline: URLError/OSError/socket errors of many kinds
        raise UserError(f"cannot download torchvision {PRETRAINED[name]} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:100] if str(e) else ''}); this needs internet: download "
                        f"{weights.url} on another machine and pass --weights PATH") from None
    return state, PRETRAINED[name]


def dataset_shape(dataset: str, data_path, resolution: Optional[int]) -> tuple[DatasetSpec, tuple]:
    """Channels, classes, resolution and class names of a dataset without decoding it (ImageFolder: from its
    test split's folders and first image)."""
    spec = get_dataset_spec(dataset)
    res = resolution or spec.resolution
    if spec.num_classes and res:
        return replace(spec, resolution=res), tuple(spec.class_names)
    _, _, raw = read_split(spec.name, data_path, "test")
    names = tuple(raw.class_names)
    if not res:
        res = int(decode_files(raw, [0], spec.channels, 0, spec.resize).shape[-1])
    return replace(spec, num_classes=len(names), resolution=res, class_names=names), names


def wrap_weights(dataset: str, data_path, out, *, weights: Optional[str | Path] = None, pretrained: bool = False,
                 arch: Optional[str] = None, norm: Optional[str] = None, evaluate_test: bool = True,
                 test_per_class: Optional[int] = None, seed: int = 0, device: str | torch.device = "cpu",
                 overwrite: bool = False, resolution: Optional[int] = None, eval_resize: Optional[int] = None,
                 workers: int = 0, quiet: bool = False, max_memory_gb: float = 4.0) -> dict:
    """--weights / --pretrained: load existing weights into `arch` for `dataset` and write a teacher file (with
    `norm`, default the dataset's statistics), optionally measuring its test top-1 first."""
    if (weights is None) == (not pretrained):
        raise UserError("pass exactly one of --weights PATH and --pretrained")
    paths = output_paths(Path(out))
    if paths["teacher"].exists() and not overwrite:
        raise UserError(f"{paths['teacher']} already exists; pass --overwrite to replace it or choose another --out")
    spec = get_dataset_spec(dataset)
    mean, std = resolve_normalization(norm, spec.name)
    if arch:
        parse_name(arch)
    if weights is not None and not Path(weights).is_file():
        raise UserError(f"weights file not found: {weights}")
    dev = resolve_device(device) if isinstance(device, str) else device
    log = RunLog(None, quiet=quiet)
    if pretrained:  # before any data is read: offline this fails at once
        known_res = resolution or spec.resolution
        arch = arch or (default_arch("default", known_res) if known_res else "ResNet-18")
        state, source = pretrained_state(arch)
    test = None
    if evaluate_test:
        er = EVAL_RESIZE.get(spec.name) if eval_resize is None else (eval_resize or None)
        test, spec = load_data(spec.name, data_path, "test", test_per_class, seed, resolution, eval_resize=er,
                               max_memory_gb=max_memory_gb, show_progress=not quiet, workers=workers)
        spec = replace(spec, resolution=test.resolution)
        class_names = test.class_names
    else:
        spec, class_names = dataset_shape(spec.name, data_path, resolution)
    arch = canonical_name(arch or default_arch("default", spec.resolution))
    net = get_network(arch, spec.channels, spec.num_classes, spec.resolution)
    if pretrained:
        try:
            result = net.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise UserError(f"torchvision {source} does not fit {arch} for {spec.name} ({spec.num_classes} "
                            f"classes): {' '.join(str(e).split())[:200]}") from None
        if result.missing_keys or result.unexpected_keys:
            raise UserError(f"torchvision {source} does not fit {arch}: "
                            f"{(result.missing_keys + result.unexpected_keys)[:3]}")
        source = f"torchvision:{source}"
    else:
        load_weights(net, weights)
        source = str(weights)
    acc = None
    if test is not None:
        acc = evaluate(net.to(dev), test, mean, std, dev, workers=workers)
        log.info(f"{arch} from {source}: test top-1 {acc:.2%} on {len(test)} {spec.name} images")
    meta = {"source": source, "norm": norm, "test_acc": acc, "test_images": len(test) if test is not None else 0,
            "epochs": None, "recipe": None}
    save_teacher(paths["teacher"], net, arch=arch, dataset=spec.name, num_classes=spec.num_classes,
                 channels=spec.channels, resolution=spec.resolution, mean=mean, std=std, class_names=class_names,
                 meta=meta)
    atomic_write_json({"mode": "wrap", "dataset": spec.name, "arch": arch, "weights": source, "norm": norm,
                       "mean": list(mean), "std": list(std), "eval": evaluate_test, "test_per_class": test_per_class,
                       "seed": seed, "test_acc": acc, "out": str(paths["teacher"])}, paths["config"])
    print(f"wrote {paths['teacher']} ({arch} from {source}"
          + (f", test top-1 {acc:.2%})" if acc is not None else ")"))
    return meta


# ------------------------------------------------------------------------------------------ pre-flight

def class_label_map(teacher_names: tuple, data_names: tuple, where: str) -> tuple[Optional[torch.Tensor], str]:
    """Map data labels to the teacher's output indices by class name (§2, §9.1 item 19: a wrong class order is
    the main cause of non-reproducing teachers). Returns (map or None for identity, what was done)."""
    if not teacher_names:
        return None, "unchecked (the teacher records no class names; data order assumed)"
    if tuple(teacher_names) == tuple(data_names):
        return None, "matched"
    index = {n: i for i, n in enumerate(teacher_names)}
    missing = [n for n in data_names if n not in index]
    if missing:
        raise UserError(f"{where}: classes {missing[:3]} of the test data are not among the teacher's "
                        f"{len(teacher_names)} classes; wrong dataset or class folders")
    return torch.tensor([index[n] for n in data_names]), "remapped by class name"


def eval_only(teacher_path: str | Path, data_path, *, dataset: Optional[str] = None, arch: Optional[str] = None,
              norm: Optional[str] = None, test_per_class: Optional[int] = None, seed: int = 0,
              device: str | torch.device = "cpu", eval_resize: Optional[int] = None, workers: int = 0,
              results: Optional[str | Path] = None, quiet: bool = False, max_memory_gb: float = 4.0) -> dict:
    """Top-1 of a teacher on the real test split, with its stored normalisation and class order (foreign
    checkpoints: give arch/dataset/norm as for utils.teacher.load_teacher)."""
    dev = resolve_device(device) if isinstance(device, str) else device
    shape = {}
    if arch and dataset:   # possibly a foreign checkpoint: its class count and size come from the dataset
        spec, _ = dataset_shape(dataset, data_path, None)
        shape = {"num_classes": spec.num_classes, "resolution": spec.resolution}
    teacher = load_teacher(teacher_path, arch=arch, dataset=dataset, norm=norm, device=dev, **shape)
    er = EVAL_RESIZE.get(teacher.dataset) if eval_resize is None else (eval_resize or None)
    test, spec = load_data(teacher.dataset, data_path, "test", test_per_class, seed, teacher.resolution,
                           eval_resize=er, max_memory_gb=max_memory_gb, show_progress=not quiet, workers=workers)
    label_map, order = class_label_map(teacher.class_names, test.class_names, str(teacher_path))
    if label_map is None and len(test.class_names) > teacher.num_classes:
        raise UserError(f"{teacher_path}: the test data has {len(test.class_names)} classes, the teacher "
                        f"{teacher.num_classes}")
    acc = evaluate(teacher.net, test, teacher.mean, teacher.std, dev, workers=workers, label_map=label_map)
    report = {"teacher": str(teacher_path), "arch": teacher.arch, "dataset": teacher.dataset, "top1": acc,
              "test_images": len(test), "mean": list(teacher.mean), "std": list(teacher.std), "class_order": order,
              "recorded_test_acc": teacher.meta.get("test_acc")}
    if results is not None:
        atomic_write_json(report, results)
    print(f"{teacher_path}: {teacher.arch} on {teacher.dataset} test: top-1 {acc:.2%} ({len(test)} images, "
          f"mean {list(teacher.mean)}, std {list(teacher.std)}, class order {order})")
    return report


# -------------------------------------------------------------------------------------------------- CLI

app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})
_O = typer.Option


@app.command()
@cli_errors
def main(
    dataset: Optional[str] = _O(None, "--dataset", "-d", help="Dataset registry name (CIFAR10, CIFAR100, "
                                "TinyImageNet, ImageNet, ImageNette, ImageFolder, ...). Default: the recipe's."),
    data_path: Path = _O(Path("data"), "--data-path", "--data_path", "--data-dir", "--data", help="Folder (or "
                         ".tar.gz) with the raw dataset; known offline copies are tried too."),
    arch: Optional[str] = _O(None, "--arch", "--model", "--arch-name", "-a", help="Network registry name "
                             "(ResNet-18-modified, resnet18_modified, ResNet-18, conv3 = ConvNet-3-BN, "
                             "ConvNet-3-BN-w64, ...). Default: the recipe's, else ResNet-18-modified up to 64 px and "
                             "ResNet-18 above (rded: ConvNet-D-BN sized to the resolution)."),
    recipe: Optional[str] = _O(None, "--recipe", help=f"Training recipe of decoupled.md §2: "
                               f"{', '.join(RECIPES)}. Default: SGD 0.1/0.9/5e-4, batch 128, 200 epochs, cosine, "
                               "crop+flip (<64 px) or RRC+flip (>=64 px), the dataset's statistics. Every value "
                               "can be overridden by its flag."),
    epochs: Optional[int] = _O(None, "--epochs", help="Training epochs (recipe: 200; sre2l-tiny 50)."),
    lr: Optional[float] = _O(None, "--lr", "--learning-rate", help="Peak SGD learning rate (recipe: 0.1; "
                             "sre2l-tiny 0.2)."),
    batch_size: Optional[int] = _O(None, "--batch-size", "--batch_size", "-b", help="GLOBAL batch size (split "
                                   "over the ranks under torchrun; recipe: 128, sre2l-tiny 256)."),
    momentum: Optional[float] = _O(None, "--momentum", help="SGD momentum (0.9)."),
    weight_decay: Optional[float] = _O(None, "--weight-decay", "--weight_decay", "--wd", help="SGD weight decay "
                                       "(recipe: 5e-4; sre2l-tiny 1e-4)."),
    warmup_epochs: Optional[int] = _O(None, "--warmup-epochs", "--warmup_epochs", "--lr-warmup-epochs",
                                      help="Epochs of linear lr warm-up before the schedule (sre2l-tiny 5)."),
    warmup_factor: Optional[float] = _O(None, "--warmup-factor", "--lr-warmup-decay", help="lr factor of the "
                                        "first warm-up epoch (0.01)."),
    schedule: Optional[str] = _O(None, "--schedule", "--lr-scheduler", help=f"lr schedule after the warm-up, per "
                                 f"epoch: {', '.join(SCHEDULES)} (cosine; step = x0.1 every 30 epochs)."),
    aug: Optional[str] = _O(None, "--aug", help=f"Training augmentation: {', '.join(AUGMENTATIONS)} (crop = "
                            "RandomCrop with zero padding, rrc = RandomResizedCrop(0.08-1), per image)."),
    crop_padding: Optional[int] = _O(None, "--crop-padding", help="Zero padding of the random crop (default "
                                     "resolution/8: 4 at 32 px)."),
    norm: Optional[str] = _O(None, "--norm", help=f"Input normalisation stored with the teacher: "
                             f"{', '.join(NORMALIZATIONS)}. Default: the recipe's, else the dataset's statistics."),
    train_per_class: Optional[int] = _O(None, "--train-per-class", "--train_per_class", help="Train on a seeded "
                                        "random subset of this many images per class (CPU-scale runs)."),
    test_per_class: Optional[int] = _O(None, "--test-per-class", "--test_per_class", help="Evaluate on a seeded "
                                       "random subset of this many test images per class."),
    out: Optional[Path] = _O(None, "--out", "--output", help="Teacher file to write (e.g. "
                             "teachers/cifar10_conv3.pt); the log and config go beside it as <stem>_log.csv and "
                             "<stem>_config.json. Default: teachers/<dataset>_<arch>.pt."),
    seed: int = _O(0, "--seed", help="Seed of the network init, the subsets, the batch order and the augmentation."),
    device: str = _O("auto", "--device", help="auto, cpu, cuda or cuda:N (under torchrun: the local rank's GPU)."),
    workers: int = _O(4, "--workers", "--num-workers", "-j", help="DataLoader workers for splits streamed from "
                      "files (ImageNet-size data); in-memory splits need none."),
    eval_every: Optional[int] = _O(None, "--eval-every", "--eval_every", help="Evaluate on the test split every N "
                                   "epochs and after the last (0: only after the last; recipe: 10, sre2l-tiny 1). "
                                   "The teacher is always the last epoch's weights."),
    resume: bool = _O(True, "--resume/--no-resume", help="Continue from <out>.ckpt when it exists (written after "
                      "every epoch, every --ckpt-every steps and on SIGTERM/SIGUSR1; refused if the settings differ)."
                      " --no-resume starts afresh."),
    ckpt_every: int = _O(0, "--ckpt-every", help="Also write the resume checkpoint <out>.ckpt every N optimiser "
                         "steps (counted over the whole run), inside epochs; a run killed mid-epoch then continues "
                         "from that step with the same result. 0: only at the end of every epoch. SIGTERM/SIGUSR1 "
                         "always checkpoint after the step in flight and exit with status 143."),
    overwrite: bool = _O(False, "--overwrite", help="Replace an existing teacher file, or a checkpoint of other "
                         "settings: start afresh (the old <out>.ckpt is deleted)."),
    quiet: bool = _O(False, "--quiet", "-q", help="Only errors and the final line."),
    weights: Optional[Path] = _O(None, "--weights", help="No training: wrap this state_dict (torchvision .pth, "
                                 "SRe2L/DWA ckpt.pth, RDED {dataset}_{arch}.pth) into a teacher file for --arch and "
                                 "--dataset, with --norm."),
    pretrained: bool = _O(False, "--pretrained", help="No training: torchvision's ImageNet weights "
                          "(IMAGENET1K_V1) for --arch (needs internet; offline, download the .pth elsewhere and "
                          "pass --weights)."),
    do_eval: bool = _O(True, "--eval/--no-eval", help="With --weights/--pretrained (and training): measure test "
                       "top-1 (needs the test split); --no-eval skips it."),
    eval_only: Optional[Path] = _O(None, "--eval-only", help="Pre-flight check (decoupled.md §9.1 item 19): print "
                                   "the top-1 of this teacher file on the test split with its stored normalisation "
                                   "and class order (foreign checkpoints: add --arch, --dataset, --norm)."),
    results: Optional[Path] = _O(None, "--results", help="With --eval-only: also write the report as JSON here."),
    amp: str = _O("off", "--amp", help=AMP_HELP),
    res: Optional[int] = _O(None, "--res", help="Resize images to this side (ImageFolder data of another size)."),
    eval_resize: Optional[int] = _O(None, "--eval-resize", help="Decode test images at this size and centre-crop "
                                    "to the network size (default 256 for the 224-px ImageNet datasets, as "
                                    "torchvision's evaluation; 0: off)."),
    max_memory_gb: float = _O(4.0, "--max-memory-gb", help="Splits larger than this (decoded) are streamed from "
                              "their files instead of held in memory."),
):
    """Train a teacher (squeeze), wrap existing weights into a teacher file, or check a teacher's test accuracy."""
    require_at_least({"--epochs": epochs, "--batch-size": batch_size, "--train-per-class": train_per_class,
                      "--test-per-class": test_per_class, "--res": res})
    if eval_only is not None:
        if weights is not None or pretrained:
            raise UserError("--eval-only checks an existing teacher; it does not take --weights/--pretrained")
        eval_only_fn(eval_only, data_path, dataset=dataset, arch=arch, norm=norm, test_per_class=test_per_class,
                     seed=seed, device=device, eval_resize=eval_resize, workers=workers, results=results,
                     quiet=quiet, max_memory_gb=max_memory_gb)
        return
    if weights is not None or pretrained:
        if weights is not None and pretrained:
            raise UserError("pass either --weights PATH or --pretrained, not both")
        if dataset is None:
            raise UserError("--dataset is required with --weights/--pretrained")
        name = get_dataset_spec(dataset).name
        out = out or Path("teachers") / f"{name}_{canonical_name(arch) if arch else 'teacher'}.pt"
        check_writable(out, "--out", folder=False)
        wrap_weights(name, data_path, out, weights=weights, pretrained=pretrained, arch=arch, norm=norm,
                     evaluate_test=do_eval, test_per_class=test_per_class, seed=seed, device=device,
                     overwrite=overwrite, resolution=res, eval_resize=eval_resize, workers=workers, quiet=quiet,
                     max_memory_gb=max_memory_gb)
        return
    rec_name, rec = get_recipe(recipe)
    if out is None:
        ds_name = get_dataset_spec(dataset or rec.dataset).name if (dataset or rec.dataset) else "dataset"
        out = Path("teachers") / f"{ds_name}_{canonical_name(arch or rec.arch) if (arch or rec.arch) else rec_name}.pt"
    check_writable(out, "--out", folder=False)
    overrides = dict(arch=arch, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
                     weight_decay=weight_decay, warmup_epochs=warmup_epochs, warmup_factor=warmup_factor,
                     schedule=schedule, aug=aug, crop_padding=crop_padding, norm=norm, train_per_class=train_per_class,
                     test_per_class=test_per_class, seed=seed, eval_every=eval_every, amp=amp)
    squeeze(dataset, data_path, out, recipe, overrides, device=device, resume=resume, overwrite=overwrite,
            quiet=quiet, workers=workers, resolution=res, evaluate_test=do_eval, eval_resize=eval_resize,
            max_memory_gb=max_memory_gb, ckpt_every=ckpt_every)


eval_only_fn = eval_only   # main's --eval-only parameter shadows the function's name inside main

if __name__ == "__main__":
    app()
