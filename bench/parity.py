"""Step-by-step parity with the papers' ORIGINAL code: the same quantity computed by the original and by this
toolkit from identical state, one line per quantity with its max absolute and relative error.

    python bench/parity.py --method idc --original /path/to/Efficient-Dataset-Condensation
    python bench/parity.py --method speed --original /path/to/SPEED --json runs/parity/speed.json

The original runs in a subprocess over the checkout the user gives, CUDA redirected to the CPU in-process
(bench/original_runner.py); its files are never edited and none of its code is in this repository. Random draws
are aligned by passing the same tensors/parameters to both sides, or switched off on both sides where they cannot
be (each check says which). Where the toolkit fixes a bug of the original by default, the check computes our
default AND our reference flag: the flag must match the original within tolerance, and the default's line names
the fix that explains its difference (such a line is informational and does not fail the run).

Exit status 0 only when every compared line is within tolerance (fp32: 1e-5 relative by default).
Each method's checks live in a module of this folder, registered in METHODS (method -> module, function).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from original_runner import OriginalFailed, check_original, original_commit  # noqa: E402
from parity_common import DEFAULT_RTOL, ParityLine  # noqa: E402

# method -> (function(original: Path, args) -> list[ParityLine], a file that identifies the original's checkout);
# filled from each family module's PARITY_METHODS by _load_registry.
METHODS: dict[str, tuple] = {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python bench/parity.py --method idc "
                                       "--original ../Efficient-Dataset-Condensation")
    p.add_argument("--method", required=True, choices=sorted(METHODS),
                   help="which method's quantities to compare")
    p.add_argument("--original", required=True, type=Path,
                   help="a checkout of that method's original repository (never edited)")
    p.add_argument("--tol", type=float, default=DEFAULT_RTOL, help="relative tolerance for fp32 lines")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared random state given to both sides")
    p.add_argument("--json", type=Path, default=None, help="also write the lines (and the original's commit) here")
    return p


def main(argv: list[str] | None = None) -> int:
    _load_registry()
    args = build_parser().parse_args(argv)
    check, marker = METHODS[args.method]
    try:
        root = check_original(args.original, marker)
        torch.manual_seed(args.seed)
        lines: list[ParityLine] = check(root, args)
    except OriginalFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    commit = original_commit(root)
    print(f"# {args.method}: original {root.name} at {commit}")
    for line in lines:
        print(line.render())
    ok = all(line.ok for line in lines) and bool(lines)
    failed = sum(not line.ok for line in lines)
    print(f"# {len(lines)} lines, {failed} outside tolerance: {'PASS' if ok else 'FAIL'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"method": args.method, "original": str(root), "commit": commit,
                                         "lines": [asdict(x) | {"ok": x.ok} for x in lines]}, indent=1))
    return 0 if ok else 1


def _load_registry() -> None:
    """Each family module lists its methods in PARITY_METHODS (parity_gm: idc, dream; parity_tm: mtt, speed;
    parity_decoupled: sre2l, dwa, delt, kd). A family not written yet simply offers no method."""
    for name in ("parity_gm", "parity_tm", "parity_decoupled"):
        if (HERE / f"{name}.py").is_file():
            METHODS.update(importlib.import_module(name).PARITY_METHODS)


if __name__ == "__main__":
    sys.exit(main())
