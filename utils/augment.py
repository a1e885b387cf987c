"""The crop and flip pieces shared by squeeze.py (teacher training), utils/kd.py (KD validation), utils/softlabels.py
(stored soft labels) and recover.py (synthesis): one implementation each, so the four stages cannot drift apart.

- `rrc_boxes`: torchvision's RandomResizedCrop box rule (decoupled.md §1.5, §2, §6.1), drawn for n images at once.
- `crop_resize` / `crop_resize_box`: crop to a box and resize bilinearly (align_corners False, as torchvision).
- `draw_pad_offsets` / `pad_crop`: RandomCrop(R, padding=p) with zero padding.
- `flip_mask` / `apply_flip`: RandomHorizontalFlip(0.5).

Every draw comes from an explicit `torch.Generator`. The draw ORDER is part of each stage's reproducibility (a run
repeats from its seed), so it is fixed here and documented on each function.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

RRC_RATIO = (3 / 4, 4 / 3)   # torchvision RandomResizedCrop's default aspect-ratio range
RRC_ATTEMPTS = 10            # torchvision's number of tries before the centre-crop fallback


# ------------------------------------------------------------------------------------------ RandomResizedCrop

def _uniform(n: int, cols: int, lo: float, hi: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, cols, generator=generator, dtype=torch.float64)


def fallback_box(height: int, width: int, ratio: Sequence[float] = RRC_RATIO) -> tuple[int, int, int, int]:
    """torchvision's fallback when no attempt fits: the whole image with its aspect ratio clamped into `ratio`,
    centred. (top, left, h, w)."""
    lo, hi = min(ratio), max(ratio)
    in_ratio = width / height
    if in_ratio < lo:
        w, h = width, int(round(width / lo))
    elif in_ratio > hi:
        h, w = height, int(round(height * hi))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def rrc_boxes(n: int, height: int, width: int, scale: Sequence[float], generator: Optional[torch.Generator],
              ratio: Sequence[float] = RRC_RATIO, attempts: int = RRC_ATTEMPTS) -> torch.Tensor:
    """RandomResizedCrop boxes for n images of height × width: LongTensor [n, 4] of (top, left, h, w).

    torchvision's rule per image: `attempts` tries of area = U(scale)·H·W and aspect = exp(U(log ratio)),
    w = round(sqrt(area·aspect)), h = round(sqrt(area/aspect)) (torch.round and Python's round both round half to
    even); the first try with 0 < w <= W and 0 < h <= H is placed uniformly on the integer grid; if none fits,
    `fallback_box`. Vectorised: every image takes all its tries and both position draws, so the distribution is
    torchvision's but not its random stream. Draw order (fixed): scales [n, attempts], log-aspects [n, attempts],
    positions [n, 2] (top, left), all float64 from `generator`."""
    area = float(height * width)
    target = area * _uniform(n, attempts, float(scale[0]), float(scale[1]), generator)
    aspect = torch.exp(_uniform(n, attempts, math.log(ratio[0]), math.log(ratio[1]), generator))
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = fits.any(dim=1)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)        # the first try that fits (0 when none does)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    top = torch.floor(u[:, 0] * (height - h + 1).to(torch.float64)).long()
    left = torch.floor(u[:, 1] * (width - w + 1).to(torch.float64)).long()
    fb = torch.tensor(fallback_box(height, width, ratio), dtype=torch.long)
    box = torch.stack([top, left, h, w], dim=1)
    return torch.where(found[:, None], box, fb)


# ------------------------------------------------------------------------------------------ crop and resize

def crop_resize_box(x: torch.Tensor, box: Sequence[int], size: int, antialias: bool) -> torch.Tensor:
    """Every image of x [N, C, H, W] cropped to the same (top, left, h, w) box and resized to size × size (bilinear,
    align_corners False: half-pixel centres, as torchvision's resize). A whole-image box on a size × size image
    is returned as it is (the resize would be the identity)."""
    t, l, h, w = (int(v) for v in box)
    crop = x[:, :, t:t + h, l:l + w]
    if (h, w) == (size, size) == tuple(x.shape[-2:]):
        return crop
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    """Each image of x [N, C, H, W] cropped to its own box (boxes [N, 4] = top, left, h, w) and resized to
    size × size. One image at a time, so a view depends only on its own image and box, never on the batch it
    travels with (stored soft labels replay bit-identically, §6.1)."""
    out = x.new_empty(x.shape[0], x.shape[1], size, size)
    for i, box in enumerate(torch.as_tensor(boxes).tolist()):
        out[i] = crop_resize_box(x[i:i + 1], box, size, antialias)[0]
    return out


# ------------------------------------------------------------------------------------------ RandomCrop(padding)

def draw_pad_offsets(n: int, pad: int, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left corners of RandomCrop(R, padding=pad) windows in the padded image, uniform over 0..2·pad.
    Draw order: all tops, then all lefts."""
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    return top, left


def pad_crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad x [N, C, H, W] by `pad` on every side, then take the H × W window at (top[i], left[i]) of image i:
    exact pixel copies, no interpolation. Zero is black when x holds pixels in [0, 1] (torchvision pads the PIL
    image), so apply it before normalising."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = top.to(x.device)[:, None] + torch.arange(h, device=x.device)            # [n, h]
    cols = left.to(x.device)[:, None] + torch.arange(w, device=x.device)           # [n, w]
    batch = torch.arange(n, device=x.device)[:, None, None]
    # advanced indexing picks xp[b, :, rows[b, i], cols[b, j]] -> [n, h, w, C]
    return xp.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------ horizontal flip

def flip_mask(n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """RandomHorizontalFlip(0.5) decisions for n images: one float32 draw each, flipped when < 0.5."""
    return torch.rand(n, generator=generator) < 0.5


def apply_flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror (last axis) the images of x whose mask entry is True."""
    mask = torch.as_tensor(mask, dtype=torch.bool, device=x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, x.flip(-1), x)
