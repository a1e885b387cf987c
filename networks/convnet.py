"""The ConvNet-D family, plus the small helpers every network module here shares.

Implements idc_dream.md section 4.1 and speed.md section 2 (the DC/DSA/MTT/SPEED/IDC ConvNet), and the
BatchNorm ConvNet-D that RDED/DELT use (decoupled.md section 1.2) through `norm="batch"`.

A ConvNet-D is D blocks of [3x3 conv with bias, padding 1 -> norm -> activation -> 2x2 pool, stride 2],
then flatten and one Linear layer. Unlike the reference code, the classifier input size is always
computed from the actual resolution, so every variant (width, norm, pooling, activation) works at any
resolution that survives the D halvings.
"""

from __future__ import annotations

import torch
from torch import nn

from utils.errors import UserError

NORMS = ("instance", "batch", "layer", "group", "none")
POOLS = ("avg", "max", "none")
ACTIVATIONS = ("relu", "sigmoid", "leakyrelu")


# --- helpers shared with resnet.py and classic.py -------------------------------------------------

def mnist_padding_boost(channels: int, resolution: int) -> int:
    """Extra padding for the first conv so a 1-channel 28 px image is treated as 32 px.

    The DC/MTT/IDC family pads MNIST-like input on the first layer (idc_dream.md 4.1, speed.md 2) so the
    rest of the network sees exactly the 32 px geometry. We apply it only to 1-channel 28 px input:
    the references key it on the channel count alone, which breaks 1-channel input at other sizes.
    """
    return 2 if channels == 1 and resolution == 28 else 0


def make_norm(kind: str, channels: int, spatial: int | None = None) -> nn.Module:
    """Build one normalisation layer by name; `none` gives an Identity.

    "instance" is GroupNorm with one group per channel and learnable affine parameters, which is how
    this whole family defines instance norm (idc_dream.md section 4): no running statistics, so train
    and eval behave the same. "layer" normalises over [C, H, W] and therefore needs the spatial size.
    """
    if kind == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(4, channels, affine=True)
    if kind == "layer":
        if spatial is None:
            raise UserError("norm 'layer' is only available for the ConvNet family")
        return nn.LayerNorm([channels, spatial, spatial], elementwise_affine=True)
    if kind == "none":
        return nn.Identity()
    raise UserError(f"unknown norm '{kind}'; valid: {', '.join(NORMS)}")


def check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    """Raise a one-line UserError when an option is not one of its valid values."""
    if value not in valid:
        raise UserError(f"unknown {what} '{value}'; valid: {', '.join(valid)}")


def require_size(net: str, size: int, resolution: int, hint: str) -> None:
    """Refuse, at build time, a resolution that would shrink a feature map to nothing.

    Failing here gives a readable message instead of a shape error deep inside the first forward.
    """
    if size < 1:
        raise UserError(f"{net} cannot run at resolution {resolution}: {hint}")


def _activation(kind: str) -> nn.Module:
    check_choice("activation", kind, ACTIVATIONS)
    # Not in-place: functional_call / vmap / double-backward code paths are simpler without aliasing,
    # and the ReLU keeps only its own output either way.
    if kind == "relu":
        return nn.ReLU()
    if kind == "sigmoid":
        return nn.Sigmoid()
    return nn.LeakyReLU(negative_slope=0.01)


# --- the network --------------------------------------------------------------------------------

class FeatureNet(nn.Module):
    """Base of every registry network: `forward(x) = classifier(embed(x))`.

    Subclasses define `embed` (flattened penultimate features; default: `features(x)` flattened) and a
    `classifier` Linear, which is what DREAM's clustering and feature-based coresets use.
    """

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class ConvNet(FeatureNet):
    """ConvNet-D (idc_dream.md 4.1, speed.md 2).

    Layers live in one flat `features` Sequential (absent norm/pool layers are left out, not replaced
    by Identity), so `.parameters()` yields, per block, conv.weight, conv.bias, norm.weight, norm.bias,
    and then classifier.weight, classifier.bias: the order trajectory-matching code flattens.
    """

    def __init__(self, channels: int, num_classes: int, resolution: int, depth: int = 3,
                 width: int = 128, norm: str = "instance", act: str = "relu", pool: str = "avg"):
        super().__init__()
        check_choice("norm", norm, NORMS)
        check_choice("pool", pool, POOLS)
        if depth < 1 or width < 1:
            raise UserError(f"ConvNet needs depth >= 1 and width >= 1 (got depth {depth}, width {width})")

        layers: list[nn.Module] = []
        size, in_ch = resolution, channels
        for block in range(depth):
            pad = 1 + (mnist_padding_boost(channels, resolution) if block == 0 else 0)
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=pad, bias=True))
            size = size + 2 * pad - 2
            if norm != "none":
                layers.append(make_norm(norm, width, size))
            layers.append(_activation(act))
            if pool != "none":
                layers.append(nn.AvgPool2d(2, 2) if pool == "avg" else nn.MaxPool2d(2, 2))
                size //= 2
                require_size(f"ConvNet-{depth}", size, resolution,
                             f"{depth} halvings need at least {2 ** depth} px")
            in_ch = width

        self.features = nn.Sequential(*layers)
        self.feature_dim = width * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)
