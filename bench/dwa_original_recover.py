"""Recover a DWA CIFAR-10 set with the ORIGINAL's distillation code (AngusDujw/Diversity-Driven-Synthesis,
`distillation/distillation_cifar.py`), on the CPU, from one of this toolkit's teacher files: the accuracy half of
the DWA parity (docs/PARITY.md, docs/RESULTS.md "Parity with the original implementations").

    python bench/dwa_original_recover.py --original /path/to/Diversity-Driven-Synthesis --teacher T.pt \
        --init-path init/random1 --ipc 1 --iterations 100 --out syn/dwa_original

The teacher's weights go into the original's own model construction (torchvision ResNet-18 with its 3x3 stem),
the initial images are `rank_select.py --selection random --format tensor` files (`tensor_{k}.pt`, DWA's format),
and the original writes its usual folder (`new{c:03d}/class{c:03d}_id{k:03d}.jpg`, JPEG, truncated 8-bit values),
which validate.py reads as it is (`--dataset CIFAR10`). The published CIFAR script values are used (lr 0.25,
r-bn 0.01, K 12, rho 15e-3, r-var 11, jitter 4, batch 100).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from original_runner import OriginalFailed, check_original, original_commit, run_original  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.teacher import load_teacher  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--original", type=Path, required=True, help="a checkout of Diversity-Driven-Synthesis")
    p.add_argument("--teacher", type=Path, required=True, help="a toolkit teacher file (ResNet-18-modified, CIFAR-10)")
    p.add_argument("--init-path", type=Path, required=True, help="folder with tensor_0.pt .. tensor_{ipc-1}.pt")
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="seeds Python's random (the original's jitter draws)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        root = check_original(a.original, "distillation/distillation_cifar.py")
        teacher = load_teacher(a.teacher)
        if teacher.arch != "ResNet-18-modified" or teacher.num_classes != 10:
            raise UserError(f"--teacher must be a 10-class ResNet-18-modified (DWA's CIFAR model), got "
                            f"{teacher.arch} with {teacher.num_classes} classes")
        missing = [k for k in range(a.ipc) if not (a.init_path / f"tensor_{k}.pt").is_file()]
        if missing:
            raise UserError(f"--init-path {a.init_path} has no tensor_{missing[0]}.pt")
        if a.out.exists() and any(a.out.iterdir()):
            raise UserError(f"--out {a.out} is not empty")
        state = {k: v.detach().cpu() for k, v in teacher.net.state_dict().items()}
        payload = {"state_dict": state, "init_path": str(a.init_path.resolve()), "out": str(a.out.resolve()),
                   "ipc": a.ipc, "iterations": a.iterations, "lr": 0.25, "jitter": 4, "r_bn": 0.01, "rho": 15e-3,
                   "steps": 12, "r_var": 11.0, "seed": a.seed}
        out = run_original(root, "bench/original_side/decoupled.py", "dwa_distill", payload,
                           extra_paths=("distillation",))
    except (OriginalFailed, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(out['written'])} images to {a.out} (original at {original_commit(root)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
