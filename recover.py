"""recover.py: synthesise images from a frozen teacher's BatchNorm statistics. SRe2L, DWA and DELT.

    python squeeze.py --dataset CIFAR10 --arch conv3 --out teachers/cifar10_conv3.pt
    python recover.py --method sre2l --teacher teachers/cifar10_conv3.pt --ipc 10 --out syn/sre2l
    python rank_select.py --teacher teachers/cifar10_conv3.pt --dataset CIFAR10 --ipc 10 --out init/medium
    python recover.py --method delt --teacher teachers/cifar10_conv3.pt --init-path init/medium --ipc 10 --out syn/delt
    python validate.py --syn syn/delt --teacher teachers/cifar10_conv3.pt --preset delt --baseline random

Spec: docs/methods/decoupled.md (section numbers below refer to it). Pixels x (normalised space of the teacher)
are optimised so that the frozen teacher (eval mode) classifies each image as its target class and the statistics
of the activations entering every BatchNorm layer match the layer's running statistics (§1.3). Methods:
- sre2l: Gaussian init, one image per class per batch (§3);
- dwa:   real init, and before each batch the teacher weights move rho up the CE gradient in K normalised steps,
         restored afterwards (§4);
- delt:  real "medium" init from rank_select.py, class-major batches, EarlyLate rounds and an easy-to-hard crop
         schedule (§5).

Work units (§8.2): SRe2L/DWA: (ipc index, class block); DELT: a block of B consecutive (class, index) pairs in
class-major order. Each unit is seeded from (seed, method, its key), so the output does not depend on how the
work is split: `--ipc-start/--ipc-end`, `--class-start/--class-end`, `--shard-index/--num-shards`, torchrun ranks
or `sbatch --array` tasks all produce the same images. Units whose images exist are skipped (resume); each image is
written atomically. The group in flight is checkpointed every `--ckpt-every` iterations and on SIGTERM/SIGUSR1 to
`.units/group-<first unit key>.ckpt.pt` (pixels, Adam state, iteration, every RNG, DWA's perturbed weights), so a
re-run of the same command continues mid-group and writes the same bytes as an uninterrupted run (CPU, one thread).

Speed (§9.3): units with the same shape are recovered together in one teacher forward (`--group`), with the BN
statistics computed per unit, so each unit's gradient is that of a separate run; teacher parameters are frozen
outside DWA's ascent; channels_last; bf16 autocast on GPU (`--amp`).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import typer
from PIL import Image
from torch import nn

from utils.amp import AMP_HELP, OFF, Amp, fp32, resolve_amp
from utils.augment import crop_resize_box, flip_mask, rrc_boxes
from utils.checkpoint import capture_rng, check_finite, load_state, restore_rng, save_state, settings_fingerprint
from utils.datasets import IMAGE_SUFFIXES, to_8bit
from utils.distributed import barrier, cleanup, init_distributed, resolve_shard, shard
from utils.errors import UserError
from utils.io import check_writable, atomic_write_bytes, atomic_write_json, safe_torch_load
from utils.misc import require_at_least, RunLog, cli_errors, progress, resolve_device
from utils.signals import StopRequest, Stopped
from utils.synset import save_grid
from utils.teacher import Teacher, load_teacher

METHODS = ("sre2l", "dwa", "delt")

# --------------------------------------------------------------------------------------------- settings


@dataclass
class RecoverConfig:
    """Every setting that decides the images. Defaults: SRe2L's script defaults (§3.2 "Defaults if a flag is
    omitted"), except the priors, which the published scripts set to 0."""
    method: str = "sre2l"
    iterations: int = 1000           # T per unit (DELT: the budget ITR of the earliest images)
    lr: float = 0.1
    batch_size: int = 100            # B: classes per unit (SRe2L/DWA) or images per unit (DELT)
    r_bn: float = 0.05
    first_bn_multiplier: float = 10.0
    r_var: float = 1.0               # gamma_var of §1.3 (DWA's r-var)
    bn_loss_norm: str = "sum"        # "sum" (reference) | "channel-mean": each r_l / sqrt(C_l) (§9.1 item 20)
    tv_l2: float = 0.0               # SRe2L's image priors (§1.3), 0 in every published script
    l2_scale: float = 0.0
    # augmentation of the batch, one draw per unit per iteration (§1.5)
    rrc: bool = False
    crop_min: float = 0.08
    crop_max: float = 1.0
    flip: bool = False
    jitter: int = 4
    jitter_mode: str = "positive"    # positive: shifts in {0..J} (SRe2L ImageNet/CIFAR, DWA); symmetric: {-J..J} (Tiny)
    rrc_antialias: bool = False      # torchvision <= 0.16 resized tensors without antialiasing (§1.5)
    crop_schedule: str = "none"      # DELT's easy-to-hard crop floor (§5.4): none | step | linear | cosine
    milestone: float = 0.0
    # initialisation
    init: str = "noise"              # noise: N(0, 1) (SRe2L) | real: --init-path (DWA, DELT)
    init_resize: str = "center"      # real images: center = Resize(floor(R/7)*8) + CenterCrop (DELT); stretch (DWA)
    # DWA (§4.2)
    dwa_steps: int = 12
    rho: float = 15e-3
    reference_quirks: bool = False   # DWA: let the K ascent passes leak CE gradients into the first pixel step
    # DELT (§5.3)
    early_late: bool = False
    round_iterations: int = 500
    min_iterations: Optional[int] = None
    # output (§1.6)
    image_format: str = "jpeg"       # jpeg (quality below, the reference's PIL default) | png (lossless)
    jpeg_quality: int = 75
    rounding: str = "floor"          # floor: the reference truncates p*255; round
    seed: int = 0


# Published settings (§3.2, §4.5, §5.6), plus CPU-scale CIFAR-10 rows the toolkit adds (marked).
_SRE2L_IN1K = dict(method="sre2l", iterations=4000, lr=0.25, batch_size=100, r_bn=0.01, rrc=True, flip=True,
                   jitter=32, init="noise")
_DWA_CIFAR = dict(method="dwa", iterations=1000, lr=0.25, batch_size=100, r_bn=0.01, dwa_steps=12, rho=15e-3,
                  r_var=11.0, jitter=4, init="real", init_resize="stretch")
_DELT_IN1K = dict(method="delt", iterations=4000, lr=0.25, batch_size=100, r_bn=0.01, rrc=True, flip=True,
                  jitter=0, crop_schedule="cosine", milestone=1.0, init="real", init_resize="center",
                  early_late=True, round_iterations=500)
PRESETS: dict[str, dict] = {
    "sre2l-in1k": _SRE2L_IN1K,
    "sre2l-tiny": dict(_SRE2L_IN1K, lr=0.1, r_bn=1.0, jitter=4, jitter_mode="symmetric"),
    "sre2l-cifar100": dict(method="sre2l", iterations=1000, lr=0.25, batch_size=100, r_bn=0.01, jitter=4,
                           init="noise"),
    "dwa-cifar100": _DWA_CIFAR,
    "dwa-cifar10": _DWA_CIFAR,       # not in DWA's scripts (§4.5): the CIFAR-100 values, one batch of 10 classes
    "dwa-tiny": dict(_DWA_CIFAR, iterations=2000, lr=0.1, batch_size=200, rrc=True, flip=True),
    "dwa-in1k": dict(_DWA_CIFAR, iterations=2000, lr=0.25, batch_size=100, dwa_steps=15, r_var=2.0, rrc=True,
                     flip=True, jitter=32),
    "delt-in1k": _DELT_IN1K,         # IPC 1: early_late is switched off by resolve_config (§5.6)
    # DELT has no published CIFAR/Tiny scripts (§5.6): SRe2L's lr/r-bn on that dataset (CIFAR-100: 0.25 / 0.01;
    # Tiny: 0.1 / 1.0, SRe2L's recover_tiny.sh), ITR 4000 / RI 500.
    "delt-cifar": dict(_DELT_IN1K, rrc=True),
    "delt-tiny": dict(_DELT_IN1K, lr=0.1, r_bn=1.0),
}


def resolve_config(preset: str | None, overrides: dict, ipc: int) -> RecoverConfig:
    """Preset values, then explicit flags (None = not given). DELT's IPC-1 rows run without EarlyLate."""
    base: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown recover preset '{preset}'; known: {', '.join(PRESETS)}")
        base = dict(PRESETS[preset])
        if base.get("method") == "delt" and ipc == 1:
            base["early_late"] = False
    given = {k: v for k, v in overrides.items() if v is not None}
    cfg = RecoverConfig(**{**base, **given})
    check_config(cfg)
    return cfg


LR_MAX = float(torch.finfo(torch.float32).max) / 2


def check_config(cfg: RecoverConfig) -> None:
    checks = [
        (cfg.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got '{cfg.method}'"),
        (cfg.iterations >= 1, "--iterations must be >= 1"),
        (cfg.batch_size >= 1, "--batch-size must be >= 1"),
        # Adam's first step is 2 x lr and must fit a float32 (beyond that torch fails with a traceback)
        (0 < cfg.lr <= LR_MAX, f"--lr must be a positive number no larger than {LR_MAX:.3g}"),
        (0 < cfg.crop_min <= cfg.crop_max <= 1, "crop scale must satisfy 0 < min <= max <= 1"),
        (cfg.jitter >= 0, "--jitter must be >= 0"),
        (cfg.jitter_mode in ("positive", "symmetric"), "--jitter-mode must be positive or symmetric"),
        (cfg.crop_schedule in CROP_SCHEDULES, f"--crop-schedule must be one of {', '.join(CROP_SCHEDULES)}"),
        (0 <= cfg.milestone <= 1, "--milestone must be in [0, 1]"),
        (cfg.init in ("noise", "real"), "--init must be noise or real"),
        (cfg.init_resize in ("center", "stretch"), "--init-resize must be center or stretch"),
        (cfg.bn_loss_norm in ("sum", "channel-mean"), "--bn-loss-norm must be sum or channel-mean"),
        (cfg.image_format in ("jpeg", "png"), "--image-format must be jpeg or png"),
        (cfg.rounding in ("floor", "round"), "--rounding must be floor or round"),
        (1 <= cfg.jpeg_quality <= 100, "--jpeg-quality must be in 1..100"),
        (cfg.dwa_steps >= 1 and cfg.rho >= 0, "DWA needs --steps >= 1 and --rho >= 0"),
        # §5.3 (added on review): the reference divides by zero when EarlyLate has no round length.
        (not cfg.early_late or cfg.round_iterations > 0, "--use-early-late needs --round-iterations > 0"),
        (not cfg.early_late or cfg.iterations >= cfg.round_iterations,
         "--iterations must be >= --round-iterations with EarlyLate"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    if cfg.method == "sre2l" and cfg.init == "real":
        pass  # allowed: SRe2L with real init is DELT's IPC-1 ablation


# --------------------------------------------------------------------------------------------- BN loss (§1.3)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 (autocast) -> fp32; fp32 and fp64 stay as they are (bench/parity_decoupled.py compares whole
    trajectories with the originals in fp64, where Adam's first steps, g / (|g| + eps), would otherwise amplify
    fp32 rounding of near-zero gradients)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class BNStatHooks:
    """Forward hooks on every BatchNorm2d input. For a forward of G units of n images each (stacked unit-major),
    `losses(G)` returns R_BN per unit: sum_l w_l (||m_l - mu_l|| + r_var ||v_l - s_l||), with the batch mean and
    BIASED variance taken over (images of the unit, H, W), unsquared L2 norms over channels, and w = first_bn_mult
    for the first BN layer in registration order. Statistics are computed in fp32 even under autocast."""

    def __init__(self, net: nn.Module, first_bn_multiplier: float, r_var: float, norm: str = "sum"):
        self.layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise UserError("the teacher has no BatchNorm2d layer; BN-statistics recovery needs one (use a -BN net)")
        self.weights = [first_bn_multiplier] + [1.0] * (len(self.layers) - 1)
        self.r_var = r_var
        self.norm = norm
        self.inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, inp, out):
            self.inputs[i] = inp[0]
        return hook

    def losses(self, groups: int) -> torch.Tensor:
        total = None
        for a, bn, w in zip(self.inputs, self.layers, self.weights):
            C = a.shape[1]
            a = at_least_fp32(a)
            if a.dim() == 4 and not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last):
                x = a.permute(0, 2, 3, 1).reshape(groups, -1, C)                     # [G, n*H*W, C], a view
                mean = x.mean(dim=1)
                d = x - mean[:, None, :]
                var = (d * d).mean(dim=1)                                             # biased
            else:
                x = a.reshape(groups, -1, C, a.shape[2] * a.shape[3])                # [G, n, C, HW]
                # two staged means (inner axis first) are ~2x faster than var_mean over (n, H, W) on CPU
                mean = x.mean(dim=3).mean(dim=1)                                      # [G, C]
                d = x - mean[:, None, :, None]
                var = (d * d).mean(dim=3).mean(dim=1)                                 # biased
            r = (torch.linalg.vector_norm(mean - bn.running_mean.to(a.dtype), dim=1)
                 + self.r_var * torch.linalg.vector_norm(var - bn.running_var.to(a.dtype), dim=1))
            if self.norm == "channel-mean":
                r = r / math.sqrt(C)
            total = w * r if total is None else total + w * r
        self.inputs = [None] * len(self.layers)
        return total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def tv_l2_prior(x: torch.Tensor) -> torch.Tensor:
    """SRe2L's total-variation prior (§1.3): Frobenius norms of the horizontal, vertical and both diagonal
    neighbour differences, summed."""
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    return sum(torch.linalg.vector_norm(d) for d in (d1, d2, d3, d4))


# --------------------------------------------------------------------------------------------- schedules


def cosine_lr(lr0: float, t: int, total: int) -> float:
    """lr_t = lr0 * 0.5 (1 + cos(pi t / T)), no warm-up (§1.4)."""
    return lr0 * 0.5 * (1 + math.cos(math.pi * t / total))


CROP_SCHEDULES = ("none", "step", "linear", "cosine")


def crop_floor(schedule: str, t: int, total: int, milestone: float, base_min: float = 0.08) -> float:
    """DELT/CDA's easy-to-hard lower crop scale s_min(t) (§5.4); 'none' keeps base_min."""
    if schedule == "none" or t >= milestone * total:
        return base_min
    frac = t / (milestone * total)
    if schedule == "step":
        return 1.0
    if schedule == "linear":
        return base_min + (1 - base_min) * (1 - frac)
    return base_min + (1 - base_min) * 0.5 * (1 + math.cos(math.pi * frac))


def round_sizes(ipc: int, rounds: int) -> list[int]:
    """DELT's split of a class's IPC images over R rounds (§5.3): the first IPC mod R rounds get one more."""
    return [ipc // rounds + (1 if r < ipc % rounds else 0) for r in range(rounds)]


def start_round(index: int, ipc: int, rounds: int) -> int:
    """The round in which per-class image `index` joins: min{r : index < e_r}, e = cumulative round sizes."""
    cum = 0
    for r, s in enumerate(round_sizes(ipc, rounds)):
        cum += s
        if index < cum:
            return r
    raise ValueError(f"index {index} >= ipc {ipc}")


def image_iterations(ipc: int, iterations: int, round_iterations: int) -> list[int]:
    """Update iterations each per-class index receives under EarlyLate with uniform budgets: (R - r0(i)) * RI."""
    rounds = iterations // round_iterations
    return [(rounds - start_round(i, ipc, rounds)) * round_iterations for i in range(ipc)]


# --------------------------------------------------------------------------------------------- work units


@dataclass(frozen=True)
class Unit:
    """One independent batch: the (class, per-class index) of each position, and which positions are active in
    each round (all of them, in one round of T iterations, unless EarlyLate)."""
    key: str
    classes: tuple[int, ...]
    indices: tuple[int, ...]
    active: tuple[tuple[bool, ...], ...]    # [rounds][positions]
    round_len: int

    @property
    def iterations(self) -> int:
        return len(self.active) * self.round_len

    @property
    def signature(self) -> tuple:
        return (len(self.classes), self.active, self.round_len)


def _rounds_per_class(cfg: RecoverConfig, classes: list[int]) -> dict[int, int]:
    full = cfg.iterations // cfg.round_iterations
    if cfg.min_iterations is None or cfg.min_iterations == cfg.iterations:
        return {c: full for c in classes}
    # §5.3 [compat, unused by the scripts]: per-class budgets drawn uniformly; seeded here (the reference is not).
    lo = max(cfg.min_iterations, cfg.round_iterations) // cfg.round_iterations
    g = torch.Generator().manual_seed(cfg.seed)
    draws = torch.randint(lo, full + 1, (max(classes) + 1,), generator=g)
    return {c: int(draws[c]) for c in classes}


def plan_units(cfg: RecoverConfig, num_classes: int, ipc_range: tuple[int, int], class_range: tuple[int, int],
               ipc_total: int) -> list[Unit]:
    """The flat, deterministic work list of a run (§3.1, §5.3, §8.2)."""
    c0, c1 = class_range
    k0, k1 = ipc_range
    if not (0 <= c0 < c1 <= num_classes):
        raise UserError(f"class range {c0}:{c1} is not inside 0:{num_classes}")
    if not (0 <= k0 < k1):
        raise UserError(f"ipc range {k0}:{k1} is empty")
    B = cfg.batch_size
    units = []
    if cfg.method in ("sre2l", "dwa"):
        for k in range(k0, k1):
            for first in range(c0, c1, B):
                cls = tuple(range(first, min(first + B, c1)))
                units.append(Unit(f"ipc{k:04d}_c{first:04d}", cls, (k,) * len(cls),
                                  ((True,) * len(cls),), cfg.iterations))
        return units
    # DELT: class-major list of (class, index), cut into consecutive blocks of B (§5.3 "Batching").
    pairs = [(c, k) for c in range(c0, c1) for k in range(k0, k1)]
    rounds_of = _rounds_per_class(cfg, list(range(c0, c1))) if cfg.early_late else None
    for start in range(0, len(pairs), B):
        block = pairs[start:start + B]
        cls = tuple(c for c, _ in block)
        idx = tuple(k for _, k in block)
        if not cfg.early_late:
            units.append(Unit(f"c{cls[0]:04d}_i{idx[0]:04d}", cls, idx, ((True,) * len(block),), cfg.iterations))
            continue
        spans = []
        for c, k in block:
            R = rounds_of[c]
            if k >= ipc_total:
                raise UserError(f"per-class index {k} is outside --ipc {ipc_total}")
            spans.append((start_round(k, ipc_total, R) if k < ipc_total else R, R))
        max_r = max(R for _, R in spans)
        active = [tuple(r0 <= r < R for r0, R in spans) for r in range(max_r)]
        active = tuple(a for a in active if any(a))   # empty rounds are dropped; T shrinks by RI each (§5.3 item 2)
        units.append(Unit(f"c{cls[0]:04d}_i{idx[0]:04d}", cls, idx, active, cfg.round_iterations))
    return units


def group_units(units: list[Unit], group: int) -> list[list[Unit]]:
    """Consecutive units of identical shape, at most `group` per group. Deterministic from the work list alone, so
    any sharding of the groups gives the same groups (and bitwise the same images)."""
    groups: list[list[Unit]] = []
    for u in units:
        if groups and len(groups[-1]) < group and groups[-1][0].signature == u.signature:
            groups[-1].append(u)
        else:
            groups.append([u])
    return groups


def unit_seed(seed: int, method: str, key: str) -> int:
    """§8.2: seeds derive from the work unit, never from the process or the wall clock."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{method}:{key}".encode()).digest()[:6], "big")


# --------------------------------------------------------------------------------------------- augmentation (§1.5)


def sample_crop(size: int, scale: tuple[float, float], generator: torch.Generator,
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (10 tries, then the centre-crop fallback), drawn from `generator` by the
    shared `utils.augment.rrc_boxes`. (top, left, h, w)."""
    return tuple(rrc_boxes(1, size, size, scale, generator, ratio)[0].tolist())


@dataclass(frozen=True)
class AugDraw:
    crop: tuple[int, int, int, int] | None
    flip: bool
    shift: tuple[int, int]


def draw_augmentation(cfg: RecoverConfig, size: int, s_min: float, generator: torch.Generator) -> AugDraw:
    """One draw for a whole unit (the batched-tensor behaviour of the references): crop, flip, then roll."""
    crop = sample_crop(size, (s_min, cfg.crop_max), generator) if cfg.rrc else None
    flip = bool(flip_mask(1, generator)) if cfg.flip else False
    if cfg.jitter > 0:
        lo = -cfg.jitter if cfg.jitter_mode == "symmetric" else 0
        dy, dx = torch.randint(lo, cfg.jitter + 1, (2,), generator=generator).tolist()
    else:
        dy = dx = 0
    return AugDraw(crop, flip, (dy, dx))


def apply_augmentation(x: torch.Tensor, draw: AugDraw, antialias: bool = False) -> torch.Tensor:
    if draw.crop is not None:                   # one box for the whole unit, as the references crop a batch
        x = crop_resize_box(x, draw.crop, x.shape[-1], antialias)
    if draw.flip:
        x = x.flip(3)
    if draw.shift != (0, 0):
        x = torch.roll(x, shifts=draw.shift, dims=(2, 3))
    return x


# --------------------------------------------------------------------------------------------- initialisation


def _preprocess(img: Image.Image, res: int, mode: str, channels: int = 3) -> torch.Tensor:
    img = to_8bit(img).convert("RGB" if channels == 3 else "L")
    if mode == "stretch":                                   # DWA Tiny/ImageNet: exact square, aspect not kept
        img = img.resize((res, res), Image.BILINEAR)
    else:                                                   # DELT: Resize(floor(R/7)*8) + CenterCrop(R)
        short = (res // 7) * 8
        w, h = img.size
        if min(w, h) != short:
            s = short / min(w, h)
            img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - res) // 2, (h - res) // 2
        img = img.crop((left, top, left + res, top + res))
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy()).float() / 255


class RealInit:
    """Real initial images: an ImageFolder (rank_select.py output or any class-per-folder tree; class c = the
    c-th sorted folder, index k = the k-th sorted file, §4.4/§5.1, sorted because the references' unsorted
    listings are not reproducible, §9.1 item 9) or DWA's CIFAR tensors `tensor_{k}.pt` ([C, 3, R, R], already
    normalised)."""

    def __init__(self, path: Path, teacher: Teacher, resize: str):
        self.path = Path(path)
        self.teacher = teacher
        self.resize = resize
        if not self.path.is_dir():
            raise UserError(f"--init-path {self.path} is not a folder")
        self.tensor_files = sorted(self.path.glob("tensor_*.pt"))
        self._tensors: dict[int, torch.Tensor] = {}
        if not self.tensor_files:
            # rank_select.py records the class folders in the teacher's label order (which is not the sorted
            # order for the fixed-wnid ImageNet subsets); any other ImageFolder uses sorted folder names.
            manifest = self.path / "selection.json"
            if manifest.is_file():
                try:
                    names = json.loads(manifest.read_text())["class_dirs"]
                except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                    raise UserError(f"{manifest} is corrupt (no class_dirs); re-run rank_select.py") from None
                self.class_dirs = [self.path / n for n in names]
            else:
                self.class_dirs = sorted(d for d in self.path.iterdir() if d.is_dir() and not d.name.startswith("."))
            if len(self.class_dirs) != teacher.num_classes:
                raise UserError(f"--init-path {self.path} has {len(self.class_dirs)} class folders but the teacher "
                                f"has {teacher.num_classes} classes")
            self._files: dict[int, list[Path]] = {}

    def _class_files(self, c: int) -> list[Path]:
        if c not in self._files:
            self._files[c] = sorted(f for f in self.class_dirs[c].iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        return self._files[c]

    def image(self, c: int, k: int) -> torch.Tensor:
        """Image k of class c in the teacher's normalised space, [channels, R, R]."""
        R = self.teacher.resolution
        if self.tensor_files:
            if k not in self._tensors:
                f = self.path / f"tensor_{k}.pt"
                t = safe_torch_load(f, "DWA init tensor")
                if not isinstance(t, torch.Tensor) or t.shape != (self.teacher.num_classes, self.teacher.channels,
                                                                  R, R):
                    raise UserError(f"{f} must hold a [{self.teacher.num_classes}, {self.teacher.channels}, {R}, {R}] "
                                    "tensor")
                self._tensors[k] = t.float()
            return self._tensors[k][c]
        files = self._class_files(c)
        if k >= len(files):
            raise UserError(f"--init-path class folder {self.class_dirs[c]} has {len(files)} images; "
                            f"index {k} is needed (lower --ipc or select more images)")
        try:
            with Image.open(files[k]) as im:
                px = _preprocess(im, R, self.resize, self.teacher.channels)
        except OSError as e:
            raise UserError(f"corrupt or unreadable init image {files[k]}: {e}") from None
        return self.teacher.normalize(px[None])[0]


def initial_images(unit: Unit, cfg: RecoverConfig, teacher: Teacher, init: RealInit | None,
                   generator: torch.Generator) -> torch.Tensor:
    shape = (len(unit.classes), teacher.channels, teacher.resolution, teacher.resolution)
    if cfg.init == "noise":
        return torch.randn(shape, generator=generator)
    return torch.stack([init.image(c, k) for c, k in zip(unit.classes, unit.indices)])


# --------------------------------------------------------------------------------------------- DWA (§4.2)


def directed_weight_adjustment(net: nn.Module, x_view: torch.Tensor, y: torch.Tensor, steps: int, rho: float
                               ) -> None:
    """Move the teacher's parameters (not its BN buffers) K times by (rho / K) along the normalised gradient
    of CE(f(x_view), y), recomputed at the already-moved weights. The caller restores them afterwards."""
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        for _ in range(steps):
            loss = F.cross_entropy(net(x_view), y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for _, g in pairs]))
            with torch.no_grad():
                for p, g in pairs:
                    p.add_(g, alpha=(rho / steps) / (float(norm) + 1e-12))
    finally:
        for p in params:
            p.requires_grad_(False)


class SavedWeights:
    """Exact copy of a network's parameters, restored with copy_ (bitwise)."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.saved = [p.detach().clone() for p in net.parameters()]

    def restore(self) -> None:
        with torch.no_grad():
            for p, s in zip(self.net.parameters(), self.saved):
                p.copy_(s)


# --------------------------------------------------------------------------------------------- the loop


@dataclass
class GroupResult:
    images: torch.Tensor                  # [G*n, C, R, R], normalised space, final iterate
    log: list[dict]
    seconds: float = 0.0                  # optimisation time, including the runs before a resume


CKPT_FORMAT = "ddtoolkit-recover-group-ckpt-1"


@dataclass
class GroupState:
    """Everything `recover_group` needs to continue a group after iteration `it` exactly as if it had not
    stopped, as plain data (tensors, lists, dicts) so the file loads with weights_only=True. The DELT round and
    the crop floor are functions of `it` (the rounds are part of the units), and so is the cosine lr."""
    units: list          # _unit_rows() of the group it was written for
    it: int              # iterations done
    x: torch.Tensor      # [G, n, C, R, R] pixels after iteration it - 1, clipped
    opt: dict            # Adam state_dict: both moments and the step count
    generators: list     # each unit's torch.Generator state: the augmentation draws still to come
    rng: dict            # utils.checkpoint.capture_rng(): nothing here draws from it today, kept for safety
    perturbed: list | None   # DWA: the teacher's parameters after the t = 0 ascent (recomputing them would
    #                          depend on the ascent's kernels being deterministic, which GPU convolutions are not)
    log: list            # log rows so far
    seconds: float       # optimisation time so far


@dataclass(frozen=True)
class GroupCheckpoint:
    """Where `recover_group` writes the group's state: every `every` iterations (0: never) and on a stop."""
    path: Path
    fingerprint: str
    every: int


def group_ckpt_path(out: Path, key: str) -> Path:
    return out / ".units" / f"group-{key}.ckpt.pt"


def _unit_rows(units: list[Unit]) -> list:
    """The units of a group as nested lists, to check that a checkpoint belongs to this very group."""
    return [[u.key, list(u.classes), list(u.indices), [list(a) for a in u.active], u.round_len] for u in units]


def _cpu(obj):
    """A (nested) state dict with its tensors on the CPU, so a checkpoint written on a GPU loads anywhere."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def recover_group(units: list[Unit], cfg: RecoverConfig, teacher: Teacher, init: RealInit | None,
                  device: torch.device, amp: Amp | str | bool = OFF, channels_last: bool = False, log_every: int = 100,
                  progress_desc: str | None = None, stop: StopRequest | None = None,
                  ckpt: GroupCheckpoint | None = None, resume: GroupState | None = None) -> GroupResult:
    """Optimise the images of G same-shaped units together (§3.1, §4.2, §5.3, §9.3). Each unit has its own
    generator (init noise and augmentation draws), its own BN statistics and its own CE mean, so its pixels get
    exactly the gradient of a separate run.

    With `ckpt`, the group's state is saved every `ckpt.every` iterations and, on a stop request, after the
    iteration in flight (then `Stopped` is raised); `resume` continues from such a state."""
    G, n = len(units), len(units[0].classes)
    amp = amp if isinstance(amp, Amp) else resolve_recover_amp(amp, device, cfg)
    scaler = amp.scaler()
    if cfg.method == "dwa" and G > 1:
        raise ValueError("DWA units carry their own perturbed weights; recover them one at a time")
    gens = [torch.Generator().manual_seed(unit_seed(cfg.seed, cfg.method, u.key)) for u in units]
    if resume is None:
        x0 = torch.stack([initial_images(u, cfg, teacher, init, g) for u, g in zip(units, gens)])  # [G, n, C, R, R]
    else:
        for g, state in zip(gens, resume.generators):
            g.set_state(state)
        x0 = resume.x
    x = x0.to(device).requires_grad_(True)
    y = torch.tensor([u.classes for u in units], device=device)                               # [G, n]
    active = torch.tensor(units[0].active, device=device)                                     # [rounds, n]
    T, RI, R = units[0].iterations, units[0].round_len, teacher.resolution
    lo, hi = (b.to(device).unsqueeze(0) for b in teacher.pixel_bounds(device))                # [1, 1, C, 1, 1]
    net = teacher.net
    if channels_last:
        net.to(memory_format=torch.channels_last)
    hooks = BNStatHooks(net, cfg.first_bn_multiplier, cfg.r_var, cfg.bn_loss_norm)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
    saved = SavedWeights(net) if cfg.method == "dwa" else None
    log, start, seconds_before = [], 0, 0.0
    if resume is not None:
        opt.load_state_dict(resume.opt)
        restore_rng(resume.rng)
        log, start, seconds_before = list(resume.log), resume.it, resume.seconds
    t_start = time.time()
    steps = range(start, T)
    if progress_desc:
        steps = progress(steps, total=T - start, desc=progress_desc)
    try:
        if saved is not None and resume is not None:
            # DWA past t = 0: the ascent is not redone; the weights it produced come back bit for bit
            with torch.no_grad():
                for p, q in zip(net.parameters(), resume.perturbed):
                    p.copy_(q)
        for t in steps:
            for group in opt.param_groups:
                group["lr"] = cosine_lr(cfg.lr, t, T)
            s_min = crop_floor(cfg.crop_schedule, t, T, cfg.milestone, cfg.crop_min)
            pos = active[t // RI].nonzero().squeeze(1)
            everyone = len(pos) == n        # SRe2L/DWA (and full DELT rounds): no gather, no scatter in backward
            views = []
            for g_i in range(G):
                draw = draw_augmentation(cfg, R, s_min, gens[g_i])
                views.append(apply_augmentation(x[g_i] if everyone else x[g_i, pos], draw, cfg.rrc_antialias))
            xa = views[0] if G == 1 else torch.cat(views)
            if channels_last:
                xa = xa.contiguous(memory_format=torch.channels_last)
            ya = (y if everyone else y[:, pos]).reshape(-1)
            if saved is not None and t == 0:
                # §4.2: the ascent direction comes from the t = 0 view, which the t = 0 step reuses. Clean mode
                # detaches the view so the K ascent passes do not leak into x.grad ([compat] bug 4).
                view = xa if cfg.reference_quirks else xa.detach()
                if cfg.reference_quirks:
                    _leak_ascent_gradients(net, view, ya, cfg.dwa_steps, cfg.rho)
                else:
                    directed_weight_adjustment(net, view, ya, cfg.dwa_steps, cfg.rho)
            with amp.autocast():
                logits = net(xa)
            logits = at_least_fp32(logits).reshape(G, len(pos), -1)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ya, reduction="none").view(G, -1).mean(1)
            bn = hooks.losses(G)
            loss_u = ce + cfg.r_bn * bn
            if cfg.tv_l2 or cfg.l2_scale:
                xv = xa.reshape(G, len(pos), *xa.shape[1:])
                for g_i in range(G):
                    loss_u[g_i] = loss_u[g_i] + cfg.tv_l2 * tv_l2_prior(xv[g_i]) + cfg.l2_scale * torch.linalg.\
                        vector_norm(xv[g_i].flatten(1), dim=1).mean()
            loss = loss_u.sum()
            # before the step: the last checkpoint (if any) still holds the state that gave a finite loss
            check_finite(float(loss.detach()), f"iteration {t} of unit {units[0].key}",
                         f"--lr (now {cfg.lr}) or --r-bn (now {cfg.r_bn})", ckpt.path if ckpt else None)
            if not (saved is not None and t == 0 and cfg.reference_quirks):
                opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            with torch.no_grad():
                x.clamp_(min=lo, max=hi)   # clip to valid pixels (§1.4)
            if t % log_every == 0 or t == T - 1:
                log.append({"iteration": t, "loss": float(loss_u.detach().mean()), "ce": float(ce.detach().mean()),
                            "bn": float(bn.detach().mean()), "active": len(pos)})
            done = t + 1
            stopping = stop is not None and stop.requested and done < T   # a finished group is written instead
            if ckpt is not None and done < T and (stopping or (ckpt.every and done % ckpt.every == 0)):
                state = GroupState(
                    units=_unit_rows(units), it=done, x=x.detach().cpu(), opt=_cpu(opt.state_dict()),
                    generators=[g.get_state() for g in gens], rng=capture_rng(),
                    perturbed=[p.detach().cpu() for p in net.parameters()] if saved is not None else None,
                    log=log, seconds=seconds_before + time.time() - t_start)
                save_state(state, ckpt.path, CKPT_FORMAT, ckpt.fingerprint)
            if stopping:
                kept = (f"checkpoint written after iteration {done} of {T} ({ckpt.path})" if ckpt is not None
                        else "the group in flight is dropped")
                raise Stopped(f"stopped by {stop.name} in unit {units[0].key}; {kept}; every finished unit is on "
                              "disk; re-run the same command to continue")
    finally:
        hooks.remove()
        if saved is not None:
            saved.restore()
    return GroupResult(x.detach().reshape(G * n, *x.shape[2:]).cpu(), log, seconds_before + time.time() - t_start)


def _leak_ascent_gradients(net: nn.Module, view: torch.Tensor, y: torch.Tensor, steps: int, rho: float) -> None:
    """--reference-quirks for DWA (§4.2 [compat]): the ascent passes backpropagate into x as well, so their CE
    gradients (at each intermediate weight) are summed into the first pixel step and seed Adam's moments."""
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        for _ in range(steps):
            for p in params:
                p.grad = None
            F.cross_entropy(net(view), y).backward(retain_graph=True)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params
                                                         if p.grad is not None]))
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=(rho / steps) / (float(norm) + 1e-12))
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)


# --------------------------------------------------------------------------------------------- output (§1.6)


def image_path(out: Path, c: int, k: int, fmt: str) -> Path:
    ext = "jpg" if fmt == "jpeg" else "png"
    return out / f"new{c:03d}" / f"class{c:03d}_id{k:03d}.{ext}"


def to_uint8(x: torch.Tensor, teacher: Teacher, rounding: str) -> torch.Tensor:
    """De-normalise, clamp to [0, 1], then floor(p*255) (the references truncate) or round."""
    p = teacher.denormalize(x).clamp(0, 1) * 255
    p = p.floor() if rounding == "floor" else p.round()
    return p.clamp(0, 255).to(torch.uint8)


def encode_image(pixels: torch.Tensor, fmt: str, quality: int) -> bytes:
    arr = pixels.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def write_unit(out: Path, unit: Unit, images: torch.Tensor, cfg: RecoverConfig, teacher: Teacher,
               info: dict) -> None:
    """Each image atomically, then the unit's manifest (its presence marks the unit done)."""
    u8 = to_uint8(images, teacher, cfg.rounding)
    for img, c, k in zip(u8, unit.classes, unit.indices):
        data = encode_image(img, cfg.image_format, cfg.jpeg_quality)
        atomic_write_bytes(data, image_path(out, c, k, cfg.image_format))
    atomic_write_json({"key": unit.key, "classes": list(unit.classes), "indices": list(unit.indices),
                       "iterations_per_image": unit_iterations(unit), **info},
                      out / ".units" / f"{unit.key}.json")


def unit_iterations(unit: Unit) -> list[int]:
    return [sum(unit.round_len for r in unit.active if r[p]) for p in range(len(unit.classes))]


def unit_done(out: Path, unit: Unit, fmt: str) -> bool:
    return (out / ".units" / f"{unit.key}.json").is_file() and all(
        image_path(out, c, k, fmt).is_file() for c, k in zip(unit.classes, unit.indices))


def run_meta(cfg: RecoverConfig, teacher: Teacher, teacher_path: Path, ipc_range, class_range, ipc_total) -> dict:
    """meta.json of the output folder: `validate.py --syn OUT` reads the images with it (layout imagefolder)."""
    return {"format": "ddtoolkit-synset", "layout": "imagefolder", "method": cfg.method,
            "dataset": teacher.dataset, "num_classes": teacher.num_classes, "channels": teacher.channels,
            "resolution": teacher.resolution, "class_names": list(teacher.class_names)
            or [str(c) for c in range(teacher.num_classes)], "mean": list(teacher.mean), "std": list(teacher.std),
            "space": "pixel", "ipc": ipc_total,
            "teacher": {"path": str(teacher_path), "arch": teacher.arch, "meta": teacher.meta},
            "config": asdict(cfg), "image_format": cfg.image_format, "rounding": cfg.rounding}


def read_folder_images(out: Path, teacher: Teacher, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images written so far (pixels in [0, 1]) with labels, for grid.png."""
    xs, ys = [], []
    for c in range(teacher.num_classes):
        for f in sorted((out / f"new{c:03d}").glob("*.jpg" if fmt == "jpeg" else "*.png")):
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB" if teacher.channels == 3 else "L"), dtype=np.uint8)
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            xs.append(torch.from_numpy(arr.copy()).float() / 255)
            ys.append(c)
    if not xs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.stack(xs), torch.tensor(ys)


# --------------------------------------------------------------------------------------------- driver

def resolve_recover_amp(mode, device, cfg: RecoverConfig) -> Amp:
    """fp16 gets a GradScaler on the pixel loss, except with DWA's --reference-quirks, whose first step adds the
    unscaled ascent gradients to the scaled ones."""
    quirks = cfg.method == "dwa" and cfg.reference_quirks
    return resolve_amp(mode, device, allow_fp16=not quirks,
                       fp16_reason="DWA --reference-quirks leaks unscaled ascent gradients into the first step")



def recover(cfg: RecoverConfig, teacher: Teacher, teacher_path: Path, out: Path, *, ipc_range: tuple[int, int],
            class_range: tuple[int, int] | None = None, ipc_total: int | None = None, init_path: Path | None = None,
            group: int = 0, shard_index: int = 0, num_shards: int = 1, device: torch.device = torch.device("cpu"),
            amp: Amp | str | bool = OFF, channels_last: bool = False, quiet: bool = False, log_every: int = 100,
            overwrite: bool = False, draw_grid: bool = True, ckpt_every: int = 100) -> dict:
    """Recover this shard's units into `out`; returns a summary. Safe to re-run: finished units are skipped and
    a group stopped mid-way continues from its checkpoint (written every `ckpt_every` iterations, 0: only when
    stopped by SIGTERM/SIGUSR1)."""
    if ckpt_every < 0:
        raise UserError("--ckpt-every must be >= 0 (0: checkpoint only when stopped by SIGTERM/SIGUSR1)")
    class_range = class_range or (0, teacher.num_classes)
    ipc_total = ipc_total or ipc_range[1]
    amp = amp if isinstance(amp, Amp) else resolve_recover_amp(amp, device, cfg)
    out = Path(out)
    meta = run_meta(cfg, teacher, teacher_path, ipc_range, class_range, ipc_total)
    _check_run_folder(out, meta, overwrite)
    if cfg.init == "real" and init_path is None:
        raise UserError(f"--method {cfg.method} initialises from real images: pass --init-path (rank_select.py "
                        "output, any ImageFolder, or DWA tensor_<k>.pt files)")
    init = RealInit(init_path, teacher, cfg.init_resize) if cfg.init == "real" else None
    units = plan_units(cfg, teacher.num_classes, ipc_range, class_range, ipc_total)
    if group <= 0:
        # auto: on GPU ~256 images per forward (small batches leave it idle); on a CPU one unit at a time, since a
        # larger batch is no faster per image there and costs memory (docs/RESULTS.md, recover speed)
        group = max(1, 256 // len(units[0].classes)) if device.type == "cuda" else 1
    groups = group_units(units, 1 if cfg.method == "dwa" else group)
    mine = shard(groups, shard_index, num_shards)
    if shard_index == 0 or not (out / "meta.json").is_file():
        atomic_write_json(meta, out / "meta.json")
    suffix = "" if num_shards == 1 else f"_shard{shard_index}of{num_shards}"
    # resume=True keeps the rows of the groups an interrupted run finished (and a resumed group's rows come back
    # from its checkpoint), so log.csv ends up the same as an uninterrupted run's
    log = RunLog(out / f"log{suffix}.csv", quiet=quiet, resume=True)
    fingerprint = group_fingerprint(cfg, teacher, init_path)
    teacher.net.to(device)
    if channels_last:
        teacher.net.to(memory_format=torch.channels_last)
    todo = []
    for g in mine:
        if not all(unit_done(out, u, cfg.image_format) for u in g):
            todo.append(g)
        else:   # a run killed after writing the group's images but before removing its checkpoint left it
            group_ckpt_path(out, g[0].key).unlink(missing_ok=True)
    log.info(f"recover {cfg.method}: {len(units)} units in {len(groups)} groups; shard {shard_index}/{num_shards} "
             f"has {len(mine)} groups, {len(mine) - len(todo)} already done")
    done_images = 0
    start = time.time()
    with StopRequest() as stop:
        for g in progress(todo, total=len(todo), desc="groups", disable=quiet or len(todo) < 2):
            done_images += _recover_and_write(g, cfg, teacher, init, device, amp, channels_last, log_every, quiet,
                                              out, log, stop, fingerprint, ckpt_every, overwrite)
            stop.check("every finished unit is on disk")
    elapsed = time.time() - start
    if draw_grid:
        draw_grid_if_complete(out, units, teacher, cfg.image_format)
    return {"units": len(units), "groups_this_shard": len(mine), "recovered_images": done_images,
            "seconds": elapsed}


def _recover_and_write(g: list[Unit], cfg: RecoverConfig, teacher: Teacher, init: RealInit | None,
                       device: torch.device, amp: Amp, channels_last: bool, log_every: int, quiet: bool, out: Path,
                       log: RunLog, stop: StopRequest, fingerprint: str = "", ckpt_every: int = 0,
                       overwrite: bool = False) -> int:
    """Recover one group (continuing from its checkpoint if there is one) and write its units that are not on
    disk yet; returns the images recovered. The checkpoint goes once the images and manifests are written."""
    ckpt = GroupCheckpoint(group_ckpt_path(out, g[0].key), fingerprint, ckpt_every)
    resume = load_group_state(g, cfg, teacher, out, fingerprint, overwrite, log)
    if resume is not None:
        log.info(f"resuming {g[0].key} (+{len(g) - 1}) at iteration {resume.it}/{g[0].iterations} from {ckpt.path}")
    res = recover_group(g, cfg, teacher, init, device, amp, channels_last, log_every,
                        progress_desc=None if quiet else f"{g[0].key} (+{len(g) - 1})", stop=stop, ckpt=ckpt,
                        resume=resume)
    n = len(g[0].classes)
    for j, u in enumerate(g):
        if unit_done(out, u, cfg.image_format):  # recomputed only as part of its group: keep the file
            continue
        write_unit(out, u, res.images[j * n:(j + 1) * n], cfg, teacher,
                   {"seed": unit_seed(cfg.seed, cfg.method, u.key), "group": [v.key for v in g],
                    "seconds": res.seconds})
    for row in res.log:
        log.row(group=g[0].key, units=len(g), **row)
    ckpt.path.unlink(missing_ok=True)
    # a SIGKILL during a checkpoint write leaves utils.io's temporary file (".<name>.<random>.tmp") behind
    for tmp in ckpt.path.parent.glob(f".{ckpt.path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)
    return len(g) * n


def load_group_state(g: list[Unit], cfg: RecoverConfig, teacher: Teacher, out: Path, fingerprint: str,
                     overwrite: bool, log: RunLog) -> GroupState | None:
    """The checkpoint of group `g` if one was left by an interrupted run, else None. A checkpoint of other
    settings, or of another grouping of these units (another --group), is refused with one line; --overwrite
    removes it and the group starts afresh."""
    first = group_ckpt_path(out, g[0].key)
    # a checkpoint named after a later unit of this group was written by a run that grouped the units otherwise
    strays = [p for p in (group_ckpt_path(out, u.key) for u in g[1:]) if p.is_file()]
    if not first.is_file() and not strays:
        return None
    try:
        if strays:
            raise UserError(f"{strays[0]} was written for another grouping of the units (another --group); re-run "
                            "with that run's --group, or pass --overwrite to drop it")
        state = load_state(first, GroupState, CKPT_FORMAT, fingerprint, "recover.py group")
        if state.units != _unit_rows(g):
            raise UserError(f"{first} was written for another grouping of the units (another --group); re-run "
                            "with that run's --group, or pass --overwrite to drop it")
        n_params = len(list(teacher.net.parameters()))
        if not (0 < state.it < g[0].iterations and len(state.generators) == len(g)
                and (cfg.method != "dwa" or (state.perturbed is not None and len(state.perturbed) == n_params))):
            raise UserError(f"{first} is inconsistent with its group; pass --overwrite to drop it")
    except UserError:
        if not overwrite:
            raise
        for p in [first, *strays]:
            p.unlink(missing_ok=True)
        log.info(f"--overwrite: removed the group checkpoint(s) of another run for {g[0].key}")
        return None
    return state


def teacher_digest(teacher: Teacher) -> str:
    """A hash of the teacher's weights and BN statistics: a group checkpoint is only valid for the same teacher."""
    h = hashlib.sha1()
    for name, t in teacher.net.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def group_fingerprint(cfg: RecoverConfig, teacher: Teacher, init_path: Path | None) -> str:
    """Fingerprint of what decides a group's images besides its units: the settings, the teacher's weights and the
    real images it starts from."""
    return settings_fingerprint({"config": asdict(cfg), "teacher": teacher_digest(teacher),
                                 "init_path": str(Path(init_path).resolve()) if cfg.init == "real" else None})


def draw_grid_if_complete(out: Path, units: list[Unit], teacher: Teacher, fmt: str) -> bool:
    """grid.png of the whole folder once every unit of the run is done (by whichever shard finishes last)."""
    if not all(unit_done(out, u, fmt) for u in units):
        return False
    x, y = read_folder_images(out, teacher, fmt)
    if len(x):
        save_grid(x, y, out / "grid.png")
    return True


def _check_run_folder(out: Path, meta: dict, overwrite: bool) -> None:
    """A folder holding another run's images is refused unless --overwrite (which only removes our own files)."""
    f = out / "meta.json"
    if not f.is_file():
        return
    try:
        old = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{f} is corrupt; remove it or pass --overwrite") from None
    # slices of one run (other ipc/class ranges) share the folder; DELT's schedule also depends on the total IPC
    keys = ("method", "dataset", "config") + (("ipc",) if meta["method"] == "delt" else ())
    same = all(old.get(k) == meta.get(k) for k in keys)
    if same and old.get("teacher", {}).get("path") == meta["teacher"]["path"]:
        return
    if not overwrite:
        raise UserError(f"{out} holds a recover run with other settings; pass --overwrite or choose another --out")
    import shutil
    for d in list(out.glob("new[0-9]*")) + [out / ".units"]:
        if d.is_dir():
            shutil.rmtree(d)
    for name in ("meta.json", "grid.png"):
        (out / name).unlink(missing_ok=True)
    for p in out.glob("log*.csv"):
        p.unlink()


# --------------------------------------------------------------------------------------------- CLI

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)
_O = typer.Option


def _range(text: str | None, what: str) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"{what} must look like a:b (e.g. 0:50), got '{text}'") from None
    return a, b


@app.command()
@cli_errors
def main(
    teacher_path: Path = _O(..., "--teacher", "--arch-path", "--arch_path", help="Teacher file from squeeze.py "
                            "(carries its normalisation and class order), or a foreign checkpoint with --arch and "
                            "--dataset (SRe2L/DWA ckpt.pth, RDED {dataset}_{arch}.pth, a torchvision state_dict)."),
    method: str = _O("sre2l", "--method", help="sre2l (noise init), dwa (real init + directed weight "
                     "adjustment) or delt (medium real init + EarlyLate + crop schedule)."),
    preset: Optional[str] = _O(None, "--preset", help="Published settings: " + ", ".join(PRESETS)
                               + ". Flags override single values."),
    out: Path = _O(..., "--out", "--syn-data-path", "--syn_data_path", help="Output folder: new<c>/class<c>_id<k>"
                   ".jpg, meta.json, grid.png, log.csv (and .units/ manifests)."),
    arch: Optional[str] = _O(None, "--arch", "--arch-name", "--arch_name", help="Teacher architecture (only for a "
                             "foreign checkpoint), e.g. resnet18_modified, conv3, ResNet-18."),
    dataset: Optional[str] = _O(None, "--dataset", help="Dataset of a foreign teacher (classes, resolution)."),
    norm: Optional[str] = _O(None, "--norm", help="Normalisation of a foreign teacher: imagenet, cifar10, "
                             "cifar10-true, cifar100, tiny (default: the dataset's)."),
    ipc: Optional[int] = _O(None, "--ipc", help="Images per class (= --ipc-end with --ipc-start 0; DELT: the IPC "
                            "its EarlyLate split is computed for)."),
    ipc_start: int = _O(0, "--ipc-start", "--ipc_start", help="First ipc index of this work slice."),
    ipc_end: Optional[int] = _O(None, "--ipc-end", "--ipc_end", help="End (exclusive) ipc index of this slice."),
    class_range: Optional[str] = _O(None, "--class-range", help="Classes a:b of this slice (global ids; default "
                                    "all)."),
    ipc_range: Optional[str] = _O(None, "--ipc-range", help="Same as --ipc-start/--ipc-end, as a:b."),
    shard_index: Optional[int] = _O(None, "--shard-index", help="This shard of the work list (default: the "
                                    "Slurm array task, or the torchrun rank)."),
    num_shards: Optional[int] = _O(None, "--num-shards", help="Number of shards (with --shard-index)."),
    init_path: Optional[Path] = _O(None, "--init-path", "--init_path", "--init-data-path",
                                   help="Real initial images (DWA, DELT): "
                                   "rank_select.py output, any ImageFolder, or tensor_<k>.pt files."),
    iterations: Optional[int] = _O(None, "--iterations", "--iteration", help="Iterations per unit (DELT: the "
                                   "budget of the earliest images)."),
    lr: Optional[float] = _O(None, "--lr", help="Adam lr on the pixels (cosine to 0 over the unit)."),
    batch_size: Optional[int] = _O(None, "--batch-size", "--batch_size", help="Classes per unit (SRe2L/DWA) or "
                                   "images per unit (DELT, class-major)."),
    r_bn: Optional[float] = _O(None, "--r-bn", "--r_bn", help="Weight of the BN-statistics loss."),
    first_bn_multiplier: Optional[float] = _O(None, "--first-bn-multiplier", "--first_bn_multiplier",
                                              help="Weight of the first BN layer's term (10)."),
    r_var: Optional[float] = _O(None, "--r-var", "--r_var", help="Weight of the variance term inside each BN term "
                                "(DWA: 11 CIFAR/Tiny, 2 ImageNet; else 1)."),
    bn_loss_norm: Optional[str] = _O(None, "--bn-loss-norm", help="sum (reference) or channel-mean (each layer "
                                     "term / sqrt(channels): keeps r-bn meaningful across architectures)."),
    tv_l2: Optional[float] = _O(None, "--tv-l2", "--tv_l2", help="Total-variation prior weight (0)."),
    l2_scale: Optional[float] = _O(None, "--l2-scale", "--l2_scale", help="L2 prior weight (0)."),
    rrc: Optional[bool] = _O(None, "--rrc/--no-rrc", help="RandomResizedCrop each iteration."),
    crop_min: Optional[float] = _O(None, "--min-scale-crops", "--crop-min", help="Lowest crop area (0.08)."),
    crop_max: Optional[float] = _O(None, "--max-scale-crops", "--crop-max", help="Highest crop area (1)."),
    flip: Optional[bool] = _O(None, "--flip/--no-flip", help="Horizontal flip with p 0.5 each iteration."),
    jitter: Optional[int] = _O(None, "--jitter", help="Circular shift range J."),
    jitter_mode: Optional[str] = _O(None, "--jitter-mode", help="positive: shifts in 0..J; symmetric: -J..J."),
    rrc_antialias: Optional[bool] = _O(None, "--rrc-antialias/--no-rrc-antialias", help="Antialias the crop "
                                       "resize (torchvision >= 0.17 default; the references ran without)."),
    crop_schedule: Optional[str] = _O(None, "--crop-schedule", "--scheduler", "--easy2hard-mode",
                                      help="DELT crop floor: none, step, linear, cosine."),
    milestone: Optional[float] = _O(None, "--milestone", help="Fraction of the unit over which the crop floor "
                                    "decays (DELT: 1)."),
    init: Optional[str] = _O(None, "--init", help="noise or real (default: by method)."),
    init_resize: Optional[str] = _O(None, "--init-resize", help="center (Resize floor(R/7)*8 + CenterCrop) or "
                                    "stretch (exact square)."),
    dwa_steps: Optional[int] = _O(None, "--steps", "--dwa-steps", help="DWA ascent steps K."),
    rho: Optional[float] = _O(None, "--rho", help="DWA total ascent length rho."),
    reference_quirks: Optional[bool] = _O(None, "--reference-quirks/--no-reference-quirks", help="DWA: leak the "
                                          "ascent passes' CE gradients into the first pixel step, as the reference "
                                          "does (decoupled.md §4.2)."),
    early_late: Optional[bool] = _O(None, "--use-early-late/--no-early-late", help="DELT EarlyLate rounds."),
    round_iterations: Optional[int] = _O(None, "--round-iterations", "--round_iterations", help="DELT round "
                                         "length RI (500)."),
    min_iterations: Optional[int] = _O(None, "--min-iterations", "--min_iterations", help="DELT: random per-class "
                                       "budgets down to this (unused by the scripts)."),
    image_format: Optional[str] = _O(None, "--image-format", help="jpeg (reference, quality 75) or png."),
    jpeg_quality: Optional[int] = _O(None, "--jpeg-quality", help="JPEG quality (75 = PIL default)."),
    rounding: Optional[str] = _O(None, "--rounding", help="floor (reference truncation) or round."),
    seed: int = _O(0, "--seed", help="Base seed; each unit's seed derives from it and the unit."),
    group: int = _O(0, "--group", help="Units recovered together in one forward (0 = auto: ~256 images on GPU, "
                    "1 on CPU). DWA always uses 1."),
    device: str = _O("auto", "--device", help="auto, cpu or cuda."),
    amp: str = _O("off", "--amp", help=AMP_HELP + " recover: the teacher's forward/backward; BN statistics, "
                  "pixels and Adam stay fp32."),
    channels_last: bool = _O(True, "--channels-last/--no-channels-last", help="channels_last memory format for "
                             "the teacher and the augmented batch (faster on GPU and on CPU for ConvNets)."),
    log_every: int = _O(100, "--log-every", help="Log loss terms every N iterations."),
    ckpt_every: int = _O(100, "--ckpt-every", help="Checkpoint the group in flight every N of its iterations to "
                         ".units/group-<unit>.ckpt.pt (0: only when stopped by SIGTERM/SIGUSR1, which always "
                         "writes one); re-running the same command continues from it with the same result. "
                         "Removed once the group's images are written."),
    overwrite: bool = _O(False, "--overwrite", help="Replace a different run's images in --out, and drop a group "
                         "checkpoint written with other settings or another --group."),
    quiet: bool = _O(False, "--quiet", help="No progress bars."),
    store_best_images: bool = _O(True, "--store-best-images/--no-store-best-images", hidden=True,
                                 help="Accepted for the references' command lines; images are always stored."),
    store_last_images: bool = _O(False, "--store-last-images", hidden=True,
                                 help="Accepted for SRe2L's Tiny command line; the last iterate is what is stored."),
    verifier: bool = _O(False, "--verifier", hidden=True, help="Accepted for the references' command lines."),
    verifier_arch: Optional[str] = _O(None, "--verifier-arch", hidden=True, help="Accepted with --verifier."),
    verifier_arch_path: Optional[str] = _O(None, "--verifier-arch-path", hidden=True,
                                           help="Accepted with --verifier."),
    exp_name: Optional[str] = _O(None, "--exp-name", "--exp_name", help="The references' run name: the images go "
                                 "to --out/<name> (their --syn-data-path/--exp-name)."),
):
    del store_best_images, store_last_images, verifier, verifier_arch, verifier_arch_path
    if exp_name is not None:
        if not exp_name.strip() or Path(exp_name).name != exp_name or exp_name in (".", ".."):
            raise UserError(f"--exp-name must be a plain folder name, got '{exp_name}'")
        out = out / exp_name
    require_at_least({"--ipc": ipc, "--ipc-end": ipc_end, "--num-shards": num_shards, "--iterations": iterations,
                      "--batch-size": batch_size})
    require_at_least({"--ipc-start": ipc_start}, least=0)
    check_writable(out, "--out")
    dev = resolve_device(device)
    resolve_amp(amp, dev)   # a bad mode fails before the teacher is read
    info = init_distributed(dev)
    teacher = load_teacher(teacher_path, arch=arch, dataset=dataset, norm=norm, device="cpu")
    if ipc_range is not None:
        ipc_start, ipc_end = _range(ipc_range, "--ipc-range")
    if ipc_end is None:
        if ipc is None:
            raise UserError("pass --ipc (or --ipc-end)")
        ipc_end = ipc
    ipc_total = ipc or ipc_end
    overrides = {f.name: v for f, v in zip(fields(RecoverConfig), [None] * len(fields(RecoverConfig)))}
    overrides.update(method=None if preset else method, iterations=iterations, lr=lr, batch_size=batch_size,
                     r_bn=r_bn, first_bn_multiplier=first_bn_multiplier, r_var=r_var, bn_loss_norm=bn_loss_norm,
                     tv_l2=tv_l2, l2_scale=l2_scale, rrc=rrc, crop_min=crop_min, crop_max=crop_max, flip=flip,
                     jitter=jitter, jitter_mode=jitter_mode, rrc_antialias=rrc_antialias,
                     crop_schedule=crop_schedule, milestone=milestone, init=init, init_resize=init_resize,
                     dwa_steps=dwa_steps, rho=rho, reference_quirks=reference_quirks, early_late=early_late,
                     round_iterations=round_iterations, min_iterations=min_iterations, image_format=image_format,
                     jpeg_quality=jpeg_quality, rounding=rounding, seed=seed)
    if preset is None:
        defaults = METHOD_DEFAULTS[method] if method in METHOD_DEFAULTS else {}
        overrides = {k: (v if v is not None else defaults.get(k)) for k, v in overrides.items()}
    cfg = resolve_config(preset, overrides, ipc_total)
    if preset is not None and method != "sre2l" and method != cfg.method:
        raise UserError(f"--method {method} contradicts --preset {preset} ({cfg.method})")
    check_method_flags(cfg, dict(dwa_steps=dwa_steps, rho=rho, reference_quirks=reference_quirks,
                                 round_iterations=round_iterations, min_iterations=min_iterations,
                                 early_late=early_late or None, init_path=init_path))
    amp_mode = resolve_recover_amp(amp, dev, cfg)
    index, count = resolve_shard(shard_index, num_shards, info)
    summary = recover(cfg, teacher, teacher_path, out, ipc_range=(ipc_start, ipc_end),
                      class_range=_range(class_range, "--class-range"), ipc_total=ipc_total, init_path=init_path,
                      group=group, shard_index=index, num_shards=count, device=dev, amp=amp_mode,
                      channels_last=channels_last, quiet=quiet,
                      log_every=log_every, overwrite=overwrite, draw_grid=not info.enabled, ckpt_every=ckpt_every)
    barrier(info)
    if info.enabled and info.is_main:  # after every rank has finished, one process draws the whole set's grid
        units = plan_units(cfg, teacher.num_classes, (ipc_start, ipc_end),
                           _range(class_range, "--class-range") or (0, teacher.num_classes), ipc_total)
        draw_grid_if_complete(out, units, teacher, cfg.image_format)
    cleanup(info)
    if not quiet:
        print(json.dumps(summary))


# Flags that mean something for one method only: given to another, they would be ignored without a word (a DWA
# command line without --method dwa would run SRe2L), so they are refused. init_path: any real initialisation.
METHOD_ONLY_FLAGS = {"dwa_steps": ("--steps", "dwa"), "rho": ("--rho", "dwa"),
                     "reference_quirks": ("--reference-quirks", "dwa"),
                     "round_iterations": ("--round-iterations", "delt"), "min_iterations": ("--min-iterations", "delt"),
                     "early_late": ("--use-early-late", "delt")}


def check_method_flags(cfg: RecoverConfig, given: dict) -> None:
    """One-line error for a method-specific flag given (not None) to another method, or --init-path with noise
    initialisation."""
    for key, (flag, owner) in METHOD_ONLY_FLAGS.items():
        if given.get(key) is not None and cfg.method != owner:
            raise UserError(f"{flag} is a {owner.upper()} setting but the method is {cfg.method}: add --method "
                            f"{owner} (or a --preset {owner}-...)")
    if given.get("init_path") is not None and cfg.init != "real":
        raise UserError(f"--init-path is for real initialisation, but {cfg.method} starts from noise here: add "
                        "--method dwa or delt (or --init real)")


# Method defaults when no --preset is given: the CIFAR-scale settings of each paper (§3.2, §4.5, §5.6).
METHOD_DEFAULTS: dict[str, dict] = {
    "sre2l": PRESETS["sre2l-cifar100"],
    "dwa": PRESETS["dwa-cifar100"],
    "delt": PRESETS["delt-cifar"],
}

if __name__ == "__main__":
    app()
