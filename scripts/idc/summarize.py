"""Markdown tables for docs/RESULTS.md from the JSON reports of scripts/idc/cpu_scale_all.sh and cpu_curve.sh, and a
PNG of the accuracy-vs-iteration curve (drawn with Pillow, no plotting library needed).

    python scripts/idc/summarize.py runs/idc_cpu runs/idc_curve [--plot docs/img/dream_vs_idc_fmnist_ipc1.png]
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


def curve_points(folder: Path) -> dict[str, list[tuple[int, float, float]]]:
    out = {}
    for m in ("idc", "dream"):
        pts = []
        for p in folder.glob(f"curve_{m}_it*.json"):
            s = json.loads(p.read_text())["syn"]
            pts.append((int(p.stem.split("_it")[1]), 100 * s["mean"], 100 * s["std"]))
        out[m] = sorted(pts)
    return out


def plot(folder: Path, path: Path) -> None:
    """Mean accuracy (± std bars) against outer iteration for IDC and DREAM."""
    from PIL import Image, ImageDraw
    pts = curve_points(folder)
    w, h, left, right, top, bottom = 640, 400, 60, 20, 30, 50
    xs = [p[0] for v in pts.values() for p in v]
    ys = [p[1] + s * p[2] for v in pts.values() for p in v for s in (-1, 1)]
    x0, x1, y0, y1 = min(xs), max(xs), int(min(ys)) - 1, int(max(ys)) + 2
    fx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
    fy = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for y in range(y0, y1 + 1):
        d.line([left - 4, fy(y), left, fy(y)], fill="black")
        d.text((left - 30, fy(y) - 6), f"{y}", fill="black")
    for x in sorted(set(xs)):
        d.line([fx(x), h - bottom, fx(x), h - bottom + 4], fill="black")
        d.text((fx(x) - 6, h - bottom + 8), f"{x}", fill="black")
    d.text((w // 2 - 120, h - 22), "outer iteration (x5 inner iterations)", fill="black")
    d.text((left, 8), "Fashion-MNIST IPC 1 (f=2), CPU scale: test accuracy %, mean +- std over 3 seeds", fill="black")
    for (m, colour), dy in zip((("idc", (200, 40, 40)), ("dream", (40, 80, 200))), (0, 14)):
        line = [(fx(x), fy(y)) for x, y, _ in pts[m]]
        d.line(line, fill=colour, width=2)
        for x, y, s in pts[m]:
            d.line([fx(x), fy(y - s), fx(x), fy(y + s)], fill=colour)
            d.ellipse([fx(x) - 3, fy(y) - 3, fx(x) + 3, fy(y) + 3], fill=colour)
        d.text((w - right - 70, h - bottom - 40 + dy), m.upper(), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    print(f"\nplot: {path}")


if __name__ == "__main__":
    args = sys.argv[1:]
    plot_to = None
    if "--plot" in args:
        i = args.index("--plot")
        plot_to = Path(args[i + 1])
        del args[i:i + 2]
    for arg in args:
        d = Path(arg)
        print(f"\n### {d}\n")
        if list(d.glob("val_*.json")):
            table(d)
            print()
            runs_table(d)
        if list(d.glob("curve_*.json")):
            curve(d)
        if plot_to is not None and list(d.glob("curve_*.json")):
            plot(d, plot_to)
