"""Parity checks of the gradient-matching family (IDC, DREAM) against the original checkouts.

    python bench/parity.py --method idc --original /path/to/Efficient-Dataset-Condensation
    python bench/parity.py --method dream --original /path/to/DREAM

Each check builds the shared state here (images, stored synthetic images, network weights, augmentation draws),
sends it to bench/original_side/gm.py, which runs the original's own functions on it in a subprocess, computes
the same quantity with this toolkit's functions (condense.py, utils/formation.py, utils/dsa.py, utils/kmeans.py)
and compares. What each line compares, and how random draws are aligned, is in docs/PARITY.md ("IDC and DREAM").
Bare `§N` references in this module are sections of docs/methods/idc_dream.md.

Random draws: the original's batch-mode DiffAug draws its parameters with np.random.uniform/randint; the bench
draws them once and replays the same values to both samplers (np.random on the original's side, utils.dsa's
_uniform/_randint here), one queue per kind, in each side's call order. k-means: both sides start from the same
data points (drawn here, as utils/kmeans.py draws them), handed to fast_pytorch_kmeans's init.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np
import torch

from original_runner import run_original
from parity_common import ParityLine, compare

import condense as ours
import utils.dsa as dsa_module
from networks import get_network
from utils.datasets import get_dataset_spec, normalize
from utils.dsa import DSA, DSAParams
from utils.formation import decode_class
from utils.kmeans import kmeans as our_kmeans, nearest_to_centres, representatives

ADAPTER = "bench/original_side/gm.py"
IDC_MARKER = "condense.py"
DREAM_MARKER = "new_strategy.py"
# The original's dataset names (argument.py -d) for the toolkit's registry names.
ORIGINAL_NAMES = {"CIFAR10": "cifar10", "FashionMNIST": "fashion", "MNIST": "mnist", "SVHN": "svhn"}
METRICS = ("mse", "l1", "l1_mean", "cos")


# ------------------------------------------------------------------------------------------ aligned draws

@contextlib.contextmanager
def queued_draws(uniform: list[float], randint: list[int]):
    """While active, utils.dsa's samplers return the queued values (uniform draws and integer draws, each queue in
    call order) instead of drawing; a value outside the range the sampler asks for, or a value left unused,
    is an error (the two sides would not be using the same parameters)."""
    u, r = [float(v) for v in uniform], [int(v) for v in randint]
    saved = dsa_module._uniform, dsa_module._randint

    def take_uniform(n, generator):
        if len(u) < n:
            raise RuntimeError("utils.dsa asked for more uniform draws than queued")
        return torch.tensor([u.pop(0) for _ in range(n)], dtype=torch.float32)

    def take_randint(low, high, n, generator):
        if len(r) < n:
            raise RuntimeError("utils.dsa asked for more integer draws than queued")
        vals = [r.pop(0) for _ in range(n)]
        bad = [v for v in vals if not low <= v < high]
        if bad:
            raise RuntimeError(f"integer draw {bad[0]} outside utils.dsa's range [{low}, {high})")
        return torch.tensor(vals, dtype=torch.int64)

    dsa_module._uniform, dsa_module._randint = take_uniform, take_randint
    try:
        yield
    finally:
        dsa_module._uniform, dsa_module._randint = saved
    if u or r:
        raise RuntimeError(f"{len(u) + len(r)} queued augmentation draws were not used")


class QueuedDSA(DSA):
    """The toolkit's DSA whose next `sample` call takes the queued draws: condense.class_match_grad samples and
    applies exactly as in a run, only the random values are the ones the original also gets."""

    def __init__(self, strategy: str, uniform: list[float], randint: list[int]):
        super().__init__(strategy, mode="idc", params=DSAParams(align_corners=False))
        self.uniform, self.randint = uniform, randint

    def sample(self, *args, **kwargs):
        with queued_draws(self.uniform, self.randint):
            return super().sample(*args, **kwargs)


def matching_draws(rng: np.random.RandomState, side: int, aug_type: str) -> tuple[list[float], list[int]]:
    """One batch-mode draw of IDC's matching augmentation (flip coin, colour factors, the geometric op's index
    and parameters, cutout centre), as the uniform and integer queues. Only color, crop and cutout are drawn here
    (the augmentations of every matching strategy the originals use)."""
    fams = aug_type.split("_")
    unknown = set(fams) - {"color", "crop", "cutout"}
    if unknown:
        raise ValueError(f"matching_draws covers color/crop/cutout, not {sorted(unknown)}")
    uniform, randint = [], []
    if "color" in fams:
        # multiples of 2^-10: the toolkit's float32 sampler then computes u - 0.5, 2u and u + 0.5 exactly, so both
        # sides hold bit-identical colour factors (the original computes them in float64)
        uniform += (np.floor(rng.uniform(size=3) * 1024) / 1024).tolist()
    if "crop" in fams:
        shift = int(side * 0.125 + 0.5)
        randint += [0] + rng.randint(-shift, shift + 1, size=2).tolist()   # op index among ['crop'], then dx, dy
    if "cutout" in fams:
        size = int(side * 0.5 + 0.5)
        randint += rng.randint(0, side + (1 - size % 2), size=2).tolist()
    return uniform, randint


# ------------------------------------------------------------------------------------------ IDC checks

def check_decode(root: Path, method: str, gen: torch.Generator) -> list[ParityLine]:
    """Multi-formation decode: single mode at the factors/resolutions the papers use (f=2 at 28 and 32 px, f=3 at
    224 px with its 1-px pad) and f=3 at 32 px (pad 1), the `multi` mode and the `bound` budget split."""
    cases = [("fashion", 1, 28, 2, 2, "single"), ("cifar10", 3, 32, 2, 2, "single"), ("cifar10", 3, 32, 2, 3, "single"),
             ("imagenet", 3, 224, 2, 3, "single"), ("cifar10", 3, 32, 3, 2, "multi"),
             ("cifar10", 3, 32, 20, 3, "bound")]
    payload, mine = [], []
    for name, ch, res, ipc, f, mode in cases:
        x = torch.rand(ipc, ch, res, res, generator=gen)
        payload.append({"dataset": name, "images": x, "factor": f, "mode": mode})
        mine.append(decode_class(x, f, mode, 128))
    theirs = run_original(root, ADAPTER, "decode", {"cases": payload})["cases"]
    return [compare(method, f"decode {mode} f={f} {res}px ipc={ipc}", m, t["images"])
            for (name, ch, res, ipc, f, mode), m, t in zip(cases, mine, theirs)]


def check_mix_init(root: Path, method: str, gen: torch.Generator) -> list[ParityLine]:
    """IDC's `mix` initialisation (first ipc*f^2 images of each class tiled, nearest downsizing) from the same
    real images: condense.initial_images (reference selection 'first') vs Synthesizer.init(loader, 'mix')."""
    nclass, ipc, f, spec = 3, 2, 2, get_dataset_spec("CIFAR10")
    real = torch.rand(nclass, ipc * f * f + 3, 3, 32, 32, generator=gen)
    theirs = run_original(root, ADAPTER, "mix_init", {"images": real, "dataset": "cifar10", "ipc": ipc,
                                                      "factor": f})["data"]
    images = real.reshape(-1, 3, 32, 32)
    labels = torch.arange(nclass).repeat_interleave(real.shape[1])
    cfg = ours.resolve_config("CIFAR10", ipc, f, False, False, {})
    spec = _with_classes(spec, nclass)
    class_indices = [torch.nonzero(labels == c).flatten() for c in range(nclass)]
    mine = ours.initial_images(cfg, spec, images, class_indices, None, torch.Generator().manual_seed(0))
    return [compare(method, f"mix init f={f} ipc={ipc}", mine, theirs)]


def check_dsa_ops(root: Path, method: str, rng: np.random.RandomState, gen: torch.Generator) -> list[ParityLine]:
    """Each DiffAug op in batch mode (one draw shared by the whole batch) with the same draws, and the whole
    matching augmentation (normalise + color_crop_cutout) on 3-channel 32 px and 1-channel 28 px batches."""
    x = torch.randn(6, 3, 32, 32, generator=gen)
    ops = {"brightness": ([rng.uniform()], []), "saturation": ([rng.uniform()], []),
           "contrast": ([rng.uniform()], []), "crop": ([], rng.randint(-4, 5, size=2).tolist()),
           "cutout": ([], rng.randint(0, 33, size=2).tolist()), "flip": ([0.25], []),
           "scale": (rng.uniform(size=2).tolist(), []), "rotate": ([rng.uniform()], [])}
    cases = [{"op": op, "images": x, "uniform": u, "randint": r} for op, (u, r) in ops.items()]
    pipelines = []
    for name, ch, res in (("CIFAR10", 3, 32), ("FashionMNIST", 1, 28)):
        xp = torch.rand(5, ch, res, res, generator=gen)
        u, r = matching_draws(rng, res, "color_crop_cutout")
        cases.append({"op": "pipeline", "images": xp, "uniform": u, "randint": r,
                      "dataset": ORIGINAL_NAMES[name], "aug_type": "color_crop_cutout"})
        pipelines.append((name, xp, u, r))
    theirs = run_original(root, ADAPTER, "diffaug_ops", {"cases": cases})["outputs"]
    lines = []
    params = DSAParams(align_corners=False)
    for (op, (u, r)), t in zip(ops.items(), theirs):
        with queued_draws(u, r):   # the toolkit's own sampler of this op, on the shared draws
            values = dsa_module._sample_op(op, 1, x.shape[-2], x.shape[-1], params, None)
        dsa = DSA(dsa_module.OP_FAMILY[op], mode="all", params=params)
        lines.append(compare(method, f"DSA {op} (shared draw)", dsa.apply(x, [(op, values)]), t))
    for (name, xp, u, r), t in zip(pipelines, theirs[len(ops):]):
        spec = get_dataset_spec(name)
        dsa = QueuedDSA("color_crop_cutout", u, r)
        plan = dsa.sample(1, xp.shape[-2], xp.shape[-1], siamese=True)
        mine = dsa.apply(normalize(xp, spec.mean, spec.std), plan)
        lines.append(compare(method, f"DSA matching pipeline {spec.channels}ch {xp.shape[-1]}px", mine, t))
    return lines


def _with_classes(spec, nclass: int):
    """The dataset spec with fewer classes (small shared states)."""
    from dataclasses import replace
    return replace(spec, num_classes=nclass)


def _network(name: str, spec, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_network("ConvNet-3", spec.channels, spec.num_classes, spec.resolution)


def match_case(root: Path, method: str, dataset: str, metric: str, gen: torch.Generator, rng, *, bias=False,
               fc=False, real: torch.Tensor | None = None, net=None, extra_argv=(), label: str = "",
               cfg_extra: dict | None = None, dtype=None, gating: bool = True,
               note: str = "") -> tuple[ParityLine, ParityLine, dict]:
    """One class's matching loss and its gradient w.r.t. the stored synthetic images, from the same weights,
    real batch, stored images and augmentation draws: condense.class_match_grad vs the original's
    synset.sample -> diffaug -> matchloss -> backward.

    dtype (default: fp64 for the sign-based metrics l1 and l1_mean, else fp32): d|g_r - g_s|/dS carries
    sign(g_r - g_s), which flips wherever the two gradients agree to within fp32 rounding, and each flip moves
    the result by a whole term; in fp64 both sides compute the same chain to far below the tolerance."""
    if dtype is None:
        dtype = torch.float64 if metric in ("l1", "l1_mean") else torch.float32
    spec = get_dataset_spec(dataset)
    ipc, f, c = 2, 2, 3
    cfg = ours.resolve_config(dataset, ipc, f, False, False, dict(metric=metric, bias=bias, fc=fc,
                                                                  **(cfg_extra or {})))
    net = net if net is not None else _network("ConvNet-3", spec, int(torch.randint(1 << 30, (1,), generator=gen)))
    if real is None:
        real = torch.rand(cfg.batch_real, spec.channels, spec.resolution, spec.resolution, generator=gen)
    S = torch.rand(spec.num_classes * ipc, spec.channels, spec.resolution, spec.resolution, generator=gen)
    net = copy.deepcopy(net).to(dtype)
    real, S = real.to(dtype), S.to(dtype)
    u, r = matching_draws(rng, spec.resolution, cfg.aug_type)
    argv = ["-d", ORIGINAL_NAMES[dataset], "--ipc", str(ipc), "-f", str(f), "--metric", metric,
            "--bias", str(bias), "--fc", str(fc)] + list(extra_argv)
    theirs = run_original(root, ADAPTER, "match_grad", {
        "argv": argv, "stored": S, "nclass": spec.num_classes, "label": c, "real": real,
        "state_dict": {k: v.clone() for k, v in net.state_dict().items()}, "uniform": u, "randint": r})
    params = ours.matched_params(net, cfg.bias, cfg.fc)
    grad, loss = ours.class_match_grad(net, params, real, S[c * ipc:(c + 1) * ipc], c, cfg, spec,
                                       QueuedDSA(cfg.aug_type, u, r), torch.Generator().manual_seed(0))
    precision = "fp64" if dtype == torch.float64 else "fp32"
    what = f"{metric}{' bias+fc' if bias or fc else ''} {spec.channels}ch {spec.resolution}px {precision}{label}"
    return (compare(method, f"match loss {what}", torch.tensor(loss), theirs["loss"], gating=gating, note=note),
            compare(method, f"d loss / d stored images {what}", grad, theirs["grad"][c * ipc:(c + 1) * ipc],
                    gating=gating, note=note),
            theirs)


def check_matching(root: Path, method: str, gen: torch.Generator, rng) -> list[ParityLine]:
    lines = []
    for metric in METRICS:
        lines += match_case(root, method, "CIFAR10", metric, gen, rng)[:2]
    lines += match_case(root, method, "CIFAR10", "mse", gen, rng, bias=True, fc=True)[:2]
    lines += match_case(root, method, "FashionMNIST", "l1", gen, rng)[:2]
    lines += match_case(root, method, "CIFAR10", "l1", gen, rng, dtype=torch.float32, gating=False,
                        note="fp32: sign(g_r - g_s) flips where the gradients agree to rounding; fp64 lines gate")[:2]
    return lines


def check_lr_img(root: Path, method: str) -> list[ParityLine]:
    """The effective synthetic lr (argument.py's tune_lr_img, with its FashionMNIST (28/32)^2 quirk)."""
    cases = [("CIFAR10", 1, 5e-3), ("CIFAR10", 10, 5e-3), ("FashionMNIST", 1, 5e-3), ("FashionMNIST", 10, 1e-4),
             ("MNIST", 10, 1e-4), ("SVHN", 50, 5e-3)]
    theirs = run_original(root, ADAPTER, "lr_img", {"cases": [
        {"dataset": ORIGINAL_NAMES[d], "ipc": ipc, "lr_img": lr} for d, ipc, lr in cases]})["lr_img"]
    mine = torch.tensor([ours.effective_lr_img(lr, ipc, get_dataset_spec(d)) for d, ipc, lr in cases],
                        dtype=torch.float64)
    return [compare(method, "effective lr_img (6 dataset/ipc cases)", mine, theirs)]


def check_idc(root: Path, args) -> list[ParityLine]:
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.RandomState(args.seed)
    return (check_decode(root, "idc", gen) + check_mix_init(root, "idc", gen) + check_dsa_ops(root, "idc", rng, gen)
            + check_matching(root, "idc", gen, rng) + check_lr_img(root, "idc"))


PARITY_METHODS = {"idc": (check_idc, IDC_MARKER)}


# ------------------------------------------------------------------------------------------ DREAM checks

def index_line(method: str, quantity: str, mine: torch.Tensor, theirs: torch.Tensor, *, gating: bool = True,
               note: str = "") -> ParityLine:
    """Chosen indices must be EQUAL: max_abs is the number of positions that differ, rel that fraction, tol 0."""
    mine, theirs = torch.as_tensor(mine).long().flatten(), torch.as_tensor(theirs).long().flatten()
    if mine.shape != theirs.shape:
        return ParityLine(method, quantity, float("inf"), float("inf"), 0.0, gating,
                          f"{len(mine)} vs original {len(theirs)} indices")
    differ = int((mine != theirs).sum())
    return ParityLine(method, quantity, float(differ), differ / max(1, len(mine)), 0.0, gating,
                      note or "indices; max_abs = positions that differ")


def representative_lines(method: str, what: str, feats: torch.Tensor, centres: torch.Tensor, mine: torch.Tensor,
                         theirs: torch.Tensor) -> list[ParityLine]:
    """The chosen samples, judged by their exact (fp64) distance to the original's centres: a 2-point cluster's
    centre is equidistant from both members, and which one a side picks then depends on the rounding of its
    distance formula (DREAM: sqrt of a clamped expanded form; ours: the expanded squared form). So the distance
    line gates, and the index line is informational, counting those exact ties."""
    dist = torch.cdist(centres.double(), feats.double())
    rows = torch.arange(len(centres))
    mine, theirs = torch.as_tensor(mine).long(), torch.as_tensor(theirs).long()
    ties = int(((mine != theirs) & torch.isclose(dist[rows, mine], dist[rows, theirs], rtol=1e-6, atol=0)).sum())
    differ = int((mine != theirs).sum())
    return [compare(method, f"representatives' distance to the centres ({what})", dist[rows, mine],
                    dist[rows, theirs]),
            index_line(method, f"representatives' indices ({what})", mine, theirs, gating=False,
                       note=f"{differ} differ, {ties} of them exact ties of two equidistant samples")]


def kmeans_starts(gen: torch.Generator, n: int, k: int) -> torch.Tensor:
    """The data points utils/kmeans.py will start from when it next draws from `gen` (read from a copy, so the
    toolkit's own call still makes the draw)."""
    probe = torch.Generator()
    probe.set_state(gen.get_state())
    return torch.randperm(n, generator=probe)[:k]


def check_dream(root: Path, args) -> list[ParityLine]:
    """DREAM's representative choice (§7.1) and its matching on the chosen batch, from the same network weights
    and class images; k-means starts from the same data points on both sides."""
    method, spec = "dream", get_dataset_spec("CIFAR10")
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.RandomState(args.seed)
    n, k = 400, 64
    net = _network("ConvNet-3", spec, args.seed)
    images = torch.rand(n, 3, 32, 32, generator=gen)
    state = {key: v.clone() for key, v in net.state_dict().items()}
    lines = []

    # 1. clustering on identical features: centres and chosen samples
    feats = ours.embed_all(net, images, spec, normalized=False)
    kgen = torch.Generator().manual_seed(args.seed + 1)
    starts = kmeans_starts(kgen, n, k)
    theirs = run_original(root, ADAPTER, "dream_query", {"dataset": "cifar10", "features": feats, "k": k,
                                                         "starts": [starts]})
    probe = torch.Generator()
    probe.set_state(kgen.get_state())
    centres, _ = our_kmeans(feats, k, probe)
    lines.append(compare(method, f"k-means centres (same features, n={n}, k={k})", centres, theirs["centres"]))
    lines += representative_lines(method, "same features", feats, theirs["centres"],
                                  representatives(feats, k, kgen), theirs["indices"])

    # 2. the whole choice from images and weights: condense.dream_batch vs NEW_Strategy(images, net).query
    cfg_raw = ours.resolve_config("CIFAR10", 1, 2, True, False, dict(dream_embed="raw"))
    cfg_default = ours.resolve_config("CIFAR10", 1, 2, True, False, {})
    dgen = torch.Generator().manual_seed(args.seed + 2)
    starts = kmeans_starts(dgen, n, k)
    theirs = run_original(root, ADAPTER, "dream_query", {"dataset": "cifar10", "images": images, "k": k,
                                                         "nclass": spec.num_classes, "state_dict": state,
                                                         "starts": [starts]})
    g_default = torch.Generator()
    g_default.set_state(dgen.get_state())
    lines.append(compare(method, "embeddings (--dream-embed raw)", ours.embed_all(net, images, spec, False),
                         theirs["features"]))
    lines.append(compare(method, "embeddings (default: normalised input)", ours.embed_all(net, images, spec, True),
                         theirs["features"], gating=False,
                         note="fix: DREAM embeds unnormalised pixels (idc_dream.md §7.1 quirk); --dream-embed raw reproduces"))
    chosen = ours.dream_batch(net, images, k, spec, cfg_raw, dgen)
    lines += representative_lines(method, "condense.dream_batch, --dream-embed raw", theirs["features"],
                                  theirs["centres"], chosen, theirs["indices"])
    chosen_default = ours.dream_batch(net, images, k, spec, cfg_default, g_default)
    lines.append(index_line(method, "representatives (default: normalised input)", chosen_default,
                            theirs["indices"], gating=False,
                            note="fix: clusters normalised embeddings; positions that differ counted"))

    # 3. DREAM's gradient matching on the representative batch (its condense.matchloss, decode, DiffAug)
    real = images[chosen]
    for metric in ("l1", "mse"):
        lines += match_case(root, method, "CIFAR10", metric, gen, rng, real=real, net=net,
                            extra_argv=("--match", "grad", "--batch_real", str(k)),
                            label=" on the representative batch")[:2]
    return lines


PARITY_METHODS["dream"] = (check_dream, DREAM_MARKER)
