"""Seconds per inner iteration and peak memory of condense.py's IDC loop against a faithful naive per-class loop
(the reference code's structure), at identical settings, in one run. Prints the ratio.

    python bench/condense_speed.py                       # CIFAR-10 shapes, ConvNet-3, ipc 10, f 2, paper batches
    python bench/condense_speed.py --ipc 1 --inner 3 --device cuda

What the naive loop does, like IDC's condense.py (idc_dream.md §2.2, §2.3, §9.2): the training set is a Python list
of per-image float tensors and every batch is a `torch.stack` of it; for each class it decodes, subsamples, augments
real+synthetic with one shared draw, takes the real gradient of ALL parameters, the synthetic gradient of ALL
parameters with create_graph, keeps the conv kernels for the loss, calls `loss.backward()` (which also fills the
network's .grad with second-order terms) and steps one SGD(momentum) over the whole synthetic tensor. The network
update stacks its batches the same way. Ours (condense.condense): uint8 data on the device indexed in one go, only
the conv-kernel gradients, the gradient with respect to the class's stored images only, and the closed-form shared
momentum step (exactly the reference's optimiser dynamics). Both use the same DSA/CutMix code and the same FLOPs in
the convolutions, so on a CPU the gain is bounded by the work the naive loop wastes.

Each implementation runs in its own subprocess so that peak RSS (CPU) / peak allocated memory (CUDA) is its own.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import condense as C  # noqa: E402
from networks import get_network  # noqa: E402
from utils.datasets import get_dataset_spec, normalize  # noqa: E402
from utils.dsa import DSA, DSAParams  # noqa: E402
from utils.formation import decode_single  # noqa: E402
from utils.misc import RunLog  # noqa: E402
from utils.train import maybe_cutmix, mixed_cross_entropy  # noqa: E402


def fake_data(spec, per_class: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = spec.num_classes * per_class
    images = torch.randint(0, 256, (n, spec.channels, spec.resolution, spec.resolution), generator=g,
                           dtype=torch.uint8)
    labels = torch.arange(spec.num_classes).repeat_interleave(per_class)
    return images, labels


def naive_inner_iterations(cfg, spec, images, labels, device, iterations: int) -> list[float]:
    """The reference's loop structure, one outer iteration of `iterations` inner iterations; seconds per inner."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    data = [img.float().div(255) for img in images]           # a Python list of per-image tensors
    targets = labels.tolist()
    cls_idx = [[i for i, t in enumerate(targets) if t == c] for c in range(spec.num_classes)]
    net = get_network(cfg.net, spec.channels, spec.num_classes, spec.resolution).to(device)
    opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    S = torch.rand(spec.num_classes * cfg.ipc, spec.channels, spec.resolution, spec.resolution, device=device,
                   requires_grad=True)
    opt_img = torch.optim.SGD([S], lr=C.effective_lr_img(cfg.lr_img, cfg.ipc, spec), momentum=cfg.mom_img)
    aug = DSA(cfg.aug_type, mode="idc", params=DSAParams(align_corners=False))
    aug_net = DSA("_".join(a for a in cfg.aug_type.split("_") if a != "cutout"), mode="idc",
                  params=DSAParams(align_corners=False))
    gen = torch.Generator().manual_seed(cfg.seed)
    times = []
    for _ in range(iterations):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for c in range(spec.num_classes):
            pick = np.random.permutation(cls_idx[c])[:cfg.batch_real]
            img_real = torch.stack([data[i] for i in pick]).to(device)
            lab_real = torch.full((len(pick),), c, device=device)
            img_syn = decode_single(S[c * cfg.ipc:(c + 1) * cfg.ipc], cfg.factor)
            if len(img_syn) > cfg.batch_syn_max:
                img_syn = img_syn[np.random.permutation(len(img_syn))[:cfg.batch_syn_max]]
            lab_syn = torch.full((len(img_syn),), c, device=device)
            both = normalize(torch.cat([img_real, img_syn]), spec.mean, spec.std)
            both = aug.apply(both, aug.sample(1, spec.resolution, spec.resolution, gen, siamese=True, device=device))
            xr, xs = both[:len(pick)], both[len(pick):]
            g_real = torch.autograd.grad(F.cross_entropy(net(xr), lab_real), list(net.parameters()))
            g_real = [g.detach() for g in g_real]
            g_syn = torch.autograd.grad(F.cross_entropy(net(xs), lab_syn), list(net.parameters()), create_graph=True)
            loss = sum(C.tensor_distance(a, b, cfg.metric) for a, b in zip(g_real, g_syn) if a.dim() == 4)
            opt_img.zero_grad()
            loss.backward()
            opt_img.step()
        seen = 0
        while seen < cfg.n_data:
            pick = np.random.randint(0, len(data), cfg.batch_real)
            x = torch.stack([data[i] for i in pick]).to(device)
            y = torch.tensor([targets[i] for i in pick], device=device)
            x = aug_net(normalize(x, spec.mean, spec.std), generator=gen)
            x, y1, y2, r = maybe_cutmix(x, y, cfg.mix_p, cfg.beta, gen)
            opt_net.zero_grad()
            mixed_cross_entropy(net(x), y1, y2, r).backward()
            opt_net.step()
            seen += len(pick)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def ours_inner_iterations(cfg, spec, images, labels, device, iterations: int) -> list[float]:
    """condense.condense itself; one outer iteration per measured inner iteration (re-initialisation excluded)."""
    cfg = replace(cfg, inner_loop=1, outer=iterations, fix_iter=10 ** 9, init="noise")
    st = C.condense(cfg, spec, images.to(device), labels.to(device), device, RunLog(None, quiet=True))
    return [h["seconds"] for h in st.history]


def breakdown(cfg, spec, images, labels, device, repeats: int = 2) -> dict:
    """Seconds per inner iteration spent in each part of ours: the real gradients alone, the whole matching step
    (real + synthetic double backward), and the network update: where the time goes."""
    net = get_network(cfg.net, spec.channels, spec.num_classes, spec.resolution).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    params = C.matched_params(net)
    gen = torch.Generator().manual_seed(0)
    S = torch.rand(spec.num_classes * cfg.ipc, spec.channels, spec.resolution, spec.resolution, device=device)
    dsa = DSA(cfg.aug_type, mode="idc", params=DSAParams(align_corners=False))
    stream = C.SetStream(len(labels), cfg.batch_real)
    images, labels = images.to(device), labels.to(device)
    real = [images[labels == c][:cfg.batch_real].float() / 255 for c in range(spec.num_classes)]

    def real_only():
        for c in range(spec.num_classes):
            C.class_gradient(net, params, normalize(real[c], spec.mean, spec.std), c)

    def matching():
        for c in range(spec.num_classes):
            C.class_match_grad(net, params, real[c], S[c * cfg.ipc:(c + 1) * cfg.ipc], c, cfg, spec, dsa, gen)

    def update():
        C.network_update(net, opt, images, labels, stream, cfg.n_data, spec, dsa, cfg, gen)

    out = {}
    for name, fn in (("real_gradients", real_only), ("matching_step", matching), ("network_update", update)):
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = (time.perf_counter() - t0) / repeats
    return out


def worker(name, args, queue):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = get_dataset_spec(args.dataset)
    spec = replace(spec, class_names=tuple(str(i) for i in range(spec.num_classes)))
    cfg = replace(C.resolve_config(spec.name, args.ipc, args.factor, False, True, {}), net=args.net,
                  batch_real=args.batch_real, n_data=args.n_data, seed=0)
    images, labels = fake_data(spec, args.per_class)
    if name == "breakdown":
        queue.put(breakdown(cfg, spec, images, labels, device))
        return
    fn = naive_inner_iterations if name == "naive" else ours_inner_iterations
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.profile:   # operator table, to show both implementations run the same convolution work
        from torch.profiler import profile
        with profile() as prof:
            times = fn(cfg, spec, images, labels, device, args.inner + 1)[1:]
        print(f"--- {name}: top operators\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8),
              flush=True)
    else:
        times = fn(cfg, spec, images, labels, device, args.inner + 1)[1:]   # drop the warm-up iteration
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    queue.put({"impl": name, "sec_per_inner": float(np.median(times)), "times": times, "peak_mib": peak})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="CIFAR10")
    p.add_argument("--net", default="ConvNet-3")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--batch-real", type=int, default=64)
    p.add_argument("--n-data", type=int, default=500)
    p.add_argument("--per-class", type=int, default=200, help="fake real images per class")
    p.add_argument("--inner", type=int, default=3, help="measured inner iterations (after one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternate naive/ours this many times")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--breakdown", action="store_true", help="also time the parts of one inner iteration of ours")
    p.add_argument("--profile", action="store_true", help="print each implementation's top operators (slower)")
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    results = {"naive": [], "ours": []}
    for _ in range(args.rounds):           # interleaved, so machine noise hits both alike
        for name in ("naive", "ours"):
            q = ctx.Queue()
            proc = ctx.Process(target=worker, args=(name, args, q))
            proc.start()
            results[name].append(q.get())
            proc.join()
    naive = float(np.median([r["sec_per_inner"] for r in results["naive"]]))
    ours = float(np.median([r["sec_per_inner"] for r in results["ours"]]))
    mem_n = max(r["peak_mib"] for r in results["naive"])
    mem_o = max(r["peak_mib"] for r in results["ours"])
    print(f"settings: {vars(args)}")
    print(f"naive per-class loop : {naive:8.3f} s / inner iteration, peak {mem_n:8.1f} MiB")
    print(f"condense.py          : {ours:8.3f} s / inner iteration, peak {mem_o:8.1f} MiB")
    print(f"speed-up (naive/ours): {naive / ours:.2f}x   memory ratio (naive/ours): {mem_n / mem_o:.2f}x")
    parts = None
    if args.breakdown:
        q = ctx.Queue()
        proc = ctx.Process(target=worker, args=("breakdown", args, q))
        proc.start()
        parts = q.get()
        proc.join()
        print("breakdown of ours (s / inner iteration): " +
              ", ".join(f"{k} {v:.3f}" for k, v in parts.items()) +
              f"  (synthetic double backward ~ matching_step - real_gradients = "
              f"{parts['matching_step'] - parts['real_gradients']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "naive": results["naive"], "ours": results["ours"],
                                               "speedup": naive / ours, "memory_ratio": mem_n / mem_o,
                                               "breakdown": parts}, indent=2))


if __name__ == "__main__":
    main()
