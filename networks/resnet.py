"""Residual networks: IDC's ResNetAP and strided ResNet, and the torchvision ResNets.

- `ResNet(downsample="avgpool")` is ResNetAP (idc_dream.md 4.2): stride-1 convolutions, spatial
  reduction by 2x2 average pooling inside the blocks and shortcuts; the IDC condensation network.
- `ResNet(downsample="stride")` is IDC's strided, torchvision-like ResNet (idc_dream.md 4.3), used
  for evaluation (ResNet-10-BN, ResNet-18-BN).
- `TorchvisionResNet` is torchvision's ResNet with `embed`/`classifier` added; `torchvision_resnet`
  builds the plain ImageNet layout and the "modified" CIFAR/Tiny stem of decoupled.md 1.2.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from networks.convnet import FeatureNet, check_choice, make_norm, require_size
from utils.errors import UserError

# ImageNet layout: depth -> (block kind, blocks per stage). Bottleneck from 50 on (idc_dream.md 4.2).
STAGES = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
IDC_NORMS = ("instance", "batch", "none")
LAYOUTS = ("imagenet", "cifar")
TORCHVISION_DEPTHS = (18, 34, 50, 101, 152)


def _conv(in_ch: int, out_ch: int, kernel: int, norm: str, stride: int = 1) -> nn.Conv2d:
    # A conv feeding a norm layer gets no bias (the norm's shift replaces it); with norm "none"
    # the bias is kept, as IDC does for its un-normalised variants.
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=(norm == "none"))


class BasicBlock(nn.Module):
    """Two 3x3 convs plus shortcut. With `avgpool` downsampling the first conv keeps stride 1 and a
    2x2 average pool follows its activation; with `stride` the first conv carries the stride."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, norm: str, downsample: str):
        super().__init__()
        pooled = downsample == "avgpool"
        self.conv1 = _conv(in_ch, planes, 3, norm, stride=1 if pooled else stride)
        self.norm1 = make_norm(norm, planes)
        self.pool = nn.AvgPool2d(stride, stride) if pooled and stride > 1 else nn.Identity()
        self.conv2 = _conv(planes, planes, 3, norm)
        self.norm2 = make_norm(norm, planes)
        self.shortcut = _shortcut(in_ch, planes * self.expansion, stride, norm, downsample)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.relu(self.norm1(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4). In `avgpool` mode the pool comes after the 3x3 conv's
    activation (idc_dream.md 4.2); in `stride` mode the 3x3 conv carries the stride."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, norm: str, downsample: str):
        super().__init__()
        pooled = downsample == "avgpool"
        self.conv1 = _conv(in_ch, planes, 1, norm)
        self.norm1 = make_norm(norm, planes)
        self.conv2 = _conv(planes, planes, 3, norm, stride=1 if pooled else stride)
        self.norm2 = make_norm(norm, planes)
        self.pool = nn.AvgPool2d(stride, stride) if pooled and stride > 1 else nn.Identity()
        self.conv3 = _conv(planes, planes * self.expansion, 1, norm)
        self.norm3 = make_norm(norm, planes * self.expansion)
        self.shortcut = _shortcut(in_ch, planes * self.expansion, stride, norm, downsample)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.pool(self.relu(self.norm2(self.conv2(out))))
        out = self.norm3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int, norm: str, downsample: str) -> nn.Module:
    """Identity, or a projection when the shape changes.

    ResNetAP projects with a stride-1 1x1 conv, then an average pool of kernel = stride (a 1x1 no-op
    pool for stride 1, e.g. the first Bottleneck stage), then the norm. The strided ResNet uses a
    1x1 conv with the stride, then the norm.
    """
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    if downsample == "avgpool":
        return nn.Sequential(_conv(in_ch, out_ch, 1, norm), nn.AvgPool2d(stride, stride),
                             make_norm(norm, out_ch))
    return nn.Sequential(_conv(in_ch, out_ch, 1, norm, stride=stride), make_norm(norm, out_ch))


def _stem_kind(resolution: int, layout: str) -> str:
    """IDC picks the stem by input size; the CIFAR layout always uses the small one (4.2, 4.3)."""
    if layout == "cifar" or resolution <= 64:
        return "small"
    return "mid" if resolution <= 128 else "large"


def _stem(kind: str, channels: int, width: int, norm: str, downsample: str) -> tuple[nn.Sequential, int]:
    """Return the stem and the factor by which it shrinks the image.

    ResNetAP: large = 7x7 stride 1 + avg-pool 4; mid = 3x3 + avg-pool 2; small = 3x3, no pool.
    Strided:  large = 7x7 stride 2 + max-pool 3/2/1; mid = 3x3 + max-pool 3/2/1; small = 3x3, no pool.
    """
    pooled = downsample == "avgpool"
    if kind == "large":
        conv = _conv(channels, width, 7, norm, stride=1 if pooled else 2)
    else:
        conv = _conv(channels, width, 3, norm)
    layers = [conv, make_norm(norm, width), nn.ReLU()]
    shrink = 1 if pooled or kind != "large" else 2
    if kind != "small":
        if pooled:
            factor = 4 if kind == "large" else 2
            layers.append(nn.AvgPool2d(factor, factor))
            shrink *= factor
        else:
            layers.append(nn.MaxPool2d(3, stride=2, padding=1))
            shrink *= 2
    return nn.Sequential(*layers), shrink


class ResNet(FeatureNet):
    """IDC's ResNet (strided) and ResNetAP (average-pool) in one class, idc_dream.md 4.2 and 4.3.

    `layout="imagenet"`: stem chosen by resolution, widths 64w/128w/256w/512w, blocks from STAGES.
    `layout="cifar"`: small stem with 32 channels, widths 32/64/128/256, floor((depth-2)/6)
    BasicBlocks per stage (IDC's CIFAR-named datasets). Head: global average pool, then `classifier`.
    """

    def __init__(self, channels: int, num_classes: int, resolution: int, depth: int = 10,
                 norm: str = "instance", layout: str = "imagenet", width: float = 1.0,
                 downsample: str = "avgpool"):
        super().__init__()
        check_choice("norm", norm, IDC_NORMS)
        check_choice("layout", layout, LAYOUTS)
        check_choice("downsample", downsample, ("avgpool", "stride"))
        if depth not in STAGES:
            raise UserError(f"ResNet depth {depth} is not one of {sorted(STAGES)}")

        if layout == "cifar":
            per_stage = (depth - 2) // 6
            if per_stage < 1:
                raise UserError(f"the cifar layout needs depth >= 8 (got {depth})")
            block, counts, base = BasicBlock, (per_stage,) * 4, 32
        else:
            kind, counts = STAGES[depth]
            block = BasicBlock if kind == "basic" else Bottleneck
            base = int(64 * width)

        self.stem, shrink = _stem(_stem_kind(resolution, layout), channels, base, norm, downsample)
        in_ch, size = base, resolution // shrink
        stages = []
        for i, count in enumerate(counts):
            planes, stride = base * 2 ** i, (1 if i == 0 else 2)
            blocks = []
            for j in range(count):
                blocks.append(block(in_ch, planes, stride if j == 0 else 1, norm, downsample))
                in_ch = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
            # Average pools floor odd sizes; strided convs (padding 1) round up.
            size = size // stride if downsample == "avgpool" else (size + stride - 1) // stride
        require_size("ResNet", size, resolution, "the image shrinks below 1 px")
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)
        self._idc_init()

    def _idc_init(self) -> None:
        """IDC init: conv ~ N(0, sqrt(2 / (k*k*out))), norm weight 1 / bias 0, Linear left default."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features of the last stage (DREAM's `embed`)."""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


def resnet_ap(channels: int, num_classes: int, resolution: int, depth: int = 10,
              norm: str = "instance", layout: str = "imagenet", width: float = 1.0) -> ResNet:
    """ResNetAP-D (idc_dream.md 4.2); instance norm by default, as IDC condenses with it."""
    return ResNet(channels, num_classes, resolution, depth, norm, layout, width, downsample="avgpool")


def resnet_strided(channels: int, num_classes: int, resolution: int, depth: int = 18,
                   norm: str = "batch", layout: str = "imagenet") -> ResNet:
    """IDC's strided ResNet-D (idc_dream.md 4.3), BatchNorm by default."""
    return ResNet(channels, num_classes, resolution, depth, norm, layout, downsample="stride")


class TorchvisionResNet(tv_resnet.ResNet):
    """torchvision's ResNet, unchanged in structure and state_dict keys (`conv1`, ..., `fc`), so
    torchvision and SRe2L/DWA/RDED checkpoints load as they are. Adds `embed` and a `classifier`
    alias for `fc`; the alias is a property so the Linear is not registered twice."""

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    @classifier.setter
    def classifier(self, module: nn.Linear) -> None:
        self.fc = module

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


def torchvision_resnet(channels: int, num_classes: int, resolution: int, depth: int = 18,
                       modified: bool = False) -> TorchvisionResNet:
    """torchvision ResNet-D with `num_classes` outputs (random init; weights are loaded by the registry).

    `modified=True` is the CIFAR/Tiny teacher of decoupled.md 1.2: conv1 becomes a 3x3 stride-1
    pad-1 conv without bias (default PyTorch init, as the references re-create it after building the
    model) and the stem max-pool becomes Identity. For `channels != 3` the plain model's 7x7 stem is
    rebuilt with that many input channels. `resolution` is unused: the global pool adapts.
    """
    del resolution
    if depth not in TORCHVISION_DEPTHS:
        raise UserError(f"torchvision ResNet depth {depth} is not one of {list(TORCHVISION_DEPTHS)}")
    kind, counts = STAGES[depth]
    block = tv_resnet.BasicBlock if kind == "basic" else tv_resnet.Bottleneck
    net = TorchvisionResNet(block, list(counts), num_classes=num_classes)
    if modified:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net
