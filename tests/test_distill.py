"""distill.py: the unroll, the loss, checkpointing, one step, presets and the CLI (MTT and SPEED)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import distill
from distill import (DistillConfig, PixelImages, SpeedCode, Unroll, checkpointed_loss, parameter_distance,
                     plan_unroll, resolve_config, unroll_batches, unrolled_loss)
from networks import get_network
from networks.functional import FlatNet, flatten_params
from utils.datasets import get_dataset_spec
from utils.dsa import DSA
from utils.errors import UserError


def test_parameter_distance_hand_case():
    start, target = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])   # ||start - target||^2 = 25
    theta = torch.tensor([3.0, 0.0])                                      # ||theta - target||^2 = 16
    assert parameter_distance(theta, start, target).item() == pytest.approx(16 / 25)
    assert parameter_distance(target, start, target).item() == 0


def test_unroll_batches_follow_the_reference_order():
    # speed.md §3.6: permutation split into chunks of `batch`, consumed from the END (short remainder first)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    batches = unroll_batches(10, 4, 3, g)
    assert [len(b) for b in batches] == [2, 4, 4]
    assert torch.equal(batches[0], perm[8:]) and torch.equal(batches[1], perm[4:8]) and torch.equal(batches[2],
                                                                                                    perm[:4])
    nxt = unroll_batches(10, 4, 4, torch.Generator().manual_seed(0))[3]  # a 4th step draws a fresh permutation
    assert len(nxt) == 2
    assert all(len(b) == 5 for b in unroll_batches(5, None, 3, g))


def tiny_unroll(steps=3, momentum=0.9, dsa=True, seed=0):
    torch.manual_seed(seed)
    net = get_network("ConvNet-1-w8", 3, 4, 8)
    student = FlatNet(net)
    start = flatten_params(net)
    target = start + 0.05 * torch.randn_like(start)
    cfg = DistillConfig(method="mtt", ipc=2, batch_syn=3, syn_steps=steps, inner_momentum=momentum)
    labels = torch.arange(4).repeat_interleave(2)
    aug = DSA() if dsa else None
    u, used = plan_unroll(student, start, target, labels, 8, cfg, aug, torch.Generator().manual_seed(seed), (8, 8),
                          "cpu")
    return u, used


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_checkpointed_unroll_equals_full_unroll(momentum):
    u, used = tiny_unroll(steps=4, momentum=momentum)
    x0 = torch.randn(len(used), 3, 8, 8)
    grads = []
    for fn in (unrolled_loss, checkpointed_loss):
        x = x0.clone().requires_grad_(True)
        a = torch.tensor(0.02, requires_grad=True)
        loss = fn(u, x, a)
        loss.backward()
        grads.append((loss.detach(), x.grad, a.grad))
    (l1, gx1, ga1), (l2, gx2, ga2) = grads
    assert torch.allclose(l1, l2, rtol=1e-5)
    assert gx1.abs().sum() > 0 and torch.allclose(gx1, gx2, rtol=1e-4, atol=1e-7)
    assert torch.allclose(ga1, ga2, rtol=1e-4)


def test_unroll_without_steps_change_is_the_start_distance():
    u, used = tiny_unroll(steps=1, dsa=False)
    x = torch.randn(len(used), 3, 8, 8)
    # alpha 0: the student does not move, so the loss is exactly 1
    assert unrolled_loss(u, x, torch.tensor(0.0)).item() == pytest.approx(1.0)


def test_inner_update_rules():
    u, _ = tiny_unroll(momentum=0.9)
    th, m, g = torch.ones(3), torch.full((3,), 2.0), torch.full((3,), 4.0)
    th2, m2 = u.update(th, m, g, 0.5)
    assert torch.allclose(m2, torch.full((3,), 0.9 * 2 + 0.1 * 4)) and torch.allclose(th2, 1 - 0.5 * m2)
    u0 = replace(u, momentum=0.0)
    th3, m3 = u0.update(th, m, g, 0.5)
    assert torch.allclose(th3, torch.full((3,), 1 - 2.0)) and torch.equal(m3, g)


def _fixed_problem(method):
    """A tiny target trajectory made by actually training on real-looking data, and a parameterisation."""
    torch.manual_seed(0)
    spec = replace(get_dataset_spec("CIFAR10"), resolution=8)
    net = get_network("ConvNet-1-w8", 3, 10, 8)
    start = flatten_params(net)
    xr = torch.randn(40, 3, 8, 8)
    yr = torch.arange(10).repeat(4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(10):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xr), yr).backward()
        opt.step()
    target = flatten_params(net)
    if method == "mtt":
        cfg = DistillConfig(method="mtt", ipc=1, model="ConvNet-1-w8", syn_steps=5, batch_syn=None, lr_img=100,
                            outer_momentum=0.5, inner_momentum=0.0)
        params = PixelImages(cfg, spec, "cpu", torch.randn(10, 3, 8, 8))
    else:
        cfg = DistillConfig(method="speed", ipc=1, model="ConvNet-1-w8", syn_steps=5, batch_syn=10, n_per_class=2,
                            num_saet=4, dim=8, depth=1, heads=2, patch=2, top_k=8, l1_weight=1e-6)
        params = SpeedCode(cfg, spec, "cpu", torch.Generator().manual_seed(0))
    return cfg, spec, params, FlatNet(net), start, target


@pytest.mark.parametrize("method", ["mtt", "speed"])
def test_one_distillation_step_lowers_the_loss(method):
    cfg, spec, params, student, start, target = _fixed_problem(method)
    n = distill.num_images(cfg, spec)
    labels = torch.arange(10).repeat_interleave(n // 10)
    u, used = plan_unroll(student, start, target, labels, n, cfg, None, torch.Generator().manual_seed(1), (8, 8),
                          "cpu")
    alpha = torch.tensor(0.05, requires_grad=True)

    def loss():
        return unrolled_loss(u, params.decode(used), alpha) + params.regularizer()
    before = loss()
    for o in params.optimizers:
        o.zero_grad()
    before.backward()
    for o in params.optimizers:
        o.step()
    after = loss()
    assert after.item() < before.item()


def test_presets_resolve_per_dataset_and_ipc():
    cifar = get_dataset_spec("CIFAR10")
    c1 = resolve_config("speed", cifar, 1, {})
    assert (c1.n_per_class, c1.num_saet, c1.dim, c1.heads, c1.syn_steps, c1.batch_syn) == (17, 16, 32, 2, 60, 64)
    c10 = resolve_config("speed", cifar, 10, {})
    assert (c10.n_per_class, c10.dim, c10.top_k, c10.l1_weight) == (124, 96, 48, 3e-7)
    tiny = resolve_config("speed", get_dataset_spec("TinyImageNet"), 10, {})
    assert (tiny.model, tiny.patch, tiny.n_per_class, tiny.batch_syn, tiny.syn_steps) == ("ConvNetD4", 8, 78, 780, 20)
    woof = resolve_config("speed", get_dataset_spec("imagewoof"), 1, {})
    assert (woof.model, woof.l1_weight, woof.n_per_class) == ("ConvNetD5", 3e-7, 15)
    # an explicit flag wins; changing the code's shape re-derives the images per class from the budget
    small = resolve_config("speed", cifar, 1, {"dim": 16, "syn_steps": 7})
    assert small.syn_steps == 7 and small.dim == 16 and small.n_per_class > 17
    mtt = resolve_config("mtt", cifar, 10, {})
    assert (mtt.syn_steps, mtt.max_start_epoch, mtt.inner_momentum, mtt.lr_floor, mtt.batch_syn) == (30, 20, 0.0,
                                                                                                     None, None)
    with pytest.raises(UserError):
        resolve_config("kip", cifar, 10, {})


def test_every_published_speed_row_passes_the_checks():
    from utils.speed import SPEED_PRESETS
    for (name, ipc) in SPEED_PRESETS:
        spec = get_dataset_spec(name)
        cfg = resolve_config("speed", spec, ipc, {})
        distill.check_config(cfg, spec)
        assert distill.num_images(cfg, spec) == spec.num_classes * cfg.n_per_class


def test_config_errors_are_one_line():
    cifar = get_dataset_spec("CIFAR10")
    with pytest.raises(UserError, match="budget"):
        distill.check_config(resolve_config("speed", cifar, 1, {"n_per_class": 500}), cifar)
    with pytest.raises(UserError, match="divisible"):
        distill.check_config(resolve_config("speed", cifar, 10, {"patch": 5, "n_per_class": 10}), cifar)
    with pytest.raises(UserError):
        distill.check_config(resolve_config("mtt", cifar, 10, {"syn_steps": 0}), cifar)


def test_unroll_type_is_a_dataclass_with_replayable_plans():
    u, used = tiny_unroll(steps=3)
    assert isinstance(u, Unroll) and len(u.plans) == 3 and all(p is not None for p in u.plans)
    x = torch.randn(len(used), 3, 8, 8)
    a = torch.tensor(0.01)
    assert unrolled_loss(u, x, a).item() == unrolled_loss(u, x, a).item()  # same plans -> same loss


