"""Seconds per iteration and peak memory of the ORIGINAL implementation against this toolkit, alternated in one run,
identical settings, fixed threads; plus the toolkit loop's achieved FLOP/s against this machine's GEMM peak measured
in the same run.

    python bench/vs_original.py --method idc --original /work/originals/Efficient-Dataset-Condensation \
        --data-dir /tmp/data --original-deps /tmp/origdeps --rounds 2 --outer 2 --threads 1 [--amp bf16]

The original runs in its own subprocess through bench/original_runner.py (its checkout untouched, CUDA redirected to
the CPU in-process) with the adapter bench/original_side/timing.py, which timestamps calls the original's loop
already makes. The toolkit runs in its own spawned process, so each side's peak RSS is its own. `--amp` applies to
the toolkit only (the original has no such mode): the ratio is then "original fp32 / toolkit bf16".

Methods: idc (IDC's inner iteration: 10 class-matching steps + the network update, Fashion-MNIST, IPC 1, f 2, the
CPU-scale batches of docs/RESULTS.md). DREAM, SPEED and DWA are not wired yet (see docs/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.original_runner import check_original, original_commit, run_original  # noqa: E402


def gemm_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` GFLOP/s of an n x n matrix product on the current thread count: the machine's GEMM peak
    as this process sees it (the reference for the hot loop's achieved FLOP/s)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


# ---------------------------------------------------------------------------------------------- IDC

def idc_settings(args) -> dict:
    return dict(ipc=args.ipc, factor=2, batch_real=16, n_data=64, inner_loop=args.inner, seed=0)


def idc_original(args) -> dict:
    s = idc_settings(args)
    niter = -(-50 * s["inner_loop"] // 100)   # the original divides by n_iter // 50: keep n_iter >= 50
    argv = ["-d", "fashion", "--ipc", str(s["ipc"]), "-f", str(s["factor"]), "--data_dir", str(args.data_dir),
            "--inner_loop", str(s["inner_loop"]), "--niter", str(niter), "--batch_real", str(s["batch_real"]),
            "--n_data", str(s["n_data"]), "--seed", str(s["seed"]), "--test"]
    out = run_original(args.original, "bench/original_side/timing.py", "idc_inner_seconds",
                       {"argv": argv, "save_dir": str(Path(args.work) / "orig_idc"), "seed": s["seed"],
                        "outer": args.outer + 1}, threads=args.threads)
    return {"sec": out["seconds_per_inner"], "peak_rss_mib": float(out["peak_rss_mib"])}


def idc_ours(args, queue) -> None:
    torch.set_num_threads(args.threads)
    import condense as C
    from utils.datasets import load_split
    from utils.misc import RunLog
    s = idc_settings(args)
    split, spec = load_split("FashionMNIST", args.data_dir, "train", progress=False)
    cfg = replace(C.resolve_config("FashionMNIST", s["ipc"], s["factor"], False, True, {}),
                  batch_real=s["batch_real"], n_data=s["n_data"], inner_loop=s["inner_loop"], outer=args.outer + 1,
                  seed=s["seed"], amp=args.amp)
    st = C.condense(cfg, spec, split.images, split.labels, torch.device("cpu"), RunLog(None, quiet=True))
    sec = [h["seconds"] / cfg.inner_loop for h in st.history[1:]]
    flops = None
    if args.flops:   # one more inner iteration under the FLOP counter (convolutions and matrix products, fwd + bwd)
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc:
            C.condense(replace(cfg, outer=st.it + 1, inner_loop=1), spec, split.images, split.labels,
                       torch.device("cpu"), RunLog(None, quiet=True), state=st)
        flops = fc.get_total_flops()
    queue.put({"sec": sec, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "flops_per_inner": flops})


METHODS = {"idc": (idc_original, idc_ours)}
NOT_WIRED = {"dream": "DREAM's clustering round", "speed": "SPEED's outer iteration", "dwa": "DWA's recover step"}


def _spawn(target, args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", required=True, choices=sorted([*METHODS, *NOT_WIRED]))
    p.add_argument("--original", required=True, type=Path, help="checkout of the method's original repository")
    p.add_argument("--data-dir", required=True, type=Path, help="dataset folder both sides read (IDC: holding "
                   "FashionMNIST/raw/*.gz, the layout torchvision and the toolkit both read)")
    p.add_argument("--original-deps", default=None, help="folder with the original's own requirements (put on its "
                   "PYTHONPATH), e.g. made with pip install --target")
    p.add_argument("--work", default="/tmp/vs_original", help="scratch folder for the original's outputs")
    p.add_argument("--rounds", type=int, default=2, help="original/toolkit alternations")
    p.add_argument("--outer", type=int, default=2, help="measured outer iterations per side per round (after one)")
    p.add_argument("--inner", type=int, default=5, help="inner iterations per outer iteration")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--amp", default="off", choices=["off", "bf16"], help="the toolkit's --amp")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.method in NOT_WIRED:
        print(f"error: --method {args.method}: {NOT_WIRED[args.method]} is not wired into this bench yet", file=sys.stderr)
        raise SystemExit(2)
    if args.original_deps:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [args.original_deps, os.environ.get("PYTHONPATH")]))
    args.original = check_original(args.original, "condense.py")
    torch.set_num_threads(args.threads)
    peak = {"fp32": gemm_peak_gflops(torch.float32), "bf16": gemm_peak_gflops(torch.bfloat16)}
    original_fn, ours_fn = METHODS[args.method]
    runs = {"original": [], "ours": []}
    for _ in range(args.rounds):   # alternated, so machine noise hits both alike
        runs["original"].append(original_fn(args))
        runs["ours"].append(_spawn(ours_fn, args))
    med = {k: float(np.median([s for r in v for s in r["sec"]])) for k, v in runs.items()}
    mem = {k: max(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
    pairs = [float(np.median(o["sec"]) / np.median(t["sec"])) for o, t in zip(runs["original"], runs["ours"])]
    flops = next((r["flops_per_inner"] for r in runs["ours"] if r.get("flops_per_inner")), None)
    achieved = flops / med["ours"] / 1e9 if flops else None
    ref = peak["bf16" if args.amp == "bf16" else "fp32"]
    print(f"settings: {vars(args)} | torch {torch.__version__}, original at {original_commit(args.original)[:12]}")
    print(f"GEMM peak ({args.threads} thread(s), 1024^3 matmul): fp32 {peak['fp32']:.1f} GFLOP/s, "
          f"bf16 {peak['bf16']:.1f} GFLOP/s")
    print(f"original : {med['original']:.3f} s / inner iteration, peak RSS {mem['original']:.0f} MiB")
    print(f"toolkit  : {med['ours']:.3f} s / inner iteration, peak RSS {mem['ours']:.0f} MiB (--amp {args.amp})")
    if achieved:
        print(f"toolkit hot loop: {flops / 1e9:.2f} GFLOP per inner iteration -> {achieved:.1f} GFLOP/s = "
              f"{100 * achieved / ref:.0f} % of the {'bf16' if args.amp == 'bf16' else 'fp32'} GEMM peak")
    print(f"per-round ratios original/toolkit: {', '.join(f'{r:.2f}' for r in pairs)}; memory ratio "
          f"{mem['original'] / mem['ours']:.2f}")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "median_sec": med, "peak_rss_mib": mem,
              "pair_ratios": pairs, "speedup": float(np.median(pairs)), "gemm_peak_gflops": peak,
              "flops_per_inner": flops, "achieved_gflops": achieved}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"speedup {result['speedup']:.2f}")
    return result


if __name__ == "__main__":
    main()
