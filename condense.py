"""condense.py: IDC (multi-formation + gradient matching) and DREAM (representative matching).

    python condense.py --reproduce -d cifar10 -f 2 --ipc 10 --out runs/idc_cifar10_f2_ipc10
    python condense.py --reproduce -d cifar10 -f 2 --ipc 10 --dream --out runs/dream_cifar10_f2_ipc10
    python validate.py --syn runs/idc_cifar10_f2_ipc10 --preset idc --baseline random --baseline herding

Spec: docs/methods/idc_dream.md (section numbers below refer to it). The synthetic set S holds `ipc` stored images
per class in pixel space [0, 1]; decoding (utils/formation.py) turns each into f*f training images. Every outer
iteration re-initialises the matching network; each of its `inner_loop` inner iterations matches, class by class,
the gradient a real batch and the decoded synthetic images induce on the network's conv kernels, then trains the
network on `n_data` real samples. DREAM replaces IDC's random real batch with the images nearest the k-means centres
of the class's current embeddings.

The output directory is a synthetic set (`validate.py --syn OUT` reads it) that also holds the run's checkpoint
(`ckpt.pt`, plain dict, written atomically every --ckpt-every outer iterations), `log.csv`, `config.json`,
`grid.png` (decoded images), `grid_stored.png` and optional `snapshots/it<N>/` sets. Re-running the same command
resumes from the checkpoint.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import typer

from networks import get_network
from utils.curves import Curves, check_eval_every, short_eval
from utils.datasets import DatasetSpec, get_dataset_spec, load_split, normalize, to_pixels
from utils.dsa import DSA, DSAParams
from utils.errors import UserError
from utils.formation import decode_class, tile_mix
from utils.checkpoint import (capture_rng, check_finite, load_state, restore_rng, resume_or_start,
                              settings_fingerprint, state_dict)
from utils.io import atomic_torch_save, atomic_write_json, check_writable, refuse_overlap, run_lock, safe_torch_load
from utils.kmeans import representatives
from utils.misc import require_at_least, RunLog, cli_errors, progress, resolve_device, seed_everything, step
from utils.signals import StopRequest
from utils.synset import SyntheticSet, make_meta, save_grid, save_synset
from utils.amp import AMP_HELP, OFF, Amp, fp32, resolve_amp
from utils.train import maybe_cutmix, mixed_cross_entropy

# --------------------------------------------------------------------------------------------- presets

@dataclass
class CondenseConfig:
    """Every setting of one condensation run (idc_dream.md §2.1). Defaults are IDC's argparse defaults."""
    dataset: str = "CIFAR10"
    ipc: int = 10
    factor: int = 2
    dream: bool = False
    net: str = "ConvNet-3"
    niter: int = 500                 # outer iterations = niter * 100 // inner_loop (§2.1)
    inner_loop: int = 100
    fix_iter: int = 1                # re-initialise the matching net every fix_iter outer iterations
    batch_real: int = 64
    batch_syn_max: int = 128
    lr_img: float = 5e-3             # BASE synthetic lr; scaled by ipc and size (effective_lr_img)
    mom_img: float = 0.5
    lr: float = 0.01                 # matching network's real-data SGD
    momentum: float = 0.9
    weight_decay: float = 5e-4
    n_data: int = 500
    net_epoch: int = 1
    metric: str = "l1"
    bias: bool = False
    fc: bool = False
    aug_type: str = "color_crop_cutout"
    mixup_net: str = "cut"
    mix_p: float = 1.0
    beta: float = 1.0
    early: int = 0
    pt_from: int = -1
    pt_num: int = 1
    pretrained: Optional[str] = None
    decode_type: str = "single"
    init: str = "auto"               # auto: mix for f>1, else random (IDC) / kmean (DREAM); or noise
    init_select: str = "first"       # reference takes the FIRST images of a class (§9.1 item 3); "random" = fix
    f2_init: str = "kmean"           # DREAM: which ipc*f^2 images the mix init tiles (kmean or random=first)
    interval: int = 10               # DREAM re-clustering interval in inner iterations (§7.1)
    dream_embed: str = "normalized"  # DREAM embeds raw [0,1] images (§7.1 quirk); we normalise unless "raw"
    seed: int = 0
    train_subset: Optional[int] = None
    momentum_mode: str = "reference"  # reference: per-class closed form of the shared momentum (§2.2); joint
    outer: Optional[int] = None       # explicit number of outer iterations (CPU-scale runs); overrides niter
    amp: str = "off"                  # --amp: off | bf16 (fp16 refused: no loss scaling through double backward)

    @property
    def outer_iterations(self) -> int:
        if self.outer is not None:
            return self.outer
        return max(1, self.niter * 100 // self.inner_loop)


# Paper settings (misc/reproduce.py + argument.py overrides, idc_dream.md §3). Plain data keyed by dataset.
SMALL = dict(net="ConvNet-3", niter=2000, inner_loop=100, fix_iter=1, batch_real=64, batch_syn_max=128,
             mom_img=0.5, lr=0.01, momentum=0.9, weight_decay=5e-4, aug_type="color_crop_cutout",
             mixup_net="cut", beta=1.0, mix_p=0.5, bias=False, fc=False, decode_type="single")
IMAGENET = dict(SMALL, net="ResNetAP-10", niter=500, n_data=500, mix_p=1.0)
REPRODUCE: dict[str, dict] = {
    "CIFAR10": dict(SMALL, metric="mse", lr_img=5e-3, n_data=2000),
    "CIFAR100": dict(SMALL, metric="mse", lr_img=5e-3, n_data=2000),
    "SVHN": dict(SMALL, metric="mse", lr_img=5e-3, n_data=500),
    "MNIST": dict(SMALL, metric="l1", lr_img=1e-4, n_data=500),
    "FashionMNIST": dict(SMALL, metric="l1", lr_img=1e-4, n_data=500),
    "ImageNet10": dict(IMAGENET, metric="l1", lr_img=3e-3, early=10),
    "ImageNet100": dict(IMAGENET, metric="l1", lr_img=1e-3, lr=0.1, weight_decay=1e-4, batch_real=128, pt_from=5),
    # DREAM's TinyImageNet branch (§7.4); IDC has no TinyImageNet setting.
    "TinyImageNet": dict(SMALL, net="ConvNet-4", metric="mse", lr_img=5e-3, n_data=1000, batch_real=64),
}
# Dataset-level flags argument.py applies with or without --reproduce (§3 notes).
DATASET_FLAGS: dict[str, dict] = {k: dict(mix_p=0.5) for k in ("CIFAR10", "CIFAR100", "SVHN", "MNIST",
                                                                "FashionMNIST")}
DATASET_FLAGS["ImageNet100"] = dict(lr=0.1, weight_decay=1e-4, batch_real=128)   # forced for nclass >= 100
DREAM_DEFAULTS = dict(batch_real=128, interval=10, f2_init="kmean")   # §7.4 argparse differences
IMAGENET_FAMILY = ("ImageNet", "ImageNet10", "ImageNet100")
METRICS = ("mse", "l1", "l1_mean", "cos")


def reproduce_settings(dataset: str, ipc: int, factor: int, dream: bool) -> dict:
    """The paper setting of one (dataset, ipc, factor) row, as CondenseConfig fields (§3, §7.4)."""
    if dataset not in REPRODUCE:
        raise UserError(f"no --reproduce setting for {dataset} (have: {', '.join(REPRODUCE)})")
    if dataset == "TinyImageNet" and not dream:
        raise UserError("IDC has no TinyImageNet setting; TinyImageNet is a DREAM preset (add --dream)")
    s = dict(REPRODUCE[dataset])
    if dataset == "MNIST" and factor > 1:
        s.update(aug_type="color_crop", mixup_net="vanilla")
    if dataset in IMAGENET_FAMILY and factor >= 3 and ipc >= 20:
        s["decode_type"] = "bound"
    if dataset == "TinyImageNet" and ipc == 50:
        s["lr_img"] = 1e-6
    if dream:
        s["batch_real"] = 128 if dataset != "TinyImageNet" else s["batch_real"]
        s.pop("early", None)   # DREAM removed the early real-training loop (§7.3)
    return s


def resolve_config(dataset: str, ipc: int, factor: int, dream: bool, reproduce: bool, explicit: dict) -> CondenseConfig:
    """Explicit flags > --reproduce row > dataset-level flags > DREAM/IDC argparse defaults."""
    values = asdict(CondenseConfig())
    if dream:
        values.update(DREAM_DEFAULTS)
    values.update(DATASET_FLAGS.get(dataset, {}))
    if reproduce:
        values.update(reproduce_settings(dataset, ipc, factor, dream))
    values.update({k: v for k, v in explicit.items() if v is not None})
    values.update(dataset=dataset, ipc=ipc, factor=factor, dream=dream)
    cfg = CondenseConfig(**values)
    check_config(cfg)
    return cfg


def check_config(cfg: CondenseConfig) -> None:
    if cfg.ipc < 1 or cfg.factor < 1:
        raise UserError("--ipc and --factor must be at least 1")
    if cfg.metric not in METRICS:
        raise UserError(f"unknown --metric '{cfg.metric}' ({', '.join(METRICS)}; the reference lists l2 but never "
                        "implemented it)")
    if cfg.decode_type not in ("single", "multi", "bound"):
        raise UserError(f"unknown --decode-type '{cfg.decode_type}' (single, multi, bound)")
    if cfg.mixup_net not in ("cut", "vanilla"):
        raise UserError(f"unknown --mixup-net '{cfg.mixup_net}' (cut, vanilla)")
    if cfg.init not in ("auto", "noise", "random", "mix", "kmean"):
        raise UserError(f"unknown --init '{cfg.init}' (auto, noise, random, mix, kmean)")
    if cfg.init_select not in ("first", "random"):
        raise UserError(f"unknown --init-select '{cfg.init_select}' (first, random)")
    if cfg.momentum_mode not in ("reference", "joint"):
        raise UserError(f"unknown --momentum-mode '{cfg.momentum_mode}' (reference, joint)")
    if cfg.dream_embed not in ("normalized", "raw"):
        raise UserError(f"unknown --dream-embed '{cfg.dream_embed}' (normalized, raw)")
    if cfg.outer is not None and cfg.outer < 0:
        raise UserError("--outer-iterations must be at least 0")
    for name in ("inner_loop", "fix_iter", "batch_real", "batch_syn_max", "niter", "interval"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if not (cfg.lr_img > 0 and math.isfinite(cfg.lr_img)):
        raise UserError(f"--lr-img must be a positive number, got {cfg.lr_img}")


def size_base(spec: DatasetSpec) -> int:
    """Reference resolution of the lr_img scaling (§2.1): 224 for ImageNet, 28 for MNIST only, else 32.
    FashionMNIST therefore gets an extra (28/32)^2 (a reference quirk we keep: it is part of the tuned lr)."""
    if spec.name in IMAGENET_FAMILY:
        return 224
    return 28 if spec.name == "MNIST" else 32


def effective_lr_img(base: float, ipc: int, spec: DatasetSpec) -> float:
    """lr_img_eff = base * (ipc / 10) * (size / size_base)^2 (§2.1): compensates CE being a mean over images."""
    return base * (ipc / 10) * (spec.resolution / size_base(spec)) ** 2


def init_mode(cfg: CondenseConfig) -> str:
    """§1.3 / §7.2: mix is forced for f > 1; f = 1 uses random (IDC) or kmean (DREAM) unless told otherwise."""
    if cfg.factor > 1 and cfg.init != "noise":
        return "mix"
    if cfg.init in ("auto", "mix"):
        return "kmean" if cfg.dream else "random"
    return cfg.init


# ------------------------------------------------------------------------------------------ matching

def matched_params(net: torch.nn.Module, bias: bool = False, fc: bool = False) -> list[torch.nn.Parameter]:
    """Parameters whose gradients are matched (§2.3): conv kernels always; 1-D tensors (biases, norm affine) only
    with `bias`, 2-D (linear weights) only with `fc`."""
    keep = []
    for p in net.parameters():
        if p.dim() == 1 and not bias:
            continue
        if p.dim() == 2 and not fc:
            continue
        keep.append(p)
    return keep


def tensor_distance(gr: torch.Tensor, gs: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance between a real and a synthetic gradient tensor (§2.3). mse and l1 are SUMS, not means."""
    if metric == "mse":
        return (gr - gs).pow(2).sum()
    if metric == "l1":
        return (gr - gs).abs().sum()
    if metric == "l1_mean":
        return (gr - gs).abs().reshape(gr.shape[0], -1).mean(-1).sum()
    if metric == "cos":
        a, b = gr.reshape(gr.shape[0], -1), gs.reshape(gs.shape[0], -1)
        return (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)).sum()
    raise UserError(f"unknown metric '{metric}'")


def matching_loss(grads_real, grads_syn, metric: str) -> torch.Tensor:
    """L_c = sum over the matched tensors of d(G_r, G_s); layers are not weighted (§2.3)."""
    return sum(tensor_distance(gr, gs, metric) for gr, gs in zip(grads_real, grads_syn))


def class_gradient(net, params, x: torch.Tensor, label: int, create_graph: bool = False,
                   amp: Amp = OFF) -> tuple[torch.Tensor, ...]:
    """Gradient of the mean cross-entropy of a one-class batch with respect to `params` (fp32 parameters, so the
    gradients are fp32 even when the forward runs under `amp`; the loss is taken on fp32 logits)."""
    y = torch.full((len(x),), label, dtype=torch.long, device=x.device)
    with amp.autocast():
        logits = net(x)
    loss = F.cross_entropy(fp32(logits), y)
    return torch.autograd.grad(loss, params, create_graph=create_graph)


def class_match_grad(net, params, real: torch.Tensor, stored: torch.Tensor, label: int, cfg: CondenseConfig,
                     spec: DatasetSpec, dsa: DSA | None, gen: torch.Generator,
                     amp: Amp = OFF) -> tuple[torch.Tensor, float]:
    """dL_c/dS_c for one class (§2.2 inner step): decode the class's stored images, keep a random subset of at most
    batch_syn_max, normalise real and synthetic images and augment both with ONE shared DSA draw (§2.4), then match
    the conv-kernel gradients. Only the stored images receive a gradient (the reference's backward also filled
    the network's .grad, which is wasted work). Under `amp` only the two network passes (and their double
    backward) run in low precision; the matching metric compares fp32 gradients."""
    s = stored.detach().requires_grad_(True)
    syn = decode_class(s, cfg.factor, cfg.decode_type, cfg.batch_syn_max)
    if len(syn) > cfg.batch_syn_max:
        syn = syn[torch.randperm(len(syn), generator=gen)[:cfg.batch_syn_max].to(syn.device)]
    xr = normalize(real, spec.mean, spec.std)
    xs = normalize(syn, spec.mean, spec.std)
    if dsa is not None:
        plan = dsa.sample(1, xr.shape[-2], xr.shape[-1], gen, siamese=True, device=xr.device)
        xr, xs = dsa.apply(xr, plan), dsa.apply(xs, plan)
    g_real = [g.detach() for g in class_gradient(net, params, xr, label, amp=amp)]
    g_syn = class_gradient(net, params, xs, label, create_graph=True, amp=amp)
    loss = matching_loss(g_real, g_syn, cfg.metric)
    (grad,) = torch.autograd.grad(loss, s)
    return grad, float(loss.detach())


def shared_momentum_step(S: torch.Tensor, buf: torch.Tensor, grad: torch.Tensor, lr: float, mom: float,
                         num_classes: int) -> None:
    """One inner iteration of the reference's synthetic-image optimiser, for all classes at once (§2.2).

    The reference keeps ONE SGD(momentum) over all of S and steps it once per class, so every class's rows also
    move N-1 extra times on momentum alone. Between two evaluations of class c that is exactly
        b_c <- m^N b_c + g_c ;  S_c <- S_c - lr * (1 - m^N) / (1 - m) * b_c
    (a geometric sum of the N moves). With all class gradients taken at the same S this closed form reproduces
    the sequential trajectory; a plain batched momentum step would not.
    """
    carry = mom ** num_classes
    buf.mul_(carry).add_(grad)
    scale = (1 - carry) / (1 - mom) if mom != 1 else float(num_classes)
    S.sub_(lr * scale * buf)


def joint_momentum_step(S, buf, grad, lr, mom, num_classes) -> None:
    """`--momentum-mode joint`: one ordinary SGD-momentum step per inner iteration (NOT the reference dynamics)."""
    buf.mul_(mom).add_(grad)
    S.sub_(lr * buf)


MOMENTUM_STEPS = {"reference": shared_momentum_step, "joint": joint_momentum_step}


# ------------------------------------------------------------------------------------------- real data

class ClassStream:
    """Per-class infinite stream of real batches (§6): each pass is a fresh random permutation of the class's
    indices, cut into batches of min(class size, batch); incomplete batches are dropped. Its state is plain data
    (for checkpoints)."""

    def __init__(self, class_indices: list[torch.Tensor], batch: int):
        self.pools = class_indices
        self.batch = batch
        self.perm: list[torch.Tensor | None] = [None] * len(class_indices)
        self.pos = [0] * len(class_indices)

    def next(self, c: int, gen: torch.Generator) -> torch.Tensor:
        pool = self.pools[c]
        b = min(self.batch, len(pool))
        if self.perm[c] is None or self.pos[c] + b > len(pool):
            self.perm[c] = pool[torch.randperm(len(pool), generator=gen)]
            self.pos[c] = 0
        out = self.perm[c][self.pos[c]:self.pos[c] + b]
        self.pos[c] += b
        return out

    def state_dict(self) -> dict:
        return {"perm": list(self.perm), "pos": list(self.pos)}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos = list(state["perm"]), list(state["pos"])


class SetStream:
    """Random sampler over the whole training set for the network updates (§2.5); incomplete batches kept."""

    def __init__(self, n: int, batch: int):
        self.n, self.batch = n, batch
        self.perm: torch.Tensor | None = None
        self.pos = 0

    def next(self, gen: torch.Generator) -> torch.Tensor:
        if self.perm is None or self.pos >= self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=gen), 0
        out = self.perm[self.pos:self.pos + self.batch]
        self.pos += len(out)
        return out

    def state_dict(self) -> dict:
        return {"perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.perm, self.pos = state["perm"], state["pos"]


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float [0, 1] (real data lives on the device as uint8)."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def train_real_batch(net, opt, x: torch.Tensor, y: torch.Tensor, spec: DatasetSpec, dsa: DSA | None,
                     cfg: CondenseConfig, gen: torch.Generator, amp: Amp = OFF) -> float:
    """One SGD step of the matching network on a real batch: normalise, per-sample DSA, CutMix with probability
    mix_p when mixup_net is 'cut' (§2.5)."""
    x = normalize(to_unit(x), spec.mean, spec.std)
    if dsa is not None:
        x = dsa(x, generator=gen)
    net.train()
    x, y1, y2, r = maybe_cutmix(x, y, cfg.mix_p if cfg.mixup_net == "cut" else 0.0, cfg.beta, gen)
    with amp.autocast():
        logits = net(x)
    loss = mixed_cross_entropy(fp32(logits), y1, y2, r)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def network_update(net, opt, images, labels, stream: SetStream, n_samples: int, spec, dsa, cfg, gen,
                   amp: Amp = OFF) -> None:
    """Train the matching network on at least n_samples real samples (one "net epoch", §2.5)."""
    seen = 0
    while seen < n_samples:
        idx = stream.next(gen)
        train_real_batch(net, opt, images[idx.to(images.device)], labels[idx.to(labels.device)], spec, dsa, cfg, gen,
                         amp)
        seen += len(idx)


# ------------------------------------------------------------------------------------- networks

NET_TYPES = {"convnet": "ConvNet-{d}", "resnet_ap": "ResNetAP-{d}", "resnet": "ResNet-{d}-BN"}
NET_DEPTHS = {"convnet": 3, "resnet_ap": 10, "resnet": 10}


def network_name(net: str, depth: Optional[int]) -> str:
    """IDC's `-n convnet|resnet_ap|resnet` with `--depth` (10, the default, means 3 for ConvNet), or any
    registry name."""
    key = net.lower()
    if key in NET_TYPES:
        d = depth if depth is not None else NET_DEPTHS[key]
        if key == "convnet" and d == 10:   # IDC maps its default depth 10 to ConvNet-3 (§4.1)
            d = 3
        return NET_TYPES[key].format(d=d)
    return net


def fresh_network(cfg: CondenseConfig, spec: DatasetSpec, seed: int, device) -> torch.nn.Module:
    """A new matching network whose init depends only on (run seed, draw number): resumable and repeatable
    (the reference draws from an unseeded global RNG, §9.1 item 4)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = get_network(cfg.net, spec.channels, spec.num_classes, spec.resolution)
    return net.to(device)


def make_optimizer(net, cfg: CondenseConfig):
    return torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def pretrained_checkpoints(folder: str | Path) -> dict[str, dict[int, Path]]:
    """{network folder: {epoch: file}} under `folder`: one subfolder per pre-trained network, files
    checkpoint<epoch>.pt (written by `condense.py --pretrain`)."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"pretrained-network folder not found: {root}")
    out: dict[str, dict[int, Path]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        eps = {}
        for f in d.glob("checkpoint*.pt"):
            tail = f.stem[len("checkpoint"):]
            if tail.isdigit():
                eps[int(tail)] = f
        if eps:
            out[d.name] = eps
    if not out:
        raise UserError(f"{root} holds no <net>/checkpoint<epoch>.pt files; make them with condense.py --pretrain")
    return out


def load_pretrained(net, ckpts: dict[str, dict[int, Path]], cfg: CondenseConfig, rng: random.Random) -> str:
    """§2.6: a network folder uniformly at random, epoch pt_from (or uniform in [pt_from, pt_from + pt_num));
    optimizer state is not restored."""
    name = rng.choice(sorted(ckpts))
    epoch = cfg.pt_from + (rng.randrange(cfg.pt_num) if cfg.pt_num > 1 else 0)
    if epoch not in ckpts[name]:
        raise UserError(f"pretrained network {name} has no checkpoint for epoch {epoch} "
                        f"(has {sorted(ckpts[name])})")
    state = safe_torch_load(ckpts[name][epoch], "pretrained checkpoint")
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"{ckpts[name][epoch]} does not fit {cfg.net}: {str(e).splitlines()[0]}") from None
    return f"{name}/epoch{epoch}"


# ------------------------------------------------------------------------------------------ DREAM

@torch.no_grad()
def embed_all(net, images: torch.Tensor, spec: DatasetSpec, normalized: bool, chunk: int = 512) -> torch.Tensor:
    """Penultimate features of every image (in chunks, no augmentation). DREAM feeds raw [0, 1] pixels (§7.1
    quirk); by default we normalise like the network's training input."""
    was_training = net.training
    net.eval()
    feats = []
    for i in range(0, len(images), chunk):
        x = to_unit(images[i:i + chunk])
        if normalized:
            x = normalize(x, spec.mean, spec.std)
        feats.append(net.embed(x).float())
    net.train(was_training)
    return torch.cat(feats)


def dream_batch(net, class_images: torch.Tensor, k: int, spec: DatasetSpec, cfg: CondenseConfig,
                gen: torch.Generator) -> torch.Tensor:
    """DREAM's representative real batch of one class (§7.1): k-means(k) on the current network's embeddings of
    all the class's images, then the image nearest each centre (indices into class_images, duplicates kept)."""
    feats = embed_all(net, class_images, spec, cfg.dream_embed == "normalized")
    k = min(k, len(feats))
    return representatives(feats, k, gen)


# --------------------------------------------------------------------------------------- init

def check_enough_images(cfg: CondenseConfig, class_indices: list[torch.Tensor]) -> int:
    """Real images one class needs for the initialisation (ipc, or ipc*f^2 for mix); a one-line error if a class
    has fewer (checked before anything is written)."""
    mode = init_mode(cfg)
    need = 0 if mode == "noise" else cfg.ipc * cfg.factor ** 2 if mode == "mix" else cfg.ipc
    for c, pool in enumerate(class_indices):
        if len(pool) < need:
            raise UserError(f"class {c} has {len(pool)} training images; initialising {cfg.ipc} stored images at "
                            f"factor {cfg.factor} needs {need} (lower --ipc/--factor or raise --train-subset)")
    return need


def kmeans_init(cfg: CondenseConfig) -> bool:
    """Whether S starts from DREAM's k-means picks (§7.2): --init kmean, or DREAM's mix with --f2-init kmean."""
    mode = init_mode(cfg)
    return mode == "kmean" or (mode == "mix" and cfg.dream and cfg.f2_init == "kmean")


def initial_images(cfg: CondenseConfig, spec: DatasetSpec, images: torch.Tensor, class_indices: list[torch.Tensor],
                   net, gen: torch.Generator) -> torch.Tensor:
    """S at iteration 0 (§1.3, §7.2), pixel space [0, 1], class-major [N*ipc, C, R, R]."""
    n_cls, ipc, f = spec.num_classes, cfg.ipc, cfg.factor
    mode = init_mode(cfg)
    noise = (torch.randn(n_cls * ipc, spec.channels, spec.resolution, spec.resolution, generator=gen) / 4 + 0.5)
    S = noise.clamp(0, 1).to(images.device)
    if mode == "noise":
        return S
    need = check_enough_images(cfg, class_indices)
    use_kmeans = kmeans_init(cfg)
    for c in progress(range(n_cls), total=n_cls, desc="k-means init", disable=None if use_kmeans else True):
        pool = class_indices[c]
        if use_kmeans:   # DREAM: nearest images to k-means centres of an untrained network's embeddings (§7.2)
            chosen = pool[dream_batch(net, images[pool], need, spec, cfg, gen).cpu()]
        elif cfg.init_select == "random":
            chosen = pool[torch.randperm(len(pool), generator=gen)[:need]]
        else:             # the reference takes the first images of the class in dataset order (§9.1 item 3)
            chosen = pool[:need]
        real = to_unit(images[chosen.to(images.device)])
        S[c * ipc:(c + 1) * ipc] = tile_mix(real, ipc, f) if mode == "mix" else real
    return S


# ------------------------------------------------------------------------------------- the loop

@dataclass
class RunState:
    """Everything a resumed run needs (plain tensors and numbers; saved as a dict)."""
    S: torch.Tensor
    buf: torch.Tensor
    it: int = 0                                   # next outer iteration to run
    gen: Optional[torch.Tensor] = None            # torch.Generator state
    py_rng: Optional[tuple] = None
    class_stream: dict = field(default_factory=dict)
    set_stream: dict = field(default_factory=dict)
    net: Optional[dict] = None
    opt: Optional[dict] = None
    dream_idx: Optional[list] = None
    history: list = field(default_factory=list)
    rng: Optional[dict] = None                    # global torch/numpy/python RNG at the checkpoint


def condense(cfg: CondenseConfig, spec: DatasetSpec, images: torch.Tensor, labels: torch.Tensor, device,
             log: RunLog, state: RunState | None = None, on_outer=None, on_init=None) -> RunState:
    """Run (or continue) the IDC/DREAM loop of §2.2 on real `images` (uint8 or [0, 1] float, on `device`) and
    their labels. `on_init(state)` is called once S is initialised (fresh runs only) and `on_outer(state)` after every
    outer iteration (checkpoints, snapshots)."""
    n_cls, ipc = spec.num_classes, cfg.ipc
    amp = resolve_condense_amp(cfg.amp, device)
    gen = torch.Generator()
    class_indices = [torch.nonzero(labels.cpu() == c).flatten() for c in range(n_cls)]
    class_stream = ClassStream(class_indices, cfg.batch_real)
    set_stream = SetStream(len(labels), cfg.batch_real)
    py_rng = random.Random(cfg.seed)
    lr_img = effective_lr_img(cfg.lr_img, ipc, spec)
    step_fn = MOMENTUM_STEPS[cfg.momentum_mode]
    match_dsa = DSA(cfg.aug_type, mode="idc", params=DSAParams(align_corners=False)) if cfg.aug_type != "none" else None
    net_strategy = "_".join(a for a in cfg.aug_type.split("_") if not (cfg.mixup_net == "cut" and a == "cutout"))
    net_dsa = DSA(net_strategy, mode="idc", params=DSAParams(align_corners=False)) if net_strategy not in ("", "none") \
        else None
    if cfg.pt_from >= 0 and cfg.pretrained is None:
        raise UserError("--pt-from needs --pretrained DIR (networks made with condense.py --pretrain)")
    ckpts = pretrained_checkpoints(cfg.pretrained) if cfg.pt_from >= 0 else None

    net = opt = None
    if state is None:
        gen.manual_seed(cfg.seed)
        net = fresh_network(cfg, spec, seed_for(cfg.seed, 0), device)
        opt = make_optimizer(net, cfg)
        with step(f"clustering each class's embeddings (k-means) for the {n_cls * ipc} initial images",
                  quiet=log.quiet or not kmeans_init(cfg)):
            S = initial_images(cfg, spec, images, class_indices, net, gen)
        state = RunState(S=S, buf=torch.zeros_like(S))
        if on_init is not None:
            on_init(state)
        if not cfg.dream:
            net = opt = None   # IDC re-initialises at it = 0; DREAM matches with its init network first (§7.3)
    else:
        gen.set_state(state.gen)
        py_rng.setstate(_tuple(state.py_rng))
        class_stream.load_state_dict(state.class_stream)
        set_stream.load_state_dict(state.set_stream)
        if state.rng is not None:
            restore_rng(state.rng)
        if state.net is not None:
            net = fresh_network(cfg, spec, 0, device)
            net.load_state_dict(state.net)
            opt = make_optimizer(net, cfg)
            opt.load_state_dict(state.opt)
    S, buf = state.S.to(device), state.buf.to(device)
    dream_idx = state.dream_idx

    outer = cfg.outer_iterations
    for it in progress(range(state.it, outer), total=outer - state.it, desc="condense"):
        t0 = time.time()
        if it % cfg.fix_iter == 0 and not (cfg.dream and it == 0 and net is not None):
            net = fresh_network(cfg, spec, seed_for(cfg.seed, it + 1), device)
            opt = make_optimizer(net, cfg)
            if ckpts is not None:
                load_pretrained(net, ckpts, cfg, py_rng)
            for _ in range(cfg.early):   # ImageNet-10: full epochs of real training after each re-init (§2.6)
                network_update(net, opt, images, labels, set_stream, len(labels), spec, net_dsa, cfg, gen, amp)
        params = matched_params(net, cfg.bias, cfg.fc)
        S.clamp_(0, 1)   # once per outer iteration, like the reference (§9.1 item 2)
        losses = []
        for t in range(cfg.inner_loop):
            if cfg.dream and t % cfg.interval == 0:
                dream_idx = [class_indices[c][dream_batch(net, images[class_indices[c].to(images.device)],
                                                          cfg.batch_real, spec, cfg, gen).cpu()]
                             for c in range(n_cls)]
            grad = torch.zeros_like(S)
            step_loss = 0.0
            for c in range(n_cls):
                idx = dream_idx[c] if cfg.dream else class_stream.next(c, gen)
                real = to_unit(images[idx.to(images.device)])
                rows = slice(c * ipc, (c + 1) * ipc)
                g, loss = class_match_grad(net, params, real, S[rows], c, cfg, spec, match_dsa, gen, amp)
                grad[rows] = g
                step_loss += loss
            # stop before the step: the last checkpoint (written after an earlier outer iteration) stays good
            check_finite(step_loss, f"outer iteration {it}", f"--lr-img (effective {lr_img:g})")
            step_fn(S, buf, grad, lr_img, cfg.mom_img, n_cls)
            losses.append(step_loss / n_cls)
            for _ in range(cfg.net_epoch):
                network_update(net, opt, images, labels, set_stream, cfg.n_data, spec, net_dsa, cfg, gen, amp)
        mean_loss = sum(losses) / len(losses)
        state = RunState(S=S, buf=buf, it=it + 1, gen=gen.get_state(), py_rng=py_rng.getstate(),
                         class_stream=class_stream.state_dict(), set_stream=set_stream.state_dict(),
                         net=net.state_dict(), opt=opt.state_dict(), dream_idx=dream_idx,
                         history=state.history + [{"it": it + 1, "match_loss": mean_loss,
                                                   "seconds": round(time.time() - t0, 3)}])
        log.row(it=it + 1, match_loss=round(mean_loss, 6), seconds=round(time.time() - t0, 3))
        if on_outer is not None:
            on_outer(state)
    return state


def seed_for(seed: int, draw: int) -> int:
    """Seed of the draw-th network of a run (draw 0: the init network)."""
    return (seed * 1_000_003 + draw) % (2 ** 63)


def _tuple(x):
    """python RNG state read back from a checkpoint (lists -> tuples)."""
    return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------- saving

def build_synset(cfg: CondenseConfig, spec: DatasetSpec, S: torch.Tensor, clamp: bool = False) -> SyntheticSet:
    """The core synthetic-set object: stored images (pixel space, unnormalised, class-major) + factor in meta."""
    data = S.detach().cpu().float()
    if clamp:
        data = data.clamp(0, 1)
    labels = torch.arange(spec.num_classes).repeat_interleave(cfg.ipc)
    decoder, dargs = ("multiformation", {"factor": cfg.factor, "mode": "single"}) if cfg.factor > 1 else ("pixels", {})
    meta = make_meta(spec, space="pixel", ipc=cfg.ipc, method="dream" if cfg.dream else "idc", decoder=decoder,
                     decoder_args=dargs, args=asdict(cfg), seed=cfg.seed)
    return SyntheticSet({"images": data}, labels, meta)


def save_outputs(out: Path, syn: SyntheticSet, cfg: CondenseConfig) -> None:
    """Final set in `out` (in place, beside the checkpoint and logs), grid of decoded and of stored images, and the
    reference's data.pt ([data, targets]) for tools that read IDC output."""
    save_synset(syn, out, in_place=True)
    save_grid(syn.tensors["images"], syn.labels, out / "grid_stored.png")
    atomic_torch_save([syn.tensors["images"], syn.labels], out / "data.pt")


CKPT_FORMAT = "ddtoolkit-condense-ckpt-1"


def checkpoint_dict(state: RunState, fingerprint: str) -> dict:
    d = state_dict(state, CKPT_FORMAT, fingerprint)
    d["S"], d["buf"] = state.S.detach().cpu(), state.buf.detach().cpu()
    d["py_rng"] = list(state.py_rng) if state.py_rng is not None else None
    d["rng"] = capture_rng()   # the run draws from `gen` and `py_rng`; the global RNG is saved so nothing can drift
    return d


def load_checkpoint(path: Path, fingerprint: str) -> RunState:
    return load_state(path, RunState, CKPT_FORMAT, fingerprint, "condense.py")


def config_fingerprint(cfg: CondenseConfig) -> str:
    settings = asdict(cfg)
    if settings["amp"] == "off":   # runs from before --amp existed keep their fingerprint
        del settings["amp"]
    return settings_fingerprint(settings)


def resolve_condense_amp(mode: str, device) -> Amp:
    return resolve_amp(mode, device, allow_fp16=False,
                       fp16_reason="gradient matching differentiates through a gradient; a GradScaler cannot "
                                   "rescale it")


# ------------------------------------------------------------------------------------- pretraining

def pretrain_networks(cfg: CondenseConfig, spec: DatasetSpec, images, labels, out: Path, seeds: list[int], device,
                      log: RunLog) -> None:
    """IDC's pretrain.py (§2.6): train the matching architecture from scratch for pt_from + pt_num - 1 epochs with
    the network-update augmentation (per-sample DSA without cutout, CutMix p = 1) and one SGD optimiser, no
    schedule; save a plain state_dict `<out>/<net>_seed<s>/checkpoint<epoch>.pt` for every epoch >= pt_from."""
    if cfg.pt_from < 1:
        raise UserError("--pretrain needs --pt-from E >= 1 (the first epoch to save)")
    pcfg = replace(cfg, mixup_net="cut", mix_p=1.0)
    strategy = "_".join(a for a in cfg.aug_type.split("_") if a != "cutout")
    dsa = DSA(strategy, mode="idc", params=DSAParams(align_corners=False)) if strategy else None
    amp = resolve_condense_amp(cfg.amp, device)
    for s in seeds:
        gen = torch.Generator().manual_seed(s)
        net = fresh_network(cfg, spec, seed_for(s, 0), device)
        opt = make_optimizer(net, cfg)
        stream = SetStream(len(labels), cfg.batch_real)
        folder = out / f"{cfg.net}_seed{s}"
        for epoch in range(1, cfg.pt_from + cfg.pt_num):
            network_update(net, opt, images, labels, stream, len(labels), spec, dsa, pcfg, gen, amp)
            if epoch >= cfg.pt_from:
                folder.mkdir(parents=True, exist_ok=True)
                atomic_torch_save({k: v.cpu() for k, v in net.state_dict().items()}, folder / f"checkpoint{epoch}.pt")
            log.info(f"pretrain seed {s}: epoch {epoch} done")


# ------------------------------------------------------------------------------------------------ CLI

IDC_DATASETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN", "mnist": "MNIST",
                "fashion": "FashionMNIST", "tinyimagenet": "TinyImageNet"}


def dataset_name(name: str, nclass: Optional[int]) -> str:
    """IDC's `-d imagenet --nclass 10|100` means the class100.txt subsets; other names go to the registry."""
    if name.lower() == "imagenet" and nclass in (10, 100):
        return f"ImageNet{nclass}"
    return get_dataset_spec(IDC_DATASETS.get(name.lower(), name)).name


app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})

_O = typer.Option


@app.command()
@cli_errors
def main(
    dataset: str = _O(..., "--dataset", "-d", help="Dataset: IDC names (cifar10, cifar100, svhn, mnist, fashion, "
                      "imagenet with --nclass 10/100) or any registry name (FashionMNIST, CIFAR10, ImageNet10, ...)."),
    data_path: Path = _O(Path("data"), "--data-path", "--data_path", "--data_dir", "--imagenet_dir",
                         help="Folder with the raw dataset files (see README, Datasets)."),
    nclass: Optional[int] = _O(None, "--nclass", help="With -d imagenet: 10 or 100 (IDC's class100.txt order)."),
    ipc: int = _O(10, "--ipc", help="STORED images per class (the storage budget)."),
    factor: int = _O(2, "--factor", "-f", help="Multi-formation factor f: each stored image decodes to f*f "
                     "training images (1 = IDC-I)."),
    dream: bool = _O(False, "--dream", help="DREAM: representative real batches from per-class k-means on the "
                     "current network's embeddings, and clustering-based initialisation."),
    reproduce: bool = _O(False, "--reproduce", help="Use the paper's setting for this dataset/ipc/factor "
                         "(idc_dream.md §3); explicit flags still override single values."),
    out: Optional[Path] = _O(None, "--out", "--save_dir", help="Output directory (a synthetic set + checkpoint "
                             "+ logs). Default: results/<dataset>/<idc|dream>_f<f>_ipc<ipc>."),
    net: Optional[str] = _O(None, "--net", "--net_type", "-n", help="Matching network: convnet, resnet_ap, "
                            "resnet (with --depth) or a registry name such as ConvNet-3, ResNetAP-10."),
    depth: Optional[int] = _O(None, "--depth", help="Depth for --net convnet/resnet_ap/resnet."),
    niter: Optional[int] = _O(None, "--niter", help="Outer iterations = niter*100/inner_loop (default 500; "
                              "paper 2000, ImageNet 500)."),
    outer: Optional[int] = _O(None, "--outer-iterations", help="Run exactly this many outer iterations "
                              "(overrides --niter; for short CPU-scale runs)."),
    inner_loop: Optional[int] = _O(None, "--inner-loop", "--inner_loop", help="Inner iterations per outer "
                                   "iteration (100)."),
    fix_iter: Optional[int] = _O(None, "--fix-iter", "--fix_iter", help="Re-initialise the matching network "
                                 "every this many outer iterations (1)."),
    batch_real: Optional[int] = _O(None, "--batch-real", "--batch_real", help="Real images per class per matching "
                                   "step, also the network-update batch (IDC 64, DREAM 128 = k-means centres)."),
    batch_syn_max: Optional[int] = _O(None, "--batch-syn-max", "--batch_syn_max", help="Cap on decoded synthetic "
                                      "images per class per step (128)."),
    lr_img: Optional[float] = _O(None, "--lr-img", "--lr_img", help="BASE synthetic lr; the effective lr is "
                                 "base*(ipc/10)*(size/size_base)^2 (idc_dream.md §2.1)."),
    mom_img: Optional[float] = _O(None, "--mom-img", "--mom_img", help="Momentum of the synthetic SGD (0.5)."),
    lr: Optional[float] = _O(None, "--lr", help="Matching network's SGD lr (0.01)."),
    momentum: Optional[float] = _O(None, "--momentum", help="Matching network's SGD momentum (0.9)."),
    weight_decay: Optional[float] = _O(None, "--weight-decay", "--weight_decay", help="Matching network's weight "
                                       "decay (5e-4)."),
    n_data: Optional[int] = _O(None, "--n-data", "--n_data", help="Real samples per network update (500; "
                               "CIFAR paper 2000)."),
    net_epoch: Optional[int] = _O(None, "--net-epoch", "--net_epoch", help="Network updates per inner iteration."),
    match: str = _O("grad", "--match", help="Only 'grad' (gradient matching) is implemented."),
    metric: Optional[str] = _O(None, "--metric", help="Gradient distance: mse, l1, l1_mean, cos (sums over "
                               "elements)."),
    bias: Optional[bool] = _O(None, "--bias/--no-bias", help="Also match 1-D gradients (biases, norm affine)."),
    fc: Optional[bool] = _O(None, "--fc/--no-fc", help="Also match 2-D gradients (linear weights)."),
    aug_type: Optional[str] = _O(None, "--aug-type", "--aug_type", help="DSA families for matching "
                                 "(color_crop_cutout); the network updates drop cutout when --mixup-net cut."),
    mixup_net: Optional[str] = _O(None, "--mixup-net", "--mixup_net", help="cut (CutMix in network updates) or "
                                  "vanilla."),
    mix_p: Optional[float] = _O(None, "--mix-p", "--mix_p", help="CutMix probability per batch."),
    beta: Optional[float] = _O(None, "--beta", help="CutMix Beta(beta, beta)."),
    early: Optional[int] = _O(None, "--early", help="Epochs of real training after every re-initialisation "
                              "(ImageNet-10 paper setting: 10)."),
    pt_from: Optional[int] = _O(None, "--pt-from", "--pt_from", help="Load pretrained epoch pt_from after every "
                                "re-initialisation (needs --pretrained); with --pretrain: first epoch saved."),
    pt_num: Optional[int] = _O(None, "--pt-num", "--pt_num", help="Pick the epoch uniformly in "
                               "[pt_from, pt_from+pt_num)."),
    pretrained: Optional[Path] = _O(None, "--pretrained", help="Folder of pretrained networks "
                                    "(<net>_seed<s>/checkpoint<e>.pt), made with --pretrain."),
    pretrain: bool = _O(False, "--pretrain", help="Instead of condensing, train --pretrain-seeds networks and save "
                        "their checkpoints from epoch --pt-from on into --out (IDC's pretrain.py)."),
    pretrain_seeds: str = _O("0", "--pretrain-seeds", help="Comma-separated seeds for --pretrain (paper: 10)."),
    decode_type: Optional[str] = _O(None, "--decode-type", "--decode_type", help="single, multi, or bound "
                                    "(set automatically by --reproduce on ImageNet with f>=3, ipc>=20)."),
    init: Optional[str] = _O(None, "--init", help="auto (mix for f>1, else random; DREAM: kmean), noise, "
                             "random, mix, kmean."),
    init_select: Optional[str] = _O(None, "--init-select", help="Which real images initialise S: 'first' in "
                                    "dataset order (reference) or 'random' (seeded draw; the spec's fix)."),
    f2_init: Optional[str] = _O(None, "--f2-init", "--f2_init", help="DREAM with f>1: kmean (default) picks the "
                                "ipc*f^2 tiled images by clustering; random reverts to IDC's choice."),
    interval: Optional[int] = _O(None, "--interval", help="DREAM: re-cluster every this many inner iterations."),
    dream_embed: Optional[str] = _O(None, "--dream-embed", help="DREAM clustering input: normalized (default) or "
                                    "raw [0,1] pixels as the reference does."),
    momentum_mode: Optional[str] = _O(None, "--momentum-mode", help="reference: the reference's momentum shared "
                                      "across classes, in exact closed form; joint: one plain momentum step per "
                                      "inner iteration."),
    train_subset: Optional[int] = _O(None, "--train-subset", help="Use this many random training images per class "
                                     "(CPU-scale runs)."),
    seed: int = _O(0, "--seed", help="Seed of every random choice (init, batches, augmentation, networks)."),
    snapshots: str = _O("", "--snapshots", help="Comma-separated outer iterations at which to also save the set "
                        "under <out>/snapshots/it<N>/ (e.g. for accuracy-vs-iteration curves)."),
    ckpt_every: int = _O(10, "--ckpt-every", help="Write the resume checkpoint every this many outer iterations."),
    clamp_save: bool = _O(False, "--clamp-save", help="Clamp the saved images to [0,1] (the reference does not)."),
    overwrite: bool = _O(False, "--overwrite", help="Start afresh even if --out holds a run."),
    device: str = _O("auto", "--device", help="auto, cpu or cuda."),
    quiet: bool = _O(False, "--quiet", help="Only errors and the final line."),
    amp: str = _O("off", "--amp", help=AMP_HELP + " condense: off or bf16."),
    eval_every: int = _O(0, "--eval-every", help="Every N outer iterations (and after the last), train a fresh "
                         "network --eval-epochs epochs on the set as it stands and log its test accuracy (eval_acc "
                         "in log.csv; the set is the same as without it). 0: never."),
    eval_epochs: int = _O(50, "--eval-epochs", help="Epochs of each --eval-every evaluation."),
    tensorboard: Optional[Path] = _O(None, "--tensorboard", help="Also write the curves (match loss, eval "
                                     "accuracy) and image grids of the stored set to this TensorBoard folder "
                                     "(needs the optional tensorboard package)."),
):
    """Condense a dataset with IDC (default) or DREAM (--dream) and write a synthetic set."""
    require_at_least({"--ipc": ipc, "--factor": factor, "--nclass": nclass, "--train-subset": train_subset,
                      "--niter": niter, "--inner-loop": inner_loop, "--batch-real": batch_real,
                      "--batch-syn-max": batch_syn_max, "--n-data": n_data})
    if match != "grad":
        raise UserError(f"--match {match} is not implemented (only grad; DREAM+'s bi_match is not in this toolkit)")
    name = dataset_name(dataset, nclass)
    explicit = dict(net=network_name(net, depth) if net else None, niter=niter, outer=outer, inner_loop=inner_loop,
                    fix_iter=fix_iter, batch_real=batch_real, batch_syn_max=batch_syn_max, lr_img=lr_img,
                    mom_img=mom_img, lr=lr, momentum=momentum, weight_decay=weight_decay, n_data=n_data,
                    net_epoch=net_epoch, metric=metric, bias=bias, fc=fc, aug_type=aug_type, mixup_net=mixup_net,
                    mix_p=mix_p, beta=beta, early=early, pt_from=pt_from, pt_num=pt_num,
                    pretrained=str(pretrained) if pretrained else None, decode_type=decode_type, init=init,
                    init_select=init_select, f2_init=f2_init, interval=interval, dream_embed=dream_embed,
                    momentum_mode=momentum_mode, train_subset=train_subset, seed=seed, amp=amp)
    cfg = resolve_config(name, ipc, factor, dream, reproduce, explicit)
    out = out or Path("results") / name / f"{'dream' if dream else 'idc'}_f{factor}_ipc{ipc}"
    check_writable(out, "--out")
    refuse_overlap(out, "--out", {"--data-path": data_path})
    dev = resolve_device(device)
    resolve_condense_amp(cfg.amp, dev)   # refused before any data is read
    snaps = sorted({int(s) for s in snapshots.split(",") if s.strip()})
    check_eval_every(eval_every, eval_epochs)

    split, spec = load_split(name, data_path, "train", per_class=cfg.train_subset, seed=cfg.seed)
    # bad settings fail here, before anything is written
    get_network(cfg.net, spec.channels, spec.num_classes, spec.resolution)
    if not pretrain:
        check_enough_images(cfg, [torch.nonzero(split.labels == c).flatten() for c in range(spec.num_classes)])
    images, labels = split.images.to(dev), split.labels.to(dev)
    log = RunLog(out / ("pretrain.csv" if pretrain else "log.csv"), quiet=quiet, resume=not overwrite)

    if pretrain:
        seeds = [int(s) for s in pretrain_seeds.split(",") if s.strip()]
        pretrain_networks(cfg, spec, images, labels, out, seeds, dev, log)
        print(f"pretrained {len(seeds)} network(s) into {out}")
        return

    if ckpt_every < 1:
        raise UserError("--ckpt-every must be at least 1")
    fingerprint = config_fingerprint(cfg)
    ckpt_path = out / "ckpt.pt"
    with run_lock(out, "condense.py"):   # one writer per output folder
        state = resume_or_start(out, lambda p: load_checkpoint(p, fingerprint), overwrite)
        if state is not None:
            log.info(f"resuming from {ckpt_path} at outer iteration {state.it}/{cfg.outer_iterations}")
        elif overwrite:
            log = RunLog(out / "log.csv", quiet=quiet)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json({**asdict(cfg), "lr_img_effective": effective_lr_img(cfg.lr_img, ipc, spec),
                           "outer_iterations": cfg.outer_iterations, "fingerprint": fingerprint}, out / "config.json")
        log.info(f"condense: {'DREAM' if dream else 'IDC'} on {spec.name} ({len(labels)} train images), ipc {ipc}, "
                 f"factor {factor}, net {cfg.net}, {cfg.outer_iterations} x {cfg.inner_loop} iterations, lr_img "
                 f"{effective_lr_img(cfg.lr_img, ipc, spec):g}, metric {cfg.metric}, device {dev}")

        test = load_split(name, data_path, "test")[0] if eval_every and not pretrain else None
        curves = Curves(log, tensorboard)

        def on_outer(st: RunState) -> None:
            last = st.it == cfg.outer_iterations
            curves.scalars(st.it, to_log=False, match_loss=st.history[-1]["match_loss"])
            if eval_every and (st.it % eval_every == 0 or last):  # before the checkpoint: a kill repeats it
                x, y = build_synset(cfg, spec, st.S, clamp_save).decode()
                acc = short_eval(x, y, lambda v: normalize(v, spec.mean, spec.std), spec, cfg.net, eval_epochs,
                                 (test.images, test.labels), dev, seed=cfg.seed,
                                 test_prepare=lambda v: normalize(to_pixels(v), spec.mean, spec.std))
                curves.scalars(st.it, eval_acc=round(acc, 5), eval_epochs=eval_epochs)
                curves.images(st.it, "stored images", st.S, nrow=cfg.ipc)
                log.info(f"  eval after outer {st.it}: test acc {100 * acc:.2f}% ({cfg.net}, {eval_epochs} epochs)")
            if st.it in snaps:
                save_synset(build_synset(cfg, spec, st.S, clamp_save), out / "snapshots" / f"it{st.it}")
            if st.it % ckpt_every == 0 or last or stop.requested:
                atomic_torch_save(checkpoint_dict(st, fingerprint), ckpt_path)
            stop.check(f"checkpoint written after outer iteration {st.it} ({ckpt_path})")
            if not quiet and (st.it % max(1, cfg.outer_iterations // 50) == 0 or last):
                h = st.history[-1]
                log.info(f"  outer {st.it}/{cfg.outer_iterations}: match loss {h['match_loss']:.4f} "
                         f"({h['seconds']:.1f}s)")

        def on_init(st: RunState) -> None:
            if 0 in snaps:
                save_synset(build_synset(cfg, spec, st.S, clamp_save), out / "snapshots" / "it0")

        # rows logged after the checkpoint belong to iterations that will run again; with no checkpoint, all of them
        log.rows = [r for r in log.rows if int(r.get("it", 0)) <= state.it] if state is not None else []
        if state is None or state.it < cfg.outer_iterations:
            seed_everything(cfg.seed)   # nothing draws from the global RNGs; seeded so a checkpoint's copy is stable
            with StopRequest() as stop:  # SIGTERM/SIGUSR1: checkpoint after the outer iteration in flight, exit 143
                state = condense(cfg, spec, images, labels, dev, log, state=state, on_outer=on_outer, on_init=on_init)
        curves.close()
        syn = build_synset(cfg, spec, state.S, clamp_save)
        save_outputs(out, syn, cfg)
        print(f"wrote {len(syn.labels)} stored images ({ipc}/class, factor {factor} -> "
              f"{ipc * factor * factor}/class decoded) to {out}")


if __name__ == "__main__":
    app()
