"""IDC multi-formation: the stored-image parameterisation shared by condense.py (training) and every reader of a
synthetic set (validate.py decodes through the `multiformation` decoder registered here).

Spec: idc_dream.md §1. A stored image of side R holds f x f patches; decoding cuts them out and resizes each back
to R x R, so `ipc` stored images per class give `ipc * f**2` training images. Everything here is a pure function
of tensors, differentiable with respect to the stored images.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils.synset import register_decoder

PAD_VALUE = 0.5  # idc_dream.md §1.2 step 1: grey padding at the bottom and right when f does not divide R
DECODE_MODES = ("single", "multi", "bound")


def crop_boxes(resolution: int, factor: int) -> list[tuple[int, int, int]]:
    """(i*f + j, top, left) of every crop, in decoding order; crops are ceil(R/f) pixels square (§1.2 step 2)."""
    s = math.ceil(resolution / factor)
    return [(i * factor + j, i * s, j * s) for i in range(factor) for j in range(factor)]


def decode_single(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Decode one class's stored images [n, C, R, R] into [f*f*n, C, R, R] (idc_dream.md §1.2).

    Decoded index (i*f + j)*n + k is patch (i, j) of stored image k, resized with bilinear interpolation
    (align_corners False, no antialias), exactly like the reference's nn.Upsample.
    """
    if factor == 1:
        return x
    r = x.shape[-1]
    rem = r % factor
    if rem:
        x = F.pad(x, (0, factor - rem, 0, factor - rem), value=PAD_VALUE)
    s = math.ceil(r / factor)
    crops = [x[:, :, top:top + s, left:left + s] for _, top, left in crop_boxes(r, factor)]
    return F.interpolate(torch.cat(crops), size=(r, r), mode="bilinear", align_corners=False)


def decode_multi(x: torch.Tensor, factor: int) -> torch.Tensor:
    """`multi` mode: the decodes for factors 1..f concatenated (ipc * (1 + 4 + ... + f^2) images)."""
    return torch.cat([decode_single(x, k) for k in range(1, factor + 1)])


def bound_split(ipc: int, factor: int, budget: int = 128) -> list[tuple[int, int]]:
    """`bound` mode: how many stored images are decoded at each factor, walking from f down to 1 (§1.2).

    Returns [(factor, count), ...] with counts summing to ipc. E.g. ipc 20, f 3 -> [(3, 12), (2, 3), (1, 5)].
    """
    out, remaining, decoded = [], ipc, 0
    cur = budget - ipc
    for k in range(factor, 0, -1):
        n = remaining if k == 1 else max(0, min(cur // (k * k), remaining))
        if n:
            out.append((k, n))
        remaining -= n
        decoded += n * k * k
        cur = budget - decoded - remaining
        if remaining == 0:
            break
    return out


def decode_bound(x: torch.Tensor, factor: int, budget: int = 128) -> torch.Tensor:
    parts, start = [], 0
    for k, n in bound_split(len(x), factor, budget):
        parts.append(decode_single(x[start:start + n], k))
        start += n
    return torch.cat(parts)


def decode_class(x: torch.Tensor, factor: int, mode: str = "single", budget: int = 128) -> torch.Tensor:
    """Decode one class's stored images in the given mode."""
    if mode == "single":
        return decode_single(x, factor)
    if mode == "multi":
        return decode_multi(x, factor)
    if mode == "bound":
        return decode_bound(x, factor, budget)
    raise ValueError(f"unknown decode mode '{mode}' ({', '.join(DECODE_MODES)})")


def decode_set(images: torch.Tensor, labels: torch.Tensor, factor: int, mode: str = "single"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole class-major set class by class (as IDC's test.py does); returns images and labels."""
    xs, ys = [], []
    for c in torch.unique(labels, sorted=True).tolist():
        dec = decode_class(images[labels == c], factor, mode)
        xs.append(dec)
        ys.append(torch.full((len(dec),), c, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def block_sizes(resolution: int, factor: int) -> list[int]:
    """Init-time block sides, "remainder first": the first R mod f blocks are one pixel larger (§1.3)."""
    q, r = divmod(resolution, factor)
    return [q + 1 if i < r else q for i in range(factor)]


def tile_mix(real: torch.Tensor, ipc: int, factor: int) -> torch.Tensor:
    """IDC `mix` initialisation of one class (§1.3): ipc*f^2 real images [ipc*f^2, C, R, R] in [0, 1] -> ipc
    stored images, group k = i*f + j (ipc consecutive images) shrunk with nearest interpolation into block (i, j).

    When R mod f is 0 or f-1 (every configuration the papers use), decoding the result returns the
    down-then-up-sampled real images in their original order.
    """
    n, c, r, _ = real.shape
    if n != ipc * factor * factor:
        raise ValueError(f"mix init needs ipc*f^2 = {ipc * factor * factor} images, got {n}")
    out = torch.empty(ipc, c, r, r, dtype=real.dtype, device=real.device)
    sizes = block_sizes(r, factor)
    top = 0
    for i, h in enumerate(sizes):
        left = 0
        for j, w in enumerate(sizes):
            k = i * factor + j
            out[:, :, top:top + h, left:left + w] = F.interpolate(real[k * ipc:(k + 1) * ipc], size=(h, w))
            left += w
        top += h
    return out


@register_decoder("multiformation")
def decode_multiformation(tensors: dict, labels: torch.Tensor, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic-set decoder: meta["decoder_args"] = {"factor": f, "mode": "single"} (mode optional).

    Evaluation always decodes in single mode unless the set says otherwise (idc_dream.md §5 step 2).
    """
    args = meta.get("decoder_args") or {}
    factor = int(args.get("factor", 1))
    return decode_set(tensors["images"], labels, factor, args.get("mode", "single"))
