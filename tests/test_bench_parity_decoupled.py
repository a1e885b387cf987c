"""bench/parity_decoupled.py (sre2l, dwa, delt, kd) and its adapter, against a tiny stand-in for SRe2L's CIFAR
recovery script written here (CI has no checkout of the originals; the real runs are recorded in RESULTS.md)."""
import importlib.util
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import parity  # noqa: E402
import parity_decoupled as pd  # noqa: E402

# A stand-in for SRe2L's `*small_dataset/recover_cifar.py` + `utils.py`, with the names and call structure the adapter
# relies on (main_syn builds a 100-class modified torchvision ResNet-18 in DataParallel and loads args.arch_path's
# state_dict; get_images draws its noise with torch.randn, its jitter with random.randint, builds
# nn.CrossEntropyLoss() and BNFeatureHooks, and clips with clip_cifar after each Adam step). UNBIASED selects the
# variance estimator of the BN hook, so the same stand-in can be right or wrong.
FAKE_UTILS = """
import numpy as np
import torch
UNBIASED = {unbiased}

class BNFeatureHook:
    def __init__(self, module):
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, inp, out):
        a = inp[0]
        mean = a.mean([0, 2, 3])
        var = a.transpose(0, 1).reshape(a.shape[1], -1).var(1, unbiased=UNBIASED)
        self.r_feature = torch.norm(module.running_var - var) + torch.norm(module.running_mean - mean)

def lr_cosine_policy(base_lr, warmup, epochs):
    def set_lr(optimizer, iteration, epoch):
        for g in optimizer.param_groups:
            g["lr"] = 0.5 * (1 + np.cos(np.pi * epoch / epochs)) * base_lr
    return set_lr
"""

FAKE_RECOVER = """
import random
import numpy as np
import torch
import torch.nn as nn
import torchvision
from utils import BNFeatureHook, lr_cosine_policy

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

def clip_cifar(x):
    for c in range(3):
        x[:, c] = torch.clamp(x[:, c], -MEAN[c] / STD[c], (1 - MEAN[c]) / STD[c])
    return x

def get_images(args, model, hook_for_display, ipc_id):
    hooks = [BNFeatureHook(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    targets_all = torch.LongTensor(np.arange(100))
    for kk in range(0, 100, args.batch_size):
        targets = targets_all[kk:kk + args.batch_size].to("cuda")
        inputs = torch.randn((targets.shape[0], 3, 32, 32), requires_grad=True, device="cuda", dtype=torch.float)
        optimizer = torch.optim.Adam([inputs], lr=args.lr, betas=[0.5, 0.9], eps=1e-8)
        schedule = lr_cosine_policy(args.lr, 0, args.iteration)
        criterion = nn.CrossEntropyLoss()
        for it in range(args.iteration):
            schedule(optimizer, it, it)
            jit = torch.roll(inputs, shifts=(random.randint(0, args.jitter), random.randint(0, args.jitter)),
                             dims=(2, 3))
            optimizer.zero_grad()
            ce = criterion(model(jit), targets)
            w = [args.first_bn_multiplier] + [1.0] * (len(hooks) - 1)
            loss = ce + args.r_bn * torch.stack([h.r_feature * w[i] for i, h in enumerate(hooks)]).sum()
            loss.backward()
            optimizer.step()
            inputs.data = clip_cifar(inputs.data)

def main_syn(args, ipc_id):
    net = torchvision.models.get_model("resnet18", num_classes=100)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net = nn.DataParallel(net).cuda()
    net.load_state_dict(torch.load(args.arch_path)["state_dict"])
    net.eval()
    for p in net.parameters():
        p.requires_grad = False
    get_images(args, net, None, ipc_id)
"""


def fake_sre2l(tmp_path: Path, unbiased: bool) -> Path:
    root = tmp_path / ("sre2l_unbiased" if unbiased else "sre2l")
    code = root / "SRe2L" / "*small_dataset"
    code.mkdir(parents=True)
    (code / "utils.py").write_text(textwrap.dedent(FAKE_UTILS.format(unbiased=unbiased)))
    (code / "recover_cifar.py").write_text(textwrap.dedent(FAKE_RECOVER))
    return root


def by_quantity(lines):
    return {line.quantity: line for line in lines}


def test_sre2l_check_matches_a_faithful_original_and_catches_an_unbiased_variance(tmp_path, monkeypatch):
    monkeypatch.setattr(pd, "SRE2L_ITERS", 2)
    args = Namespace(seed=0, tol=1e-5)
    good = by_quantity(pd.check_sre2l(fake_sre2l(tmp_path, unbiased=False), args))
    assert set(good) == {"BN-statistics loss R_BN, steps 1..2", "CE, steps 1..2", "total loss, steps 1..2",
                         "pixel gradient, step 1", "pixel gradient, steps 1..2, fp64",
                         "images after steps 1..2 (Adam, cosine lr, clip), fp64"}
    assert all(line.ok and line.gating for line in good.values()), [l.render() for l in good.values()]
    bad = by_quantity(pd.check_sre2l(fake_sre2l(tmp_path, unbiased=True), args))
    # an unbiased variance moves every BN term, hence R_BN, the total loss and the pixels
    assert not bad["BN-statistics loss R_BN, steps 1..2"].ok
    assert not bad["total loss, steps 1..2"].ok
    assert not bad["images after steps 1..2 (Adam, cosine lr, clip), fp64"].ok


def test_fp32_gradient_line_uses_our_own_rounding_as_the_floor():
    exact = torch.linspace(-1, 1, 101, dtype=torch.float64)
    ours = exact + 1e-3                     # our fp32 result is 1e-3 off its own fp64 value
    near = pd.fp32_gradient_line("m", "g", ours, ours + 5e-4, exact, tol=1e-5)
    far = pd.fp32_gradient_line("m", "g", ours, ours + 5e-2, exact, tol=1e-5)
    tight = pd.fp32_gradient_line("m", "g", exact, exact + 1e-3, exact, tol=1e-5)
    assert near.ok and near.tol == pytest.approx(2e-3) and "fp32-vs-fp64" in near.note
    assert not far.ok
    assert not tight.ok and tight.tol == 1e-5 and tight.note == ""


def test_adapter_replays_our_shifts_in_order_and_refuses_one_out_of_range():
    spec = importlib.util.spec_from_file_location("dec_adapter", ROOT / "bench" / "original_side" / "decoupled.py")
    adapter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adapter)
    randint = adapter._shift_draws([(1, 4), (0, 2)])
    assert [randint(0, 4) for _ in range(4)] == [1, 4, 0, 2]
    with pytest.raises(AssertionError, match="outside the original's range"):
        adapter._shift_draws([(5, 0)])(0, 4)
    load = adapter._torch_load_redirect({"resnet18_E200/ckpt.pth": {"state_dict": {"w": 1}}})
    assert load("./pretrain/save/cifar10/resnet18_E200/ckpt.pth") == {"state_dict": {"w": 1}}


def test_parity_cli_offers_the_decoupled_methods_and_refuses_a_wrong_checkout(tmp_path, capsys):
    parity._load_registry()
    assert {"sre2l", "dwa", "delt", "kd"} <= set(parity.METHODS)
    assert parity.METHODS["dwa"][1] == "distillation/distillation_cifar.py"
    assert parity.main(["--method", "delt", "--original", str(tmp_path)]) == 2
    assert "no recover/recover.py there" in capsys.readouterr().err


def test_delt_round_plans_cover_the_straddling_case():
    units = pd.our_plan(30, 4000, 500, 100, 10)
    # class 3 straddles batches 0 and 1 (images 0..9 in batch 0, 10..29 in batch 1): its index 10 joins in round 2
    second = units[1]
    pos = second.classes.index(3)
    assert second.indices[pos] == 10
    assert [r for r, active in enumerate(second.active) if active[pos]][0] == 2
