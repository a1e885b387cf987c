"""Train a fresh network on a (small) training set and measure test accuracy: the evaluation loop every
stage and `validate.py` share.

The recipe is plain data (`TrainRecipe`). Defaults are the DC/DSA/MTT evaluation protocol (speed.md §5.2):
SGD momentum 0.9, weight decay 5e-4, batch 256, lr × 0.1 after half the epochs, DSA per batch. Test accuracy is
measured once, after the last epoch: there is no model selection on the test set.

Inputs may be stored compactly (e.g. uint8 real images) and mapped to the network's input space batch by batch
with `prepare`, so a full training set never needs a float copy in memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import UserError
from utils.misc import progress

Prepare = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class TrainRecipe:
    epochs: int = 300
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    # 'step': lr × 0.1 once, after epochs//2 (DC/DSA/MTT); 'multistep': × 0.2 at ⌊2E/3⌋ and ⌊5E/6⌋ (IDC test.py);
    # 'cosine': cosine to 0; 'none': constant.
    schedule: str = "step"
    dsa: Callable | None = None          # utils.dsa.DSA instance, applied per batch (not Siamese)
    batch_standardize: bool = False      # SPEED's per-batch scalar standardisation (speed.md §1.3)
    extra: dict = field(default_factory=dict)


def _lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    if schedule == "none":
        return 1.0
    if schedule == "step":
        return 0.1 if epoch >= epochs // 2 else 1.0
    if schedule == "multistep":
        return 0.2 ** ((epoch >= (2 * epochs) // 3) + (epoch >= (5 * epochs) // 6))
    if schedule == "cosine":
        import math
        return 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))
    raise UserError(f"unknown lr schedule '{schedule}' (step, multistep, cosine, none)")


def standardize_batch(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


def train_network(net: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, recipe: TrainRecipe,
                  generator: torch.Generator, device: torch.device, prepare: Prepare = identity,
                  desc: str = "train") -> list[float]:
    """Train `net` in place; returns the per-epoch mean training loss (for logs, never for selection)."""
    if not torch.isfinite(torch.tensor(recipe.lr)) or recipe.lr <= 0:
        raise UserError(f"training lr must be a positive finite number, got {recipe.lr}")
    net.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    n = len(inputs)
    bs = min(recipe.batch_size, n)
    losses = []
    for epoch in progress(range(recipe.epochs), total=recipe.epochs, desc=desc):
        for g in opt.param_groups:
            g["lr"] = recipe.lr * _lr_factor(recipe.schedule, epoch, recipe.epochs)
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            x = prepare(inputs[idx].to(device, non_blocking=True))
            y = labels[idx].to(device, non_blocking=True)
            if recipe.batch_standardize:
                x = standardize_batch(x)
            if recipe.dsa is not None:
                x = recipe.dsa(x, generator=generator)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        losses.append(total / count)
        if not torch.isfinite(torch.tensor(losses[-1])):
            raise UserError(f"training loss became {losses[-1]} at epoch {epoch}; lower the lr (now {recipe.lr})")
    return losses


def _batches(data, batch_size: int, workers: int):
    """Batches of (images, labels) from a pair of tensors, a TensorDataset, or any Dataset of (image, label)."""
    if isinstance(data, torch.utils.data.TensorDataset):
        data = tuple(data.tensors)
    if isinstance(data, tuple):
        x, y = data
        return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers)


@torch.no_grad()
def evaluate(net: nn.Module, data, device: torch.device, prepare: Prepare = identity, batch_size: int = 500,
             batch_standardize: bool = False, workers: int = 0) -> float:
    """Top-1 accuracy (a fraction) of `net` on `data`: (inputs, labels) tensors or a Dataset (streamed)."""
    net.to(device).eval()
    correct = total = 0
    for x, y in _batches(data, batch_size, workers):
        x = prepare(x.to(device))
        if batch_standardize:
            x = standardize_batch(x)
        correct += (net(x).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct / max(total, 1)
