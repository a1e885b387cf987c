"""Draw a run's curves from its log.csv to a PNG: one panel per numeric column against the iteration.

    python scripts/plot_log.py runs/idc_c10/log.csv                  # -> runs/idc_c10/log.png
    python scripts/plot_log.py runs/distill/x/log.csv --columns match_loss,eval_acc --out curves.png

Works for condense.py and distill.py logs (match_loss per iteration, eval_acc every --eval-every iterations),
buffer.py, squeeze.py and recover.py logs: any CSV with an iteration-like first column (`it`, `epoch`, `step`)
and numeric columns; empty cells (a column logged only on some rows) are skipped. Needs only Pillow.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

X_NAMES = ("it", "iteration", "epoch", "step")
SKIP = {"seconds", "config", "seed", "eval_epochs"}
PANEL_W, PANEL_H, MARGIN = 560, 200, 56
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


class PlotError(Exception):
    pass


def read_curves(path: Path, columns: list[str] | None = None) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """(x column, {column: [(x, y), ...]}) of the numeric columns of a log CSV."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise PlotError(f"cannot read {path}: {e.strerror or e}") from None
    if not rows:
        raise PlotError(f"{path} holds no rows")
    x_name = next((n for n in X_NAMES if n in rows[0]), None)
    if x_name is None:
        raise PlotError(f"{path} has no iteration column ({', '.join(X_NAMES)})")
    wanted = columns or [c for c in rows[0] if c != x_name and c not in SKIP]
    missing = [c for c in wanted if c not in rows[0]]
    if missing:
        raise PlotError(f"{path} has no column {missing[0]} (it has {', '.join(rows[0])})")
    curves: dict[str, list[tuple[float, float]]] = {}
    for c in wanted:
        points = []
        for r in rows:
            try:
                x, y = float(r[x_name]), float(r[c])
            except (TypeError, ValueError):
                continue  # empty cell, or text
            if math.isfinite(x) and math.isfinite(y):
                points.append((x, y))
        if points:
            curves[c] = points
    if not curves:
        raise PlotError(f"{path} has no numeric column to plot")
    return x_name, curves


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def draw(x_name: str, curves: dict[str, list[tuple[float, float]]], title: str = "") -> Image.Image:
    """One panel per curve, stacked; axes labelled with their ranges."""
    img = Image.new("RGB", (PANEL_W + 2 * MARGIN, len(curves) * (PANEL_H + MARGIN) + MARGIN), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((MARGIN, 8), title, fill="black")
    for k, (name, pts) in enumerate(curves.items()):
        top = MARGIN + k * (PANEL_H + MARGIN)
        left, right, bottom = MARGIN, MARGIN + PANEL_W, top + PANEL_H
        d.rectangle([left, top, right, bottom], outline=(120, 120, 120))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        x1 = x1 if x1 > x0 else x0 + 1
        pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad
        px = [(left + (x - x0) / (x1 - x0) * PANEL_W, bottom - (y - y0) / (y1 - y0) * PANEL_H) for x, y in pts]
        colour = COLOURS[k % len(COLOURS)]
        if len(px) > 1:
            d.line(px, fill=colour, width=2)
        for x, y in px:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        d.text((left + 4, top + 4), f"{name} (last {_fmt(ys[-1])})", fill=colour)
        d.text((4, top), _fmt(y1), fill="black")
        d.text((4, bottom - 10), _fmt(y0), fill="black")
        d.text((left, bottom + 4), f"{x_name} {_fmt(x0)}", fill="black")
        d.text((right - 60, bottom + 4), _fmt(x1), fill="black")
    return img


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path, help="a run's log.csv")
    ap.add_argument("--columns", help="comma-separated columns to draw (default: every numeric one)")
    ap.add_argument("--out", type=Path, help="PNG to write (default: beside the log, .png)")
    args = ap.parse_args(argv)
    try:
        cols = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
        x_name, curves = read_curves(args.log, cols)
        out = args.out or args.log.with_suffix(".png")
        tmp = out.with_name(f".{out.name}.tmp.png")
        draw(x_name, curves, title=str(args.log)).save(tmp)
        tmp.replace(out)
    except (PlotError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({', '.join(curves)} against {x_name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
