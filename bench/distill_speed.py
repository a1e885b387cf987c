"""Seconds per outer iteration and peak memory of distill.py's unroll against a faithful naive unroll (the
reference's structure), at identical settings, in one run. Prints the ratios.

    python bench/distill_speed.py                                   # SPEED, CIFAR-10 IPC 10 shapes, syn_steps 40
    python bench/distill_speed.py --method mtt --batch-syn 100 --syn-steps 30
    python bench/distill_speed.py --device cuda --batch-syn 128 --amp

What the naive unroll does, like the reference (speed.md §3.6-3.8): the student is the module whose parameters are
re-bound to views of the flat vector on every call (torch.func.functional_call, the reference's reparametrised
module); every step re-decodes its minibatch from the dense codes with FReeNet, recomputing the head-wise code
products in every block as the original does; the whole unroll stays in the graph. Ours (distill.py): the
flat-parameter functional ConvNet (networks/functional.py), every touched image decoded once per iteration with
the codes computed once, and optionally `--checkpoint-unroll` (per-step recomputation in the backward pass).
The student's convolutions are the same FLOPs in every variant, so on a CPU the time ratio is bounded by what the
naive unroll wastes around them; the memory ratio of checkpointing grows with syn_steps.

Each variant runs in its own subprocess, alternating, so peak memory is its own: CUDA max_memory_allocated, or on a
CPU the growth of the peak resident set over the measured iterations (VmHWM reset through /proc/self/clear_refs).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import distill as D  # noqa: E402
from networks import get_network  # noqa: E402
from networks.functional import flatten_params  # noqa: E402
from utils.datasets import get_dataset_spec  # noqa: E402
from utils.dsa import DSA  # noqa: E402
from bench.memory import PeakMemory  # noqa: E402




def naive_decode(freenet, saet, scm_rows):
    """The original decode: the head-wise code products are recomputed inside every block (speed.md §3.2)."""
    x = None
    for block in freenet.decoder_blocks:
        z = freenet.codes(saet, scm_rows)
        x = block(x, z)
    return freenet.unpatchify(freenet.decoder_pred(x))


def naive_loss(net, params, u: D.Unroll, rows: list[torch.Tensor], alpha, method: str):
    """The reference unroll: re-bound module, per-step decode (SPEED) or indexing (MTT), graph kept throughout."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    student_params = [u.start.clone().requires_grad_(True)]
    mom = torch.zeros_like(u.start)
    for t, idx in enumerate(rows):
        if method == "speed":
            x = naive_decode(params.freenet, params.saet, params.scm[idx])
        else:
            x = params.images[idx]
        if u.plans[t] is not None:
            x = u.dsa.apply(x, u.plans[t])
        flat = student_params[-1]
        weights = {n: v.view(s) for n, v, s in zip(names, flat.split(sizes), shapes)}
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=u.amp.enabled):
            out = torch.func.functional_call(net, weights, (x,))
        ce = F.cross_entropy(out.float(), u.labels[t])
        grad = torch.autograd.grad(ce, student_params[-1], create_graph=True)[0]
        new, mom = u.update(student_params[-1], mom, grad, alpha)
        student_params.append(new)
    return D.parameter_distance(student_params[-1], u.start, u.target)


def setup(args, device):
    spec = get_dataset_spec("CIFAR10")
    model = f"ConvNet-3-w{args.width}"
    cfg = D.resolve_config(args.method, spec, args.ipc, dict(model=model, syn_steps=args.syn_steps,
                                                              batch_syn=args.batch_syn, amp=args.amp or None))
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if args.method == "speed":
        params = D.SpeedCode(cfg, spec, device, gen)
    else:
        params = D.PixelImages(cfg, spec, device, torch.randn(D.num_images(cfg, spec), 3, 32, 32, generator=gen))
    net = get_network(model, 3, 10, 32).to(device)
    start = flatten_params(net).to(device)
    target = start + 0.01 * torch.randn(start.shape, generator=gen).to(device)
    return spec, cfg, params, net, start, target, gen


def one_iteration(variant, spec, cfg, params, net, start, target, gen, device):
    n = D.num_images(cfg, spec)
    labels = torch.arange(10).repeat_interleave(n // 10)
    student = D.FlatNet(net)
    dsa = DSA()
    u, used = D.plan_unroll(student, start, target, labels, n, cfg, dsa, gen, (32, 32), device)
    alpha = torch.tensor(0.01, device=device, requires_grad=True)
    if variant == "naive":
        rows = [used[b] for b in u.batches]          # global row indices, decoded per step
        match = naive_loss(net, params, u, rows, alpha, cfg.method)
    else:
        fn = D.checkpointed_loss if variant == "ours-ckpt" else D.unrolled_loss
        match = fn(u, params.decode(used), alpha)
    loss = match + params.regularizer()
    for o in params.optimizers:
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o in params.optimizers:
        o.step()
    return float(match.detach())


def worker(variant, args, queue):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec, cfg, params, net, start, target, gen = setup(args, device)
    one_iteration(variant, spec, cfg, params, net, start, target, gen, device)  # warm-up
    meter = PeakMemory(device)
    meter.start()
    times, losses = [], []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        losses.append(one_iteration(variant, spec, cfg, params, net, start, target, gen, device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    queue.put({"variant": variant, "sec_per_iter": min(times), "times": times,
               "peak_extra_mib": meter.extra_mib(), "loss": losses[0]})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="speed", choices=["speed", "mtt"])
    ap.add_argument("--ipc", type=int, default=10, help="the SPEED/MTT preset row of CIFAR-10 to take shapes from")
    ap.add_argument("--syn-steps", type=int, default=40)
    ap.add_argument("--batch-syn", type=int, default=32)
    ap.add_argument("--width", type=int, default=128, help="ConvNet-3 width (128 = the papers')")
    ap.add_argument("--iters", type=int, default=2, help="measured iterations per variant (after one warm-up)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating rounds of all variants")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast in both (GPU)")
    ap.add_argument("--variants", default="naive,ours,ours-ckpt")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    # glibc keeps freed large blocks mapped (its mmap threshold grows after frees), which would hide a process's
    # peak behind memory retained from the warm-up; a fixed threshold makes RSS follow live tensors.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    ctx = mp.get_context("spawn")
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for v in args.variants.split(","):
            q = ctx.Queue()
            p = ctx.Process(target=worker, args=(v, args, q))
            p.start()
            r = q.get()
            p.join()
            results.setdefault(v, []).append(r)
            print(f"{v:10s} {r['sec_per_iter']:7.2f} s/iter  peak +{r['peak_extra_mib']:8.1f} MiB  loss {r['loss']:.5f}",
                  flush=True)
    best = {v: min(r["sec_per_iter"] for r in rs) for v, rs in results.items()}
    mem = {v: min(r["peak_extra_mib"] for r in rs) for v, rs in results.items()}
    summary = {"settings": vars(args) | {"json": None}, "sec_per_iter": best, "peak_extra_mib": mem}
    if "naive" in best:
        for v in best:
            if v != "naive":
                summary[f"speedup_{v}"] = best["naive"] / best[v]
                summary[f"memory_ratio_{v}"] = mem["naive"] / max(mem[v], 1e-9)
                print(f"{v}: {summary[f'speedup_{v}']:.2f}x faster, {summary[f'memory_ratio_{v}']:.2f}x less peak "
                      "memory than naive")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
