"""Knowledge-distillation training of a fresh student on a small image set: the validation protocol of the
decoupled methods SRe2L, DWA and DELT (decoupled.md §6, §10).

The student never sees a hard label: every augmented, mixed view of a batch is soft-labelled by a TEACHER
(online, `soft_targets`) or by logits recorded in advance (`stored`, a `utils.softlabels.SoftLabelReader`),
and the loss is KL(batchmean) at temperature T (`kd_loss`). Without either source the same loop trains with
plain cross-entropy on the hard labels (mixed like the views), which gives the "hard-label numbers alongside".

Everything that differs between the references is plain data in `KDRecipe` (optimiser, schedule, crop, mix,
T, the T² factor, the teacher's BatchNorm mode), and every random draw (batch order, crops, flips, RandAugment,
mix λ/box/partners) comes from the run's `torch.Generator`, so a run repeats exactly from its seed. Test
accuracy is the caller's business and is measured once, after the last epoch (no model selection on the test
set; the references report the best of their periodic evaluations, decoupled.md §6.6, §9.1 item 18).

Under torchrun (`dist` enabled) the student is wrapped in DistributedDataParallel. Every rank draws the same
batch order, views and mix (same seed), and rank r trains on rows r::world of every batch, so the union over
ranks is exactly the single-process batch (decoupled.md §8.2, Validation).

Resume works as in `utils.train.train_network`: `on_epoch_end` after every finished epoch, `on_step` after every
optimiser step (with the position inside the epoch), `resume` (a `utils.train.TrainResume`) to continue; the schedule depends on the epoch alone and the teacher holds no state
that changes its labels (in train BN mode only its running buffers move, and those are not used to label).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.amp import Amp, as_amp, fp32
from utils.augment import apply_flip, draw_pad_offsets, flip_mask, pad_crop, rrc_boxes
from utils.augment import crop_resize as _crop_resize
from utils.checkpoint import check_finite
from utils.errors import UserError
from utils.misc import progress
from utils.train import (EpochHook, StepHook, TrainResume, _batches, _draw, cutmix, identity, mid_epoch,
                         mixed_cross_entropy, sample_beta)

Prepare = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------ loss

def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float, t_squared: bool = False
            ) -> torch.Tensor:
    """KL(batchmean) between log_softmax(student / T) and softmax(teacher / T) (decoupled.md §6.2-§6.5), times T²
    only when asked (the two Tiny-ImageNet SGD recipes, §6.3 Tiny / §6.4 Tiny; Tiny's `log_target` form is the
    same number). Computed in fp32 whatever the logits' dtype."""
    if not (T > 0 and math.isfinite(T)):
        raise UserError(f"KD temperature must be a positive number, got {T}")
    log_p = F.log_softmax(student_logits.float() / T, dim=1)
    q = F.softmax(teacher_logits.detach().float() / T, dim=1)
    loss = F.kl_div(log_p, q, reduction="batchmean")
    return loss * (T * T) if t_squared else loss


# ---------------------------------------------------------------------------------------------- recipe

@dataclass
class KDRecipe:
    """One KD training recipe (decoupled.md §6). The defaults are the SRe2L/DWA ImageNet `train_KD` recipe with
    DWA's batch 128; `validate.KD_PRESETS` holds each reference's values."""
    epochs: int = 300
    optimizer: str = "adamw"             # OPTIMIZERS key: adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.01
    # False: no weight decay on normalisation-layer parameters and biases (SRe2L ImageNet, DWA ImageNet, DELT:
    # §6.2, §6.5); True: decay on every parameter (the two CIFAR scripts, and SGD in the Tiny scripts, §6.3/§6.4)
    wd_on_norm_and_bias: bool = False
    momentum: float = 0.9                # SGD only
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW only
    batch_size: int = 128
    schedule: str = "cosine"             # SCHEDULES key, stepped once per epoch
    warmup_epochs: int = 0               # linear warm-up from `warmup_start` before the schedule (Tiny: 5)
    warmup_start: float = 0.01
    temperature: float = 20.0
    t_squared: bool = False
    mix: str = "cutmix"                  # MIXES key: none | cutmix | mixup
    mix_alpha: float | None = None       # λ ~ Beta(α, α); None: 1 for cutmix, 0.8 for mixup (§6.1, §6.3)
    mix_p: float = 1.0                   # probability per batch (every batch in all references)
    crop: str = "rrc"                    # CROPS key: rrc | random-crop-pad4 | none
    crop_scale: tuple[float, float] = (0.08, 1.0)   # RandomResizedCrop area range
    crop_padding: int = 4                # random-crop-pad4: zero padding in pixel space
    flip: bool = True                    # horizontal flip, p 0.5 per image
    rand_augment: bool = False           # DELT: RandAugment m6 n2 on uint8 before the crop (§6.5)
    rand_augment_magnitude: int = 6
    rand_augment_ops: int = 2
    # "eval": the teacher normalises with its running statistics (clean default). "train": its BatchNorm uses
    # the statistics of the current mixed batch, as SRe2L relabel_cifar.py and DWA validation_cifar.py do by
    # accident (decoupled.md §9.1 item 7) [compat]; the caller restores its buffers after each run.
    teacher_bn_mode: str = "eval"
    amp: str | Amp = "off"               # --amp of the teacher and student forwards (utils.amp: off, bf16, fp16)
    extra: dict = field(default_factory=dict)

    @property
    def alpha(self) -> float:
        return self.mix_alpha if self.mix_alpha is not None else MIX_DEFAULT_ALPHA.get(self.mix, 1.0)


# -------------------------------------------------------------------------------------------- schedules

def _cosine(e: int, E: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * e / max(E, 1)))


# Factor of the base lr at epoch e of E (after any warm-up, e and E count the post-warm-up epochs).
SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "cosine": _cosine,                                                         # §6.2, §6.3 CIFAR, §6.4
    "half-cosine": lambda e, E: 0.5 * (1 + math.cos(math.pi * e / (2 * max(E, 1)))),  # DELT/RDED, §6.5: ends ≈ 0.5
    "warmup-cosine": _cosine,                  # Tiny (§6.3, §6.4): cosine with T_max = E − warm-up after it
    "linear": lambda e, E: 1 - e / max(E, 1),  # train_FKD without --cos (§6.2)
    "constant": lambda e, E: 1.0,
}


def lr_factor(schedule: str, epoch: int, epochs: int, warmup_epochs: int = 0, warmup_start: float = 0.01) -> float:
    """The lr factor for `epoch` (0-based), set once before the epoch. With W warm-up epochs the factor rises
    linearly from `warmup_start` (epoch 0) towards 1 (torch LinearLR, total_iters W), and from epoch W on the
    schedule runs over the remaining E − W epochs (SequentialLR), as in the Tiny recipes (§6.3, §6.4)."""
    if schedule not in SCHEDULES:
        raise UserError(f"unknown KD lr schedule '{schedule}' ({', '.join(SCHEDULES)})")
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return warmup_start + (1 - warmup_start) * epoch / warmup_epochs
    return SCHEDULES[schedule](epoch - warmup_epochs, epochs - warmup_epochs)


# -------------------------------------------------------------------------------------------- optimiser

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(net: nn.Module, weight_decay: float, wd_on_norm_and_bias: bool) -> list[dict]:
    """Optimiser parameter groups: with `wd_on_norm_and_bias` False, the parameters of normalisation layers and
    every bias go to a group without weight decay (decoupled.md §6.2, §6.5); the rest (conv / linear weights)
    decay. Frozen parameters are left out."""
    decay, no_decay = [], []
    for mod in net.modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            exempt = not wd_on_norm_and_bias and (isinstance(mod, _NORM_TYPES) or name == "bias")
            (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


OPTIMIZERS: dict[str, Callable[[list[dict], KDRecipe], torch.optim.Optimizer]] = {
    "adamw": lambda groups, r: torch.optim.AdamW(groups, lr=r.lr, betas=tuple(r.betas)),
    "sgd": lambda groups, r: torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum),
}


def make_optimizer(net: nn.Module, recipe: KDRecipe) -> torch.optim.Optimizer:
    if recipe.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown --optimizer '{recipe.optimizer}' ({', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[recipe.optimizer](param_groups(net, recipe.weight_decay, recipe.wd_on_norm_and_bias), recipe)


# ------------------------------------------------------------------------------------------ augmentation
# Per image, with the run's generator. Images arrive in pixel space [0, 1] (float) at the set's resolution R and
# leave at R; the caller normalises afterwards (so padding is black, as torchvision pads the PIL image).

# The box rule, the crop/resize, the padded crop and the flip are the shared ones of `utils.augment` (one
# implementation for squeeze.py, recover.py, relabel.py and this trainer); `rrc_boxes` is re-exported here.

def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int, antialias: bool = False) -> torch.Tensor:
    """Crop each image to its (top, left, h, w) box and resize it bilinearly to size×size, one image at a time
    (`utils.augment.crop_resize`: half-pixel centres, as torchvision's tensor resize). Not antialiased when
    shrinking unless asked (the trainer's documented behaviour; torchvision's tensor resize before 0.17)."""
    return _crop_resize(x, boxes, size, antialias)


def random_resized_crop(x: torch.Tensor, recipe: KDRecipe, generator: torch.Generator) -> torch.Tensor:
    boxes = rrc_boxes(len(x), x.shape[-2], x.shape[-1], tuple(recipe.crop_scale), generator)
    return crop_resize(x, boxes, x.shape[-1])


def random_crop_padded(x: torch.Tensor, recipe: KDRecipe, generator: torch.Generator) -> torch.Tensor:
    """RandomCrop(R, padding p): zero-pad p pixels, then an R×R window at a uniform integer offset per image
    (exact pixel copies, no interpolation)."""
    top, left = draw_pad_offsets(len(x), recipe.crop_padding, generator)
    return pad_crop(x, top, left, recipe.crop_padding)


CROPS: dict[str, Callable[[torch.Tensor, KDRecipe, torch.Generator], torch.Tensor]] = {
    "rrc": random_resized_crop,                 # SRe2L/DWA ImageNet and Tiny, DELT (§6.2-§6.5)
    "random-crop-pad4": random_crop_padded,     # the CIFAR scripts (§6.3, §6.4)
    "none": lambda x, recipe, generator: x,
}


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return apply_flip(x, flip_mask(len(x), generator))


def rand_augment(x: torch.Tensor, recipe: KDRecipe, generator: torch.Generator) -> torch.Tensor:
    """torchvision RandAugment(num_ops n, magnitude m) per image on uint8, a documented stand-in for DELT's timm
    `rand-m6-n2-mstd1.0` (timm draws the magnitude around m with std 1 and has a slightly different op list);
    the fill is timm's img_mean (124, 116, 104) for RGB. torchvision draws from the global RNG, so each batch
    runs under a forked RNG seeded from the run's generator (repeatable, and the global stream is untouched)."""
    from torchvision.transforms import RandAugment
    fill = [124, 116, 104] if x.shape[1] == 3 else None
    ra = RandAugment(num_ops=recipe.rand_augment_ops, magnitude=recipe.rand_augment_magnitude, fill=fill)
    u8 = (x.detach().cpu().float() * 255).round().clamp(0, 255).to(torch.uint8)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.stack([ra(img) for img in u8])
    return out.to(x.device).float().div_(255)


def augment(x: torch.Tensor, recipe: KDRecipe, generator: torch.Generator) -> torch.Tensor:
    """The per-image view of a pixel batch: [RandAugment] → crop → [flip] (DELT's order, §6.5)."""
    if recipe.crop not in CROPS:
        raise UserError(f"unknown --kd-crop '{recipe.crop}' ({', '.join(CROPS)})")
    if recipe.rand_augment:
        x = rand_augment(x, recipe, generator)
    x = CROPS[recipe.crop](x, recipe, generator)
    return random_flip(x, generator) if recipe.flip else x


# ------------------------------------------------------------------------------------------------- mix

def _mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator):
    """mixup (§6.3): λ ~ Beta(α, α), a partner permutation of the batch; x λ-weighted with its partner."""
    lam = sample_beta(alpha, generator)
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    return lam * x + (1 - lam) * x[perm], y, y[perm.to(y.device)], lam


# Each: (x, y, α, generator) -> (x_mixed, y, y_partner, weight of y). CutMix is utils.train.cutmix (one box per
# batch, random partner permutation, λ ~ Beta(α, α); §6.1), also used where DWA Tiny rolls the batch by one.
MIXES: dict[str, Callable] = {
    "none": lambda x, y, alpha, generator: (x, y, y, 1.0),
    "cutmix": cutmix,
    "mixup": _mixup,
}
MIX_DEFAULT_ALPHA = {"cutmix": 1.0, "mixup": 0.8}


def mix_batch(x: torch.Tensor, y: torch.Tensor, recipe: KDRecipe, generator: torch.Generator):
    """Mix one batch with probability mix_p (p >= 1: every batch, no extra draw)."""
    if recipe.mix not in MIXES:
        raise UserError(f"unknown --kd-mix '{recipe.mix}' ({', '.join(MIXES)})")
    if recipe.mix == "none" or recipe.mix_p <= 0 or (recipe.mix_p < 1 and _draw(generator) >= recipe.mix_p):
        return x, y, y, 1.0
    return MIXES[recipe.mix](x, y, recipe.alpha, generator)


# ---------------------------------------------------------------------------------------------- teacher

def amp_context(device: torch.device, amp: str | Amp | bool):
    """The autocast region of `amp` (utils.amp mode or Amp) on `device`; a null context for "off"."""
    return as_amp(amp, device).autocast()


def teacher_soft_targets(net: nn.Module, bn_mode: str = "eval", amp: str | Amp | bool = "off") -> Callable:
    """`soft_targets` for `train_network_kd`: the teacher's fp32 logits of exactly the given views, under no_grad.
    bn_mode "train" runs its BatchNorm on the batch statistics and updates its running buffers [compat, §9.1-7]."""
    if bn_mode not in ("eval", "train"):
        raise UserError(f"unknown --teacher-bn-mode '{bn_mode}' (eval, train)")

    def soft_targets(views: torch.Tensor) -> torch.Tensor:
        net.train(bn_mode == "train")
        with torch.no_grad(), amp_context(views.device, amp):
            return fp32(net(views))
    return soft_targets


class StoredSoftLabels(Protocol):
    """What `train_network_kd` needs of `utils.softlabels.SoftLabelReader`."""

    def num_epochs(self) -> int: ...

    def epoch_batches(self, images: torch.Tensor, epoch: int, *, temperature: float | None = None,
                      device: torch.device | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...


# ------------------------------------------------------------------------------------------------ train

@dataclass(frozen=True)
class Shard:
    """This process's rows of every batch: rank r of world keeps rows r::world."""
    rank: int = 0
    world: int = 1


def check_recipe(recipe: KDRecipe) -> None:
    """One-line errors for impossible settings, before any training."""
    if not (recipe.lr > 0 and math.isfinite(recipe.lr)):
        raise UserError(f"KD lr must be a positive finite number, got {recipe.lr}")
    if recipe.epochs < 1 or recipe.batch_size < 1:
        raise UserError(f"KD needs epochs >= 1 and batch size >= 1 (got {recipe.epochs}, {recipe.batch_size})")
    for what, key, table in (("--optimizer", recipe.optimizer, OPTIMIZERS), ("--schedule", recipe.schedule,
                             SCHEDULES), ("--kd-mix", recipe.mix, MIXES), ("--kd-crop", recipe.crop, CROPS)):
        if key not in table:
            raise UserError(f"unknown {what} '{key}' in KD mode ({', '.join(table)})")
    if recipe.schedule == "warmup-cosine" and recipe.warmup_epochs < 1:
        raise UserError("--schedule warmup-cosine needs --warmup-epochs >= 1 (the Tiny recipes use 5)")
    if recipe.warmup_epochs >= recipe.epochs:
        raise UserError(f"--warmup-epochs {recipe.warmup_epochs} leaves no epoch of the schedule "
                        f"(--epochs {recipe.epochs})")
    lo, hi = recipe.crop_scale
    if not 0 < lo <= hi <= 1:
        raise UserError(f"crop scale must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
    if not 0 <= recipe.mix_p <= 1:
        raise UserError(f"mix probability must be in [0, 1], got {recipe.mix_p}")
    if recipe.mix != "none" and not (recipe.alpha > 0 and math.isfinite(recipe.alpha)):
        raise UserError(f"mix alpha must be a positive number, got {recipe.alpha}")
    if not (recipe.temperature > 0 and math.isfinite(recipe.temperature)):
        raise UserError(f"--temperature must be a positive number, got {recipe.temperature}")
    if recipe.teacher_bn_mode not in ("eval", "train"):
        raise UserError(f"unknown --teacher-bn-mode '{recipe.teacher_bn_mode}' (eval, train)")


def _to_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


def train_network_kd(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: KDRecipe,
                     generator: torch.Generator, device: torch.device,
                     soft_targets: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     stored: StoredSoftLabels | None = None, prepare: Prepare = identity,
                     shard: Shard = Shard(), desc: str = "kd", *, resume: TrainResume | None = None,
                     on_epoch_end: EpochHook | None = None, on_step: StepHook | None = None,
                     lower: str | None = None, ckpt: str | Path | None = None) -> list[float]:
    """Train `net` in place on `images` (pixel space [0, 1], float or uint8 [N, C, R, R]) and return the
    per-epoch mean training loss (logs only, never selection).

    Per batch (§10): views = augment(pixels) → `prepare` (the teacher's normalisation) → mix; then
    - `soft_targets` given: loss = kd_loss(student(views), soft_targets(views), T) — the teacher labels exactly
      the mixed views the student trains on;
    - `stored` given: the views and teacher logits of epoch e are `stored.epoch_batches(prepare(images), e)`
      (recorded crops/flips/mix replayed by the reader, in its batches); nothing is augmented here, and the
      recipe's batch size, crop and mix do not apply;
    - neither: cross-entropy on the hard labels, mixed like the views (the hard-label arm).
    Under DDP (`shard.world` > 1, process group initialised) each rank keeps rows rank::world of every batch.
    `resume` / `on_epoch_end` / `on_step` / `lower` / `ckpt`: as in `utils.train.train_network` (the hooks get the
    bare student, not its DDP wrapper).
    """
    check_recipe(recipe)
    if stored is not None and soft_targets is not None:
        raise ValueError("give soft_targets or stored, not both")
    if stored is not None and recipe.epochs > stored.num_epochs():
        raise UserError(f"the stored soft labels cover {stored.num_epochs()} epochs but {recipe.epochs} were asked "
                        "for; lower --epochs or relabel for more epochs")
    net.to(device).train()
    model: nn.Module = net
    if shard.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    opt = make_optimizer(net, recipe)
    scaler = as_amp(recipe.amp, device).scaler()
    n = len(images)
    bs = min(recipe.batch_size, n)
    stored_images = prepare(_to_pixels(images)) if stored is not None else None
    start, losses = 0, []
    if resume is not None:
        opt.load_state_dict(resume.opt)
        start, losses = resume.epoch, [float(v) for v in resume.losses]
    for epoch in progress(range(start, recipe.epochs), total=recipe.epochs - start, desc=desc):
        factor = lr_factor(recipe.schedule, epoch, recipe.epochs, recipe.warmup_epochs, recipe.warmup_start)
        for g in opt.param_groups:
            g["lr"] = recipe.lr * factor
        inside = mid_epoch(resume, epoch)
        # the epoch's batch order (stored labels replay their own); a run resumed inside the epoch keeps its order
        order = None if stored is not None else (
            inside.order if inside is not None else torch.randperm(n, generator=generator))
        total, count = (float(inside.total), int(inside.count)) if inside is not None else (0.0, 0)
        first = inside.step if inside is not None else 0
        batches = _epoch_batches(images, labels, recipe, generator, device, prepare, stored, stored_images, epoch,
                                 bs, order, first)
        for step, (views, target, y2, r) in enumerate(batches, start=first):
            rows = slice(shard.rank, None, shard.world)
            if len(views) < shard.world:  # too few rows for every rank: skipped everywhere alike
                continue
            views = views[rows]
            with amp_context(device, recipe.amp):
                out = fp32(model(views))
            if stored is not None:
                t_logits = target[rows].to(device).float()
                if t_logits.shape != out.shape:
                    raise UserError(f"stored soft labels have shape {tuple(t_logits.shape)} but the student "
                                    f"outputs {tuple(out.shape)}; they were made for another class count")
                loss = kd_loss(out, t_logits, recipe.temperature, recipe.t_squared)
            elif soft_targets is not None:
                loss = kd_loss(out, soft_targets(views), recipe.temperature, recipe.t_squared)
            else:
                loss = mixed_cross_entropy(out, target[rows], y2[rows], r)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.item() * len(views)
            count += len(views)
            if on_step is not None:
                on_step(TrainResume(epoch, {}, list(losses), step + 1, order, total, count), net, opt)
        losses.append(total / max(count, 1))
        check_finite(losses[-1], f"epoch {epoch + 1}/{recipe.epochs} of {desc}",
                     lower or f"the lr (now {recipe.lr:g})", ckpt)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, net, opt, losses)
    return losses


def _epoch_batches(images, labels, recipe, generator, device, prepare, stored, stored_images, epoch, bs, order,
                   first: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """(views, teacher logits or labels, partner labels, label weight) for every batch of one epoch from batch
    `first` on (the ones before were trained before a stop; their draws are already in the restored generator)."""
    if stored is not None:  # T picks the stored tail mass of top-k labels; views are replayed on `device`
        replayed = stored.epoch_batches(stored_images, epoch, temperature=recipe.temperature, device=device)
        for views, logits in itertools.islice(replayed, first, None):
            yield views.to(device).float(), logits, logits, 1.0
        return
    for start in range(first * bs, len(images), bs):
        idx = order[start:start + bs]
        x = augment(_to_pixels(images[idx].to(device, non_blocking=True)), recipe, generator)
        y = labels[idx].to(device, non_blocking=True)
        yield mix_batch(prepare(x), y, recipe, generator)


# ------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def count_correct(net: nn.Module, data, device: torch.device, prepare: Prepare = identity, batch_size: int = 500,
                  workers: int = 0, shard: Shard = Shard(), amp: str | Amp | bool = "off") -> tuple[int, int]:
    """(correct, total) top-1 counts of `net` (eval mode) on this shard (items rank::world) of `data`: a pair of
    tensors, a TensorDataset, or any Dataset of (image, label). The caller all-reduces the counts."""
    if isinstance(data, torch.utils.data.TensorDataset):
        data = tuple(data.tensors)
    if shard.world > 1:
        data = (data[0][shard.rank::shard.world], data[1][shard.rank::shard.world]) if isinstance(data, tuple) \
            else torch.utils.data.Subset(data, range(shard.rank, len(data), shard.world))
    net.to(device).eval()
    correct = total = 0
    for x, y in _batches(data, batch_size, workers):
        with amp_context(device, amp):
            pred = net(prepare(x.to(device))).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct, total


def resize_center_crop(x: torch.Tensor) -> torch.Tensor:
    """DELT's evaluation view (§6.5): Resize(⌊R/7⌋·8) then CenterCrop(R), on pixel batches of side R (at R = 224
    this is the ImageNet Resize 256 → CenterCrop 224 of §6.2/§6.4). The test images are already decoded at R, so
    this is a second, antialiased resize of them; at R = 32 it is the identity."""
    r = x.shape[-1]
    s = r // 7 * 8
    if s == r:
        return x
    y = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    off = int(round((s - r) / 2))
    return y[..., off:off + r, off:off + r]


EVAL_TRANSFORMS: dict[str, Prepare] = {"none": identity, "resize-crop": resize_center_crop}
