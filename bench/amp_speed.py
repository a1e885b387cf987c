"""bf16 (or fp16) over fp32 for one stage's own hot loop, alternated in one process, per iteration.

    python bench/amp_speed.py --stage condense                  # IDC, Fashion-MNIST shapes, ipc 1, f 2, CPU scale
    python bench/amp_speed.py --stage distill --rounds 3        # SPEED unroll, CIFAR-10 shapes, syn_steps 20
    python bench/amp_speed.py --stage recover                   # SRe2L/DWA pixel step on a ResNet-18 teacher
    python bench/amp_speed.py --stage train                     # network training step (buffer/validate/squeeze)
    python bench/amp_speed.py --stage condense --device cuda --mode bf16

Each round runs `--iters` timed iterations of fp32 then of the low-precision mode (after one warm-up iteration of
each), on fake data of the real shapes, with the stage's own functions (condense.condense, distill.unrolled_loss,
recover.recover_group, utils.train.train_network): only `--amp` differs. The per-iteration ratio is the median over
rounds of (fp32 median / amp median). The last line is `speedup X.XX`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from networks import get_network  # noqa: E402
from utils.amp import resolve_amp  # noqa: E402
from utils.datasets import get_dataset_spec  # noqa: E402
from utils.misc import RunLog  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def fake_images(spec, per_class: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = spec.num_classes * per_class
    x = torch.randint(0, 256, (n, spec.channels, spec.resolution, spec.resolution), generator=g, dtype=torch.uint8)
    return x, torch.arange(spec.num_classes).repeat_interleave(per_class)


def condense_step(args, device, amp):
    """One IDC inner iteration (all classes' matching + the network update) = one outer iteration of
    condense.condense with inner_loop 1 and no re-initialisation, so `seconds` in its history is exactly that."""
    import condense as C
    spec = get_dataset_spec(args.dataset or "FashionMNIST")
    cfg = replace(C.resolve_config(spec.name, args.ipc, args.factor, False, True, {}), inner_loop=1, outer=1,
                  fix_iter=10 ** 9, init="noise", amp=amp.mode, seed=0, batch_real=args.batch_real,
                  n_data=args.n_data)
    images, labels = fake_images(spec, args.per_class)
    images, labels = images.to(device), labels.to(device)
    state = [None]

    def step():
        nonlocal cfg
        st = state[0]
        cfg = replace(cfg, outer=(st.it if st is not None else 0) + 1)
        state[0] = C.condense(cfg, spec, images, labels, device, RunLog(None, quiet=True), state=st)
        _sync(device)
    return step


def distill_step(args, device, amp):
    """One SPEED outer iteration: decode the touched images, unroll syn_steps student steps, backward, step."""
    import distill as D
    from networks.functional import flatten_params
    from utils.dsa import DSA
    spec = get_dataset_spec(args.dataset or "CIFAR10")
    # --checkpoint-unroll by default: the plain unroll of CIFAR-10 IPC 10 holds ~11 GiB per side on a CPU
    cfg = D.resolve_config("speed", spec, args.ipc, dict(syn_steps=args.syn_steps, amp=amp.mode,
                                                         checkpoint_unroll=args.checkpoint_unroll or None))
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    params = D.SpeedCode(cfg, spec, device, gen)
    net = get_network(cfg.model, spec.channels, spec.num_classes, spec.resolution).to(device)
    start = flatten_params(net).to(device)
    target = start + 0.01 * torch.randn(start.shape, generator=gen).to(device)
    n = D.num_images(cfg, spec)
    labels = torch.arange(spec.num_classes).repeat_interleave(n // spec.num_classes)
    student = D.FlatNet(net)

    def step():
        u, used = D.plan_unroll(student, start, target, labels, n, cfg, DSA(), gen, (spec.resolution,) * 2, device)
        alpha = torch.tensor(0.01, device=device, requires_grad=True)
        unroll = D.checkpointed_loss if cfg.checkpoint_unroll else D.unrolled_loss
        loss = unroll(u, params.decode(used), alpha) + params.regularizer()
        for o in params.optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in params.optimizers:
            o.step()
        _sync(device)
    return step


def recover_step(args, device, amp):
    """`--recover-iters` pixel iterations of recover.recover_group on a randomly initialised, BN-warmed teacher."""
    import recover as R
    from utils.teacher import Teacher, freeze
    torch.manual_seed(0)
    classes, res = args.classes, args.res
    net = get_network(args.arch, 3, classes, res)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(32, 3, res, res))
    teacher = Teacher(freeze(net).to(device), args.arch, "bench", classes, 3, res, (0.4914, 0.4822, 0.4465),
                      (0.2023, 0.1994, 0.2010))
    cfg = R.RecoverConfig(method=args.method, iterations=args.recover_iters, lr=0.25, batch_size=args.batch,
                          r_bn=0.01, jitter=4, init="noise", dwa_steps=12, rho=15e-3,
                          r_var=11.0 if args.method == "dwa" else 1.0)
    units = R.plan_units(cfg, classes, (0, 1), (0, min(args.batch, classes)), 1)

    def step():
        R.recover_group(units, cfg, teacher, None, device, amp=amp, channels_last=True)
        _sync(device)
    return step


def train_step(args, device, amp):
    """One epoch of utils.train.train_network (the loop of buffer.py experts and validate.py) on a fake set."""
    from utils.train import TrainRecipe, train_network
    spec = get_dataset_spec(args.dataset or "CIFAR10")
    images, labels = fake_images(spec, args.per_class)
    x = images.float().div(255)
    net = get_network("ConvNet-3", spec.channels, spec.num_classes, spec.resolution)
    gen = torch.Generator().manual_seed(0)
    recipe = TrainRecipe(epochs=1, batch_size=256, amp=amp)

    def step():
        train_network(net, x, labels, recipe, gen, device)
        _sync(device)
    return step


STAGES = {"condense": condense_step, "distill": distill_step, "recover": recover_step, "train": train_step}


def time_it(step, iters: int, device: torch.device) -> tuple[list[float], float | None]:
    """Seconds of each call and the peak GPU memory (MiB) over them (None on a CPU: one process holds both
    sides, so its RSS is not either side's own; bench/vs_original.py measures CPU memory per process)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return out, peak


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=sorted(STAGES), required=True)
    p.add_argument("--mode", default="bf16", choices=["bf16", "fp16"], help="the low precision to compare")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=3, help="timed iterations per side per round")
    p.add_argument("--rounds", type=int, default=2, help="fp32/amp alternations")
    p.add_argument("--dataset", default=None, help="shapes (default: FashionMNIST for condense, else CIFAR10)")
    p.add_argument("--ipc", type=int, default=None)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--per-class", type=int, default=100, help="fake real images per class")
    p.add_argument("--batch-real", type=int, default=16, help="condense: real images per class per matching step "
                   "(16: docs/RESULTS.md's CPU scale; the paper 64)")
    p.add_argument("--n-data", type=int, default=64, help="condense: real samples per network update (CPU scale 64)")
    p.add_argument("--syn-steps", type=int, default=20)
    p.add_argument("--no-checkpoint-unroll", dest="checkpoint_unroll", action="store_false",
                   help="distill: keep the whole unroll's graph (memory grows with syn_steps)")
    p.add_argument("--arch", default="ResNet-18")
    p.add_argument("--res", type=int, default=32, help="recover: teacher input size")
    p.add_argument("--classes", type=int, default=10, help="recover: teacher classes")
    p.add_argument("--method", default="sre2l", help="recover: sre2l or dwa")
    p.add_argument("--batch", type=int, default=10, help="recover: images per unit")
    p.add_argument("--recover-iters", type=int, default=5, help="recover: pixel iterations per timed call")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.ipc is None:
        args.ipc = 1 if args.stage == "condense" else 10
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    low = resolve_amp(args.mode, device)
    off = resolve_amp("off", device)
    steps = {"off": STAGES[args.stage](args, device, off), low.mode: STAGES[args.stage](args, device, low)}
    for s in steps.values():
        s()   # warm-up: allocator, oneDNN/cuDNN kernel choice
    times = {k: [] for k in steps}
    peaks = {k: [] for k in steps}
    ratios = []
    for _ in range(args.rounds):
        med = {}
        for k, s in steps.items():
            t, peak = time_it(s, args.iters, device)
            times[k].append(t)
            peaks[k].append(peak)
            med[k] = float(np.median(t))
        ratios.append(med["off"] / med[low.mode])
    speedup = float(np.median(ratios))
    print(f"settings: {vars(args)}, torch threads {torch.get_num_threads()}")
    summary = {}
    for k in steps:
        flat = [v for r in times[k] for v in r]
        peak = max(peaks[k]) if peaks[k][0] is not None else None
        summary[k] = {"sec_per_it": float(np.median(flat)), "peak_mib": peak}
        mem = f", peak {peak:.0f} MiB" if peak is not None else ""
        print(f"{args.stage} {k:4s}: {np.median(flat):.4f} s / iteration (median of {len(flat)}){mem}")
    print(f"per-round ratios fp32/{low.mode}: " + ", ".join(f"{r:.2f}" for r in ratios))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": str(device), "times": times,
                                               "summary": summary, "ratios": ratios, "speedup": speedup}, indent=2))
    print(f"speedup {speedup:.2f}")
    return speedup


if __name__ == "__main__":
    main()
