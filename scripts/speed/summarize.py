#!/usr/bin/env python3
"""Markdown table of the CPU-scale MTT/SPEED runs written by scripts/speed/cpu_scale.sh.

    python scripts/speed/summarize.py runs/cpu_speed

One row per (dataset, method, IPC): images per class actually trained on, the storage used of the budget, the learned
lr, the set's accuracy and the random subset's (same protocol and seeds), each as mean ± std with the per-seed values.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = {"mtt": "MTT", "speed": "SPEED (reference)", "speed-tk": "SPEED --topk-from (variant)"}


def pct(s: dict) -> str:
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"


def runs(s: dict) -> str:
    return ", ".join(f"{100 * r:.2f}" for r in s["runs"])


def main(root: Path) -> None:
    print("| dataset | method | IPC | images/class | storage / budget | learned lr | set | random | set − random | "
          "per seed: set / random |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ds in ("fmnist", "cifar10"):
        for ipc in (1, 10):
            for m in ("mtt", "speed", "speed-tk"):
                d = root / ds / f"{m}_ipc{ipc}"
                if not (d / "results.json").is_file():
                    continue
                res = json.loads((d / "results.json").read_text())
                cfg = json.loads((d / "config.json").read_text())
                per_class = cfg["num_images"] // (10 if ds in ("fmnist", "cifar10") else 1)
                store = (f"{cfg['storage_floats'] / cfg['budget_floats']:.3f}" if "storage_floats" in cfg else "1.000")
                lr = float(__import__("torch").load(d / "lr_final.pt", weights_only=True))
                gap = 100 * (res["syn"]["mean"] - res["random"]["mean"])
                name = NAMES[m]
                if m == "speed" and cfg.get("topk_share"):   # a derived row's default: the last share on top-k
                    name = f"SPEED (derived default, --topk-share {cfg['topk_share']:g})"
                print(f"| {res['dataset']} | {name} | {ipc} | {per_class} | {store} | {lr:.4f} | "
                      f"**{pct(res['syn'])}** | {pct(res['random'])} | {gap:+.2f} | {runs(res['syn'])} / "
                      f"{runs(res['random'])} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cpu_speed"))
