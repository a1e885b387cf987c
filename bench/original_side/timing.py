"""Adapter run INSIDE an original checkout by bench/original_runner.py for bench/vs_original.py: times the
original's own loop, unmodified, by observing calls it already makes.

Imports only torch, numpy, the standard library and the original's own modules (never this repository). The
original's requirements (IDC: matplotlib, efficientnet_pytorch) must be importable in the subprocess (PYTHONPATH).
Two shims that change no value, for the CPU: `np.int` (removed in numpy 1.24, used by IDC's CutMix box) is set to
`int`, and DiffAug's output is copied into the standard layout (its crop's permute leaves one-channel images with
strides that also read as channels-last, which `.contiguous()` keeps; the ConvNet's final `view` then fails on a CPU).
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_shims() -> None:
    if not hasattr(np, "int"):
        np.int = int
    from misc.augment import DiffAug
    if getattr(DiffAug.__call__, "_ddt_contiguous", False):
        return
    call = DiffAug.__call__

    def contiguous_call(self, x, *a, **k):
        return call(self, x, *a, **k).clone(memory_format=torch.contiguous_format)
    contiguous_call._ddt_contiguous = True
    DiffAug.__call__ = contiguous_call


class _Done(Exception):
    pass


def idc_inner_seconds(root: Path, payload: dict) -> dict:
    """Seconds per inner iteration of IDC's condense() (the original's loop, loader, augmentation and network),
    with its command line `argv`. The loop builds a new network at the start of every outer iteration (fix_iter 1):
    those calls are timestamped, and the run stops when outer iteration `outer` + 1 would begin. Outer iteration 0
    (warm-up) is dropped; each later outer iteration is divided by its inner_loop."""
    sys.argv = ["condense.py"] + list(payload["argv"])
    _cpu_shims()
    import argument
    args = argument.args
    save = Path(payload["save_dir"])
    save.mkdir(parents=True, exist_ok=True)
    args.save_dir, args.workers = str(save), 0
    np.random.seed(int(payload["seed"]))
    torch.manual_seed(int(payload["seed"]))
    import condense
    from misc.utils import Logger
    define_model, stamps, outer = condense.define_model, [], int(payload["outer"])

    def timed_define_model(*a, **k):
        stamps.append(time.perf_counter())
        if len(stamps) == outer + 1:
            raise _Done()
        return define_model(*a, **k)
    condense.define_model = timed_define_model
    try:
        condense.condense(args, Logger(str(save)), device="cpu")
    except _Done:
        pass
    per_outer = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"seconds_per_inner": [s / args.inner_loop for s in per_outer[1:]], "peak_rss_mib": _peak_rss_mib(),
            "threads": torch.get_num_threads()}
