"""bench/parity_tm.py (MTT / SPEED parity) and its adapter bench/original_side/tm.py, run against tiny stand-in
"originals" written here (CI has no checkout of the real ones; docs/RESULTS.md records the run against them).

The stand-ins have the originals' shape where the adapter relies on it: a distill.py whose `main(args)` holds the
outer loop `for it in range(0, args.Iteration + 1)` with the student built by `get_network`, a ReparamModule taking
`flat_param`, a FReeNet class with the original's state-dict keys, `feature_sparsification`, `ParamDiffAug` and
`DiffAugment`. Their loop bodies are this test's own small trajectory-matching steps."""
import argparse
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import parity  # noqa: E402
import parity_tm  # noqa: E402
from original_runner import OriginalFailed, run_original  # noqa: E402

# Tiny shapes: a width-8, depth-1 ConvNet on CIFAR-10's 32 px, 2-step unrolls, SPEED with 4 tokens of width 8.
CASE = parity_tm.TMCase(model="ConvNet-1-w8", syn_steps=3, ipc=1, n_per_class=2, batch_syn=6, num_saet=4, dim=8,
                        depth=2, heads=2, patch=8, top_k=6, expert_images=12, expert_batch=5, expert_epochs=2,
                        dsa_steps=3, dsa_strategy="flip")
ARGS = argparse.Namespace(seed=0, tol=1e-5)

UTILS = """
import numpy as np
import torch
import torch.nn as nn

class ConvNet(nn.Module):
    def __init__(self, channel, num_classes, width, res):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channel, width, 3, padding=1), nn.GroupNorm(width, width),
                                      nn.ReLU(), nn.AvgPool2d(2, 2))
        self.classifier = nn.Linear(width * (res // 2) ** 2, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))

def get_network(model, channel, num_classes, im_size=(32, 32), dist=True):
    return ConvNet(channel, num_classes, 8, im_size[0])

class ParamDiffAug:
    pass

def DiffAugment(x, strategy='', seed=-1, param=None):
    # mode single from the global RNG: a family, then its draws (the stand-in knows only flip)
    families = strategy.split('_')
    family = families[torch.randint(0, len(families), size=(1,)).item()]
    if family != 'flip':
        raise AssertionError('the stand-in implements flip only')
    return torch.where(torch.rand(x.size(0), 1, 1, 1) < FLIP_BELOW, x.flip(3), x)

def epoch(mode, dataloader, net, optimizer, criterion, args, aug):
    for x, y in dataloader:
        if STANDARDIZE:
            x = (x - x.mean()) / x.std()
        loss = criterion(net(x), y)
        if mode == "train":
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return 0.0, 0.0

def feature_sparsification(scm, top_k, device):
    flat = scm.reshape(scm.shape[0], scm.shape[1], -1)
    kth = flat.abs().topk(top_k, dim=-1).values[..., -1:]
    return (flat * (flat.abs() >= kth)).reshape(scm.shape)
"""

REPARAM = """
import torch
import torch.nn as nn

class ReparamModule(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module
        self._names = [n for n, _ in module.named_parameters()]
        self._shapes = [p.shape for p in module.parameters()]
        self._param_numels = tuple(p.numel() for p in module.parameters())

    def forward(self, x, flat_param):
        views = [v.view(s) for v, s in zip(flat_param.split(self._param_numels), self._shapes)]
        return torch.func.functional_call(self.module, dict(zip(self._names, views)), (x,))
"""

NETWORKS = """
import torch
import torch.nn as nn
import torch.nn.functional as F

class _Proj(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

class _Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

class _Block(nn.Module):
    def __init__(self, dim, hidden, norm_layer):
        super().__init__()
        self.norm1, self.mhsc, self.norm2, self.mlp = norm_layer(dim), _Proj(dim), norm_layer(dim), _Mlp(dim, hidden)

class FReeNet(nn.Module):
    def __init__(self, img_size, patch_size, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
                 norm_layer):
        super().__init__()
        self.p, self.h = patch_size, decoder_num_heads
        hidden = int(decoder_embed_dim * mlp_ratio)
        self.decoder_blocks = nn.ModuleList(_Block(decoder_embed_dim, hidden, norm_layer)
                                            for _ in range(decoder_depth))
        self.decoder_pred = nn.Linear(decoder_embed_dim, 3 * patch_size ** 2)

    def forward(self, saet, scm):
        b, h, l, k = scm.shape
        z = (scm @ saet.reshape(b, k, h, -1).transpose(1, 2)).transpose(1, 2).reshape(b, l, -1)
        x = torch.zeros_like(z)
        for blk in self.decoder_blocks:
            x = blk.norm1(x + blk.mhsc.proj(z))
            x = blk.norm2(x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(x))))
        g, p = int(l ** 0.5), self.p
        return self.decoder_pred(x).reshape(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * p, g * p)
"""

# One expert of buffer.py; snapshots with .cpu() as the originals do (the bench runs it with copy_on_cpu).
BUFFER = """
import torch

def main(args):
    trajectories = []
    for it in range(0, args.num_experts):
        teacher_net = get_network(args.model, channel, num_classes, im_size)
        teacher_optim = torch.optim.SGD(teacher_net.parameters(), lr=args.lr_teacher)
        timestamps = [[p.detach().cpu() for p in teacher_net.parameters()]]
        for e in range(args.train_epochs):
            epoch("train", dataloader=trainloader, net=teacher_net, optimizer=teacher_optim, criterion=criterion,
                  args=args, aug=True)
            epoch("test", dataloader=testloader, net=teacher_net, optimizer=None, criterion=criterion, args=args,
                  aug=False)
            timestamps.append([p.detach().cpu() for p in teacher_net.parameters()])
        trajectories.append(timestamps)
        print("saving happens here")
"""

# The outer-loop bodies: {STEP} is the inner update, so a test can plant a divergence.
MTT_DISTILL = """
import numpy as np
import torch

def main(args):
    for it in range(0, args.Iteration + 1):
        print("evaluation and logging the parity bench does not run")
        student_net = get_network(args.model, channel, num_classes, im_size, dist=False)
        student_net = ReparamModule(student_net)
        num_params = sum(p.numel() for p in student_net.parameters())
        trajectory = buffer[np.random.randint(0, len(buffer))]
        start_epoch = np.random.randint(0, args.max_start_epoch)
        theta0 = torch.cat([p.reshape(-1) for p in trajectory[start_epoch]])
        target = torch.cat([p.reshape(-1) for p in trajectory[start_epoch + args.expert_epochs]])
        theta = theta0.clone().requires_grad_(True)
        chunks = []
        for step in range(args.syn_steps):
            if not chunks:
                chunks = list(torch.split(torch.randperm(len(image_syn)), args.batch_syn))
            idx = chunks.pop()
            x = image_syn[idx]
            if args.dsa and not args.no_aug:
                x = DiffAugment(x, args.dsa_strategy, param=args.dsa_param)
            out = student_net(x, flat_param=theta)
            g = torch.autograd.grad(criterion(out, label_syn[idx]), theta, create_graph=True)[0]
            theta = {STEP}
        grand_loss = ((theta - target) ** 2).sum() / ((theta0 - target) ** 2).sum()
        optimizer_img.zero_grad()
        optimizer_lr.zero_grad()
        grand_loss.backward()
        optimizer_img.step()
        optimizer_lr.step()
        print("logging after the step")
"""

SPEED_DISTILL = """
import numpy as np
import torch

def main(args):
    for it in range(0, args.Iteration + 1):
        student_net = get_network(args.model, channel, num_classes, im_size, dist=False)
        student_net = ReparamModule(student_net)
        trajectory = buffer[np.random.randint(0, len(buffer))]
        start_epoch = np.random.randint(0, args.max_start_epoch)
        theta0 = torch.cat([p.reshape(-1) for p in trajectory[start_epoch]])
        target = torch.cat([p.reshape(-1) for p in trajectory[start_epoch + args.expert_epochs]])
        theta = theta0.clone().requires_grad_(True)
        mom = torch.zeros_like(theta0)
        chunks = []
        for step in range(args.syn_steps):
            if not chunks:
                chunks = list(torch.split(torch.randperm(num_classes * args.num_scm, device=args.device),
                                          args.batch_syn))
            idx = chunks.pop()
            x = freenet.forward(saet.repeat(len(idx), 1, 1), scm[idx])
            if args.dsa and not args.no_aug:
                x = DiffAugment(x, args.dsa_strategy, param=args.dsa_param)
            g = torch.autograd.grad(criterion(student_net(x, flat_param=theta), label_syn[idx]), theta,
                                    create_graph=True)[0]
            mom = args.momentum * mom + (1 - args.momentum) * g
            theta = {STEP}
        grand_loss = ((theta - target) ** 2).sum() / ((theta0 - target) ** 2).sum()
        l1_penalty = args.l1_weight * scm.abs().sum()
        total_loss = grand_loss + l1_penalty
        for opt in (optimizer_saet, optimizer_scm, optimizer_freenet, optimizer_lr):
            opt.zero_grad()
        total_loss.backward()
        optimizer_saet.step()
        optimizer_scm.step()
        optimizer_freenet.step()
        optimizer_lr.step()
        syn_lr.data = syn_lr.data.clip(min=0.001)
"""


def _original(tmp_path: Path, distill: str, speed: bool, flip_below: float = 0.5) -> Path:
    root = tmp_path / ("speed" if speed else "mtt")
    root.mkdir()
    # SPEED's epoch() standardises every batch (speed.md §1.3), MTT's does not
    (root / "utils.py").write_text(UTILS.replace("STANDARDIZE", str(speed)).replace("FLIP_BELOW", str(flip_below)))
    (root / "reparam_module.py").write_text(REPARAM)
    (root / "distill.py").write_text(distill)
    (root / "buffer.py").write_text(BUFFER)
    if speed:
        (root / "networks.py").write_text(NETWORKS)
        (root / "recurrent_block.py").write_text("")
    return root


def _by_quantity(lines):
    return {line.quantity.split(" (worst")[0]: line for line in lines}


def test_mtt_parity_passes_against_a_matching_original(tmp_path):
    root = _original(tmp_path, MTT_DISTILL.replace("{STEP}", "theta - syn_lr * g"), speed=False)
    lines = parity_tm.check_mtt(root, ARGS, CASE)
    q = _by_quantity(lines)
    assert all(line.ok for line in lines) and sum(not line.gating for line in lines) == 1
    for name in ("matching loss", "d loss / d images", "d loss / d syn_lr", "d loss / d images [--checkpoint-unroll]",
                 "images after the outer step", "syn_lr after the outer step",
                 "expert trajectory, 2 epochs [--no-batch-standardize]", "matching loss [DSA, 3 steps]",
                 "d loss / d images [DSA, 3 steps]"):
        assert q[name].rel <= 1e-5
    assert q["matching loss [DSA, 3 steps]"].note == "families drawn: flip"
    info = q["expert trajectory, 2 epochs (buffer.py default)"]    # ours standardises batches, MTT's does not
    assert not info.gating and info.rel > 1e-3 and "--no-batch-standardize" in info.note


def test_mtt_parity_fails_on_a_divergent_inner_step(tmp_path):
    root = _original(tmp_path, MTT_DISTILL.replace("{STEP}", "theta - 0.5 * syn_lr * g"), speed=False)
    q = _by_quantity(parity_tm.check_mtt(root, ARGS, CASE))
    assert q["student parameter layout (sizes, in order)"].ok
    for name in ("matching loss", "d loss / d images", "d loss / d syn_lr", "images after the outer step"):
        assert not q[name].ok, name


def test_mtt_parity_fails_when_the_augmentation_draws_differ(tmp_path):
    # the stand-in never flips (ours flips where the draw is < 0.5): only the DSA lines can see it
    root = _original(tmp_path, MTT_DISTILL.replace("{STEP}", "theta - syn_lr * g"), speed=False, flip_below=-1.0)
    q = _by_quantity(parity_tm.check_mtt(root, ARGS, CASE))
    assert q["matching loss"].ok and q["d loss / d images"].ok
    assert not q["d loss / d images [DSA, 3 steps]"].ok


def test_speed_parity_passes_and_names_the_storage_fix(tmp_path):
    root = _original(tmp_path, SPEED_DISTILL.replace("{STEP}", "theta - syn_lr * mom"), speed=True)
    lines = parity_tm.check_speed(root, ARGS, CASE)
    q = _by_quantity(lines)
    gating = [line for line in lines if line.gating]
    assert gating and all(line.ok for line in gating)
    for name in ("matching loss", "L1 term", "d loss / d SAET", "d loss / d SCM (incl. L1)", "d loss / d FReeNet",
                 "d loss / d syn_lr", "SCM after the outer step", "FReeNet after the outer step",
                 "decode of the saved top-k set (decode_images)", "top-k sparsification, tied values (topk_prune)",
                 "expert trajectory, 2 epochs (buffer.py default)", "d loss / d SCM (incl. L1) [DSA, 3 steps]"):
        assert q[name].gating and q[name].rel <= 1e-5, name
    info = q["top-k codes as saved, tied values (pack_scm)"]
    assert not info.gating and info.rel > 0 and "bug 11" in info.note   # ties: the original keeps more than k
    assert "INFO" in info.render()


def test_speed_parity_fails_without_the_inner_momentum(tmp_path):
    root = _original(tmp_path, SPEED_DISTILL.replace("{STEP}", "theta - syn_lr * g"), speed=True)
    q = _by_quantity(parity_tm.check_speed(root, ARGS, CASE))
    assert not q["matching loss"].ok and not q["d loss / d SCM (incl. L1)"].ok
    assert q["decode of the dense codes (the unroll's images)"].ok   # the decoder itself still agrees


def _mtt_payload(perm_size: int) -> dict:
    return {"model": "x", "channel": 3, "num_classes": 10, "im_size": [32, 32], "syn_steps": 1, "batch_syn": 10,
            "labels": torch.arange(10), "start": [torch.zeros(1)], "target": [torch.ones(1)],
            "images": torch.zeros(10, 3, 32, 32), "syn_lr": torch.tensor(0.01), "lr_img": 1.0, "lr_lr": 1.0,
            "perms": [torch.randperm(perm_size)]}


def test_adapter_refuses_a_distill_without_the_outer_loop(tmp_path):
    root = _original(tmp_path, "def main(args):\n    pass\n", speed=False)
    with pytest.raises(OriginalFailed, match="no `for it in range"):
        run_original(root, parity_tm.ADAPTER, "mtt_step", _mtt_payload(10))


def test_adapter_refuses_a_permutation_of_another_size(tmp_path):
    root = _original(tmp_path, MTT_DISTILL.replace("{STEP}", "theta - syn_lr * g"), speed=False)
    with pytest.raises(OriginalFailed, match="drew a permutation of 10, the bench prepared one of 7"):
        run_original(root, parity_tm.ADAPTER, "mtt_step", _mtt_payload(7))


def test_mtt_method_refuses_the_speed_checkout(tmp_path, capsys):
    root = _original(tmp_path, SPEED_DISTILL.replace("{STEP}", "theta - syn_lr * mom"), speed=True)
    assert parity.main(["--method", "mtt", "--original", str(root)]) == 2
    assert "is SPEED's checkout" in capsys.readouterr().err


def test_permutations_replay_the_generator():
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    first = [torch.randperm(9, generator=g) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, parity_tm.permutations(state, 9, 3)))
