"""DD-Ranking's scores (Li et al., "DD-Ranking: Rethinking the Evaluation of Dataset Distillation", 2025), computed
from the arms validate.py trains, in fractions, from last-epoch test accuracies, every arm under one recipe.

- HLR, hard label recovery = acc(full data, hard labels) - acc(synthetic set, hard labels). Lower is better: how
  much of the full data's accuracy the set's images alone, without soft labels, fail to recover.
- IOR, improvement over random = acc(synthetic set, the method's own recipe) - acc(random real subset of the same
  storage, the same recipe). Higher is better.
- LRS, label-robust score = (exp(w IOR - (1 - w) HLR) - exp(-1)) / (e - exp(-1)), w = 0.5: 0 at IOR = -1,
  HLR = 1 and 1 at IOR = 1, HLR = -1 (fractions keep the exponent in [-1, 1]; DD-Ranking 0.2.0 fed percentages).
- ARS, augmentation-robust score = (exp(w IOR_aug + (1 - w) IOR_noaug) - exp(-1)) / (e - exp(-1)), w = 0.5: the
  improvement over random with the recipe's augmentation and without it.

Each score is computed per seed (the arms share their seeds, so run i of every arm is paired) and reported as mean
and population std over the seeds. A score is defined only when its arms were trained: HLR needs a hard-label
synthetic arm and a hard-label full-data arm, IOR the synthetic and random arms, LRS both, ARS the two pairs.
"""
from __future__ import annotations

import math

import numpy as np

WEIGHT = 0.5
_LOW, _HIGH = math.exp(-1.0), math.e


def squash(x: float) -> float:
    """DD-Ranking's normalisation (exp(x) - exp(-1)) / (e - exp(-1)): [-1, 1] -> [0, 1]."""
    return (math.exp(x) - _LOW) / (_HIGH - _LOW)


def lrs(ior: float, hlr: float, w: float = WEIGHT) -> float:
    return squash(w * ior - (1 - w) * hlr)


def ars(ior_aug: float, ior_noaug: float, w: float = WEIGHT) -> float:
    return squash(w * ior_aug + (1 - w) * ior_noaug)


def _runs(arms: dict, name: str | None) -> list[float] | None:
    if name is None or name not in arms:
        return None
    return [float(a) for a in arms[name]["runs"]]


def _pair(a: list[float], b: list[float], what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: arms with {len(a)} and {len(b)} runs cannot be paired by seed")


def _summary(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": values}


def scores(arms: dict, *, syn: str = "syn", random: str = "random", syn_hard: str | None = None,
           full_hard: str | None = None, syn_noaug: str | None = None, random_noaug: str | None = None,
           w: float = WEIGHT) -> dict:
    """DD-Ranking's scores from `arms` ({arm: {"runs": [acc per seed, fractions], ...}}); the arguments name the
    arms that play each role (None or absent: that score is not defined). Returns {score: {mean, std, runs}}."""
    s, r = _runs(arms, syn), _runs(arms, random)
    sh, fh = _runs(arms, syn_hard), _runs(arms, full_hard)
    sn, rn = _runs(arms, syn_noaug), _runs(arms, random_noaug)
    out: dict = {}
    if s is not None and r is not None:
        _pair(s, r, "IOR")
        out["IOR"] = _summary([a - b for a, b in zip(s, r)])
    if sh is not None and fh is not None:
        _pair(fh, sh, "HLR")
        out["HLR"] = _summary([a - b for a, b in zip(fh, sh)])
    if "IOR" in out and "HLR" in out:
        out["LRS"] = _summary([lrs(i, h, w) for i, h in zip(out["IOR"]["runs"], out["HLR"]["runs"])])
    if "IOR" in out and sn is not None and rn is not None:
        _pair(sn, rn, "ARS")
        _pair(sn, s, "ARS")
        out["ARS"] = _summary([ars(i, a - b, w) for i, a, b in zip(out["IOR"]["runs"], sn, rn)])
    if out:
        out["roles"] = {"syn": syn, "random": random, "syn_hard": syn_hard, "full_hard": full_hard,
                        "syn_noaug": syn_noaug, "random_noaug": random_noaug, "w": w}
    return out


def format_line(model: str, result: dict) -> str:
    """One console line: `<model> DD-Ranking: IOR +4.10 ± 0.50 %, HLR ...` (IOR/HLR in points, LRS/ARS in %)."""
    parts = []
    for key in ("IOR", "HLR", "LRS", "ARS"):
        if key in result:
            m, sd = 100 * result[key]["mean"], 100 * result[key]["std"]
            parts.append(f"{key} {m:+.2f} ± {sd:.2f}" if key in ("IOR", "HLR") else f"{key} {m:.2f} ± {sd:.2f}")
    return f"{model:14s} DD-Ranking: " + ", ".join(parts) + " (IOR/HLR in accuracy points, LRS/ARS in %)"


def export_tensors(syn) -> dict:
    """A toolkit set (utils.synset.SyntheticSet) as the tensors DD-Ranking's evaluators take: `images` in the
    set's own value space (`space`: pixel / normalized / zca, as the method trained on them), `images_pixel` in
    [0, 1], hard `labels`, and the set's `soft_labels` and learned `lr` when it has them (else None)."""
    images, labels = syn.decode()
    return {"images": images, "images_pixel": syn.to_pixels(images), "labels": labels, "space": syn.space,
            "mean": syn.meta.get("mean"), "std": syn.meta.get("std"), "soft_labels": syn.soft_labels,
            "lr": None if syn.lr is None else float(syn.lr)}
