"""Images per second and peak memory of recover.py against a faithful naive recovery loop (the reference's
structure), at identical settings, in one run. Prints the ratios.

    python bench/recover_speed.py                                  # SRe2L, CIFAR-10 IPC 10, ConvNet-3-BN-w64
    python bench/recover_speed.py --arch ResNet-18-modified --units 4
    python bench/recover_speed.py --method dwa
    python bench/recover_speed.py --device cuda --arch ResNet-18 --res 224 --classes 1000 --batch 100 --amp

What the naive loop does, like the references (decoupled.md §3.1, §4.2): one batch (ipc index x class block) at a
time; forward hooks that keep each BN input and compute mean/var with a permute + view; augmentation with
torchvision transforms on the batch tensor from the global RNG and a roll from Python's `random`; a per-channel
clamp loop; the teacher's parameters keep requires_grad for DWA (so every backward also computes weight
gradients). Ours (recover.recover_group): the same `--units`, `--group` of them per forward with per-unit BN statistics
(each unit's gradient is that of a separate run), parameters frozen outside DWA's ascent, no gather
when every image is active, BN statistics from two staged means, one in-place clamp, channels_last (+ bf16 with
--amp in both, GPU).

Each variant runs in its own subprocess, alternating, so peak memory is its own: CUDA max_memory_allocated, or on
a CPU the growth of the peak resident set (VmHWM reset through /proc/self/clear_refs).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import recover as Rc  # noqa: E402
from networks import get_network  # noqa: E402
from utils.teacher import Teacher, freeze  # noqa: E402
from bench.memory import PeakMemory  # noqa: E402




class NaiveBNHook:
    """The references' hook: stores ||mean - mu|| + r_var ||var - sigma^2|| of the layer's input."""

    def __init__(self, module: nn.Module, r_var: float):
        self.r_var = r_var
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inp, out):
        x = inp[0]
        nch = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        self.r_feature = (torch.norm(module.running_mean.data - mean, 2)
                          + self.r_var * torch.norm(module.running_var.data - var, 2))


def naive_unit(net, cfg: Rc.RecoverConfig, teacher: Teacher, n_classes: int, device, amp: bool,
               x0: torch.Tensor | None = None) -> torch.Tensor:
    """One batch the reference way; returns the final images (x0: the initial images, else N(0, 1) noise)."""
    import torchvision.transforms as T
    R = teacher.resolution
    if cfg.method == "dwa":
        for p in net.parameters():
            p.requires_grad_(True)            # the reference never freezes DWA's teacher
    hooks = [NaiveBNHook(m, cfg.r_var) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    aug = T.Compose([T.RandomResizedCrop(R, scale=(cfg.crop_min, cfg.crop_max), antialias=False),
                     T.RandomHorizontalFlip()]) if cfg.rrc else None
    y = torch.arange(n_classes, device=device)
    x = (torch.randn(n_classes, teacher.channels, R, R, device=device) if x0 is None else x0.clone().to(device))
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
    mean, std = teacher.mean, teacher.std
    for t in range(cfg.iterations):
        for g in opt.param_groups:
            g["lr"] = 0.5 * (1 + math.cos(math.pi * t / cfg.iterations)) * cfg.lr
        xa = aug(x) if aug is not None else x
        if cfg.jitter:
            xa = torch.roll(xa, shifts=(random.randint(0, cfg.jitter), random.randint(0, cfg.jitter)), dims=(2, 3))
        if cfg.method == "dwa" and t == 0:
            for _ in range(cfg.dwa_steps):
                ce = F.cross_entropy(net(xa), y)
                grads = torch.autograd.grad(ce, [p for p in net.parameters()], retain_graph=True)
                norm = torch.norm(torch.stack([torch.norm(g) for g in grads]))
                with torch.no_grad():
                    for p, g in zip(net.parameters(), grads):
                        p.add_(g * (cfg.rho / cfg.dwa_steps) / (norm + 1e-12))
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(xa)
        loss = F.cross_entropy(out.float(), y)
        rescale = [cfg.first_bn_multiplier] + [1.0] * (len(hooks) - 1)
        loss = loss + cfg.r_bn * sum(h.r_feature * w for h, w in zip(hooks, rescale))
        loss.backward()
        opt.step()
        with torch.no_grad():
            for c in range(teacher.channels):
                m, s = mean[c], std[c]
                x[:, c] = torch.clamp(x[:, c], -m / s, (1 - m) / s)
    for h in hooks:
        h.handle.remove()
    if cfg.method == "dwa":
        for p in net.parameters():
            p.requires_grad_(False)
    return x.detach()


def setup(args, device) -> tuple[Teacher, Rc.RecoverConfig]:
    torch.manual_seed(0)
    net = get_network(args.arch, 3, args.classes, args.res)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(32, 3, args.res, args.res))
    teacher = Teacher(freeze(net).to(device), args.arch, "bench", args.classes, 3, args.res,
                      (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    cfg = Rc.RecoverConfig(method=args.method, iterations=args.iterations, lr=0.25, batch_size=args.batch,
                           r_bn=0.01, rrc=args.rrc, flip=args.rrc, jitter=4, init="noise", dwa_steps=args.dwa_steps,
                           rho=15e-3, r_var=11.0 if args.method == "dwa" else 1.0)
    return teacher, cfg


def worker(variant, args, queue):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher, cfg = setup(args, device)
    n = min(args.batch, args.classes)
    units = Rc.plan_units(cfg, args.classes, (0, args.units), (0, n), args.units)

    def run():
        if variant == "naive":
            for _ in units:
                naive_unit(teacher.net, cfg, teacher, n, device, args.amp)
        else:
            group = 1 if cfg.method == "dwa" else args.group
            for g in Rc.group_units(units, group):
                Rc.recover_group(g, cfg, teacher, None, device, amp=args.amp, channels_last=not args.no_channels_last)
        if device.type == "cuda":
            torch.cuda.synchronize()

    warm = replace_iterations(cfg, 2)
    cfg_saved, cfg = cfg, warm
    run()                                     # warm-up (allocator, kernels)
    cfg = cfg_saved
    meter = PeakMemory(device)
    meter.start()
    t0 = time.perf_counter()
    run()
    sec = time.perf_counter() - t0
    images = len(units) * n
    queue.put({"variant": variant, "seconds": sec, "images_per_sec": images / sec,
               "image_iterations_per_sec": images * cfg.iterations / sec, "peak_extra_mib": meter.extra_mib()})


def replace_iterations(cfg, iterations):
    from dataclasses import replace
    return replace(cfg, iterations=iterations)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="sre2l", choices=["sre2l", "dwa"])
    ap.add_argument("--arch", default="ConvNet-3-BN-w64")
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=100, help="classes per unit (B); capped at --classes")
    ap.add_argument("--units", type=int, default=10, help="units (ipc indices) recovered; ours groups them")
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--group", type=int, default=1, help="units per forward in ours (recover.py's CPU default 1; "
                    "its GPU default ~256 images)")
    ap.add_argument("--no-channels-last", action="store_true", help="ours without channels_last")
    ap.add_argument("--rrc", action="store_true", help="RandomResizedCrop + flip (ImageNet/Tiny settings)")
    ap.add_argument("--dwa-steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds of both variants")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast in both (GPU)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    ctx = mp.get_context("spawn")
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for v in ("naive", "ours"):
            q = ctx.Queue()
            p = ctx.Process(target=worker, args=(v, args, q))
            p.start()
            r = q.get()
            p.join()
            results.setdefault(v, []).append(r)
            print(f"{v:6s} {r['images_per_sec']:8.3f} images/s ({r['image_iterations_per_sec']:9.1f} image-iterations/s)"
                  f"  peak +{r['peak_extra_mib']:8.1f} MiB", flush=True)
    best = {v: max(r["images_per_sec"] for r in rs) for v, rs in results.items()}
    mem = {v: min(r["peak_extra_mib"] for r in rs) for v, rs in results.items()}
    summary = {"settings": vars(args) | {"json": None}, "images_per_sec": best, "peak_extra_mib": mem,
               "speedup": best["ours"] / best["naive"], "memory_ratio": mem["ours"] / max(mem["naive"], 1e-9)}
    print(f"ours: {summary['speedup']:.2f}x the naive loop's images/s; peak memory {summary['memory_ratio']:.2f}x "
          "the naive loop's")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
