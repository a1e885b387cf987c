"""Rough GPU-cost and memory estimates for the generated trajectory-matching scripts (scripts/speed, scripts/mtt).

Rough orders of magnitude for script headers, not measurements: the unroll memory per image-step was measured on a
CPU with bench/distill_speed.py and is scaled by each resolution's convolution work.
"""
from __future__ import annotations

import math

UNROLL_LIMIT_GB = 60    # above this estimate a script passes --checkpoint-unroll


def map_area(res: int) -> int:
    """Summed feature-map area of the ConvNet of depth log2(res/4): the convolution work of one image."""
    depth = int(round(math.log2(res / 4)))
    return sum((res >> i) ** 2 for i in range(depth))


def image_work(res: int) -> float:
    """One image's work relative to a 32-px image."""
    return map_area(res) / map_area(32)


def unroll_gb(res: int, images_per_iteration: int, mb_per_image_step: float) -> float:
    """Memory of a whole unroll kept in the graph, from the measured MB per 32-px image-step."""
    return images_per_iteration * mb_per_image_step * image_work(res) / 1000


def hours(lo: float, hi: float) -> str:
    def f(x: float) -> str:
        return f"{x:.2g}" if x < 10 else f"{x:.0f}"
    return f"~{f(lo)} GPU-hours" if f(lo) == f(hi) else f"{f(lo)}-{f(hi)} GPU-hours"


def size(gb: float) -> str:
    return f"{gb * 1000:.2g} MB" if gb < 0.1 else f"{gb:.2g} GB"


def eval_hours(n_images: int, baseline_images: int, res: int, runs: int = 5) -> float:
    """RUNS x 1001 epochs over the set and over the random baseline, at ~23k 32-px images/s, >= 5 ms a step."""
    steps = runs * 1001 * (math.ceil(n_images / 256) + math.ceil(baseline_images / 256))
    return max(runs * 1001 * (n_images + baseline_images) * image_work(res) / 23000, steps * 0.005) / 3600
