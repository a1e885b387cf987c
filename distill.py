"""distill.py: trajectory matching. SPEED (default) and plain MTT on pixels.

    python buffer.py  --dataset CIFAR10 --zca --num-experts 100 --train-epochs 50
    python distill.py --dataset CIFAR10 --zca                 # SPEED, the paper's CIFAR-10 IPC 10 row
    python distill.py --dataset CIFAR10 --zca --ipc 1 --method mtt
    python validate.py --syn runs/distill/CIFAR10/speed_ipc10 --preset speed --baseline random

Spec: docs/methods/speed.md (section numbers below refer to it). Each outer iteration takes the next expert
trajectory, a start epoch s, and unrolls a student network from the expert's parameters at epoch s for syn_steps
SGD steps on synthetic minibatches; the loss is the normalised distance between where the student lands and the
expert's parameters at epoch s + expert_epochs (§3.7). Everything the synthetic images are made of receives the
meta-gradient through the whole unroll:
- MTT: the images themselves (pixels, initialised from real images) and the learnable inner lr;
- SPEED: a shared token dictionary (SAET), one multi-head sparse coding matrix per image (SCM, with an L1 term)
  and the FReeNet decoder (utils/speed.py), and the inner lr (clamped >= 0.001).

Every (dataset, IPC) row of the paper's table is a preset (`--dataset/--subset/--ipc` pick it); flags override
single values. The output directory is a synthetic set (`validate.py --syn OUT` decodes it) that also holds the
resume checkpoint `ckpt.pt`, `log.csv`, `config.json`, the decoded images in MTT's file names
(`images_final.pt`, `labels_final.pt`, `lr_final.pt`) and `grid.png`. Re-running the same command resumes.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import typer

from networks import get_network
from networks.functional import FlatNet
from utils.curves import Curves, check_eval_every, short_eval
from utils.datasets import DatasetSpec, get_dataset_spec, load_split, normalize, to_pixels
from utils.dsa import DSA
from utils.errors import UserError
from utils.checkpoint import capture_rng, load_state, restore_rng, resume_or_start, settings_fingerprint, state_dict
from utils.digest import files_digest
from utils.io import check_writable, atomic_torch_save, atomic_write_json, refuse_overlap, run_lock, safe_torch_load
from utils.misc import require_at_least, RunLog, cli_errors, progress, resolve_device, seed_everything, step
from utils.signals import StopRequest
from utils.speed import (FReeNet, SpeedConfig, budget_floats, check_budget, derive_config, kept_code_mass, masked_topk,
                         speed_decoder_args, speed_preset, speed_tensors, storage_floats, straight_through_topk)
from utils.synset import SyntheticSet, make_meta, save_synset
from utils.amp import AMP_HELP, OFF, Amp, fp32, resolve_amp
from utils.train import standardize_batch
from utils.trajectory import ExpertStream, buffer_files, expert_dir, flatten_snapshot, load_buffer_file

# --------------------------------------------------------------------------------------------- settings


@dataclass
class DistillConfig:
    """Every setting of one distillation run. Defaults are SPEED's argparse defaults (= its CIFAR-10 IPC 10 row)."""
    method: str = "speed"
    dataset: str = "CIFAR10"
    ipc: int = 10
    model: str = "ConvNet"
    iterations: int = 20000          # outer iterations (--Iteration); the reference runs 0..Iteration inclusive
    syn_steps: int = 60
    expert_epochs: int = 2
    max_start_epoch: int = 20        # start epoch s ~ UniformInt[0, max_start_epoch - 1] (§3.5)
    batch_syn: Optional[int] = 128   # None: the whole set every step (MTT's default)
    lr_teacher: float = 0.01         # initial inner lr alpha
    lr_lr: float = 1e-5
    inner_momentum: float = 0.9      # SPEED's EMA inner update (§3.6); MTT: 0 (plain SGD)
    lr_floor: Optional[float] = 0.001  # SPEED clamps alpha >= 0.001 after each step; MTT does not
    outer_momentum: float = 0.95     # SPEED: all four optimisers; MTT: 0.5
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    inner_standardize: bool = False  # speed.md bug 9: the reference does NOT standardise batches in the unroll
    # SPEED (§3.1-3.4, §4)
    n_per_class: Optional[int] = 124
    num_saet: int = 64
    dim: int = 96
    depth: int = 1
    heads: int = 3
    patch: int = 4
    top_k: int = 48
    l1_weight: float = 3e-7
    lr_saet: float = 10.0
    lr_scm: float = 100.0
    lr_freenet: float = 0.01
    init_std: float = 0.2
    scm_train: str = "dense"         # dense: the reference (top-k only at save, bug 10); topk-ste: see SCM_TRAIN
    l1_mode: str = "subgradient"     # subgradient: the reference (§3.3); proximal: soft-threshold after each step
    topk_from: Optional[int] = None  # from this iteration on, train through the top-k codes (scm_train "topk")
    topk_share: Optional[float] = None  # or: the last share of the iterations does (derived rows: 0.5; see topk_start)
    # MTT
    lr_img: float = 1000.0
    pix_init: str = "real"           # real: random real images of each class; noise: N(0, 1)
    # sampling / engineering
    load_all: bool = False
    max_files: Optional[int] = None
    max_experts: Optional[int] = None
    checkpoint_unroll: bool = False
    amp: str = "off"                 # off | bf16 (fp16 refused: the unroll's inner gradients cannot be loss-scaled)
    seed: int = 0


METHODS = ("speed", "mtt")
# How the SCM enters the training forward pass. dense: the reference (the dense codes are trained and only the saved
# copy is pruned to top-k, speed.md §3.3 / bug 10). topk-ste: the forward pass uses the top-k codes that will be
# saved, with a straight-through (identity) backward (§7's listed non-default variant). topk: the same forward, the
# gradient only to the kept codes (utils.speed.masked_topk).
SCM_TRAIN = ("dense", "topk-ste", "topk")
# How the L1 term acts on the SCM. subgradient: the reference (lambda * sign(A) inside the momentum SGD step; entries
# oscillate around zero and never become exactly zero, §3.3). proximal: the L1 term leaves the loss and, after each
# step, A <- sign(A) * max(|A| - lr_scm * lambda, 0) (§7's listed non-default variant), which gives exact zeros.
L1_MODES = ("subgradient", "proximal")

# MTT's published settings (MTT paper's hyperparameter table / README commands; not in speed.md, which covers
# only the parts SPEED shares): (dataset, ipc) -> syn_steps, expert_epochs, max_start_epoch, lr_img, lr_lr,
# lr_teacher, zca. batch_syn is the whole set unless a row says otherwise.
MTT_PRESETS: dict[tuple[str, int], dict] = {
    ("CIFAR10", 1): dict(syn_steps=50, expert_epochs=2, max_start_epoch=2, lr_img=1000, lr_lr=1e-7, lr_teacher=0.01),
    ("CIFAR10", 10): dict(syn_steps=30, expert_epochs=2, max_start_epoch=20, lr_img=1000, lr_lr=1e-5,
                          lr_teacher=0.01),
    ("CIFAR10", 50): dict(syn_steps=30, expert_epochs=2, max_start_epoch=40, lr_img=1000, lr_lr=1e-5,
                          lr_teacher=0.01),
    ("CIFAR100", 1): dict(syn_steps=20, expert_epochs=3, max_start_epoch=20, lr_img=1000, lr_lr=1e-5,
                          lr_teacher=0.01),
    ("CIFAR100", 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=20, lr_img=1000, lr_lr=1e-5,
                           lr_teacher=0.01),
    ("CIFAR100", 50): dict(syn_steps=80, expert_epochs=2, max_start_epoch=40, lr_img=1000, lr_lr=1e-5,
                           lr_teacher=0.01, batch_syn=125),
    ("TinyImageNet", 1): dict(syn_steps=10, expert_epochs=2, max_start_epoch=40, lr_img=10000, lr_lr=1e-4,
                              lr_teacher=0.01),
    ("TinyImageNet", 10): dict(syn_steps=20, expert_epochs=2, max_start_epoch=40, lr_img=10000, lr_lr=1e-4,
                               lr_teacher=0.01, batch_syn=200),
    ("TinyImageNet", 50): dict(syn_steps=80, expert_epochs=2, max_start_epoch=40, lr_img=10000, lr_lr=1e-4,
                               lr_teacher=0.01, batch_syn=300),
}
# Which MTT rows were distilled in ZCA space (the --zca of MTT's published commands); it decides the expert folder.
MTT_ZCA = {("CIFAR10", 1): True, ("CIFAR10", 10): True, ("CIFAR10", 50): False, ("CIFAR100", 1): True,
           ("CIFAR100", 10): False, ("CIFAR100", 50): True, ("TinyImageNet", 1): False, ("TinyImageNet", 10): False,
           ("TinyImageNet", 50): False}
MTT_COMMON = dict(inner_momentum=0.0, lr_floor=None, outer_momentum=0.5, batch_syn=None, iterations=5000)


def default_model(resolution: int) -> str:
    """The reference's architecture per resolution (§2): ConvNet (D3) to 32 px, ConvNetD4 at 64, ConvNetD5 at 128."""
    return "ConvNet" if resolution <= 32 else f"ConvNetD{int(round(math.log2(resolution / 4)))}"


# MTT without a published row (e.g. Fashion-MNIST, or CIFAR-10 at IPC 5): the row of the family of the nearest
# resolution at the largest published IPC not above the requested one (the smallest otherwise), all its values as
# published; the same rule as SPEED's derived defaults (docs/SPEED_MTT.md, "Derived defaults").
MTT_REFERENCE_FAMILY = {32: "CIFAR10", 64: "TinyImageNet"}


def mtt_reference_row(resolution: int, ipc: int) -> dict:
    """The MTT_PRESETS row a derived MTT configuration copies."""
    family = MTT_REFERENCE_FAMILY[min(MTT_REFERENCE_FAMILY, key=lambda r: (abs(r - resolution), -r))]
    ipcs = sorted(i for (d, i) in MTT_PRESETS if d == family)
    below = [i for i in ipcs if i <= ipc]
    return MTT_PRESETS[(family, below[-1] if below else ipcs[0])]


def preset_values(method: str, spec: DatasetSpec, ipc: int) -> dict:
    """The published row for this method, dataset and IPC as DistillConfig fields; without one, MTT's derived row
    (mtt_reference_row) and SPEED's derived default (utils.speed.speed_preset)."""
    if method == "mtt":
        row = MTT_PRESETS.get((spec.name, ipc)) or mtt_reference_row(spec.resolution, ipc)
        return {**MTT_COMMON, **row}
    cfg = speed_preset(spec.name, ipc)
    return dict(model=cfg.model, n_per_class=cfg.n_per_class, num_saet=cfg.num_saet, dim=cfg.dim, depth=cfg.depth,
                heads=cfg.heads, patch=cfg.patch, top_k=cfg.top_k, l1_weight=cfg.l1_weight,
                batch_syn=cfg.batch_syn, syn_steps=cfg.syn_steps, max_start_epoch=cfg.max_start_epoch,
                topk_share=cfg.topk_share)


def topk_start(cfg: DistillConfig) -> Optional[int]:
    """The first iteration trained through the saved top-k codes: --topk-from when given, else the start of the
    last `topk_share` of the iterations (derived presets), else None (dense training throughout, the reference).
    A continued run (larger --iterations) moves this point with the new total."""
    if cfg.topk_from is not None:
        return cfg.topk_from
    if cfg.topk_share:
        return cfg.iterations - round(cfg.topk_share * cfg.iterations)
    return None


SPEED_SHAPE_FIELDS = ("num_saet", "dim", "depth", "heads", "patch", "top_k")


def resolve_config(method: str, spec: DatasetSpec, ipc: int, explicit: dict) -> DistillConfig:
    """Each field: the explicit flag (not None), else the preset row, else DistillConfig's default.

    SPEED: when the shape of the code (K, D, T, h, p, k) is changed but n_per_class is not given, n_per_class is
    re-derived as the largest that fits the IPC budget (§3.4), so a smaller CPU-scale decoder still spends the
    whole budget."""
    if method not in METHODS:
        raise UserError(f"unknown --method '{method}' ({', '.join(METHODS)})")
    try:
        preset = preset_values(method, spec, ipc)
    except UserError:
        # no published row (e.g. Tiny-ImageNet IPC 50): allowed when the code's whole shape is given explicitly
        if method != "speed" or any(explicit.get(k) is None for k in SPEED_SHAPE_FIELDS):
            raise
        preset = {}
    base = asdict(DistillConfig())
    values = {k: explicit[k] if explicit.get(k) is not None else preset.get(k, base[k]) for k in base}
    values.update(method=method, dataset=spec.name, ipc=ipc)
    if values["model"] is None or (explicit.get("model") is None and "model" not in preset):
        values["model"] = default_model(spec.resolution)
    cfg = DistillConfig(**values)
    if method == "speed":
        reshaped = any(explicit.get(k) is not None for k in SPEED_SHAPE_FIELDS)
        if explicit.get("n_per_class") is None and reshaped:
            d = derive_config(spec.name, ipc, spec.num_classes, spec.channels, spec.resolution, patch=cfg.patch,
                              num_saet=cfg.num_saet, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                              top_k=cfg.top_k, l1_weight=cfg.l1_weight, batch_syn=cfg.batch_syn or 0,
                              syn_steps=cfg.syn_steps, max_start_epoch=cfg.max_start_epoch, model=cfg.model)
            cfg = replace(cfg, n_per_class=d.n_per_class)
    return cfg


def check_config(cfg: DistillConfig, spec: DatasetSpec) -> None:
    """Shape and value checks with one-line messages, before anything is written (§7 improvements)."""
    if cfg.iterations < 0 or cfg.syn_steps < 1 or cfg.expert_epochs < 1 or cfg.max_start_epoch < 1:
        raise UserError("--iterations must be >= 0 and --syn-steps, --expert-epochs, --max-start-epoch >= 1")
    if cfg.batch_syn is not None and cfg.batch_syn < 1:
        raise UserError("--batch-syn must be at least 1")
    if not (cfg.lr_teacher > 0 and math.isfinite(cfg.lr_teacher)):
        raise UserError(f"--lr-teacher must be a positive number, got {cfg.lr_teacher}")
    if not 0 <= cfg.inner_momentum < 1:
        raise UserError(f"--inner-momentum must be in [0, 1), got {cfg.inner_momentum}")
    if cfg.l1_mode not in L1_MODES:
        raise UserError(f"unknown --l1-mode '{cfg.l1_mode}' ({', '.join(L1_MODES)})")
    if cfg.topk_share is not None and not 0 <= cfg.topk_share <= 1:
        raise UserError(f"--topk-share must lie in [0, 1], got {cfg.topk_share}")
    if cfg.scm_train not in SCM_TRAIN:
        raise UserError(f"unknown --scm-train '{cfg.scm_train}' ({', '.join(SCM_TRAIN)})")
    if cfg.method == "mtt" and cfg.pix_init not in ("real", "noise"):
        raise UserError(f"unknown --pix-init '{cfg.pix_init}' (real, noise)")
    if cfg.method == "speed":
        scfg = speed_config(cfg, spec)
        if spec.resolution % cfg.patch:
            raise UserError(f"--patch {cfg.patch} does not divide the resolution {spec.resolution}")
        if cfg.dim % cfg.heads:
            raise UserError(f"--dim {cfg.dim} is not divisible by --heads {cfg.heads}")
        if not cfg.n_per_class or cfg.n_per_class < 1:
            raise UserError("--n-per-class must be at least 1")
        L = (spec.resolution // cfg.patch) ** 2
        if cfg.top_k > L * cfg.num_saet:
            raise UserError(f"--top-k {cfg.top_k} exceeds the {L * cfg.num_saet} entries of one SCM head")
        check_budget(scfg, spec.num_classes, spec.channels)


def speed_config(cfg: DistillConfig, spec: DatasetSpec):
    """The SPEED shape of this run as utils.speed.SpeedConfig (budget accounting, decoder arguments)."""
    return SpeedConfig(dataset=spec.name, ipc=cfg.ipc, model=cfg.model, resolution=spec.resolution, patch=cfg.patch,
                       n_per_class=cfg.n_per_class, num_saet=cfg.num_saet, top_k=cfg.top_k,
                       l1_weight=cfg.l1_weight, batch_syn=cfg.batch_syn or 0, syn_steps=cfg.syn_steps,
                       max_start_epoch=cfg.max_start_epoch, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads)


def num_images(cfg: DistillConfig, spec: DatasetSpec) -> int:
    """N: synthetic training images (SPEED: n_per_class per class; MTT: ipc per class)."""
    per_class = cfg.n_per_class if cfg.method == "speed" else cfg.ipc
    return spec.num_classes * per_class


# ----------------------------------------------------------------------------------- parameterisations
# What the synthetic set is made of. Both expose decode(idx) (images of rows idx, differentiable), the L1-type
# regulariser, their optimisers, plain-dict state, and the tensors of the saved set.

class PixelImages:
    """MTT: the synthetic images are the parameters (class-major, in the buffer's value space)."""
    decoder = "pixels"

    def __init__(self, cfg: DistillConfig, spec: DatasetSpec, device, init: torch.Tensor):
        self.cfg = cfg
        self.images = init.detach().clone().to(device).requires_grad_(True)
        self.opt = torch.optim.SGD([self.images], lr=cfg.lr_img, momentum=cfg.outer_momentum)

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt]

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx]

    def regularizer(self) -> torch.Tensor:
        return self.images.new_zeros(())

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"images": self.images.detach().cpu(), "opt": self.opt.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        with torch.no_grad():
            self.images.copy_(d["images"])
        self.opt.load_state_dict(d["opt"])

    @torch.no_grad()
    def final(self) -> tuple[dict, dict, torch.Tensor]:
        """(set tensors, decoder args, decoded images)."""
        x = self.images.detach().cpu().clone()
        return {"images": x}, {}, x


class SpeedCode:
    """SPEED (§3.1-3.3): SAET E (1,K,D), dense SCM A (N,h,L,K), FReeNet; SGD with momentum for each."""
    decoder = "speed"

    def __init__(self, cfg: DistillConfig, spec: DatasetSpec, device, gen: torch.Generator):
        self.cfg = cfg
        n = num_images(cfg, spec)
        L = (spec.resolution // cfg.patch) ** 2
        # §3.1: E, A ~ N(0, 0.2^2); FReeNet's own init (Xavier / zero / one), drawn from the global RNG seeded
        # by the caller. E and A come from the run generator so the draw is explicit.
        self.saet = (torch.randn(1, cfg.num_saet, cfg.dim, generator=gen) * cfg.init_std).to(device).requires_grad_()
        self.scm = (torch.randn(n, cfg.heads, L, cfg.num_saet, generator=gen) * cfg.init_std).to(device) \
            .requires_grad_()
        self.freenet = FReeNet(cfg.dim, cfg.depth, cfg.heads, cfg.patch, channels=spec.channels,
                               generator=gen).to(device)
        self.iteration = 0
        m = cfg.outer_momentum
        self.opts = {"saet": torch.optim.SGD([self.saet], lr=cfg.lr_saet, momentum=m),
                     "scm": torch.optim.SGD([self.scm], lr=cfg.lr_scm, momentum=m),
                     "freenet": torch.optim.SGD(self.freenet.parameters(), lr=cfg.lr_freenet, momentum=m)}

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return list(self.opts.values())

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        codes = self.scm[idx]
        mode = self.cfg.scm_train
        switch = topk_start(self.cfg)
        if switch is not None and self.iteration >= switch:
            mode = "topk"
        if mode == "topk-ste":
            codes = straight_through_topk(codes, self.cfg.top_k)
        elif mode == "topk":
            codes = masked_topk(codes, self.cfg.top_k)
        return self.freenet(self.saet, codes)

    def regularizer(self) -> torch.Tensor:
        # §3.3: lambda * sum |A| over the WHOLE dense SCM, handled by its subgradient in the same SGD step.
        reg = self.cfg.l1_weight * self.scm.abs().sum()
        return reg.detach() if self.cfg.l1_mode == "proximal" else reg

    @torch.no_grad()
    def after_step(self) -> None:
        if self.cfg.l1_mode == "proximal":
            t = self.cfg.lr_scm * self.cfg.l1_weight
            self.scm.copy_(self.scm.sign() * (self.scm.abs() - t).clamp_(min=0))

    def state_dict(self) -> dict:
        return {"saet": self.saet.detach().cpu(), "scm": self.scm.detach().cpu(),
                "freenet": {k: v.cpu() for k, v in self.freenet.state_dict().items()},
                "opts": {k: o.state_dict() for k, o in self.opts.items()}}

    def load_state_dict(self, d: dict) -> None:
        with torch.no_grad():
            self.saet.copy_(d["saet"])
            self.scm.copy_(d["scm"])
        self.freenet.load_state_dict(d["freenet"])
        for k, o in self.opts.items():
            o.load_state_dict(d["opts"][k])

    @torch.no_grad()
    def final(self) -> tuple[dict, dict, torch.Tensor]:
        """Top-k-pruned, compactly stored set (§5.1, §3.4) and the images decoded from exactly what is stored."""
        tensors = speed_tensors(self.saet, self.scm, self.freenet, self.cfg.top_k)
        return tensors, {}, None


# ----------------------------------------------------------------------------------------- the unroll

def unroll_batches(n: int, batch: Optional[int], steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Minibatch indices of one unroll (§3.6): a permutation of all n rows split into chunks of `batch` (the last
    chunk shorter), consumed from the END; a fresh permutation when the chunks run out. batch None: all rows."""
    if batch is None or batch >= n:
        return [torch.randperm(n, generator=gen) for _ in range(steps)]
    out: list[torch.Tensor] = []
    queue: list[torch.Tensor] = []
    for _ in range(steps):
        if not queue:
            queue = list(torch.randperm(n, generator=gen).split(batch))
        out.append(queue.pop())
    return out


def parameter_distance(theta: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """§3.7: ||theta - target||^2 / ||start - target||^2 (the 1/P factors of the reference cancel; no epsilon)."""
    return ((theta - target) ** 2).sum() / ((start - target) ** 2).sum()


@dataclass
class Unroll:
    """One student unroll: everything random is drawn up front, so a recomputation replays it exactly."""
    student: FlatNet
    start: torch.Tensor            # theta_0 (flat)
    target: torch.Tensor           # theta* (flat)
    batches: list                  # row indices into the decoded images X, one tensor per step
    labels: list                   # labels of each batch
    plans: list                    # DSA plan per step (None: no augmentation)
    momentum: float                # beta of the EMA inner update; 0 = plain SGD (MTT)
    dsa: Optional[DSA] = None
    standardize: bool = False
    amp: Amp = OFF                 # autocast of the student's forward (and its recomputation in the backward)

    def step_loss(self, theta: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
        if self.standardize:
            x = standardize_batch(x)
        if self.plans[t] is not None:
            x = self.dsa.apply(x, self.plans[t])
        with self.amp.autocast():
            logits = self.student(theta, x)
        return F.cross_entropy(fp32(logits), self.labels[t])

    def update(self, theta, mom, grad, alpha):
        """§3.6: m <- beta m + (1 - beta) g; theta <- theta - alpha m (beta 0: theta - alpha g)."""
        mom = grad if self.momentum == 0 else self.momentum * mom + (1 - self.momentum) * grad
        return theta - alpha * mom, mom


def unrolled_loss(u: Unroll, images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The matching loss with the whole unroll in the autograd graph (the reference's way; memory grows with
    syn_steps). `images` are the decoded rows the batches index."""
    theta = u.start.clone().requires_grad_(True)
    mom = torch.zeros_like(theta)
    # One gather for all steps, then split: indexing `images` once per step would make every step's backward
    # allocate a dense gradient of the whole decoded tensor (syn_steps of them alive at once).
    per_step = images[torch.cat(u.batches)].split([len(b) for b in u.batches])
    for t, x in enumerate(per_step):
        ce = u.step_loss(theta, x, t)
        grad = torch.autograd.grad(ce, theta, create_graph=True)[0]
        theta, mom = u.update(theta, mom, grad, alpha)
    return parameter_distance(theta, u.start, u.target)


class _CheckpointedUnroll(torch.autograd.Function):
    """Same loss and gradients as `unrolled_loss`, in memory independent of syn_steps: the forward keeps only
    (theta_t, m_t) per step; the backward recomputes one step at a time with its graph and chains the vector-
    Jacobian products backwards through the steps (reverse-mode with per-step checkpoints)."""

    @staticmethod
    def forward(ctx, images, alpha, u: Unroll):
        thetas, moms = [], []
        theta, mom = u.start, torch.zeros_like(u.start)
        for t, idx in enumerate(u.batches):
            thetas.append(theta)
            moms.append(mom)
            with torch.enable_grad():
                th = theta.detach().requires_grad_(True)
                grad = torch.autograd.grad(u.step_loss(th, images[idx].detach(), t), th)[0]
            theta, mom = u.update(theta, mom, grad, alpha.detach())
        ctx.u, ctx.thetas, ctx.moms, ctx.final = u, thetas, moms, theta
        ctx.save_for_backward(images, alpha)
        return parameter_distance(theta, u.start, u.target)

    @staticmethod
    def backward(ctx, gloss):
        images, alpha = ctx.saved_tensors
        u = ctx.u
        g_theta = gloss * 2 * (ctx.final - u.target) / ((u.start - u.target) ** 2).sum()
        g_mom = torch.zeros_like(g_theta)
        g_images = torch.zeros_like(images)
        g_alpha = torch.zeros_like(alpha)
        for t in reversed(range(len(u.batches))):
            idx = u.batches[t]
            with torch.enable_grad():
                th = ctx.thetas[t].detach().requires_grad_(True)
                m = ctx.moms[t].detach().requires_grad_(True)
                x = images[idx].detach().requires_grad_(True)
                a = alpha.detach().requires_grad_(True)
                grad = torch.autograd.grad(u.step_loss(th, x, t), th, create_graph=True)[0]
                th_next, m_next = u.update(th, m, grad, a)
                g_theta, g_m, g_x, g_a = torch.autograd.grad((th_next, m_next), (th, m, x, a),
                                                             (g_theta, g_mom), allow_unused=True)
            g_mom = g_m if g_m is not None else torch.zeros_like(g_mom)
            g_images.index_add_(0, idx, g_x)
            g_alpha = g_alpha + g_a
        return g_images, g_alpha, None


def checkpointed_loss(u: Unroll, images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return _CheckpointedUnroll.apply(images, alpha, u)


def plan_unroll(student: FlatNet, start, target, labels: torch.Tensor, n: int, cfg: DistillConfig,
                dsa: Optional[DSA], gen: torch.Generator, shape: tuple[int, int],
                device) -> tuple[Unroll, torch.Tensor]:
    """Draw one unroll's batches and augmentation; returns it and the sorted rows it touches (decoded once)."""
    batches = unroll_batches(n, cfg.batch_syn, cfg.syn_steps, gen)
    plans = [dsa.sample(len(b), shape[0], shape[1], gen, device=device) if dsa is not None else None
             for b in batches]
    used, local = torch.unique(torch.cat(batches), return_inverse=True)
    local_batches = list(local.split([len(b) for b in batches]))
    u = Unroll(student, start, target, [b.to(device) for b in local_batches],
               [labels[b].to(device) for b in batches], plans, cfg.inner_momentum, dsa, cfg.inner_standardize,
               resolve_distill_amp(cfg.amp, device))
    return u, used.to(device)


# ------------------------------------------------------------------------------------------ the loop

@dataclass
class RunState:
    """Everything a resumed run needs (plain tensors, numbers and dicts)."""
    it: int = 0                                   # next outer iteration
    params: dict = field(default_factory=dict)    # the parameterisation's state_dict (tensors + optimisers)
    alpha: Optional[torch.Tensor] = None
    alpha_opt: Optional[dict] = None
    gen: Optional[torch.Tensor] = None
    stream: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    rng: Optional[dict] = None                    # global torch/numpy/python RNG at the checkpoint


def make_student(cfg: DistillConfig, spec: DatasetSpec) -> FlatNet:
    """The student architecture as a flat-parameter network; its own weights are never used (§3.6)."""
    return FlatNet(get_network(cfg.model, spec.channels, spec.num_classes, spec.resolution))


def distill(cfg: DistillConfig, spec: DatasetSpec, params, stream: ExpertStream, gen: torch.Generator, device,
            log: RunLog, state: RunState, on_iter: Callable[[RunState, Callable], None] | None = None) -> RunState:
    """Run outer iterations state.it .. cfg.iterations - 1 and return the final state (§3.8).

    After each iteration `on_iter(state, fill)` runs; calling `fill()` copies the current tensors, optimiser and
    RNG states into `state` (done only when a checkpoint is due, since it copies the whole SCM)."""
    student = make_student(cfg, spec)
    n = num_images(cfg, spec)
    per_class = n // spec.num_classes
    labels = torch.arange(spec.num_classes).repeat_interleave(per_class)  # class-major hard labels (§3.1)
    alpha = (state.alpha.clone() if state.alpha is not None else torch.tensor(cfg.lr_teacher)).to(device)
    alpha.requires_grad_(True)
    alpha_opt = torch.optim.SGD([alpha], lr=cfg.lr_lr, momentum=cfg.outer_momentum)
    if state.alpha_opt is not None:
        alpha_opt.load_state_dict(state.alpha_opt)
    dsa = DSA(cfg.dsa_strategy, mode="single") if cfg.dsa else None
    loss_fn = checkpointed_loss if cfg.checkpoint_unroll else unrolled_loss

    def fill() -> None:
        state.params, state.alpha, state.alpha_opt = params.state_dict(), alpha.detach().cpu(), alpha_opt.state_dict()
        state.gen, state.stream = gen.get_state(), stream.state_dict()

    if state.rng is not None:   # last, after everything above that draws (the student's unused init weights)
        restore_rng(state.rng)
    for it in progress(range(state.it, cfg.iterations), total=cfg.iterations - state.it, desc=cfg.method):
        t0 = time.time()
        traj = stream.next()
        if len(traj) < cfg.expert_epochs + cfg.max_start_epoch:
            raise UserError(f"expert trajectories hold {len(traj)} snapshots, but --max-start-epoch "
                            f"{cfg.max_start_epoch} + --expert-epochs {cfg.expert_epochs} needs "
                            f"{cfg.max_start_epoch + cfg.expert_epochs}; lower them or train longer experts")
        s = int(torch.randint(0, cfg.max_start_epoch, (1,), generator=gen))
        start = flatten_snapshot(traj[s]).to(device)
        target = flatten_snapshot(traj[s + cfg.expert_epochs]).to(device)
        if start.numel() != student.num_params:
            raise UserError(f"expert snapshots have {start.numel()} parameters but {cfg.model} on {spec.name} has "
                            f"{student.num_params}: the buffer was made with another network or dataset")
        u, used = plan_unroll(student, start, target, labels, n, cfg, dsa, gen, (spec.resolution,) * 2, device)
        params.iteration = it
        images = params.decode(used)            # each touched image decoded once per iteration (§7 improvement)
        match = loss_fn(u, images, alpha)
        reg = params.regularizer()
        loss = match + reg
        for opt in [*params.optimizers, alpha_opt]:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss) or not torch.isfinite(alpha.grad if alpha.grad is not None else alpha):
            raise UserError(f"the matching loss became {float(loss.detach())} at iteration {it}; the last checkpoint "
                            f"is kept. Lower --lr-{'scm' if cfg.method == 'speed' else 'img'} or --lr-lr and re-run "
                            "with --overwrite (a fresh start with the new value)")
        for opt in [*params.optimizers, alpha_opt]:
            opt.step()
        params.after_step()
        with torch.no_grad():
            if cfg.lr_floor is not None:
                alpha.clamp_(min=cfg.lr_floor)   # §3.1: SPEED clamps; MTT does not
            if not (math.isfinite(float(alpha)) and float(alpha) > 0):
                raise UserError(f"the learned lr became {float(alpha)} at iteration {it}; the last checkpoint is "
                                "kept. Lower --lr-lr (or set --lr-floor) and re-run with --overwrite (a fresh start)")
        state.it = it + 1
        state.history.append({"it": it, "match_loss": float(match.detach()), "reg": float(reg.detach()),
                              "syn_lr": float(alpha.detach()),
                              "start_epoch": s, "seconds": time.time() - t0})
        log.row(**state.history[-1])
        if on_iter is not None:
            on_iter(state, fill)
    fill()
    return state


# ------------------------------------------------------------------------------------ data and buffers

def _num_params(model: str, spec: DatasetSpec) -> int:
    return sum(p.numel() for p in get_network(model, spec.channels, spec.num_classes, spec.resolution).parameters())


def read_buffer_meta(folder: Path) -> dict:
    """buffer.py's record of how the experts saw their data (value space, ZCA, subset); {} for legacy buffers."""
    f = folder / "buffer_meta.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is corrupt: {e}") from None


def real_init(cfg: DistillConfig, spec: DatasetSpec, images: torch.Tensor, labels: torch.Tensor,
              to_space: Callable, gen: torch.Generator) -> torch.Tensor:
    """MTT's pix_init real: `ipc` random real images of each class, class-major, in the experts' value space."""
    rows = []
    for c in range(spec.num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < cfg.ipc:
            raise UserError(f"class {c} has {len(idx)} training images, fewer than --ipc {cfg.ipc}")
        rows.append(idx[torch.randperm(len(idx), generator=gen)[:cfg.ipc]])
    return to_space(images[torch.cat(rows)])


def space_mapping(space: str, spec: DatasetSpec, zca_state: dict | None) -> Callable:
    """uint8 real images -> the experts' value space (§1.1, §1.2)."""
    if space == "zca":
        from utils.zca import ZCA
        zca = ZCA.from_state_dict(zca_state)
        return lambda x: zca.transform(to_pixels(x))
    return lambda x: normalize(to_pixels(x), spec.mean, spec.std)


# -------------------------------------------------------------------------------------------- saving

def build_synset(cfg: DistillConfig, spec: DatasetSpec, params, alpha: torch.Tensor, space: str,
                 zca_state: dict | None) -> SyntheticSet:
    """The saved set: MTT pixels, or SPEED's SAET + pruned SCM (compact) + FReeNet weights; the learned lr."""
    tensors, dargs, _ = params.final()
    n = num_images(cfg, spec)
    labels = torch.arange(spec.num_classes).repeat_interleave(n // spec.num_classes)
    if cfg.method == "speed":
        dargs = speed_decoder_args(speed_config(cfg, spec), spec.channels)
    meta = make_meta(spec, space=space, ipc=cfg.ipc, method=cfg.method, decoder=params.decoder, decoder_args=dargs,
                     args=asdict(cfg), seed=cfg.seed, zca_eps=0.1 if space == "zca" else None)
    return SyntheticSet(tensors, labels, meta, lr=alpha.detach().cpu().float().reshape(()), zca_state=zca_state)


# Below this share of the trained code mass kept by the saved top-k, the stored set is "far from what was trained".
KEPT_MASS_WARN = 0.9


def trained_dense_at_end(cfg: DistillConfig) -> bool:
    """Whether the last iteration's forward pass used the dense codes (so what is saved, the top-k, differs)."""
    switch = topk_start(cfg)
    return cfg.scm_train == "dense" and (switch is None or switch >= cfg.iterations)


def stored_form_note(cfg: DistillConfig, params) -> Optional[str]:
    """One line for the end of the run when the saved set is far from what was trained (SPEED trained on dense codes
    and saved as top-k: the share of the code mass the top-k keeps), else None."""
    if cfg.method != "speed" or not trained_dense_at_end(cfg):
        return None
    kept = kept_code_mass(params.scm, cfg.top_k)
    if kept >= KEPT_MASS_WARN:
        return None
    lk = (params.scm.shape[2] * params.scm.shape[3])
    return (f"warning: the saved set keeps {100 * kept:.1f} % of the trained code mass (top {cfg.top_k} of {lk} "
            "codes per image and head; the codes were trained dense), so it is not the set that was trained; "
            "--topk-share 0.5 trains the last half of the iterations through the saved codes (docs/SPEED_MTT.md)")


def save_outputs(out: Path, syn: SyntheticSet) -> None:
    """The set in place (synset.pt, meta.json, zca.pt, grid.png of the decoded images) plus the decoded images in
    MTT's file names, which MTT/SPEED evaluation code and `validate.py` read as well."""
    save_synset(syn, out, in_place=True)
    images, labels = syn.decode()
    atomic_torch_save(images, out / "images_final.pt")
    atomic_torch_save(labels, out / "labels_final.pt")
    atomic_torch_save(syn.lr, out / "lr_final.pt")


CKPT_FORMAT = "ddtoolkit-distill-ckpt-1"


def checkpoint_dict(state: RunState, fingerprint: str, inputs: dict[str, str] | None = None) -> dict:
    d = state_dict(state, CKPT_FORMAT, fingerprint, inputs)
    d["rng"] = capture_rng()   # nothing after initialisation draws from it today; saved so nothing new can drift
    return d


def load_checkpoint(path: Path, fingerprint: str, inputs: dict[str, str] | None = None) -> RunState:
    return load_state(path, RunState, CKPT_FORMAT, fingerprint, "distill.py", inputs=inputs)


def expert_digests(folder: Path, files: list[Path]) -> dict[str, str]:
    """The content fingerprint of the experts a run reads (utils/digest.py): size and mtime of every buffer file
    (several GB in all: not hashed at every start) and the bytes of buffer_meta.json and zca.pt. Experts
    regenerated in the same folder (buffer.py --overwrite) get another digest, so a checkpoint made against the
    old ones is not continued against the new ones."""
    extra = [folder / n for n in ("buffer_meta.json", "zca.pt") if (folder / n).is_file()]
    digest = files_digest([*files, *extra], root=folder, by_bytes=lambda p: p.suffix == ".json" or p.name == "zca.pt")
    return {f"the expert trajectories in {folder}": digest}


def config_fingerprint(cfg: DistillConfig, extra: dict) -> str:
    # more iterations may continue a run; checkpointing the unroll changes memory, not the gradients
    keyed = {k: v for k, v in asdict(cfg).items() if k not in ("iterations", "checkpoint_unroll")}
    if keyed["amp"] == "off":   # the fingerprint of fp32 runs from before --amp took a mode
        keyed["amp"] = False
    return settings_fingerprint({**keyed, **extra})


def resolve_distill_amp(mode: str, device) -> Amp:
    return resolve_amp(mode, device, allow_fp16=False,
                       fp16_reason="the unrolled student steps differentiate through their own gradients; a "
                                   "GradScaler cannot rescale them")


# ------------------------------------------------------------------------------------------------ CLI

app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})
_O = typer.Option


@app.command()
@cli_errors
def main(
    dataset: str = _O("CIFAR10", "--dataset", "-d", help="Dataset (registry name: CIFAR10, CIFAR100, TinyImageNet "
                      "(alias Tiny), FashionMNIST, ...; ImageNet with --subset)."),
    subset: Optional[str] = _O(None, "--subset", help="ImageNet subset at 128 px: imagenette, imagewoof, imagefruit, "
                               "imagemeow, imagesquawk, imageyellow (speed.md §8)."),
    ipc: int = _O(10, "--ipc", help="Storage budget in images per class. SPEED stores more, smaller-coded images "
                  "in that budget (speed.md §3.4)."),
    method: str = _O("speed", "--method", help="speed (SAET + sparse codes + FReeNet) or mtt (pixels)."),
    zca: bool = _O(False, "--zca", help="The experts were trained in ZCA space (CIFAR in the papers); the set lives "
                   "there too. Read from buffer_meta.json when buffer.py made the experts."),
    data_path: Path = _O(Path("data"), "--data-path", "--data_path", help="Raw dataset folder (MTT's real init, "
                         "and the ZCA fit for legacy buffers)."),
    buffer_path: Path = _O(Path("buffers"), "--buffer-path", "--buffer_path", help="Root of buffer.py's output; "
                           "the expert folder is <root>/<dataset>/<model>, with /<subset>/128 after the dataset for "
                           "ImageNet subsets and "
                           "_NO_ZCA after it for CIFAR without ZCA (speed.md §1.6)."),
    expert_folder: Optional[Path] = _O(None, "--expert-dir", help="The folder of replay_buffer_*.pt files itself "
                                       "(overrides --buffer-path)."),
    out: Optional[Path] = _O(None, "--out", "--save-dir", help="Output directory (set + checkpoint + logs). "
                             "Default: runs/distill/<dataset>/<method>_ipc<ipc>."),
    model: Optional[str] = _O(None, "--model", help="Student = expert architecture (default: ConvNet, ConvNetD4 at "
                              "64 px, ConvNetD5 at 128 px; any registry name, e.g. ConvNet-3-w32)."),
    iterations: Optional[int] = _O(None, "--iterations", "--Iteration", help="Outer iterations (SPEED 20000, MTT "
                                   "5000)."),
    syn_steps: Optional[int] = _O(None, "--syn-steps", "--syn_steps", help="Student steps per unroll (preset)."),
    expert_epochs: Optional[int] = _O(None, "--expert-epochs", "--expert_epochs", help="Target = start epoch + "
                                      "this (2)."),
    max_start_epoch: Optional[int] = _O(None, "--max-start-epoch", "--max_start_epoch", help="Start epoch drawn "
                                        "from 0 .. this - 1 (preset)."),
    batch_syn: Optional[int] = _O(None, "--batch-syn", "--batch_syn", help="Synthetic images per student step "
                                  "(preset; MTT: the whole set)."),
    lr_teacher: Optional[float] = _O(None, "--lr-teacher", "--lr_teacher", help="Initial learnable inner lr (0.01)."),
    lr_lr: Optional[float] = _O(None, "--lr-lr", "--lr_lr", help="lr of the learnable inner lr (SPEED 1e-5)."),
    inner_momentum: Optional[float] = _O(None, "--inner-momentum", "--momentum", help="SPEED's EMA inner update "
                                         "m = b m + (1-b) g (0.9); 0 = plain SGD (MTT)."),
    lr_floor: Optional[float] = _O(None, "--lr-floor", help="Clamp the learned lr to at least this after each step "
                                   "(SPEED 0.001; MTT none)."),
    outer_momentum: Optional[float] = _O(None, "--outer-momentum", help="Momentum of the outer SGD optimisers "
                                         "(SPEED 0.95, MTT 0.5)."),
    lr_img: Optional[float] = _O(None, "--lr-img", "--lr_img", help="MTT: lr of the pixels (preset)."),
    pix_init: Optional[str] = _O(None, "--pix-init", "--pix_init", help="MTT: real (random real images) or noise."),
    n_per_class: Optional[int] = _O(None, "--n-per-class", "--num_scm", help="SPEED: synthetic images per class "
                                    "(preset; re-derived from the budget when the code shape is changed)."),
    num_saet: Optional[int] = _O(None, "--num-saet", "--num_saet", help="SPEED: K, tokens in the shared SAET."),
    dim: Optional[int] = _O(None, "--dim", "--dim_saet", help="SPEED: D, token dimension = FReeNet width."),
    depth: Optional[int] = _O(None, "--decoder-depth", "--decoder_depth", help="SPEED: T, FReeNet blocks."),
    heads: Optional[int] = _O(None, "--heads", "--num_head", help="SPEED: h, heads of the sparse codes."),
    patch: Optional[int] = _O(None, "--patch", "--patch_size", help="SPEED: p, patch side."),
    top_k: Optional[int] = _O(None, "--top-k", "--top_k", help="SPEED: non-zeros kept per (image, head) when saved."),
    l1_weight: Optional[float] = _O(None, "--l1-weight", "--l1_weight", help="SPEED: L1 weight on the SCM."),
    lr_saet: Optional[float] = _O(None, "--lr-saet", "--lr_saet", help="SPEED: SAET lr (10)."),
    lr_scm: Optional[float] = _O(None, "--lr-scm", "--lr_scm", help="SPEED: SCM lr (100)."),
    lr_freenet: Optional[float] = _O(None, "--lr-freenet", "--lr_freenet", help="SPEED: FReeNet lr (0.01)."),
    topk_from: Optional[int] = _O(None, "--topk-from", help="SPEED: from this iteration on, train through the "
                                  "top-k codes that will be saved (gradient to the kept codes only): a dense phase, "
                                  "then fine-tuning of the stored representation. Wins over --topk-share."),
    topk_share: Optional[float] = _O(None, "--topk-share", help="SPEED: train the last this share of the "
                                     "iterations through the saved top-k codes (derived presets 0.5, published rows "
                                     "0 = the reference's dense training; docs/SPEED_MTT.md)."),
    init_std: Optional[float] = _O(None, "--init-std", help="SPEED: std of the Gaussian SAET/SCM initialisation "
                                   "(0.2, hard-coded in the reference)."),
    l1_mode: Optional[str] = _O(None, "--l1-mode", help="SPEED: subgradient (reference: lambda*sign(A) in the SGD "
                                "step) or proximal (soft-threshold A by lr_scm*lambda after each step: exact zeros; "
                                "a non-default variant, speed.md §7)."),
    scm_train: Optional[str] = _O(None, "--scm-train", help="SPEED: dense (reference: train the dense codes, prune "
                                  "to top-k only when saving) or topk-ste (train through the top-k codes that will "
                                  "be saved, straight-through gradient; a non-default variant, speed.md §7)."),
    dsa: Optional[bool] = _O(None, "--dsa/--no-dsa", help="DSA on every student batch (on)."),
    no_aug: bool = _O(False, "--no-aug", "--no_aug", help="Same as --no-dsa (the reference's spelling)."),
    dsa_strategy: Optional[str] = _O(None, "--dsa-strategy", "--dsa_strategy", help="DSA families (mode single)."),
    inner_standardize: Optional[bool] = _O(None, "--inner-standardize/--no-inner-standardize", help="Standardise "
                                           "each student batch like expert training does (speed.md bug 9; off in "
                                           "the reference)."),
    load_all: bool = _O(False, "--load-all", "--load_all", help="Load every buffer file; draw experts uniformly."),
    max_files: Optional[int] = _O(None, "--max-files", "--max_files", help="Use only this many buffer files."),
    max_experts: Optional[int] = _O(None, "--max-experts", "--max_experts", help="Use only this many experts."),
    checkpoint_unroll: bool = _O(False, "--checkpoint-unroll", help="Recompute each student step in the backward "
                                 "pass: memory independent of syn_steps, same gradients, ~1.3x compute."),
    amp: str = _O("off", "--amp", help=AMP_HELP + " distill: off or bf16 (the student's forward)."),
    train_subset: Optional[int] = _O(None, "--train-subset", help="MTT real init / ZCA fit from this many images per "
                                     "class (default: what buffer_meta.json records)."),
    seed: int = _O(0, "--seed", help="Seed of every random choice (init, experts, start epochs, batches, DSA)."),
    ckpt_every: int = _O(50, "--ckpt-every", help="Write the resume checkpoint every this many iterations."),
    snapshots: str = _O("", "--snapshots", help="Comma-separated iterations at which to also save the set under "
                        "<out>/snapshots/it<N>/."),
    device: str = _O("auto", "--device", help="auto, cpu or cuda."),
    overwrite: bool = _O(False, "--overwrite", help="Start afresh even if --out holds a run."),
    quiet: bool = _O(False, "--quiet", help="Only errors and the final line."),
    eval_every: int = _O(0, "--eval-every", help="Every N iterations (and after the last), train a fresh --model "
                         "--eval-epochs epochs on the set as it stands (with its learned lr) and log its test "
                         "accuracy (eval_acc in log.csv; the set is the same as without it). 0: never."),
    eval_epochs: int = _O(50, "--eval-epochs", help="Epochs of each --eval-every evaluation."),
    tensorboard: Optional[Path] = _O(None, "--tensorboard", help="Also write the curves (losses, learned lr, eval "
                                     "accuracy) and image grids of the set to this TensorBoard folder (needs the "
                                     "optional tensorboard package)."),
):
    """Distil a dataset by trajectory matching (SPEED or MTT) from buffer.py's expert trajectories."""
    require_at_least({"--ipc": ipc, "--syn-steps": syn_steps, "--expert-epochs": expert_epochs,
                      "--max-start-epoch": max_start_epoch, "--batch-syn": batch_syn, "--train-subset": train_subset,
                      "--n-per-class": n_per_class, "--max-files": max_files, "--max-experts": max_experts})
    check_eval_every(eval_every, eval_epochs)
    require_at_least({"--iterations": iterations}, least=0)
    name = subset if subset else dataset
    spec = get_dataset_spec(name)
    explicit = dict(model=model, iterations=iterations, syn_steps=syn_steps, expert_epochs=expert_epochs,
                    max_start_epoch=max_start_epoch, batch_syn=batch_syn, lr_teacher=lr_teacher, lr_lr=lr_lr,
                    inner_momentum=inner_momentum, lr_floor=lr_floor, outer_momentum=outer_momentum, lr_img=lr_img,
                    pix_init=pix_init, n_per_class=n_per_class, num_saet=num_saet, dim=dim, depth=depth, heads=heads,
                    patch=patch, top_k=top_k, l1_weight=l1_weight, lr_saet=lr_saet, lr_scm=lr_scm,
                    lr_freenet=lr_freenet, scm_train=scm_train, l1_mode=l1_mode, init_std=init_std, topk_from=topk_from,
                    topk_share=topk_share, dsa=False if no_aug else dsa,
                    dsa_strategy=dsa_strategy,
                    inner_standardize=inner_standardize, load_all=load_all or None, max_files=max_files,
                    max_experts=max_experts, checkpoint_unroll=checkpoint_unroll or None, amp=amp, seed=seed)
    cfg = resolve_config(method.lower(), spec, ipc, explicit)
    check_config(cfg, spec)
    if ckpt_every < 1:
        raise UserError("--ckpt-every must be at least 1")
    dev = resolve_device(device)
    resolve_distill_amp(cfg.amp, dev)
    get_network(cfg.model, spec.channels, spec.num_classes, spec.resolution)  # bad names fail before any write
    out = out or Path("runs") / "distill" / spec.name / f"{cfg.method}_ipc{ipc}"
    check_writable(out, "--out")

    folder = expert_folder or expert_dir(buffer_path, "ImageNet" if subset else spec.name, cfg.model, zca,
                                         subset=subset, res=spec.resolution if subset else None)
    files = buffer_files(folder)
    load_buffer_file(files[0])   # a corrupt or foreign buffer fails here, before --out is created
    bmeta = read_buffer_meta(folder)
    if bmeta.get("net") and get_network(bmeta["net"], spec.channels, spec.num_classes, spec.resolution) is not None \
            and _num_params(bmeta["net"], spec) != _num_params(cfg.model, spec):
        raise UserError(f"the experts in {folder} are {bmeta['net']} networks but --model is {cfg.model}: their "
                        "parameters do not match; pass the experts' --model")
    zca = bool(bmeta.get("zca", zca))
    space = "zca" if zca else "normalized"
    subset_per_class = train_subset if train_subset is not None else bmeta.get("train_subset")
    zca_state = safe_torch_load(folder / "zca.pt", "ZCA state") if zca and (folder / "zca.pt").is_file() else None
    need_data = (cfg.method == "mtt" and cfg.pix_init == "real") or (zca and zca_state is None)
    split = None
    if need_data:
        split, _ = load_split(name, data_path, "train", per_class=subset_per_class,
                              seed=bmeta.get("seed", cfg.seed) if subset_per_class else cfg.seed)
    if zca and zca_state is None:  # a legacy buffer: refit the ZCA the experts used (eps 0.1, train split)
        from utils.zca import ZCA
        with step(f"fitting ZCA on {len(split.images)} train images"):
            zca_state = ZCA.fit(to_pixels(split.images), eps=0.1).state_dict()

    refuse_overlap(out, "--out", {"--data-path": data_path})
    fingerprint = config_fingerprint(cfg, {"experts": str(folder.resolve()), "space": space})
    inputs = expert_digests(folder, files)
    ckpt_path = out / "ckpt.pt"
    with run_lock(out, "distill.py"):   # one writer per output folder
        state = resume_or_start(out, lambda p: load_checkpoint(p, fingerprint, inputs), overwrite)
        log = RunLog(out / "log.csv", quiet=quiet, resume=not overwrite)
        if state is not None:   # rows logged after the checkpoint belong to iterations that run again
            log.info(f"resuming from {ckpt_path} at iteration {state.it}/{cfg.iterations}")
            log.rows = [r for r in log.rows if int(r.get("it", 0)) < state.it]
        else:                   # killed before its first checkpoint: the rows belong to iterations that run again
            log.rows = []
        out.mkdir(parents=True, exist_ok=True)
        resolved = {**asdict(cfg), "experts": str(folder), "space": space, "fingerprint": fingerprint, "inputs": inputs,
                    "num_images": num_images(cfg, spec)}
        if cfg.method == "speed":
            scfg = speed_config(cfg, spec)
            resolved.update(budget_floats=budget_floats(spec.num_classes, ipc, spec.channels, spec.resolution),
                            storage_floats=storage_floats(scfg, spec.num_classes, spec.channels))
        atomic_write_json(resolved, out / "config.json")

        # Every random draw: the run generator (E/A init, pixel init, expert order, start epochs, batches, DSA); the
        # global RNG (seeded here) only initialises FReeNet, whose init is not ours to rewrite.
        gen = torch.Generator().manual_seed(cfg.seed)
        seed_everything(cfg.seed)   # torch, numpy, python: a checkpoint's copy of them is then the run's own
        if cfg.method == "speed":
            params = SpeedCode(cfg, spec, dev, gen)
        else:
            labels_all = split.labels if split is not None else None
            init = real_init(cfg, spec, split.images, labels_all, space_mapping(space, spec, zca_state), gen) \
                if cfg.pix_init == "real" else torch.randn(num_images(cfg, spec), spec.channels, spec.resolution,
                                                           spec.resolution, generator=gen)
            params = PixelImages(cfg, spec, dev, init)
        stream = ExpertStream(files, gen, load_all=cfg.load_all, max_files=cfg.max_files, max_experts=cfg.max_experts)
        if state is not None:
            params.load_state_dict(state.params)
            gen.set_state(state.gen)
            stream.load_state_dict(state.stream)
        else:
            state = RunState()
        snaps = sorted({int(s) for s in snapshots.split(",") if s.strip()})
        log.info(f"distill: {cfg.method.upper()} on {spec.name}, ipc {ipc} ({num_images(cfg, spec)} images), "
                 f"{cfg.model}, {cfg.iterations} iterations x {cfg.syn_steps} steps, batch {cfg.batch_syn or 'all'}, "
                 f"experts {folder} ({len(files)} files), space {space}, device {dev}")

        test = load_split(name, data_path, "test")[0] if eval_every else None
        curves = Curves(log, tensorboard)

        def on_iter(st: RunState, fill) -> None:
            last = st.it == cfg.iterations
            h = st.history[-1]
            curves.scalars(h["it"], to_log=False, match_loss=h["match_loss"], reg=h["reg"], syn_lr=h["syn_lr"])
            if eval_every and (st.it % eval_every == 0 or last):  # before the checkpoint: a kill repeats it
                fill()
                syn = build_synset(cfg, spec, params, st.alpha, space, zca_state)
                x, y = syn.decode()
                acc = short_eval(x, y, lambda v: v, spec, cfg.model, eval_epochs, (test.images, test.labels), dev,
                                 seed=cfg.seed, test_prepare=space_mapping(space, spec, zca_state),
                                 lr=float(st.alpha))
                curves.scalars(h["it"], eval_acc=round(acc, 5), eval_epochs=eval_epochs)
                curves.images(h["it"], "images", syn.to_pixels(x), nrow=len(y) // spec.num_classes)
                log.info(f"  eval after iteration {st.it}: test acc {100 * acc:.2f}% ({cfg.model}, {eval_epochs} "
                         "epochs, learned lr)")
            if st.it in snaps:
                fill()
                save_synset(build_synset(cfg, spec, params, st.alpha, space, zca_state),
                            out / "snapshots" / f"it{st.it}")
            if st.it % ckpt_every == 0 or last or stop.requested:
                fill()
                atomic_torch_save(checkpoint_dict(st, fingerprint, inputs), ckpt_path)
            stop.check(f"checkpoint written after iteration {st.it} ({ckpt_path})")
            if not quiet and (st.it % max(1, cfg.iterations // 50) == 0 or last):
                h = st.history[-1]
                log.info(f"  it {st.it}/{cfg.iterations}: match {h['match_loss']:.4f} reg {h['reg']:.4f} "
                         f"lr {h['syn_lr']:.5f} ({h['seconds']:.2f}s)")

        if state.it < cfg.iterations:
            with StopRequest() as stop:  # SIGTERM/SIGUSR1: checkpoint after the iteration in flight, exit 143
                state = distill(cfg, spec, params, stream, gen, dev, log, state, on_iter)
        curves.close()
        alpha = state.alpha if state.alpha is not None else torch.tensor(cfg.lr_teacher)
        syn = build_synset(cfg, spec, params, alpha, space, zca_state)
        save_outputs(out, syn)
        print(f"wrote {cfg.method} set: {len(syn.labels)} images ({len(syn.labels) // spec.num_classes}/class, budget "
              f"ipc {ipc}), learned lr {float(alpha):.5f}, to {out}")
        note = stored_form_note(cfg, params)
        if note:
            typer.echo(note, err=True)


if __name__ == "__main__":
    app()
