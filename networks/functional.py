"""Networks evaluated on ONE flat parameter vector, for trajectory matching (speed.md §3.6).

The student of MTT/SPEED is unrolled for syn_steps SGD steps whose parameters are plain tensors in the autograd
graph, so the forward pass must take the parameters as an argument. The reference wraps the module and, on every
call, re-binds each parameter attribute to a view of the flat vector before running the module's forward.
`FlatNet` instead reads the module's layer list once, at construction, and evaluates the same maths with
torch.nn.functional calls on views of the vector: nothing is re-bound or rebuilt per step, and the module's own
weights are never touched.

The flat layout is the concatenation of `module.parameters()` in order, which for ConvNet is MTT's expert snapshot
order (conv.weight, conv.bias, norm.weight, norm.bias per block, then classifier weight and bias), so a flattened
expert snapshot is directly a valid parameter vector.

Layers FlatNet knows: Conv2d, GroupNorm (ConvNet's instance norm is GroupNorm(C, C)), LayerNorm, BatchNorm2d (batch
statistics, as in training mode; no running statistics are kept), ReLU/Sigmoid/LeakyReLU, AvgPool2d/MaxPool2d,
Identity, Flatten, Linear. Any other network falls back to torch.func.functional_call over the same views, which is
exact but re-binds parameters per call (like the reference).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from networks.convnet import ConvNet


def flatten_params(net: nn.Module) -> torch.Tensor:
    """The network's parameters as one 1-D vector in `parameters()` order (MTT's snapshot order)."""
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def _layer_op(m: nn.Module) -> tuple[Callable, int] | None:
    """(op(x, params) -> y, number of parameter tensors it consumes) for a supported layer; None otherwise."""
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or m.padding_mode != "zeros":
            return None
        stride, padding, dilation, bias = m.stride, m.padding, m.dilation, m.bias is not None
        return (lambda x, p: F.conv2d(x, p[0], p[1] if bias else None, stride, padding, dilation)), 1 + bias
    if isinstance(m, nn.GroupNorm):
        g, eps, aff = m.num_groups, m.eps, m.affine
        return (lambda x, p: F.group_norm(x, g, p[0] if aff else None, p[1] if aff else None, eps)), 2 * aff
    if isinstance(m, nn.LayerNorm):
        shape, eps, aff = m.normalized_shape, m.eps, m.elementwise_affine
        return (lambda x, p: F.layer_norm(x, shape, p[0] if aff else None, p[1] if aff else None, eps)), 2 * aff
    if isinstance(m, nn.BatchNorm2d):
        eps, aff = m.eps, m.affine
        return (lambda x, p: F.batch_norm(x, None, None, p[0] if aff else None, p[1] if aff else None, True, 0.0,
                                          eps)), 2 * aff
    if isinstance(m, nn.ReLU):
        return (lambda x, p: F.relu(x)), 0
    if isinstance(m, nn.Sigmoid):
        return (lambda x, p: torch.sigmoid(x)), 0
    if isinstance(m, nn.LeakyReLU):
        slope = m.negative_slope
        return (lambda x, p: F.leaky_relu(x, slope)), 0
    if isinstance(m, nn.AvgPool2d):
        k, s = m.kernel_size, m.stride
        return (lambda x, p: F.avg_pool2d(x, k, s)), 0
    if isinstance(m, nn.MaxPool2d):
        k, s = m.kernel_size, m.stride
        return (lambda x, p: F.max_pool2d(x, k, s)), 0
    if isinstance(m, nn.Identity):
        return (lambda x, p: x), 0
    if isinstance(m, nn.Linear):
        bias = m.bias is not None
        return (lambda x, p: F.linear(x.flatten(1), p[0], p[1] if bias else None)), 1 + bias
    return None


class FlatNet:
    """`FlatNet(net)(flat, x)` equals `net(x)` evaluated with the parameters in `flat` (same layout as
    `flatten_params(net)`), differentiable with respect to both `flat` and `x`."""

    def __init__(self, net: nn.Module):
        self.names = [n for n, _ in net.named_parameters()]
        self.shapes = [p.shape for p in net.parameters()]
        self.numels = [p.numel() for p in net.parameters()]
        self.num_params = sum(self.numels)
        self.ops = self._compile(net)
        self.net = net if self.ops is None else None  # kept only for the functional_call fallback

    @staticmethod
    def _compile(net: nn.Module) -> list[tuple[Callable, int]] | None:
        """The ConvNet layer list as functional ops, or None when the network is not a plain sequence."""
        if type(net) is not ConvNet:  # forward = classifier(features(x).flatten(1)), nothing else
            return None
        ops = []
        for m in [*net.features, net.classifier]:
            op = _layer_op(m)
            if op is None:
                return None
            ops.append(op)
        if sum(n for _, n in ops) != len(list(net.parameters())):
            return None
        return ops

    @property
    def compiled(self) -> bool:
        """True when the forward runs on functional ops (no module re-binding)."""
        return self.ops is not None

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [v.view(s) for v, s in zip(flat.split(self.numels), self.shapes)]

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if flat.numel() != self.num_params:
            raise ValueError(f"flat parameter vector has {flat.numel()} values; the network needs {self.num_params}")
        params = self.views(flat)
        if self.ops is None:
            return torch.func.functional_call(self.net, dict(zip(self.names, params)), (x,))
        i = 0
        for op, n in self.ops:
            x = op(x, params[i:i + n])
            i += n
        return x
