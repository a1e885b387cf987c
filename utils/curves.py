"""Learning curves of a distillation run (condense.py, distill.py `--eval-every N`, `--tensorboard DIR`).

- `short_eval`: the set as it stands, trained on a fresh network for a few epochs and scored on the test split. It
  runs between iterations with the process-wide random states saved and put back, so a run with `--eval-every`
  produces the same set as one without, and a resumed run the same as an uninterrupted one.
- `Curves`: one place a stage sends its curves to: rows of its log.csv (`eval_acc` beside the iteration) and,
  with `--tensorboard DIR`, TensorBoard scalars and image grids (the `tensorboard` package is optional: asking for
  it without the package is a one-line error).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from networks import get_network
from utils.checkpoint import capture_rng, restore_rng
from utils.datasets import DatasetSpec
from utils.errors import UserError
from utils.misc import RunLog
from utils.train import TrainRecipe, evaluate, train_network

EVAL_RECIPE = dict(lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=256, schedule="step")


def short_eval(images: torch.Tensor, labels: torch.Tensor, prepare: Callable, spec: DatasetSpec, model: str,
               epochs: int, test: tuple[torch.Tensor, torch.Tensor], device: torch.device, seed: int = 0,
               runs: int = 1, test_prepare: Callable | None = None, lr: float | None = None) -> float:
    """Mean test accuracy (a fraction) of `runs` fresh `model`s trained `epochs` epochs on (images, labels)
    (SGD lr 0.01 or the set's learned `lr`, momentum 0.9, step schedule, no augmentation: a cheap signal that is
    comparable along one run, not the paper's protocol). `prepare` maps the set's images, `test_prepare` the test
    images (default: `prepare`), to the input space. The process-wide random states are the same afterwards."""
    saved = capture_rng()
    accs = []
    try:
        for r in range(runs):
            torch.manual_seed(seed + r)
            gen = torch.Generator().manual_seed(seed + r)
            net = get_network(model, spec.channels, spec.num_classes, spec.resolution)
            recipe = TrainRecipe(epochs=epochs, **{**EVAL_RECIPE, **({"lr": lr} if lr else {})})
            train_network(net, images.detach().cpu(), labels.detach().cpu(), recipe, gen, device, prepare,
                          desc=f"eval run {r}")
            accs.append(evaluate(net, test, device, test_prepare or prepare))
    finally:
        restore_rng(saved)
    return float(np.mean(accs))


class Curves:
    """Curves of one run: `scalars(it, ...)` and `images(it, ...)` go to the log and, if asked, TensorBoard."""

    def __init__(self, log: RunLog, tensorboard: str | Path | None = None):
        self.log = log
        self.writer = open_tensorboard(tensorboard) if tensorboard else None

    def scalars(self, it: int, *, to_log: bool = True, **values: float) -> None:
        if to_log:
            self.log.row(it=it, **values)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, float(v), it)

    def images(self, it: int, tag: str, pixels: torch.Tensor, nrow: int) -> None:
        """A grid of images in [0, 1] (TensorBoard only; the stages write their own grid.png)."""
        if self.writer is not None:
            from torchvision.utils import make_grid
            self.writer.add_image(tag, make_grid(pixels.detach().cpu().clamp(0, 1), nrow=nrow), it)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def open_tensorboard(path: str | Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises ImportError naming the missing package
        raise UserError("--tensorboard needs the optional tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(path))


def check_eval_every(eval_every: int, eval_epochs: int) -> None:
    if eval_every < 0:
        raise UserError(f"--eval-every must be >= 0 (0: no evaluation), got {eval_every}")
    if eval_every and eval_epochs < 1:
        raise UserError(f"--eval-epochs must be >= 1, got {eval_epochs}")
