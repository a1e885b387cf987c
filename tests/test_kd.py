"""utils/kd.py and validate.py's KD protocol (decoupled.md §6): loss, optimiser groups, schedules, views, the
student learning from a teacher, stored soft labels, presets, the CLI report and torchrun."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import validate
from networks import get_network
from utils import kd
from utils.datasets import IMAGENET_MEAN, IMAGENET_STD, get_dataset_spec, normalize
from utils.errors import UserError
from utils.teacher import Teacher, freeze, save_teacher

REPO = Path(__file__).resolve().parent.parent
C, R = 10, 8
ARCH = "ConvNet-1-BN-w8"


# ------------------------------------------------------------------------------------------- helpers

def prototypes(classes=C, res=R, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (classes, 3, res, res), generator=g).float()


def sample(protos, per_class, seed):
    """Noisy copies of each class prototype, uint8, class-major."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(protos)).repeat_interleave(per_class)
    x = protos[labels] + 30 * torch.randn(len(labels), *protos.shape[1:], generator=g)
    return x.clamp(0, 255).round().to(torch.uint8), labels


def prep(x):
    return normalize(x.float() / 255 if x.dtype == torch.uint8 else x, IMAGENET_MEAN, IMAGENET_STD)


def train_teacher(protos, steps=60, seed=0):
    torch.manual_seed(seed)
    x, y = sample(protos, 20, seed=100 + seed)
    net = get_network(ARCH, 3, len(protos), protos.shape[-1])
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(net(prep(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return freeze(net)


@pytest.fixture(scope="module")
def toy():
    protos = prototypes()
    net = train_teacher(protos)
    teacher = Teacher(net, ARCH, "ImageFolder", C, 3, R, IMAGENET_MEAN, IMAGENET_STD)
    return protos, teacher


def small_recipe(**kw):
    base = dict(epochs=25, lr=1e-2, batch_size=10, temperature=4.0, t_squared=True, mix="cutmix", crop="rrc",
                crop_scale=(0.5, 1.0))
    return kd.KDRecipe(**{**base, **kw})


# ------------------------------------------------------------------------------------------------ loss

def test_kd_loss_matches_a_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0
    total = 0.0
    for i in range(2):  # KL(q || p) per row, then the batch mean
        p = [math.exp(v / T) for v in s[i].tolist()]
        q = [math.exp(v / T) for v in t[i].tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        total += sum(qc * math.log(qc / pc) for qc, pc in zip(q, p))
    want = total / 2
    assert kd.kd_loss(s, t, T).item() == pytest.approx(want, rel=1e-5)
    assert kd.kd_loss(s, t, T, t_squared=True).item() == pytest.approx(want * T * T, rel=1e-5)
    assert kd.kd_loss(t, t, 3.0).abs().item() < 1e-6
    assert kd.kd_loss(t + 5.0, t, 3.0).abs().item() < 1e-6  # softmax is shift invariant
    with pytest.raises(UserError, match="temperature"):
        kd.kd_loss(s, t, 0.0)


# ------------------------------------------------------------------------------------------ optimiser

class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm([4, 2, 2])  # a 3-d norm weight: excluded by type, not by shape
        self.fc = nn.Linear(16, 3)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_adamw_groups_exclude_exactly_norm_parameters_and_biases():
    net = Mixed()
    groups = kd.param_groups(net, 0.01, wd_on_norm_and_bias=False)
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert decay == {id(net.conv.weight), id(net.fc.weight)}
    want = {id(p) for m in (net.bn, net.gn, net.ln) for p in m.parameters()} | {id(net.conv.bias), id(net.fc.bias)}
    assert no_decay == want
    # decay on everything (the CIFAR / Tiny scripts): one group, frozen parameters never included
    (only,) = kd.param_groups(net, 0.01, wd_on_norm_and_bias=True)
    assert {id(p) for p in only["params"]} == decay | no_decay and only["weight_decay"] == 0.01
    opt = kd.make_optimizer(net, kd.KDRecipe(optimizer="adamw", betas=(0.8, 0.9), weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    sgd = kd.make_optimizer(net, kd.KDRecipe(optimizer="sgd", lr=0.2, momentum=0.9, wd_on_norm_and_bias=True))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9


# ------------------------------------------------------------------------------------------- schedules

def _torch_factors(make, epochs):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_factors_by_hand_and_against_torch_schedulers():
    f = kd.lr_factor
    assert f("cosine", 0, 300) == 1.0 and f("cosine", 150, 300) == pytest.approx(0.5)
    assert f("cosine", 299, 300) == pytest.approx(0.5 * (1 + math.cos(math.pi * 299 / 300)))
    # DELT's half cosine only decays to one half (§6.5)
    assert f("half-cosine", 150, 300) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert f("half-cosine", 300, 300) == pytest.approx(0.5)
    assert f("linear", 75, 300) == pytest.approx(0.75)
    # Tiny: 5 warm-up epochs from 0.01, then cosine with T_max = E - 5 (§6.3)
    assert [round(f("warmup-cosine", e, 100, 5), 6) for e in range(6)] == [0.01, 0.208, 0.406, 0.604, 0.802, 1.0]
    assert f("warmup-cosine", 5 + 95 // 2, 100, 5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 47 / 95)))
    E = 25
    tiny = _torch_factors(lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.01, total_iters=5),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=E - 5)], milestones=[5]), E)
    assert [f("warmup-cosine", e, E, 5) for e in range(E)] == pytest.approx(tiny, abs=1e-9)
    cos = _torch_factors(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=E), E)
    assert [f("cosine", e, E) for e in range(E)] == pytest.approx(cos, abs=1e-9)
    with pytest.raises(UserError, match="schedule"):
        f("step", 0, 10)
    with pytest.raises(UserError, match="warmup-epochs"):
        kd.check_recipe(kd.KDRecipe(schedule="warmup-cosine", warmup_epochs=0))


# --------------------------------------------------------------------------------------------- views

def test_padded_random_crop_is_an_exact_shift_and_views_repeat_from_the_seed():
    x = torch.rand(6, 3, 8, 8)
    r = kd.KDRecipe(crop="random-crop-pad4", flip=False)
    out = kd.augment(x, r, torch.Generator().manual_seed(1))
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(6):  # every view is one of the 81 windows of the zero-padded image
        assert any(torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(9) for dx in range(9))
    again = kd.augment(x, r, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    flipped = kd.augment(x, kd.KDRecipe(crop="none", flip=True), torch.Generator().manual_seed(2))
    assert all(torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1)) for i in range(6))
    assert not torch.equal(flipped, x)


def test_random_resized_crop_boxes_and_resampling():
    g = torch.Generator().manual_seed(0)
    boxes = kd.rrc_boxes(500, 16, 16, (0.25, 1.0), g)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 16).all() and (left + w <= 16).all()
    assert (h * w >= 0.25 * 256 * 0.8).all()  # rounding of the sides only
    x = torch.rand(2, 3, 16, 16)
    full = torch.tensor([[0, 0, 16, 16]] * 2)
    assert torch.allclose(kd.crop_resize(x, full, 16), x, atol=1e-5)  # the whole image is the identity
    quarter = kd.crop_resize(x, torch.tensor([[4, 8, 8, 8]] * 2), 8)  # an 8×8 box at size 8: a plain crop
    assert torch.allclose(quarter, x[:, :, 4:12, 8:16], atol=1e-5)


def test_rand_augment_is_seeded_and_keeps_the_global_rng():
    x = torch.rand(4, 3, 16, 16)
    r = kd.KDRecipe(rand_augment=True, crop="none", flip=False)
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = kd.augment(x, r, torch.Generator().manual_seed(3))
    assert torch.equal(torch.rand(1), before)  # the global stream did not move
    b = kd.augment(x, r, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)


def test_mixup_and_cutmix_mix_as_specified():
    x = torch.arange(4 * 16, dtype=torch.float32).view(4, 1, 4, 4)
    y = torch.arange(4)
    r = kd.KDRecipe(mix="mixup", mix_alpha=0.8)
    mixed, y1, y2, lam = kd.mix_batch(x, y, r, torch.Generator().manual_seed(0))
    perm = y2  # labels are the indices, so the partner labels are the permutation
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm]) and torch.equal(y1, y)
    for seed in range(5):
        cut, _, partner, ratio = kd.mix_batch(x, y, kd.KDRecipe(mix="cutmix"), torch.Generator().manual_seed(seed))
        pasted = (cut != x).any(1)  # every pixel value is unique, so pasted pixels all differ
        for i in range(4):
            if partner[i] != i:  # one box per batch: 1 - ratio of the image, filled from the partner
                assert float(pasted[i].float().mean()) == pytest.approx(1 - ratio)
                assert torch.equal(cut[i][:, pasted[i]], x[partner[i]][:, pasted[i]])
    same, *_ = kd.mix_batch(x, y, kd.KDRecipe(mix="none"), torch.Generator().manual_seed(0))
    assert same is x


# --------------------------------------------------------------------------------------------- training

def test_kd_student_learns_from_the_teacher_and_beats_chance(toy):
    protos, teacher = toy
    x, y = sample(protos, 3, seed=1)
    tx, ty = sample(protos, 10, seed=2)
    assert (teacher.net(prep(tx)).argmax(1) == ty).float().mean() > 0.9  # the teacher knows the problem
    soft = kd.teacher_soft_targets(teacher.net)
    losses = []
    accs = []
    for seed in (0, 0):  # twice with the same seed: identical runs
        torch.manual_seed(seed)
        net = get_network(ARCH, 3, C, R)
        chance_before = kd.count_correct(net, (tx, ty), torch.device("cpu"), prep)
        losses.append(kd.train_network_kd(net, x, y, small_recipe(), torch.Generator().manual_seed(seed),
                                          torch.device("cpu"), soft_targets=soft, prepare=prep))
        accs.append(kd.count_correct(net, (tx, ty), torch.device("cpu"), prep))
    assert losses[0] == losses[1] and accs[0] == accs[1]
    assert losses[0][-1] < 0.5 * losses[0][0]
    correct, total = accs[0]
    assert total == 100 and correct / total > 0.5  # chance is 0.1
    assert chance_before[0] / total < 0.3  # an untrained student is near chance


def test_without_soft_labels_the_loss_is_cross_entropy_on_the_hard_labels(toy):
    import copy
    protos, _ = toy
    x, y = sample(protos, 2, seed=5)
    torch.manual_seed(0)
    net = get_network(ARCH, 3, C, R)
    before = copy.deepcopy(net).train()
    recipe = small_recipe(epochs=1, batch_size=len(x), mix="none", crop="none", flip=False)
    losses = kd.train_network_kd(net, x, y, recipe, torch.Generator().manual_seed(0), torch.device("cpu"),
                                 prepare=prep)
    assert losses[0] == pytest.approx(F.cross_entropy(before(prep(x)), y).item(), rel=1e-5)


def test_views_reaching_the_teacher_are_exactly_what_the_student_trains_on(toy):
    protos, teacher = toy
    x, y = sample(protos, 2, seed=3)
    seen_teacher, seen_student = [], []
    soft = kd.teacher_soft_targets(teacher.net)

    def spy(views):
        seen_teacher.append(views.clone())
        return soft(views)
    net = get_network(ARCH, 3, C, R)
    net.register_forward_pre_hook(lambda m, a: seen_student.append(a[0].clone()))
    kd.train_network_kd(net, x, y, small_recipe(epochs=2), torch.Generator().manual_seed(0), torch.device("cpu"),
                        soft_targets=spy, prepare=prep)
    assert len(seen_teacher) == len(seen_student) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen_teacher, seen_student))


def test_teacher_train_bn_mode_uses_batch_statistics(toy):
    protos, teacher = toy
    x, _ = sample(protos, 2, seed=4)
    views = prep(x)
    ev = kd.teacher_soft_targets(teacher.net, "eval")(views)
    ev_part = kd.teacher_soft_targets(teacher.net, "eval")(views[:4])
    state = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    train_mode = kd.teacher_soft_targets(teacher.net, "train")
    tr = train_mode(views)
    try:
        assert not torch.allclose(ev, tr)
        # eval: an image's soft label ignores the rest of the batch; train: it depends on the batch (§1.3, §9.1-7)
        assert torch.allclose(ev_part, ev[:4], atol=1e-5)
        assert not torch.allclose(train_mode(views[:4]), tr[:4], atol=1e-3)
        key = next(k for k in state if k.endswith("running_mean"))
        assert not torch.equal(state[key], teacher.net.state_dict()[key])  # and its buffers drift
    finally:
        teacher.net.load_state_dict(state)
        teacher.net.eval()


class FakeReader:
    """Stands in for utils.softlabels.SoftLabelReader: fixed views and logits per epoch."""

    def __init__(self, n_epochs, batches):
        self.batches, self.n = batches, n_epochs
        self.manifest = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "arch": ARCH}
        self.got = []

    def num_epochs(self):
        return self.n

    def epoch_batches(self, images, epoch, temperature=None, device=None):
        self.got.append((images.clone(), epoch))
        self.temperature = temperature
        return iter(self.batches[epoch])


def test_stored_soft_labels_feed_exactly_the_readers_views():
    g = torch.Generator().manual_seed(0)
    batches = [[(torch.randn(5, 3, R, R, generator=g), torch.randn(5, C, generator=g)) for _ in range(2)]
               for _ in range(3)]
    reader = FakeReader(3, batches)
    images = torch.randint(0, 256, (7, 3, R, R), dtype=torch.uint8)
    seen = []
    net = get_network(ARCH, 3, C, R)
    net.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    losses = kd.train_network_kd(net, images, torch.zeros(7, dtype=torch.long), small_recipe(epochs=3),
                                 torch.Generator().manual_seed(0), torch.device("cpu"), stored=reader, prepare=prep)
    assert len(seen) == 6 and all(torch.equal(s, v) for s, (v, _) in zip(seen, [b for e in batches for b in e]))
    assert [e for _, e in reader.got] == [0, 1, 2] and reader.temperature == 4.0  # T selects top-k tails
    assert all(torch.allclose(im, prep(images)) for im, _ in reader.got)  # the reader gets teacher-space images
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    with pytest.raises(UserError, match="cover 3 epochs"):
        kd.train_network_kd(net, images, torch.zeros(7, dtype=torch.long), small_recipe(epochs=4),
                            torch.Generator(), torch.device("cpu"), stored=FakeReader(3, batches), prepare=prep)


def test_ranks_take_disjoint_slices_of_the_same_views():
    """Rank r keeps rows r::world of every batch: two ranks together see exactly the one-process views."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x, y = sample(prototypes(4, R), 5, seed=0)
        seen = {}
        for rank, world in ((0, 1), (0, 2), (1, 2)):
            rows = seen.setdefault((rank, world), [])
            net = get_network(ARCH, 3, 4, R)
            net.register_forward_pre_hook(lambda m, a, rows=rows: rows.append(a[0].clone()))
            kd.train_network_kd(net, x, y, small_recipe(epochs=2, batch_size=8), torch.Generator().manual_seed(0),
                                torch.device("cpu"), prepare=prep, shard=kd.Shard(rank, world))
        for whole, r0, r1 in zip(seen[(0, 1)], seen[(0, 2)], seen[(1, 2)]):
            assert torch.equal(whole[0::2], r0) and torch.equal(whole[1::2], r1)
    finally:
        dist.destroy_process_group()


def test_validate_kd_restores_a_train_mode_teacher_and_scores_every_arm(toy, monkeypatch):
    from dataclasses import replace
    from utils.misc import RunLog
    protos, teacher = toy
    x, y = sample(protos, 2, seed=6)
    train = sample(protos, 4, seed=7)
    test = sample(protos, 3, seed=8)
    spec = replace(get_dataset_spec("ImageFolder"), num_classes=C, resolution=R)
    state = {k: v.clone() for k, v in teacher.net.state_dict().items()}
    calls = []
    soft = kd.teacher_soft_targets

    def counting(net, *a, **k):  # every arm is labelled by the one teacher network
        calls.append(net)
        return soft(net, *a, **k)
    recipe = small_recipe(epochs=2, teacher_bn_mode="train")
    monkeypatch.setattr(validate, "teacher_soft_targets", counting)
    out = validate.validate_kd(x, y, spec, train, test, models=[ARCH], recipe_for=lambda m: recipe,
                               teacher=teacher, norm=(IMAGENET_MEAN, IMAGENET_STD), baselines=["random"],
                               runs=2, seed=3, ipc=2, device=torch.device("cpu"), log=RunLog(None, quiet=True))
    assert calls == [teacher.net]
    assert not teacher.net.training
    assert all(torch.equal(v, teacher.net.state_dict()[k]) for k, v in state.items())  # buffers restored
    res = out[ARCH]
    assert res["syn"]["seeds"] == res["random"]["seeds"] == [3, 4] and len(res["random"]["runs"]) == 2
    assert set(out["_diversity"]) == {"syn", "random", "random_runs"}


# ------------------------------------------------------------------------------------------------ presets

def test_presets_resolve_to_the_spec_numbers():
    cifar = get_dataset_spec("CIFAR100")
    tiny = get_dataset_spec("TinyImageNet")
    in1k = get_dataset_spec("ImageNet")
    p = validate.kd_protocol("sre2l-cifar", cifar, 50, "resnet18_modified")
    assert (p["epochs"], p["batch_size"], p["optimizer"], p["lr"], p["weight_decay"]) == (400, 128, "adamw", 1e-3,
                                                                                           0.01)
    assert (p["wd_on_norm_and_bias"], p["mix"], p["mix_alpha"], p["temperature"], p["teacher_bn_mode"],
            p["crop"]) == (True, "mixup", 0.8, 30.0, "train", "random-crop-pad4")
    assert validate.kd_protocol("dwa-cifar", cifar, 10, "x") == p
    t = validate.kd_protocol("sre2l-tiny", tiny, 50, "resnet18_modified")
    assert (t["optimizer"], t["lr"], t["momentum"], t["weight_decay"], t["batch_size"], t["epochs"]) == (
        "sgd", 0.2, 0.9, 1e-4, 256, 100)
    assert (t["schedule"], t["warmup_epochs"], t["temperature"], t["t_squared"], t["crop"], t["mix"]) == (
        "warmup-cosine", 5, 20.0, True, "rrc", "none")
    d = validate.kd_protocol("dwa-tiny", tiny, 50, "resnet18_modified")
    assert (d["epochs"], d["batch_size"], d["lr"], d["mix"], d["mix_p"], d["t_squared"]) == (200, 64, 0.2, "cutmix",
                                                                                           1.0, True)
    s = validate.kd_protocol("sre2l-in1k", in1k, 50, "ResNet-18")
    assert (s["batch_size"], s["epochs"], s["wd_on_norm_and_bias"], s["crop_scale"], s["mix"], s["t_squared"]) == (
        1024, 300, False, (0.08, 1.0), "cutmix", False)
    assert validate.kd_protocol("dwa-in1k", in1k, 50, "ResNet-18") == {**s, "batch_size": 128}
    delt = validate.kd_protocol("delt", in1k, 50, "ResNet-18")
    assert (delt["schedule"], delt["crop_scale"], delt["rand_augment"], delt["betas"], delt["lr"]) == (
        "half-cosine", (0.25, 1.0), True, (0.9, 0.999), 1e-3)
    assert delt["batch_size"] == 200 and delt["eval_transform"] == "resize-crop"
    assert validate.kd_protocol("delt", in1k, 10, "ResNet-18")["batch_size"] == 100
    assert validate.kd_protocol("delt", in1k, 1, "ResNet-18")["batch_size"] == 20
    assert validate.kd_protocol("delt", in1k, 50, "ResNet-101")["batch_size"] == 100  # halved for R101
    assert validate.kd_protocol("delt", tiny, 10, "resnet18_modified")["batch_size"] == 100
    assert validate.kd_protocol("delt", get_dataset_spec("CIFAR10"), 1, "conv3")["batch_size"] == 10
    assert validate.kd_protocol("delt", in1k, 10, "VGG-11")["lr"] == 5e-4
    c3 = validate.kd_protocol("delt", cifar, 10, "conv3", teacher_arch="conv3")
    assert (c3["batch_size"], c3["lr"]) == (25, 2e-3)
    # a preset sets only its own keys; the rest come from KD_DEFAULTS, and flags beat both
    got = validate.resolve_options({"epochs": 7, "temperature": None}, t, validate.KD_DEFAULTS)
    assert got["epochs"] == 7 and got["temperature"] == 20.0 and got["betas"] == (0.9, 0.999)


def test_eval_transform_resize_crop():
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(kd.resize_center_crop(x), x)  # ⌊32/7⌋·8 = 32: nothing to do
    y = torch.rand(1, 3, 64, 64)
    out = kd.resize_center_crop(y)
    want = F.interpolate(y, size=(72, 72), mode="bilinear", antialias=True, align_corners=False)[..., 4:68, 4:68]
    assert out.shape == y.shape and torch.allclose(out, want)


# ---------------------------------------------------------------------------------------------- the CLI

def _write_folder(root, images, labels, names=None):
    for i, (im, c) in enumerate(zip(images, labels.tolist())):
        d = root / (names(c) if names else f"c{c}")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(d / f"img{i:03d}.png")


@pytest.fixture(scope="module")
def kd_files(tmp_path_factory):
    """A 4-class ImageFolder dataset, an SRe2L-style set (new000/class000_id000.png) and a teacher file."""
    root = tmp_path_factory.mktemp("kd")
    protos = prototypes(4, R, seed=1)
    for split, n, s in (("train", 8, 10), ("test", 6, 11)):
        _write_folder(root / "tree" / split, *sample(protos, n, seed=s))
    x, y = sample(protos, 4, seed=12)
    for c in range(4):
        d = root / "set" / f"new{c:03d}"
        d.mkdir(parents=True)
        for k, im in enumerate(x[y == c]):
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(d / f"class{c:03d}_id{k:03d}.png")
    save_teacher(root / "teacher.pt", train_teacher(protos), arch=ARCH, dataset="ImageFolder", num_classes=4,
                 channels=3, resolution=R, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    small = get_network(ARCH, 3, 3, R)  # 3 classes: does not fit the 4-class data
    save_teacher(root / "teacher3.pt", small, arch=ARCH, dataset="ImageFolder", num_classes=3, channels=3,
                 resolution=R, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    big = get_network(ARCH, 3, 4, 16)  # 16 px: another resolution
    save_teacher(root / "teacher16.pt", big, arch=ARCH, dataset="ImageFolder", num_classes=4, channels=3,
                 resolution=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return root


def _kd_args(root, *extra, results="r.json"):
    return ["--syn", str(root / "set"), "--dataset", "ImageFolder", "--data-path", str(root / "tree"),
            "--teacher", str(root / "teacher.pt"), "--runs", "1", "--quiet", "--results", str(root / results),
            *extra]


def test_cli_kd_report_random_baseline_same_teacher_hard_labels_and_first_ipc(kd_files, monkeypatch):
    import csv
    monkeypatch.setenv("DDT_CACHE", str(kd_files / "cache"))
    r = CliRunner().invoke(validate.app, _kd_args(kd_files, "--epochs", "15", "--batch-size", "8", "--lr", "0.01",
                                                  "-T", "4", "--t-squared", "--ipc", "3", "--baseline", "random",
                                                  "--hard-labels"))
    assert r.exit_code == 0, r.output
    rep = json.loads((kd_files / "r.json").read_text())
    assert rep["protocol"] == "kd" and rep["reported"] == "last" and rep["model"] == ARCH  # student = teacher arch
    assert set(rep) >= {"syn", "random", "hard_label", "by_model", "config", "diversity_cosine"}
    teacher = str(kd_files / "teacher.pt")
    assert rep["syn"]["teacher"] == rep["random"]["teacher"] == teacher and rep["hard_label"]["teacher"] is None
    assert rep["random"]["ipc"] == 3 and rep["syn"]["seeds"] == rep["random"]["seeds"] == [0]
    assert rep["syn"]["mean"] > 0.5  # 4 easy classes, chance 0.25
    div = rep["diversity_cosine"]
    assert -1 <= div["syn"] <= 1 and -1 <= div["random"] <= 1 and len(div["random_runs"]) == 1
    kdc = rep["config"]["kd"]
    assert kdc["teacher"] == teacher and kdc["hard_labels"] and kdc["recipe"]["temperature"] == 4.0
    assert kdc["recipe"]["t_squared"] is True and kdc["teacher_mean"] == list(IMAGENET_MEAN)
    rows = list(csv.DictReader(open(kd_files / "r.csv")))
    assert [r["arm"] for r in rows] == ["syn", "hard_label", "random"]
    dd = rep["dd_ranking"][ARCH]  # no full-data arm: IOR only (HLR/LRS need --baseline full)
    assert set(dd) == {"IOR", "roles"} and dd["roles"]["syn_hard"] == "hard_label"
    assert dd["IOR"]["runs"] == pytest.approx([rep["syn"]["runs"][0] - rep["random"]["runs"][0]])
    assert {r["n_train"] for r in rows} == {"12"}  # --ipc 3: the first 3 of the 4 files per class


def test_cli_kd_preset_fills_the_recipe_and_flags_override(kd_files, monkeypatch):
    monkeypatch.setenv("DDT_CACHE", str(kd_files / "cache"))
    r = CliRunner().invoke(validate.app, _kd_args(kd_files, "--preset", "dwa-tiny", "--epochs", "6",
                                                  "--batch-size", "8", "--lr", "0.05", "--no-flip",
                                                  results="p.json"))
    assert r.exit_code == 0, r.output
    rec = json.loads((kd_files / "p.json").read_text())["config"]["kd"]["recipe"]
    assert (rec["epochs"], rec["batch_size"], rec["lr"], rec["flip"]) == (6, 8, 0.05, False)  # flags
    assert (rec["optimizer"], rec["momentum"], rec["weight_decay"], rec["schedule"], rec["warmup_epochs"]) == (
        "sgd", 0.9, 1e-4, "warmup-cosine", 5)  # the preset's
    assert (rec["temperature"], rec["t_squared"], rec["mix"], rec["wd_on_norm_and_bias"]) == (20.0, True, "cutmix",
                                                                                              True)


@pytest.mark.parametrize("extra,msg", [
    (["--teacher", "{root}/teacher16.pt"], "takes 16px images but the data is 8px"),
    (["--teacher", "{root}/teacher3.pt"], "has 3 classes but the ImageFolder data has 4"),
    (["--preset", "idc"], "not a KD protocol"),
    (["--dsa-mode", "idc"], "hard-label protocols"),
    (["--kd-mix", "bogus"], "unknown --kd-mix 'bogus'"),
    (["--crop-scale", "0.5"], "--crop-scale takes two numbers"),
    (["--baseline", "noaug"], "--baseline noaug (DD-Ranking's ARS arms) is for the hard-label protocols, not KD"),
])
def test_cli_kd_bad_input_is_one_line_error(kd_files, monkeypatch, extra, msg):
    monkeypatch.setenv("DDT_CACHE", str(kd_files / "cache"))
    args = _kd_args(kd_files, "--epochs", "1") + [e.format(root=kd_files) for e in extra]
    r = CliRunner().invoke(validate.app, args)
    assert r.exit_code == 2, r.output
    assert msg in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.startswith("error:")]) == 1


def test_cli_kd_flags_without_a_teacher_are_refused(kd_files):
    r = CliRunner().invoke(validate.app, ["--syn", str(kd_files / "set"), "--dataset", "ImageFolder",
                                          "--data-path", str(kd_files / "tree"), "-T", "4"])
    assert r.exit_code == 2 and "--temperature belongs to the KD protocol" in r.output
    r = CliRunner().invoke(validate.app, ["--syn", str(kd_files / "set"), "--dataset", "ImageFolder",
                                          "--data-path", str(kd_files / "tree"), "--preset", "delt"])
    assert r.exit_code == 2 and "is a KD protocol" in r.output


def test_cli_stored_soft_labels_take_batches_epochs_norm_and_student_from_the_manifest(kd_files, monkeypatch):
    import utils.softlabels
    monkeypatch.setenv("DDT_CACHE", str(kd_files / "cache"))
    made = []

    class Reader(FakeReader):  # replays the set itself in batches of 4, with the teacher's logits
        def __init__(self, path):
            self.path, self.n = path, 3
            self.manifest = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "batch_size": 4,
                             "epochs": 3, "teacher": {"arch": ARCH, "path": "t.pt"}}
            self.got = []
            made.append(self)

        def epoch_batches(self, images, epoch, temperature=None, device=None):
            self.got.append((images, epoch))
            return ((images[i:i + 4], torch.zeros(len(images[i:i + 4]), 4)) for i in range(0, len(images), 4))
    monkeypatch.setattr(utils.softlabels, "SoftLabelReader", Reader)
    args = ["--syn", str(kd_files / "set"), "--dataset", "ImageFolder", "--data-path", str(kd_files / "tree"),
            "--soft-labels", str(kd_files / "fkd"), "--runs", "1", "--quiet", "--results", str(kd_files / "s.json")]
    r = CliRunner().invoke(validate.app, args)
    assert r.exit_code == 0, r.output
    rep = json.loads((kd_files / "s.json").read_text())
    assert rep["model"] == ARCH and rep["syn"]["soft_labels"] == str(kd_files / "fkd")
    assert (rep["config"]["epochs"], rep["config"]["batch_size"]) == (3, 4) and rep["syn"]["teacher"] == "t.pt"
    assert [e for _, e in made[0].got] == [0, 1, 2] and len(made[0].got[0][0]) == 16
    r = CliRunner().invoke(validate.app, args + ["--batch-size", "8"])
    assert r.exit_code == 2 and "stored in batches of 4" in r.output
    r = CliRunner().invoke(validate.app, args + ["--baseline", "random"])
    assert r.exit_code == 2 and "needs an online --teacher" in r.output


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_ranks_train_one_student_and_write_once(kd_files):
    out = kd_files / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDT_CACHE": str(kd_files / "cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(REPO / "validate.py"), *_kd_args(kd_files, results="ddp/r.json"), "--epochs",
           "15", "--batch-size", "8", "--lr", "0.01", "-T", "4", "--t-squared", "--device", "cpu"]
    cmd.remove("--quiet")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("results:") == 1  # rank 0 alone reports and writes
    assert p.stderr.count("syn        seed 0: test acc") == 1
    rep = json.loads((out / "r.json").read_text())
    assert rep["config"]["kd"]["world_size"] == 2 and rep["syn"]["mean"] > 0.5  # chance 0.25
    assert len((out / "r.csv").read_text().strip().splitlines()) == 2  # header + the one run
    assert sorted(f.name for f in out.iterdir()) == ["r.csv", "r.json"]


def test_hard_labels_with_full_baseline_add_a_hard_label_full_arm_for_hlr(toy):
    """KD protocol: --hard-labels with --baseline full also trains the full split with cross-entropy, so
    DD-Ranking's HLR compares two hard-label arms; the full KD arm still uses the teacher."""
    from dataclasses import replace
    from utils import ddranking
    from utils.misc import RunLog
    protos, teacher = toy
    x, y = sample(protos, 2, seed=6)
    train = sample(protos, 4, seed=7)
    test = sample(protos, 3, seed=8)
    spec = replace(get_dataset_spec("ImageFolder"), num_classes=C, resolution=R)
    log = RunLog(None, quiet=True)
    out = validate.validate_kd(x, y, spec, train, test, models=[ARCH], recipe_for=lambda m: small_recipe(epochs=2),
                               teacher=teacher, norm=(IMAGENET_MEAN, IMAGENET_STD), baselines=["random", "full"],
                               runs=1, seed=3, ipc=2, device=torch.device("cpu"), log=log, hard_labels=True,
                               full_epochs=1)
    res = out[ARCH]
    assert set(res) == {"syn", "hard_label", "random", "full", "full_hard_label"}
    assert res["full_hard_label"]["teacher"] is None and [r["arm"] for r in log.rows][-1] == "full_hard_label"
    dd = ddranking.scores(res, syn_hard="hard_label", full_hard="full_hard_label")
    assert dd["HLR"]["runs"] == pytest.approx([res["full_hard_label"]["runs"][0] - res["hard_label"]["runs"][0]])
    assert 0 <= dd["LRS"]["mean"] <= 1
