"""Markdown tables for docs/RESULTS.md from the JSON reports of scripts/idc/cpu_scale_all.sh and cpu_curve.sh.

    python scripts/idc/summarize.py runs/idc_cpu runs/idc_curve
"""
import json
import sys
from pathlib import Path


def cell(s):
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if s else "–"


def per_run(s):
    return ", ".join(f"{100 * a:.1f}" for a in s["runs"]) if s else "–"


def runs_table(folder: Path) -> None:
    print("| dataset | IPC | arm | per-run accuracy (seeds 0, 1, 2) |")
    print("|---|---|---|---|")
    for ds in ("FashionMNIST", "CIFAR10"):
        for ipc in (1, 10):
            for method in ("idc", "dream"):
                p = folder / f"val_{method}_{ds}_ipc{ipc}.json"
                if not p.exists():
                    continue
                r = json.loads(p.read_text())
                for arm in ("syn", "random", "herding"):
                    if arm in r:
                        name = method.upper() if arm == "syn" else arm
                        print(f"| {ds} | {ipc} | {name} | {per_run(r[arm])} |")


def table(folder: Path) -> None:
    print("| dataset | IPC | IDC | DREAM | random | herding |")
    print("|---|---|---|---|---|---|")
    for ds in ("FashionMNIST", "CIFAR10"):
        for ipc in (1, 10):
            idc = folder / f"val_idc_{ds}_ipc{ipc}.json"
            dream = folder / f"val_dream_{ds}_ipc{ipc}.json"
            if not idc.exists():
                continue
            a = json.loads(idc.read_text())
            b = json.loads(dream.read_text()) if dream.exists() else {}
            print(f"| {ds} | {ipc} | {cell(a.get('syn'))} | {cell(b.get('syn'))} | {cell(a.get('random'))} | "
                  f"{cell(a.get('herding'))} |")
    seeds = {tuple(json.loads(p.read_text())["syn"]["seeds"]) for p in folder.glob("val_*.json")}
    print(f"\nseeds: {sorted(seeds)}")


def curve(folder: Path) -> None:
    its = sorted({int(p.stem.split("_it")[1]) for p in folder.glob("curve_*_it*.json")})
    print("| outer iteration (x5 inner) | " + " | ".join(str(i) for i in its) + " |")
    print("|---|" + "---|" * len(its))
    for m in ("idc", "dream"):
        row = []
        for i in its:
            p = folder / f"curve_{m}_it{i}.json"
            row.append(cell(json.loads(p.read_text())["syn"]) if p.exists() else "–")
        print(f"| {m.upper()} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        d = Path(arg)
        print(f"\n### {d}\n")
        if list(d.glob("val_*.json")):
            table(d)
            print()
            runs_table(d)
        if list(d.glob("curve_*.json")):
            curve(d)
