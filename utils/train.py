"""Train a fresh network on a (small) training set and measure test accuracy: the evaluation loop every
stage and `validate.py` share.

The recipe is plain data (`TrainRecipe`). Defaults are the DC/DSA/MTT evaluation protocol (speed.md §5.2):
SGD momentum 0.9, weight decay 5e-4, batch 256, lr × 0.1 after half the epochs, DSA per batch. Test accuracy is
measured once, after the last epoch: there is no model selection on the test set. IDC/DREAM's protocol adds CutMix
(`mix_p`, `beta`; idc_dream.md §2.5 and §5 item 5), applied to the batch after normalisation and DSA.

Inputs may be stored compactly (e.g. uint8 real images) and mapped to the network's input space batch by batch
with `prepare`, so a full training set never needs a float copy in memory.

A caller that checkpoints (validate.py) passes `on_epoch_end`, called after every finished epoch with what it needs
to save, and `on_step`, called after every optimiser step with the loop's position inside the epoch (so a stop
request is honoured within one batch, not at the end of a long epoch); it continues an interrupted run with
`resume` (a `TrainResume`) after putting back the weights and RNGs. The lr schedule is a pure function of the
epoch, so the epoch count is all of its state; inside an epoch the position adds the epoch's batch order, the
batches done and the running loss sums (the generator the caller restores holds the draws still to come).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.amp import Amp, as_amp, fp32
from utils.checkpoint import check_finite
from utils.errors import UserError
from utils.misc import progress

Prepare = Callable[[torch.Tensor], torch.Tensor]
# on_epoch_end(epochs_done, net, optimiser, losses_so_far): called after each finished epoch whose loss is finite
EpochHook = Callable[[int, nn.Module, torch.optim.Optimizer, list], None]


@dataclass
class TrainResume:
    """Where an interrupted training run continues: `epoch` epochs are done, `opt` is the optimiser's state_dict
    at that moment and `losses` their mean losses. With `step` > 0 the run stopped inside epoch index `epoch`, after
    its first `step` batches: `order` is that epoch's batch order (None where the loop draws none) and `total` /
    `count` its running loss sum and sample count. The caller has already put back the network's weights, the run's
    generator and the global RNGs as they were at that moment."""
    epoch: int
    opt: dict
    losses: list
    step: int = 0
    order: torch.Tensor | None = None
    total: float = 0.0
    count: int = 0


# on_step(position, net, optimiser): called after every optimiser step; `position` is the TrainResume that continues
# the run from right after that step (its `opt` left empty: the hook takes optimiser.state_dict() if it saves)
StepHook = Callable[[TrainResume, nn.Module, torch.optim.Optimizer], None]


def mid_epoch(resume: TrainResume | None, epoch: int) -> TrainResume | None:
    """`resume` when it continues inside `epoch`, else None (the epoch starts afresh)."""
    return resume if resume is not None and resume.step > 0 and resume.epoch == epoch else None


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
    # 'cosine': cosine to 0; 'none': constant; 'mtt': MTT/SPEED evaluate_synset (speed.md §5.2): the reference runs
    # epochs 0..E with E = epochs - 1 and, after finishing epoch E//2 + 1, multiplies the lr by 0.1 with a FRESH
    # optimiser (momentum buffers reset). So `--epochs 1001` is the papers' "1000 epochs".
    schedule: str = "step"
    dsa: Callable | None = None          # utils.dsa.DSA instance, applied per batch (not Siamese)
    batch_standardize: bool = False      # SPEED's per-batch scalar standardisation (speed.md §1.3)
    # CutMix (idc_dream.md §2.5, §5 item 5): with probability mix_p per batch, after DSA; λ ~ Beta(beta, beta).
    # mix_p 0 draws nothing from the generator, so runs without CutMix are unchanged.
    mix_p: float = 0.0
    beta: float = 1.0
    # --amp: "off" (fp32), "bf16" or "fp16" (with a GradScaler), or a resolved utils.amp.Amp; the network's forward
    # runs under autocast, the loss on fp32 logits
    amp: str | Amp = "off"
    extra: dict = field(default_factory=dict)


def _lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    if schedule == "none":
        return 1.0
    if schedule == "step":
        return 0.1 if epoch >= epochs // 2 else 1.0
    if schedule == "multistep":
        return 0.2 ** ((epoch >= (2 * epochs) // 3) + (epoch >= (5 * epochs) // 6))
    if schedule == "mtt":
        return 0.1 if epoch > mtt_drop_epoch(epochs) else 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))
    raise UserError(f"unknown lr schedule '{schedule}' (step, multistep, cosine, none, mtt)")


def mtt_drop_epoch(epochs: int) -> int:
    """Last epoch index at the initial lr under the 'mtt' schedule: (epochs - 1) // 2 + 1 (501 for 1001 epochs)."""
    return (epochs - 1) // 2 + 1


def standardize_batch(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


# ------------------------------------------------------------------------------------------------ CutMix
# Every draw goes through the caller's torch.Generator (never numpy or the global RNG), so a run is repeated
# exactly from its seed, like DSA. torch.distributions.Beta cannot take a generator, hence the Gamma sampler.

def _draw(generator: torch.Generator | None, kind: str = "rand") -> float:
    device = generator.device if generator is not None else "cpu"
    fn = torch.rand if kind == "rand" else torch.randn
    return float(fn(1, generator=generator, device=device, dtype=torch.float64))


def _sample_gamma(shape: float, generator: torch.Generator | None) -> float:
    """One Gamma(shape, 1) draw by Marsaglia and Tsang's squeeze-free rejection method (shape >= 1); a shape
    below 1 is boosted to shape + 1 and scaled by U^(1/shape)."""
    if shape < 1:
        return _sample_gamma(shape + 1, generator) * _draw(generator) ** (1 / shape)
    d = shape - 1 / 3
    c = 1 / math.sqrt(9 * d)
    while True:
        z = _draw(generator, "randn")
        v = (1 + c * z) ** 3
        if v <= 0:
            continue
        u = _draw(generator)
        if u > 0 and math.log(u) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v


def sample_beta(beta: float, generator: torch.Generator | None) -> float:
    """λ ~ Beta(beta, beta). Beta(1, 1) is U(0, 1), drawn directly (the IDC default, idc_dream.md §2.5); other
    values as G1 / (G1 + G2) with G1, G2 ~ Gamma(beta)."""
    if beta <= 0 or not math.isfinite(beta):
        raise UserError(f"CutMix beta must be a positive number, got {beta}")
    if beta == 1:
        return _draw(generator)
    g1, g2 = _sample_gamma(beta, generator), _sample_gamma(beta, generator)
    return g1 / (g1 + g2) if g1 + g2 > 0 else 0.5


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator | None
               ) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the CutMix box (idc_dream.md §2.5): sides int(side * sqrt(1 - λ)), a centre
    uniform over the pixels, half a side (rounded down) on each side of it, clipped to the image."""
    ratio = math.sqrt(max(0.0, 1.0 - lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    device = generator.device if generator is not None else "cpu"
    cy = int(torch.randint(0, height, (1,), generator=generator, device=device))
    cx = int(torch.randint(0, width, (1,), generator=generator, device=device))
    top, bottom = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    left, right = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return top, bottom, left, right


def cutmix(x: torch.Tensor, y: torch.Tensor, beta: float, generator: torch.Generator | None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """CutMix one batch (idc_dream.md §2.5): λ ~ Beta(beta, beta), a partner permutation of the whole batch (not
    per class), one box for the batch; the box is filled with the partners' pixels.

    Returns (x_mixed, y, y_partner, ratio) with ratio = 1 - box area / image area of the clipped box, the weight
    of `y` in `mixed_cross_entropy`. `x` is not modified; the result is differentiable with respect to it.
    """
    lam = sample_beta(beta, generator)
    device = generator.device if generator is not None else "cpu"
    perm = torch.randperm(len(x), generator=generator, device=device).to(x.device)
    h, w = x.shape[-2:]
    top, bottom, left, right = cutmix_box(h, w, lam, generator)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
    ratio = 1.0 - (bottom - top) * (right - left) / (h * w)
    return mixed, y, y[perm.to(y.device)], ratio


def maybe_cutmix(x: torch.Tensor, y: torch.Tensor, mix_p: float, beta: float, generator: torch.Generator | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """CutMix with probability `mix_p` per batch (one U(0, 1) draw, then the `cutmix` draws); otherwise the batch
    unchanged with ratio 1. mix_p <= 0 draws nothing."""
    if mix_p <= 0 or _draw(generator) >= mix_p:
        return x, y, y, 1.0
    return cutmix(x, y, beta, generator)


def mixed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, y2: torch.Tensor, r: float) -> torch.Tensor:
    """r * CE(logits, y) + (1 - r) * CE(logits, y2), each a batch mean (idc_dream.md §2.5); r = 1 is plain CE."""
    if r >= 1:
        return F.cross_entropy(logits, y)
    return r * F.cross_entropy(logits, y) + (1 - r) * F.cross_entropy(logits, y2)


def train_network(net: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, recipe: TrainRecipe,
                  generator: torch.Generator, device: torch.device, prepare: Prepare = identity,
                  desc: str = "train", *, resume: TrainResume | None = None, on_epoch_end: EpochHook | None = None,
                  on_step: StepHook | None = None, lower: str | None = None, ckpt: str | Path | None = None
                  ) -> list[float]:
    """Train `net` in place; returns the per-epoch mean training loss (for logs, never for selection).

    `resume` continues a run after its `epoch` finished epochs, or inside an epoch (see TrainResume);
    `on_epoch_end` sees every finished epoch, `on_step` every optimiser step. A NaN/inf epoch loss stops with `utils.checkpoint.Diverged`, naming `lower` (the caller's lr
    flag; default "the lr") and the kept checkpoint `ckpt`; `on_epoch_end` never sees that epoch."""
    if not torch.isfinite(torch.tensor(recipe.lr)) or recipe.lr <= 0:
        raise UserError(f"training lr must be a positive finite number, got {recipe.lr}")
    if not 0 <= recipe.mix_p <= 1:
        raise UserError(f"CutMix probability must be in [0, 1], got {recipe.mix_p}")
    if recipe.mix_p > 0 and not (recipe.beta > 0 and math.isfinite(recipe.beta)):
        raise UserError(f"CutMix beta must be a positive number, got {recipe.beta}")
    amp = as_amp(recipe.amp, device)
    scaler = amp.scaler()
    net.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    n = len(inputs)
    bs = min(recipe.batch_size, n)
    start, losses = 0, []
    if resume is not None:
        # the state of whichever optimiser was live then; under 'mtt' the loop below still replaces it at the
        # drop epoch when that epoch is yet to run, exactly as an uninterrupted run does
        opt.load_state_dict(resume.opt)
        start, losses = resume.epoch, [float(v) for v in resume.losses]
    for epoch in progress(range(start, recipe.epochs), total=recipe.epochs - start, desc=desc):
        inside = mid_epoch(resume, epoch)
        # the reference's new optimiser (a run resumed inside that epoch already holds the new one's state)
        if recipe.schedule == "mtt" and epoch == mtt_drop_epoch(recipe.epochs) + 1 and inside is None:
            opt = torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                  weight_decay=recipe.weight_decay)
        for g in opt.param_groups:
            g["lr"] = recipe.lr * _lr_factor(recipe.schedule, epoch, recipe.epochs)
        order = inside.order if inside is not None else torch.randperm(n, generator=generator)
        total, count = (float(inside.total), int(inside.count)) if inside is not None else (0.0, 0)
        for step, first in enumerate(range(0, n, bs)):
            if inside is not None and step < inside.step:
                continue   # done before the stop; the restored generator already holds the draws after it
            idx = order[first:first + bs]
            x = prepare(inputs[idx].to(device, non_blocking=True))
            y = labels[idx].to(device, non_blocking=True)
            if recipe.batch_standardize:
                x = standardize_batch(x)
            if recipe.dsa is not None:
                x = recipe.dsa(x, generator=generator)
            if recipe.mix_p > 0:  # on the augmented batch: IDC normalises and augments first (idc_dream.md §2.5)
                x, y, y2, r = maybe_cutmix(x, y, recipe.mix_p, recipe.beta, generator)
                with amp.autocast():
                    logits = fp32(net(x))
                loss = mixed_cross_entropy(logits, y, y2, r)
            else:
                with amp.autocast():
                    logits = fp32(net(x))
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.item() * len(idx)
            count += len(idx)
            if on_step is not None:
                on_step(TrainResume(epoch, {}, list(losses), step + 1, order, total, count), net, opt)
        losses.append(total / count)
        check_finite(losses[-1], f"epoch {epoch + 1}/{recipe.epochs} of {desc}",
                     lower or f"the lr (now {recipe.lr:g})", ckpt)
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, net, opt, losses)
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
