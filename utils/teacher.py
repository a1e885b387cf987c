"""Teachers of the decoupled pipeline (decoupled.md §1.1, §1.2, §2): one checkpoint format that carries the
network's name, its class count and order, its input size and, above all, the normalisation it was trained
with. Every later stage (rank_select, recover, relabel, validate) optimises, selects or soft-labels in the
teacher's normalised space, so the normalisation travels with the weights instead of being re-typed per
script (the references mix up CIFAR-10/100 statistics between squeeze and recover: decoupled.md §9.1 items 6
and 14).

A teacher file is a plain dict (`weights_only=True` readable):
  format "ddtoolkit-teacher", version, model (state_dict), arch (registry name), dataset, num_classes, channels,
  resolution, mean, std, class_names, plus free-form entries (accuracy, epochs, recipe) under `meta`.
Foreign checkpoints (SRe2L/DWA `ckpt.pth` with `state_dict`/`module.` keys, RDED `{dataset}_{arch}.pth` with
`model`, a torchvision state_dict) load too when `arch` and `dataset` are given; their normalisation is then
`norm` (a NORMALIZATIONS key) or the dataset's default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from networks.registry import _unwrap_state_dict, canonical_name, get_network
from utils.datasets import IMAGENET_MEAN, IMAGENET_STD, get_dataset_spec
from utils.errors import UserError
from utils.io import atomic_torch_save, safe_torch_load

TEACHER_FORMAT = "ddtoolkit-teacher"
TEACHER_VERSION = 1

# decoupled.md §1.1: the normalisations the references use, by the name a user passes as --norm.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),       # "kuangliu" std (SRe2L, DWA, DELT)
    "cifar10-true": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),  # DWA squeeze_cifar10.py only
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),      # DWA CIFAR-100
    "tiny": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),          # SRe2L/DWA Tiny-ImageNet
}


def resolve_normalization(norm: str | None, dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`norm` by name, or the dataset registry's mean/std when None."""
    if norm is None:
        spec = get_dataset_spec(dataset)
        return tuple(spec.mean), tuple(spec.std)
    key = norm.lower()
    if key not in NORMALIZATIONS:
        raise UserError(f"unknown normalisation '{norm}'; known: {', '.join(NORMALIZATIONS)}")
    return NORMALIZATIONS[key]


@dataclass
class Teacher:
    """A frozen classifier in eval mode plus what its inputs must look like."""

    net: nn.Module
    arch: str
    dataset: str
    num_classes: int
    channels: int
    resolution: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1)
        return (torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(shape),
                torch.tensor(self.std, device=x.device, dtype=x.dtype).view(shape))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the teacher's input space."""
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher space -> pixels (not clamped)."""
        mean, std = self._stats(x)
        return x * std + mean

    def pixel_bounds(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel [lo, hi] of valid pixels in normalised space, shaped [1, C, 1, 1] (decoupled.md §1.4)."""
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return -mean / std, (1 - mean) / std

    def to(self, device: torch.device | str) -> "Teacher":
        self.net.to(device)
        return self


def freeze(net: nn.Module) -> nn.Module:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def teacher_payload(net: nn.Module, *, arch: str, dataset: str, num_classes: int, channels: int, resolution: int,
                    mean: Sequence[float], std: Sequence[float], class_names: Sequence[str] = (),
                    meta: dict | None = None) -> dict:
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v.detach().cpu()
             for k, v in net.state_dict().items()}
    return {"format": TEACHER_FORMAT, "version": TEACHER_VERSION, "model": state, "arch": canonical_name(arch),
            "dataset": dataset, "num_classes": int(num_classes), "channels": int(channels),
            "resolution": int(resolution), "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "class_names": [str(c) for c in class_names], "meta": dict(meta or {})}


def save_teacher(path: str | Path, net: nn.Module, **kw) -> None:
    """Write a teacher file atomically (see the module docstring for its keys)."""
    atomic_torch_save(teacher_payload(net, **kw), path)


def load_teacher(path: str | Path, *, arch: str | None = None, dataset: str | None = None, norm: str | None = None,
                 num_classes: int | None = None, resolution: int | None = None,
                 device: torch.device | str = "cpu") -> Teacher:
    """Load a teacher (ours, or a foreign checkpoint given `arch` and `dataset`), frozen and in eval mode.

    For our own files, `arch`/`dataset`/`norm` given by the user must agree with what the file records
    (a mismatch is a one-line error, not a silently wrong normalisation)."""
    obj = safe_torch_load(path, "teacher checkpoint")
    if isinstance(obj, dict) and obj.get("format") == TEACHER_FORMAT:
        _check_teacher_file(obj, path)
        if arch is not None and canonical_name(arch) != obj["arch"]:
            raise UserError(f"{path} holds a {obj['arch']} teacher, not {canonical_name(arch)}")
        if dataset is not None and get_dataset_spec(dataset).name != get_dataset_spec(obj["dataset"]).name:
            raise UserError(f"{path} is a teacher for {obj['dataset']}, not {dataset}")
        mean, std = tuple(obj["mean"]), tuple(obj["std"])
        if norm is not None and resolve_normalization(norm, obj["dataset"]) != (mean, std):
            raise UserError(f"{path} was trained with mean {list(mean)} / std {list(std)}, which is not --norm {norm}")
        net = get_network(obj["arch"], obj["channels"], obj["num_classes"], obj["resolution"])
        _load_state(net, obj["model"], path)
        return Teacher(freeze(net).to(device), obj["arch"], obj["dataset"], obj["num_classes"], obj["channels"],
                       obj["resolution"], mean, std, tuple(obj.get("class_names", ())), dict(obj.get("meta", {})))
    if arch is None or dataset is None:
        raise UserError(f"{path} is not a ddtoolkit teacher file; to load a foreign checkpoint pass --arch and "
                        "--dataset (and --norm if it was not trained with the dataset's default normalisation)")
    spec = get_dataset_spec(dataset)
    classes = num_classes or spec.num_classes
    res = resolution or spec.resolution
    if not classes or not res:
        raise UserError(f"dataset {dataset} does not fix the class count / resolution; pass them explicitly")
    net = get_network(arch, spec.channels, classes, res)
    _load_state(net, _unwrap_state_dict(obj), path)
    mean, std = resolve_normalization(norm, spec.name)
    return Teacher(freeze(net).to(device), canonical_name(arch), spec.name, classes, spec.channels, res, mean, std,
                   tuple(spec.class_names), {"source": str(path), "foreign": True})


# The keys of a teacher file and their types (beyond format/version); `meta` and `class_names` are optional.
_TEACHER_KEYS = {"model": dict, "arch": str, "dataset": str, "num_classes": int, "channels": int, "resolution": int,
                 "mean": list, "std": list}


def _check_teacher_file(obj: dict, path: str | Path) -> None:
    """Required keys with their types, a normalisation of one positive std per channel: a hand-edited or damaged
    teacher file is one line naming it, not a wrongly normalised teacher."""
    for key, kind in _TEACHER_KEYS.items():
        if key not in obj:
            raise UserError(f"teacher file {path} lacks '{key}'; it is incomplete (re-export it with squeeze.py)")
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            raise UserError(f"teacher file {path}: '{key}' must be a {kind.__name__}, got {str(obj[key])[:60]!r}")
    if obj["num_classes"] < 1 or obj["channels"] < 1 or obj["resolution"] < 1:
        raise UserError(f"teacher file {path}: num_classes, channels and resolution must be positive")
    mean, std = obj["mean"], obj["std"]
    if len(mean) != obj["channels"] or len(std) != obj["channels"] or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise UserError(f"teacher file {path}: mean {mean} / std {std} must hold {obj['channels']} finite values "
                        "each, std > 0")


def _check_finite_weights(state: dict, path: str | Path) -> None:
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"teacher weights {path} hold NaN/Inf values in '{key}': the file is damaged or the "
                            "training that made it diverged")


def _load_state(net: nn.Module, state: dict, path: str | Path) -> None:
    if not isinstance(state, dict):
        raise UserError(f"teacher weights {path} are not a state_dict (got {type(state).__name__})")
    _check_finite_weights(state, path)
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise UserError(f"teacher weights {path} do not fit {type(net).__name__}: "
                        f"{' '.join(str(err).split())[:300]}") from None
    problems = [f"missing {k}" for k in result.missing_keys] + [f"unexpected {k}" for k in result.unexpected_keys]
    if problems:
        raise UserError(f"teacher weights {path} do not fit {type(net).__name__}: {', '.join(problems[:3])}")


@torch.no_grad()
def teacher_features(teacher: Teacher, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Penultimate features (`embed`) of normalised inputs, batched."""
    dev = next(teacher.net.parameters()).device
    return torch.cat([teacher.net.embed(x[i:i + batch_size].to(dev)).float().cpu()
                      for i in range(0, len(x), batch_size)])


def intra_class_cosine(features: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Mean pairwise cosine similarity of the features within each class (pairs i != j): DELT's diversity
    measure (decoupled.md §7.2; lower = more diverse). Classes with one image are left out."""
    out = {}
    f = F.normalize(features.float(), dim=1)
    for c in labels.unique().tolist():
        fc = f[labels == c]
        n = len(fc)
        if n < 2:
            continue
        sim = fc @ fc.T
        out[int(c)] = float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
    return out
