"""Herding: a feature-based coreset of real images (idc_dream.md §5 item 10, IDC test.py's `-s herding` baseline).

Per class, herding greedily picks the images whose running feature mean stays closest to the class-mean feature.
The features come from a network trained briefly on the same real images (`feature_net`); IDC loads a pretrained
net instead, which the toolkit does not ship, so the feature net is trained here from an explicit seed. Every
registry network has `embed` (its flattened penultimate features), which is the feature used.

Shared by the stage scripts: `coreset.py --method herding` writes such a subset as a synthetic set, and
`validate.py --baseline herding` trains on one next to the distilled set.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from networks import get_network
from utils.datasets import DatasetSpec, normalize, to_pixels
from utils.errors import UserError
from utils.train import TrainRecipe, train_network

Prepare = Callable[[torch.Tensor], torch.Tensor]


def check_class_sizes(labels: torch.Tensor, num_classes: int, ipc: int) -> None:
    """A class with fewer than `ipc` images cannot give `ipc` of them; say so before any training."""
    counts = torch.bincount(labels, minlength=num_classes)
    small = [c for c in range(num_classes) if counts[c] < ipc]
    if small:
        c = small[0]
        raise UserError(f"class {c} has only {int(counts[c])} images, {ipc} per class were asked for herding")


def herding_select(features: torch.Tensor, labels: torch.Tensor, num_classes: int, ipc: int) -> torch.Tensor:
    """Indices of `ipc` rows per class, class-major, each class in herding order (idc_dream.md §5 item 10).

    For class c with features F_c and mean μ_c, step k (1-based) picks the unchosen row i minimising
    ||(s + F_c[i]) / k - μ_c|| where s is the sum of the rows chosen so far; ties go to the lower index.
    """
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features must be [n, d] with n = len(labels); got {tuple(features.shape)}, "
                         f"{len(labels)} labels")
    check_class_sizes(labels, num_classes, ipc)
    out = []
    for c in range(num_classes):
        rows = torch.nonzero(labels == c).flatten()
        f = features[rows].double()  # float64: the running-mean differences shrink as k grows
        mu = f.mean(0)
        sq = (f * f).sum(1)
        total = torch.zeros_like(mu)
        taken = torch.zeros(len(rows), dtype=torch.bool)
        picked = []
        for k in range(1, ipc + 1):
            # ||a + f_i / k||^2 with a = s / k - μ, expanded so no [n, d] temporary is built per step
            a = total / k - mu
            dist = (a @ a) + 2 * (f @ a) / k + sq / (k * k)
            dist[taken] = float("inf")
            i = int(torch.argmin(dist))
            taken[i] = True
            total += f[i]
            picked.append(int(rows[i]))
        out.append(torch.tensor(picked, dtype=torch.long))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def default_prepare(spec: DatasetSpec) -> Prepare:
    """uint8 real images -> the dataset's normalised space (what validate.py feeds networks without ZCA)."""
    def prepare(x: torch.Tensor) -> torch.Tensor:
        return normalize(to_pixels(x), spec.mean, spec.std)
    return prepare


def feature_recipe(epochs: int) -> TrainRecipe:
    """The feature network's recipe: the default evaluation SGD (lr 0.01, momentum 0.9, wd 5e-4, batch 256,
    lr × 0.1 at half), no augmentation. Fixed here so a herding subset depends only on model, epochs and seed."""
    return TrainRecipe(epochs=epochs, lr=0.01, batch_size=256, schedule="step", dsa=None)


def feature_net(images: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec, model: str = "ConvNet-3",
                epochs: int = 5, seed: int = 0, device: torch.device = torch.device("cpu"),
                prepare: Prepare | None = None, recipe: TrainRecipe | None = None) -> nn.Module:
    """A fresh registry network trained on the real `images` (uint8, or whatever `prepare` maps) for `epochs`.

    Network init uses `seed` on a forked global RNG (the caller's RNG state is left as it was); batch order uses
    a generator seeded with `seed`.
    """
    if epochs < 1:
        raise UserError(f"the herding feature network needs at least 1 epoch, got {epochs}")
    prepare = prepare or default_prepare(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = get_network(model, spec.channels, spec.num_classes, spec.resolution)
    train_network(net, images, labels, recipe or feature_recipe(epochs), torch.Generator().manual_seed(seed),
                  device, prepare, desc="herding features")
    return net


@torch.no_grad()
def embed_features(net: nn.Module, images: torch.Tensor, prepare: Prepare, batch_size: int = 500) -> torch.Tensor:
    """`net.embed` of every image, in eval mode and without gradients, as a float CPU tensor [n, d]."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    feats = [net.embed(prepare(images[i:i + batch_size].to(device))).float().cpu()
             for i in range(0, len(images), batch_size)]
    net.train(was_training)
    return torch.cat(feats)


def herding_indices(images: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec, ipc: int,
                    model: str = "ConvNet-3", epochs: int = 5, seed: int = 0,
                    device: torch.device = torch.device("cpu"), prepare: Prepare | None = None) -> torch.Tensor:
    """Train a feature network on (images, labels), embed them, and herd `ipc` per class (class-major indices)."""
    check_class_sizes(labels, spec.num_classes, ipc)  # fail before the training, not after
    prepare = prepare or default_prepare(spec)
    net = feature_net(images, labels, spec, model=model, epochs=epochs, seed=seed, device=device, prepare=prepare)
    return herding_select(embed_features(net, images, prepare), labels, spec.num_classes, ipc)
