"""The small-image cross-architecture pool of the DC/DSA/MTT family: AlexNet, VGG, LeNet, MLP.

These are the evaluation networks of the `M` cross-architecture pool (registry.EVAL_POOLS). Their
layouts follow the DC/DSA/MTT small-image versions (a 5x5-stem AlexNet without norm, VGG with instance
norm or BatchNorm and a single Linear head, the classic LeNet-5, a 128-128 MLP); the classifier input is
computed from the resolution so they run at 28 (1-channel), 32, 64 and 128 px alike.
Every class exposes `embed(x)` (flattened penultimate features) and `classifier` (the last Linear).
"""

from __future__ import annotations

import torch
from torch import nn

from networks.convnet import FeatureNet, check_choice, make_norm, mnist_padding_boost, require_size
from utils.errors import UserError


class AlexNet(FeatureNet):
    """Five convs (128, 192, 256, 192, 192 channels; 5x5, 5x5, 3x3, 3x3, 3x3), ReLU, three 2x2 max
    pools, no norm, one Linear. 32 px -> 4x4x192 = 3072 features."""

    def __init__(self, channels: int, num_classes: int, resolution: int):
        super().__init__()
        pad0 = 2 + mnist_padding_boost(channels, resolution)
        # (out channels, kernel, pool after?)
        plan = [(128, 5, True), (192, 5, True), (256, 3, False), (192, 3, False), (192, 3, True)]
        layers: list[nn.Module] = []
        in_ch, size = channels, resolution + 2 * pad0 - 4
        for i, (out_ch, k, pool) in enumerate(plan):
            layers += [nn.Conv2d(in_ch, out_ch, k, padding=pad0 if i == 0 else k // 2), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            in_ch = out_ch
        require_size("AlexNet", size, resolution, "three halvings need at least 8 px")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch * size * size, num_classes)


# Channel plans; "M" is a 2x2 max pool. Five pools, so 32 px ends at 1x1x512.
VGG_PLANS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"),
}


class VGG(FeatureNet):
    """VGG-D for small images: [3x3 conv (bias) -> norm -> ReLU] per plan entry, max pools, then
    flatten and one Linear (no 4096-wide MLP head). Norm is instance (GroupNorm, one group per
    channel) for VGG-11 and BatchNorm for VGG-11-BN, as in the MTT family."""

    def __init__(self, channels: int, num_classes: int, resolution: int, depth: int = 11,
                 norm: str = "instance"):
        super().__init__()
        if depth not in VGG_PLANS:
            raise UserError(f"VGG depth {depth} is not one of {sorted(VGG_PLANS)}")
        check_choice("norm", norm, ("instance", "batch", "none"))
        layers: list[nn.Module] = []
        in_ch = channels
        boost = mnist_padding_boost(channels, resolution)
        size = resolution + 2 * boost
        for entry in VGG_PLANS[depth]:
            if entry == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
                continue
            pad = 1 + (boost if not layers else 0)
            layers += [nn.Conv2d(in_ch, entry, 3, padding=pad), make_norm(norm, entry), nn.ReLU()]
            in_ch = entry
        require_size(f"VGG-{depth}", size, resolution, "five halvings need at least 32 px")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch * size * size, num_classes)


class LeNet(FeatureNet):
    """LeNet-5: 5x5 conv (6) -> ReLU -> max pool -> 5x5 conv (16) -> ReLU -> max pool, then
    Linear 120 -> ReLU -> Linear 84 -> ReLU (the embedding) -> classifier. 28 px 1-channel input gets
    padding 2 on the first conv so both MNIST and CIFAR end at 5x5x16."""

    def __init__(self, channels: int, num_classes: int, resolution: int):
        super().__init__()
        pad = mnist_padding_boost(channels, resolution)
        size = ((resolution + 2 * pad - 4) // 2 - 4) // 2
        require_size("LeNet", size, resolution, "it needs at least 16 px")
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        self.hidden = nn.Sequential(nn.Linear(16 * size * size, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
        self.classifier = nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.features(x).flatten(1))


class MLP(FeatureNet):
    """Flattened pixels -> Linear 128 -> ReLU -> Linear 128 -> ReLU (the embedding) -> classifier."""

    def __init__(self, channels: int, num_classes: int, resolution: int, hidden: int = 128):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(channels * resolution * resolution, hidden), nn.ReLU(),
                                    nn.Linear(hidden, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(x.flatten(1))
