"""Run the ORIGINAL IDC (or DREAM) condensation loop on this CPU and leave its data.pt where validate.py reads it.

    python bench/idc_original_condense.py --original /path/to/Efficient-Dataset-Condensation \
        --dataset fashion --data-dir /tmp/fmnist-tv --ipc 1 --factor 2 --inner-loop 50 --outer-iterations 1 \
        --out runs/idc_original_fmnist
    python validate.py --syn runs/idc_original_fmnist --dataset FashionMNIST --factor 2 --preset idc ...

The original's condense() runs in a subprocess over the checkout (bench/original_runner.py: CUDA redirected to
the CPU, nothing edited) with the original's argparse defaults plus the flags given here; its in-loop 1000-epoch
evaluations are skipped (--test). `--data-dir` must be laid out as its torchvision loader wants
(<dir>/FashionMNIST/raw/train-images-idx3-ubyte, ...). `--outer-iterations K` ends the loop after K outer
iterations (the original itself only saves at n_iter/10, /5, /2 and n_iter, with n_iter >= 50); the saved
data.pt ([stored images, labels], pixel space, not clamped) is the original's format, which validate.py reads
with --factor. The original's own requirements (matplotlib, efficientnet_pytorch) must be importable
(PYTHONPATH).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from original_runner import OriginalFailed, check_original, run_original  # noqa: E402


def build_argv(a: argparse.Namespace) -> list[str]:
    """The original's command line: its defaults, the dataset and size flags, and --test (no in-loop evaluation)."""
    return ["-d", a.dataset, "--ipc", str(a.ipc), "-f", str(a.factor), "--inner_loop", str(a.inner_loop),
            "--data_dir", str(a.data_dir), "--test"] + list(a.extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--original", required=True, type=Path, help="checkout of the original (never edited)")
    p.add_argument("--dataset", default="fashion", help="the original's -d name (fashion, mnist, cifar10, ...)")
    p.add_argument("--data-dir", required=True, type=Path, help="folder its torchvision loader reads")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--inner-loop", type=int, default=100, help="the original's --inner_loop")
    p.add_argument("--outer-iterations", type=int, default=1, help="stop after this many outer iterations")
    p.add_argument("--seed", type=int, default=0, help="seeds numpy and torch before the original's run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("extra", nargs="*", help="further flags for the original's argument.py (after --)")
    a = p.parse_args(argv)
    if a.outer_iterations < 1 or a.inner_loop < 1:
        print("error: --outer-iterations and --inner-loop must be at least 1", file=sys.stderr)
        return 2
    # n_iter = niter*100//inner_loop must be >= 50 (its log interval n_iter//50 must not be 0)
    niter = max(a.outer_iterations, 50) * a.inner_loop // 100 + 1
    try:
        root = check_original(a.original, "condense.py")
        t0 = time.time()
        out = run_original(root, "bench/original_side/gm.py", "condense_run",
                           {"argv": build_argv(a), "save_dir": str(a.out.resolve()), "seed": a.seed,
                            "niter": niter, "stop_after": a.outer_iterations},
                           threads=a.threads, timeout=24 * 3600)
    except OriginalFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"original condense: {tuple(out['data'].shape)} stored images, lr_img {out['lr_img']:g}, "
          f"{time.time() - t0:.0f}s -> {a.out / 'data.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
