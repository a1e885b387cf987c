"""Tests for networks/: the registry, the ConvNet family, the ResNets and the classic pool.

Shape sweeps over every registered name run on the `meta` device: modules are built and inputs are
propagated with full shape checking but no arithmetic, which keeps the sweep to a few seconds on CPU.
Numerical checks (embed + classifier == forward) run for real on 2-image batches.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from networks import EVAL_POOLS, canonical_name, eval_pool, get_network, list_networks, load_weights
from utils.errors import UserError

# (channels, resolution): MNIST-like, CIFAR, Tiny/ImageNet-64, ImageNette-128.
GEOMETRIES = [(1, 28), (3, 32), (3, 64), (3, 128)]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny batches gain nothing from threads, and on a busy 2-core machine OpenMP thread contention
    made a 2-image ResNet-18 forward ~70x slower. Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def on_meta(name: str, channels: int, resolution: int, num_classes: int = 10, batch: int = 2, **kw):
    """Build `name` on the meta device and push a batch through it; returns (net, output)."""
    with torch.device("meta"):
        net = get_network(name, channels, num_classes, resolution, **kw)
        out = net(torch.empty(batch, channels, resolution, resolution))
    return net, out


def convnet_too_deep(name: str, channels: int, resolution: int) -> bool:
    """A ConvNet-D halves D times; 1-channel 28 px input is padded to 32 first."""
    if not name.startswith("ConvNet-"):
        return False
    depth = int(name.split("-")[1])
    effective = 32 if (channels, resolution) == (1, 28) else resolution
    return effective < 2 ** depth


# --- every registered network, every resolution ----------------------------------------------------

def test_registry_lists_every_family():
    names = list_networks()
    assert len(names) == len(set(names))
    for expected in ["ConvNet-3", "ConvNet-4", "ConvNet-5", "ResNetAP-10", "ResNetAP-18", "ResNet-10-BN",
                     "ResNet-18-BN", "ResNet-18-modified", "ResNet-50-modified", "ResNet-18", "ResNet-50",
                     "AlexNet", "VGG-11", "VGG-11-BN", "LeNet", "MLP"]:
        assert expected in names
    # Listed names are canonical: they survive a round trip unchanged.
    assert all(canonical_name(n) == n for n in names)


@pytest.mark.parametrize("name", list_networks())
def test_output_shape_at_every_resolution(name):
    for channels, resolution in GEOMETRIES:
        if convnet_too_deep(name, channels, resolution):
            with pytest.raises(UserError, match="cannot run at resolution"):
                on_meta(name, channels, resolution)
            continue
        net, out = on_meta(name, channels, resolution, num_classes=7, batch=3)
        assert out.shape == (3, 7), (name, channels, resolution)
        assert isinstance(net.classifier, nn.Linear) and net.classifier.out_features == 7


@pytest.mark.parametrize("name", ["ResNetAP-10", "ResNet-18", "ResNet-18-BN"])
def test_imagenet_layout_at_224(name):
    net, out = on_meta(name, 3, 224, num_classes=1000, batch=1)
    assert out.shape == (1, 1000)
    assert net.classifier.in_features == 512


def test_resnet18_runs_for_real_at_224():
    torch.manual_seed(0)
    net = get_network("ResNet-18", 3, 5, 224).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


# --- ConvNet ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, resolution, classes, total", [
    ("ConvNet-3", 32, 10, 320_010),
    ("ConvNet-3", 32, 100, 504_420),
    ("ConvNet-4", 64, 200, 857_160),
    ("ConvNet-5", 128, 10, 615_690),
])
def test_convnet_parameter_totals(name, resolution, classes, total):
    net = get_network(name, 3, classes, resolution)
    assert n_params(net) == total
    assert net.classifier.in_features == 2048


def test_convnet_parameter_order():
    net = get_network("ConvNet-3", 3, 10, 32)
    shapes = [tuple(p.shape) for p in net.parameters()]
    per_block = lambda c_in: [(128, c_in, 3, 3), (128,), (128,), (128,)]
    assert shapes == per_block(3) + per_block(128) + per_block(128) + [(10, 2048), (10,)]
    # The norm parameters sit right after their conv: conv.bias then norm.weight (ones at init).
    params = list(net.parameters())
    assert torch.equal(params[2], torch.ones(128)) and torch.equal(params[3], torch.zeros(128))
    # Without norm the order is conv.weight, conv.bias per block.
    bare = [tuple(p.shape) for p in get_network("ConvNet-2-NN", 3, 10, 32).parameters()]
    assert bare == [(128, 3, 3, 3), (128,), (128, 128, 3, 3), (128,), (10, 128 * 8 * 8), (10,)]


def test_convnet_mnist_padding():
    net = get_network("ConvNet-3", 1, 10, 28)
    assert net.features[0].padding == (3, 3)
    assert net.classifier.in_features == 2048
    assert all(m.padding == (1, 1) for m in net.features if isinstance(m, nn.Conv2d) and m is not net.features[0])
    # Only 1-channel 28 px input is padded; 3-channel 28 px keeps padding 1 (28 -> 14 -> 7 -> 3).
    rgb = get_network("ConvNet-3", 3, 10, 28)
    assert rgb.features[0].padding == (1, 1) and rgb.classifier.in_features == 128 * 3 * 3


def test_instance_norm_is_groupnorm_with_one_group_per_channel():
    for name in ["ConvNet-3", "ResNetAP-10", "VGG-11", "ResNet-18-IN"]:
        net = get_network(name, 3, 10, 32)
        norms = [m for m in net.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
        assert norms, name
        for m in norms:
            assert isinstance(m, nn.GroupNorm), name
            assert m.num_groups == m.num_channels and m.affine, name


@pytest.mark.parametrize("name, check", [
    ("ConvNet-3-BN", lambda n: sum(isinstance(m, nn.BatchNorm2d) for m in n.modules()) == 3),
    ("ConvNet-3-LN", lambda n: [m.normalized_shape for m in n.modules() if isinstance(m, nn.LayerNorm)]
        == [(128, 32, 32), (128, 16, 16), (128, 8, 8)]),
    ("ConvNet-3-GN", lambda n: [m.num_groups for m in n.modules() if isinstance(m, nn.GroupNorm)] == [4, 4, 4]),
    ("ConvNet-3-NN", lambda n: not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm))
                                       for m in n.modules())),
    ("ConvNet-3-MP", lambda n: sum(isinstance(m, nn.MaxPool2d) for m in n.modules()) == 3),
    ("ConvNet-3-NP", lambda n: n.classifier.in_features == 128 * 32 * 32),
    ("ConvNet-3-AS", lambda n: sum(isinstance(m, nn.Sigmoid) for m in n.modules()) == 3),
    ("ConvNet-3-AL", lambda n: sum(isinstance(m, nn.LeakyReLU) for m in n.modules()) == 3),
    ("ConvNet-3-w64", lambda n: n.classifier.in_features == 64 * 4 * 4),
    ("ConvNet-4-BN-MP", lambda n: n.classifier.in_features == 128 * 2 * 2
        and sum(isinstance(m, nn.MaxPool2d) for m in n.modules()) == 4),
])
def test_convnet_variants(name, check):
    net = get_network(name, 3, 10, 32)
    assert check(net)
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_convnet_variants_work_off_32px():
    # The references size these variants for 32 px only; here the classifier follows the resolution.
    for name in ["ConvNet-3-w64", "ConvNet-3-BN", "ConvNet-3-LN", "ConvNet-3-MP"]:
        _, out = on_meta(name, 3, 64)
        assert out.shape == (2, 10)


# --- embed / classifier ----------------------------------------------------------------------------

# ResNets run at 16 px to keep this real-arithmetic test fast; VGG needs 32 px (five halvings).
@pytest.mark.parametrize("name, resolution", [
    ("ConvNet-3", 32), ("ConvNet-3-BN", 32), ("ResNetAP-10", 16), ("ResNet-10-BN", 16),
    ("ResNet-18-modified", 16), ("ResNet-18", 32), ("AlexNet", 32), ("VGG-11", 32), ("LeNet", 32), ("MLP", 32),
])
def test_embed_then_classifier_equals_forward(name, resolution):
    torch.manual_seed(0)
    net = get_network(name, 3, 10, resolution).eval()
    x = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad():
        features = net.embed(x)
        logits = net(x)
    assert features.dim() == 2 and features.shape == (2, net.classifier.in_features)
    assert torch.allclose(net.classifier(features), logits, atol=1e-5)
    assert net.classifier is [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    if isinstance(net, torchvision.models.ResNet):
        # Our forward goes through embed; it must agree with torchvision's own forward.
        with torch.no_grad():
            assert torch.allclose(torchvision.models.ResNet.forward(net, x), logits, atol=1e-5)


# --- ResNets ---------------------------------------------------------------------------------------

def test_resnet18_modified_stem_and_batchnorms():
    net = get_network("ResNet-18-modified", 3, 100, 32)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 20
    assert isinstance(net.maxpool, nn.Identity)
    conv1 = net.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding, conv1.bias) == ((3, 3), (1, 1), (1, 1), None)
    # Everything but the stem conv is torchvision's resnet18.
    reference = torchvision.models.resnet18(weights=None, num_classes=100)
    assert n_params(net) == n_params(reference) - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3
    assert get_network("ResNet-18-modified", 1, 10, 28).conv1.in_channels == 1
    assert len([m for m in get_network("ResNet-50-modified", 3, 10, 32).modules()
                if isinstance(m, nn.BatchNorm2d)]) == 53


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet_matches_torchvision(depth):
    with torch.device("meta"):
        ours = get_network(f"ResNet-{depth}", 3, 1000, 224)
        builder = getattr(torchvision.models, f"resnet{depth}")
        reference = builder(weights=None, num_classes=1000)
    assert list(ours.state_dict()) == list(reference.state_dict())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in reference.parameters()]
    assert ours.classifier is ours.fc


def test_load_weights_accepts_prefixed_and_nested_checkpoints(tmp_path):
    torch.manual_seed(0)
    source = get_network("ConvNet-2-BN", 3, 10, 16)
    state = source.state_dict()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = source.eval()(x)
    layouts = {
        "plain.pt": state,
        "dp.pt": {f"module.{k}": v for k, v in state.items()},
        "nested.pt": {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
        "lightning.pt": {"state_dict": state},
    }
    for file, payload in layouts.items():
        torch.save(payload, tmp_path / file)
        net = get_network("ConvNet-2-BN", 3, 10, 16, weights=tmp_path / file).eval()
        with torch.no_grad():
            assert torch.allclose(net(x), expected, atol=1e-5), file


def test_load_weights_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        get_network("ResNet-18", 3, 10, 32, weights=tmp_path / "missing.pt")
    torch.save(get_network("ConvNet-2", 3, 10, 16).state_dict(), tmp_path / "ten.pt")
    with pytest.raises(UserError, match="do not fit"):   # wrong head size
        get_network("ConvNet-2", 3, 100, 16, weights=tmp_path / "ten.pt")
    with pytest.raises(UserError, match="do not fit"):   # wrong architecture
        load_weights(get_network("ConvNet-2-NN", 3, 10, 16), tmp_path / "ten.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        get_network("ResNet-18", 3, 10, 32, weights=tmp_path / "junk.pt")


def test_resnet_ap_structure():
    net = get_network("ResNetAP-10", 3, 10, 224)
    stem_conv, pool = net.stem[0], net.stem[-1]
    assert (stem_conv.kernel_size, stem_conv.stride) == ((7, 7), (1, 1))
    assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 4
    block = net.layer2[0]
    assert block.conv1.stride == (1, 1) and isinstance(block.pool, nn.AvgPool2d)
    proj_conv, proj_pool, proj_norm = block.shortcut
    assert proj_conv.kernel_size == (1, 1) and proj_conv.stride == (1, 1)
    assert isinstance(proj_pool, nn.AvgPool2d) and proj_pool.kernel_size == 2
    assert isinstance(proj_norm, nn.GroupNorm)
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))
    # IDC init: N(0, sqrt(2 / (k*k*out))) for convs, norm weight 1 and bias 0.
    w = net.layer4[0].conv2.weight
    assert math.isclose(w.std().item(), math.sqrt(2 / (9 * 512)), rel_tol=0.05)
    assert abs(w.mean().item()) < 1e-3
    gn = net.layer4[0].norm2
    assert torch.equal(gn.weight, torch.ones(512)) and torch.equal(gn.bias, torch.zeros(512))
    # Stem by size: mid (<= 128) pools by 2, small (<= 64) does not pool.
    mid = get_network("ResNetAP-10", 3, 10, 128)
    assert mid.stem[0].kernel_size == (3, 3) and mid.stem[-1].kernel_size == 2
    assert not any(isinstance(m, nn.AvgPool2d) for m in get_network("ResNetAP-10", 3, 10, 32).stem)
    # Stem output geometry: 224 -> 56, 128 -> 64, 32 -> 32.
    for resolution, side in [(224, 56), (128, 64), (32, 32)]:
        with torch.device("meta"):
            stem = get_network("ResNetAP-10", 3, 10, resolution).stem
            assert stem(torch.empty(1, 3, resolution, resolution)).shape == (1, 64, side, side)
    assert any(isinstance(m, nn.BatchNorm2d) for m in get_network("ResNetAP-10-BN", 3, 10, 32).modules())
    # Bottleneck stage 1 needs a stride-1 projection (64 -> 256) with a 1x1 pool.
    deep = get_network("ResNetAP-50", 3, 10, 32).layer1[0].shortcut
    assert deep[0].out_channels == 256 and deep[1].kernel_size == 1


def test_resnet_cifar_layout():
    for name in ["ResNetAP-10", "ResNet-10-BN"]:
        net = get_network(name, 3, 10, 128, layout="cifar")
        assert net.stem[0].out_channels == 32 and len(net.stem) == 3   # small stem even at 128 px
        assert [len(s) for s in (net.layer1, net.layer2, net.layer3, net.layer4)] == [1, 1, 1, 1]
        assert net.classifier.in_features == 256
    assert len(get_network("ResNetAP-18", 3, 10, 32, layout="cifar").layer3) == 2


def test_strided_resnet_structure():
    big = get_network("ResNet-18-BN", 3, 10, 224)
    assert (big.stem[0].kernel_size, big.stem[0].stride) == ((7, 7), (2, 2))
    assert isinstance(big.stem[-1], nn.MaxPool2d)
    assert big.layer2[0].conv1.stride == (2, 2) and big.layer2[0].shortcut[0].stride == (2, 2)
    small = get_network("ResNet-18-BN", 3, 10, 32)
    assert small.stem[0].kernel_size == (3, 3) and not any(isinstance(m, nn.MaxPool2d) for m in small.stem)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in small.modules()) == 20
    # Same parameter count as MTT's ResNet18BN at 32 px (3x3 stem, torchvision-width stages).
    reference = torchvision.models.resnet18(weights=None, num_classes=10)
    assert n_params(small) == n_params(reference) - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3


# --- names -----------------------------------------------------------------------------------------

# "resnet18" is refused on purpose: MTT means an instance-norm 3x3-stem net, SRe2L torchvision's.
@pytest.mark.parametrize("bad", ["ResNet-7", "ConvNet-9", "ConvNet-0", "ConvNet-3-XX", "ConvNet-3-BN-IN",
                                 "Transformer", "", "VGG-12", "resnet18", "ResNet-10", "ResNet-18-BN-modified",
                                 "ConvNet-3-w"])
def test_unknown_names_raise_user_error(bad):
    with pytest.raises(UserError) as info:
        get_network(bad, 3, 10, 32)
    assert "\n" not in str(info.value)


def test_unknown_name_message_lists_valid_names():
    with pytest.raises(UserError) as info:
        get_network("NoSuchNet", 3, 10, 32)
    message = str(info.value)
    for fragment in ["NoSuchNet", "ConvNet-{1,2,3,4,5,6,7,8}", "ResNetAP-", "AlexNet", "MLP"]:
        assert fragment in message


@pytest.mark.parametrize("alias, canonical", [
    ("ConvNet", "ConvNet-3"), ("convnet", "ConvNet-3"), ("ConvNetD1", "ConvNet-1"), ("ConvNetD4", "ConvNet-4"),
    ("ConvNetD8", "ConvNet-8"), ("ConvNetBN", "ConvNet-3-BN"), ("ConvNetIN", "ConvNet-3"),
    ("ConvNetNN", "ConvNet-3-NN"), ("ConvNetLN", "ConvNet-3-LN"), ("ConvNetGN", "ConvNet-3-GN"),
    ("ConvNetMP", "ConvNet-3-MP"), ("ConvNetAP", "ConvNet-3"), ("ConvNetNP", "ConvNet-3-NP"),
    ("ConvNetAS", "ConvNet-3-AS"), ("ConvNetW32", "ConvNet-3-w32"), ("ConvNetW128", "ConvNet-3"),
    ("ConvNetW1024", "ConvNet-3-w1024"), ("conv3in", "ConvNet-3"), ("conv3bn", "ConvNet-3-BN"),
    ("conv4", "ConvNet-4-BN"), ("convnet-4-mp-bn", "ConvNet-4-BN-MP"), ("ConvNet-3-IN-AP-w128", "ConvNet-3"),
    ("resnet10apin", "ResNetAP-10"), ("resnet10apbn", "ResNetAP-10-BN"), ("ResNetAP-10-IN", "ResNetAP-10"),
    ("resnet10_bn", "ResNet-10-BN"), ("resnet18_modified", "ResNet-18-modified"),
    ("ResNet18BN", "ResNet-18-BN"), ("VGG11", "VGG-11"), ("VGG11BN", "VGG-11-BN"), ("alexnet", "AlexNet"),
])
def test_aliases_resolve_to_the_same_architecture(alias, canonical):
    assert canonical_name(alias) == canonical
    resolution = 256 if canonical == "ConvNet-8" else 32
    a, _ = on_meta(alias, 3, resolution)
    b, _ = on_meta(canonical, 3, resolution)
    assert n_params(a) == n_params(b)
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]


def test_options_from_keywords():
    assert isinstance(get_network("ConvNet-3", 3, 10, 32, norm="batch").features[1], nn.BatchNorm2d)
    assert get_network("ConvNet-3", 3, 10, 32, width=64).classifier.in_features == 64 * 16
    with pytest.raises(UserError, match="contradicts"):
        get_network("ConvNet-3-IN", 3, 10, 32, norm="batch")
    with pytest.raises(UserError, match="does not take option"):
        get_network("AlexNet", 3, 10, 32, norm="batch")
    with pytest.raises(UserError, match="unknown norm"):
        get_network("ConvNet-3", 3, 10, 32, norm="weird")
    with pytest.raises(UserError, match="layout"):
        get_network("ResNet-18", 3, 10, 32, layout="cifar")
    for bad in [0, -1, 2.5]:
        with pytest.raises(UserError):
            get_network("ConvNet-3", 3, 10, bad)


# --- evaluation pools ------------------------------------------------------------------------------

def test_eval_pools_resolve_and_build():
    assert eval_pool("S", "ConvNetD4") == ["ConvNet-4"]
    assert eval_pool("M", "ConvNet-3") == ["ConvNet-3", "AlexNet", "VGG-11", "ResNet-18-BN"]
    for mode in EVAL_POOLS:
        for name in eval_pool(mode, "ConvNet-3"):
            _, out = on_meta(name, 3, 32)
            assert out.shape == (2, 10), (mode, name)
    with pytest.raises(UserError):
        eval_pool("Q", "ConvNet-3")
