"""networks/functional.py: the flat-parameter network equals the module network."""
import pytest
import torch

from networks import get_network
from networks.functional import FlatNet, flatten_params


@pytest.mark.parametrize("name,channels,res", [
    ("ConvNet-3", 3, 32), ("ConvNet-3", 1, 28), ("ConvNet-2-BN", 3, 16), ("ConvNet-2-LN", 3, 16),
    ("ConvNet-2-GN", 3, 16), ("ConvNet-2-NN", 3, 16), ("ConvNet-2-MP", 3, 16), ("ConvNet-1-NP", 3, 8),
    ("ConvNet-2-AS", 3, 16), ("ConvNet-2-AL-w16", 3, 16), ("ConvNet-4", 3, 64),
])
def test_flat_convnet_equals_module(name, channels, res):
    torch.manual_seed(0)
    net = get_network(name, channels, 10, res)
    flat = FlatNet(net)
    assert flat.compiled
    x = torch.randn(4, channels, res, res)
    theta = flatten_params(net)
    assert theta.numel() == sum(p.numel() for p in net.parameters()) == flat.num_params
    assert torch.allclose(flat(theta, x), net(x), atol=1e-5, rtol=1e-5)
    # a different vector gives the module's output with those weights loaded
    theta2 = theta + 0.01 * torch.randn_like(theta)
    torch.nn.utils.vector_to_parameters(theta2, net.parameters())
    assert torch.allclose(flat(theta2, x), net(x), atol=1e-5, rtol=1e-5)


def test_flat_gradients_equal_module_gradients():
    torch.manual_seed(1)
    net = get_network("ConvNet-2", 3, 5, 16)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    theta = flatten_params(net).requires_grad_(True)
    g_flat = torch.autograd.grad(torch.nn.functional.cross_entropy(FlatNet(net)(theta, x), y), theta)[0]
    torch.nn.functional.cross_entropy(net(x), y).backward()
    g_mod = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert torch.allclose(g_flat, g_mod, atol=1e-6)


def test_fallback_for_other_networks_is_exact():
    torch.manual_seed(2)
    net = get_network("ResNetAP-10", 3, 10, 32)
    net.eval()  # instance norm: no running statistics either way
    flat = FlatNet(net)
    assert not flat.compiled
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(flat(flatten_params(net), x), net(x), atol=1e-5)


def test_wrong_vector_length_is_refused():
    net = get_network("ConvNet-1-w8", 3, 10, 8)
    with pytest.raises(ValueError):
        FlatNet(net)(torch.zeros(5), torch.zeros(1, 3, 8, 8))
