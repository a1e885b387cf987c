"""Differentiable Siamese Augmentation (DSA) with separate sampling and applying.

Spec references: speed.md §1.4 (DSA parameter ranges, mode "S") and idc_dream.md §2.4 (IDC's DiffAug
order and batch-level Siamese use).

The augmentation is split in two steps so that one random draw can be reused:

* `DSA.sample` draws an `AugPlan`: an ordered list of `(op_name, {param_name: tensor})`. Every tensor has
  leading dimension B (one parameter set per sample) or 1 (a Siamese plan, shared by any batch).
* `DSA.apply` applies a plan to a batch; it is differentiable with respect to the images.

Operations and what their plan stores (values are already scaled, so `apply` needs no ratios):

=============  ===============================  ==========================================================
op             plan entries (leading dim B/1)   effect
=============  ===============================  ==========================================================
brightness     shift (float)                    x + shift
saturation     factor (float)                   (x - mean_over_channels) * factor + mean_over_channels
contrast       factor (float)                   (x - mean_over_CHW) * factor + mean_over_CHW
crop           dy, dx (int64)                   out[i, j] = x[i + dy, j + dx], zero where out of range
cutout         top, left, height, width (int64) rows [top, top+height) x cols [left, left+width) set to 0
flip           flip (bool)                      horizontal flip where True
scale          sx, sy (float)                   affine grid diag(sx, sy), bilinear, zero padding
rotate         angle (float, radians)           rotation affine grid, bilinear, zero padding
=============  ===============================  ==========================================================

The family "color" expands to the three ops brightness -> saturation -> contrast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.errors import UserError

AugPlan = list[tuple[str, dict[str, Tensor]]]

# Which ops each family contributes, in application order (speed.md §1.4: color = brightness, then
# saturation, then contrast).
FAMILY_OPS: dict[str, tuple[str, ...]] = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("crop",),
    "cutout": ("cutout",),
    "flip": ("flip",),
    "scale": ("scale",),
    "rotate": ("rotate",),
}
OP_FAMILY: dict[str, str] = {op: fam for fam, ops in FAMILY_OPS.items() for op in ops}

# The geometric families among which IDC's DiffAug picks exactly one per call (idc_dream.md §2.4).
IDC_GEOMETRIC = ("crop", "scale", "rotate")

MODES = ("single", "all", "idc")


@dataclass(frozen=True)
class DSAParams:
    """Augmentation magnitudes (speed.md §1.4, the ParamDiffAug defaults).

    align_corners is True for MTT/SPEED/DSA; IDC/DREAM use grid_sample's default False (idc_dream.md §2.4).
    """

    brightness: float = 1.0  # shift = (u - 0.5) * brightness
    saturation: float = 2.0  # factor = u * saturation
    contrast: float = 0.5  # factor = u + contrast
    crop: float = 0.125  # max shift = int(side * crop + 0.5) px
    cutout: float = 0.5  # square side = int(side * cutout + 0.5) px
    scale: float = 1.2  # sx, sy ~ U(1/scale, scale)
    rotate: float = 15.0  # angle ~ U(-rotate, rotate) degrees
    align_corners: bool = True


def parse_strategy(strategy: str) -> list[str]:
    """Split a strategy such as "color_crop_cutout" into its families, in string order.

    An empty string or "none" means no augmentation. An unknown family is a user error.
    """
    text = (strategy or "").strip()
    if text.lower() in ("", "none"):
        return []
    families = [name for name in text.split("_") if name]
    unknown = [name for name in families if name not in FAMILY_OPS]
    if unknown:
        raise UserError(
            f"unknown DSA augmentation {unknown[0]!r} in strategy {strategy!r}; "
            f"known families: {', '.join(FAMILY_OPS)} (joined with '_', or 'none')"
        )
    return families


# ----------------------------------------------------------------------------------------------------
# Sampling: every draw goes through the given generator so runs can be repeated and resumed.
# ----------------------------------------------------------------------------------------------------


def _uniform(n: int, generator: torch.Generator | None) -> Tensor:
    """n draws of U(0, 1) in float32, on the generator's device (CPU for the global RNG)."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=device, dtype=torch.float32)


def _randint(low: int, high: int, n: int, generator: torch.Generator | None) -> Tensor:
    """n integers uniform in [low, high) as int64, on the generator's device."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(low, high, (n,), generator=generator, device=device, dtype=torch.int64)


def _sample_op(op: str, n: int, height: int, width: int, p: DSAParams, g: torch.Generator | None) -> dict:
    """Draw the parameters of one op for n samples (speed.md §1.4 ranges)."""
    if op == "brightness":
        return {"shift": (_uniform(n, g) - 0.5) * p.brightness}
    if op == "saturation":
        return {"factor": _uniform(n, g) * p.saturation}
    if op == "contrast":
        return {"factor": _uniform(n, g) + p.contrast}
    if op == "crop":
        # Rows use the height and columns the width, each with its own maximum shift.
        max_dy, max_dx = int(height * p.crop + 0.5), int(width * p.crop + 0.5)
        return {"dy": _randint(-max_dy, max_dy + 1, n, g), "dx": _randint(-max_dx, max_dx + 1, n, g)}
    if op == "cutout":
        side_h, side_w = int(height * p.cutout + 0.5), int(width * p.cutout + 0.5)
        # The centre ranges over [0, side] inclusive for an even square and [0, side - 1] for an odd one,
        # and the square spans centre - s//2 .. centre - s//2 + s - 1 (DSA's convention); clipping at the
        # border happens when the mask is built.
        centre_r = _randint(0, height + (1 - side_h % 2), n, g)
        centre_c = _randint(0, width + (1 - side_w % 2), n, g)
        return {
            "top": centre_r - side_h // 2,
            "left": centre_c - side_w // 2,
            "height": torch.full_like(centre_r, side_h),
            "width": torch.full_like(centre_c, side_w),
        }
    if op == "flip":
        return {"flip": _uniform(n, g) < 0.5}
    if op == "scale":
        low = 1.0 / p.scale
        return {"sx": _uniform(n, g) * (p.scale - low) + low, "sy": _uniform(n, g) * (p.scale - low) + low}
    if op == "rotate":
        # The originals' float32 order, (u - 0.5) * 2 * ratio / 180 * pi: the same draw gives the same angle to the
        # last bit. math.radians(ratio) as one factor differs by an ulp, which the unrolled meta-gradient of
        # MTT/SPEED amplifies to ~1e-3 relative (bench/parity.py --method mtt, the [DSA] lines).
        return {"angle": (_uniform(n, g) - 0.5) * 2 * p.rotate / 180 * math.pi}
    raise ValueError(f"unknown DSA op {op!r}")


# ----------------------------------------------------------------------------------------------------
# Applying: all ops act on each sample independently and are vectorised over the batch.
# ----------------------------------------------------------------------------------------------------


def _per_sample(v: Tensor) -> Tensor:
    """Reshape a (n,) parameter to (n, 1, 1, 1) so it broadcasts over C, H, W (and over B when n == 1)."""
    return v.view(-1, 1, 1, 1)


def _brightness(x: Tensor, shift: Tensor) -> Tensor:
    """Add a per-sample constant (speed.md §1.4 brightness)."""
    return x + _per_sample(shift)


def _saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Scale each pixel's deviation from its channel mean (speed.md §1.4 saturation)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * _per_sample(factor) + mean


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Scale each image's deviation from its mean over C, H, W (speed.md §1.4 contrast)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _per_sample(factor) + mean


def _crop(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Translate by whole pixels: out[i, j] = x[i + dy, j + dx], zero outside (speed.md §1.4 crop).

    Implemented as two index gathers plus a validity mask, so values are copied exactly (no interpolation)
    and gradients reach the source pixels.
    """
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).unsqueeze(0) + dy.unsqueeze(1)  # (n, H)
    cols = torch.arange(w, device=x.device).unsqueeze(0) + dx.unsqueeze(1)  # (n, W)
    row_ok = (rows >= 0) & (rows < h)
    col_ok = (cols >= 0) & (cols < w)
    row_idx = rows.clamp(0, h - 1)[:, None, :, None].expand(b, c, h, w)
    col_idx = cols.clamp(0, w - 1)[:, None, None, :].expand(b, c, h, w)
    out = x.gather(2, row_idx).gather(3, col_idx)
    valid = row_ok[:, None, :, None] & col_ok[:, None, None, :]
    return out * valid.to(x.dtype)


def _cutout(x: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """Zero one axis-aligned rectangle per sample, clipped at the border (speed.md §1.4 cutout)."""
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).unsqueeze(0)
    cols = torch.arange(w, device=x.device).unsqueeze(0)
    in_rows = (rows >= top.unsqueeze(1)) & (rows < (top + height).unsqueeze(1))  # (n, H)
    in_cols = (cols >= left.unsqueeze(1)) & (cols < (left + width).unsqueeze(1))  # (n, W)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x * (~hole).to(x.dtype)


def _flip(x: Tensor, flip: Tensor) -> Tensor:
    """Mirror the width axis of the samples whose flag is set (speed.md §1.4 flip)."""
    return torch.where(_per_sample(flip), x.flip(3), x)


def _warp(x: Tensor, theta: Tensor, align_corners: bool) -> Tensor:
    """Resample x with per-sample 2x3 affine matrices: bilinear, zero padding (speed.md §1.4)."""
    theta = theta.expand(x.shape[0], 2, 3)  # a Siamese (1, 2, 3) matrix serves the whole batch
    grid = F.affine_grid(theta, list(x.shape), align_corners=align_corners)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)


def _scale(x: Tensor, sx: Tensor, sy: Tensor, align_corners: bool) -> Tensor:
    """Anisotropic scaling of the sampling grid by diag(sx, sy) (speed.md §1.4 scale)."""
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return _warp(x, theta, align_corners)


def _rotate(x: Tensor, angle: Tensor, align_corners: bool) -> Tensor:
    """Rotate the sampling grid by angle radians, [[cos, -sin], [sin, cos]] (speed.md §1.4 rotate): the matrix
    of the originals (DSA/MTT's rand_rotate and IDC's DiffAug both build [[cos a, sin(-a)], [sin a, cos a]]), so
    the same drawn angle turns the image the same way as theirs (bench/parity.py checks it)."""
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _warp(x, theta, align_corners)


class DSA:
    """Differentiable Siamese Augmentation over a strategy string (speed.md §1.4, idc_dream.md §2.4).

    Modes decide which ops one call applies:

    * "single" (MTT/SPEED mode "S", default): one family drawn uniformly from the strategy per call.
    * "all" (original DSA mode "M"): every family, in the order written in the strategy.
    * "idc" (IDC DiffAug): flip (if present), color (if present), exactly one of the geometric families
      crop/scale/rotate present (drawn uniformly per call), then cutout (if present).

    Within the chosen ops, parameters are drawn per sample, or once for the whole batch when
    `siamese=True` (a plan with leading dimension 1 that can be applied to batches of any size).
    """

    def __init__(
        self,
        strategy: str = "color_crop_cutout_flip_scale_rotate",
        mode: str = "single",
        params: DSAParams | None = None,
    ) -> None:
        if mode not in MODES:
            raise UserError(f"unknown DSA mode {mode!r}; choose one of {', '.join(MODES)}")
        self.strategy = strategy
        self.mode = mode
        self.params = params if params is not None else DSAParams()
        self.families = parse_strategy(strategy)

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, mode={self.mode!r}, params={self.params!r})"

    def _choose_families(self, generator: torch.Generator | None) -> list[str]:
        """The families one call applies, in application order, according to the mode."""
        fams = self.families
        if not fams:
            return []
        if self.mode == "all":
            return list(fams)
        if self.mode == "single":
            return [fams[int(_randint(0, len(fams), 1, generator).item())]]
        # "idc": fixed order around one geometric op chosen per call (idc_dream.md §2.4).
        chosen = [f for f in ("flip", "color") if f in fams]
        geometric = [f for f in fams if f in IDC_GEOMETRIC]
        if geometric:
            chosen.append(geometric[int(_randint(0, len(geometric), 1, generator).item())])
        if "cutout" in fams:
            chosen.append("cutout")
        return chosen

    def sample(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        siamese: bool = False,
        device: torch.device | str | None = None,
    ) -> AugPlan:
        """Draw an augmentation plan for a batch of `batch_size` images of size height x width.

        With siamese=True one parameter set is drawn (leading dimension 1) and it broadcasts to any batch,
        e.g. a real batch and a synthetic batch of different sizes. All randomness comes from `generator`
        (the global RNG when None); tensors are drawn on the generator's device and moved to `device`.
        """
        n = 1 if siamese else int(batch_size)
        if n < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        plan: AugPlan = []
        for family in self._choose_families(generator):
            for op in FAMILY_OPS[family]:
                values = _sample_op(op, n, height, width, self.params, generator)
                if device is not None:
                    values = {k: v.to(device) for k, v in values.items()}
                plan.append((op, values))
        return plan

    def apply(self, x: Tensor, plan: AugPlan) -> Tensor:
        """Apply a plan to a batch x of shape (B, C, H, W); differentiable with respect to x.

        Each plan entry must have leading dimension B or 1 (Siamese). A per-sample plan drawn for another
        batch size is rejected rather than silently broadcast.
        """
        if x.dim() != 4:
            raise ValueError(f"DSA expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
        batch = x.shape[0]
        for op, values in plan:
            vals = {}
            for name, v in values.items():
                if v.dim() != 1 or v.shape[0] not in (1, batch):
                    raise ValueError(
                        f"DSA plan op {op!r} holds parameters for {v.shape[0] if v.dim() else 0} samples but "
                        f"the batch has {batch}; sample with siamese=True to share one draw across batches "
                        f"of different sizes"
                    )
                v = v.to(x.device)
                vals[name] = v.to(x.dtype) if v.is_floating_point() else v
            x = self._apply_op(x, op, vals)
        return x

    def _apply_op(self, x: Tensor, op: str, v: dict[str, Tensor]) -> Tensor:
        """Dispatch one op of a plan."""
        if op == "brightness":
            return _brightness(x, v["shift"])
        if op == "saturation":
            return _saturation(x, v["factor"])
        if op == "contrast":
            return _contrast(x, v["factor"])
        if op == "crop":
            return _crop(x, v["dy"], v["dx"])
        if op == "cutout":
            return _cutout(x, v["top"], v["left"], v["height"], v["width"])
        if op == "flip":
            return _flip(x, v["flip"])
        if op == "scale":
            return _scale(x, v["sx"], v["sy"], self.params.align_corners)
        if op == "rotate":
            return _rotate(x, v["angle"], self.params.align_corners)
        raise ValueError(f"unknown DSA op {op!r} in plan; known ops: {', '.join(OP_FAMILY)}")

    def __call__(self, x: Tensor, generator: torch.Generator | None = None, siamese: bool = False) -> Tensor:
        """Sample a plan for x and apply it (the usual one-batch use)."""
        plan = self.sample(x.shape[0], x.shape[2], x.shape[3], generator, siamese, device=x.device)
        return self.apply(x, plan)
