#!/usr/bin/env python3
"""Diagnostic: a SPEED run's final codes decoded WITHOUT the top-k pruning, written as a pixel-decoder set.

    python scripts/speed/dense_codes_diagnostic.py RUN_DIR OUT_DIR     # RUN_DIR: a distill.py --method speed output
    python validate.py --syn OUT_DIR --preset speed ...

The result stores far more than the IPC budget allows, so it is not a valid distilled set: it measures what the
top-k pruning at save time (speed.md §3.3, bug 10) costs a run, by comparison with RUN_DIR's own accuracy.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from utils.io import safe_torch_load  # noqa: E402
from utils.speed import build_freenet  # noqa: E402
from utils.synset import load_synset, save_synset  # noqa: E402


def main(src: Path, dst: Path) -> None:
    syn = load_synset(src)
    params = safe_torch_load(src / "ckpt.pt", "distill checkpoint")["params"]
    freenet = build_freenet(syn.meta["decoder_args"], params["freenet"]).eval()
    scm = params["scm"]
    with torch.no_grad():
        dense = torch.cat([freenet(params["saet"], scm[i:i + 256]) for i in range(0, len(scm), 256)])
    syn.tensors = {"images": dense}
    syn.meta = dict(syn.meta, decoder="pixels", decoder_args={},
                    method=f"{syn.meta['method']}-dense-codes (diagnostic, over the storage budget)")
    save_synset(syn, dst)
    print(f"wrote {dst}: {tuple(dense.shape)} images decoded from the dense codes of {src}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
