"""SPEED (sparse parameterization for epitomic dataset distillation): the decoder network, the per-(dataset, IPC)
configurations, the storage-budget accounting, SCM sparsification and compact storage, the `speed` synthetic-set
decoder, and a reader for the original repository's saved components.

Spec: speed.md. §3.1 objects, §3.2 FReeNet and decoding, §3.3 top-k sparsification, §3.4 budget accounting,
§4 published configurations, §5.1 decoding for evaluation, §5.3 the original's saved files, §7 bugs 10/11 and the
"improvements" list (Z computed once per decode, compact uint16-index storage, a budget check, shape validation).

Shapes (speed.md conventions): SAET E (1, K, D); SCM A (N, h, L, K) with L = (R/p)^2 patches; FReeNet turns the
head-wise products A·E (N, L, D) into N images (N, channels, R, R). Everything here is a pure function of tensors
and differentiable where training needs it (FReeNet); pruning and packing never carry gradients.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.datasets import get_dataset_spec
from utils.errors import UserError
from utils.io import safe_torch_load
from utils.synset import register_decoder

LN_EPS = 1e-6                # speed.md §3.2 / §4: LayerNorm eps in every published configuration
MLP_RATIO = 1.0              # speed.md §4: mlp_ratio = 1 everywhere
INDEX_RANGE = 1 << 16        # compact storage: one uint16 flat index per non-zero (speed.md §3.4, §7 improvements)
BYTES_PER_NONZERO = 6        # fp32 value + 16-bit index
FLOATS_PER_NONZERO = 1.5     # the same in fp32 units (speed.md §3.4)


# ============================================================================================== FReeNet (§3.2)

class _Projection(nn.Module):
    """The per-block D->D projection of the codes Z; the original names this module "MHSC" (speed.md §3.2 step 3)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)


class _MLP(nn.Module):
    """Linear(D -> rD) -> exact GELU -> Linear(rD -> D), both with bias (speed.md §3.2 step 3)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    """One post-norm block (speed.md §3.2 step 3): Y = LN1(X + Z·Pᵀ + b); X' = LN2(Y + MLP(Y))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mhsc = _Projection(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = _MLP(dim, hidden)

    def forward(self, x: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
        m = self.mhsc.proj(z)
        y = self.norm1(m if x is None else x + m)          # X_0 = 0: the first block sees only its projection
        return self.norm2(y + self.mlp(y))


def count_params(dim: int, depth: int, patch: int, channels: int = 3, mlp_ratio: float = MLP_RATIO) -> int:
    """FReeNet parameter count (speed.md §3.2): T·(3D² + 7D) + channels·p²·(D + 1) at mlp_ratio 1.

    General r: each block has the projection D²+D, two LayerNorms 4D, fc1 D·H+H and fc2 H·D+D with H = int(rD).
    """
    hidden = int(dim * mlp_ratio)
    per_block = (dim * dim + dim) + 4 * dim + (dim * hidden + hidden) + (hidden * dim + dim)
    return depth * per_block + channels * patch * patch * (dim + 1)


class FReeNet(nn.Module):
    """Feature-Recurrent Network (speed.md §3.2): decodes SAET + SCM into images, patch by patch.

    State-dict keys equal the original's, so its checkpoints load with `load_state_dict`:
    decoder_blocks.{t}.{norm1, mhsc.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias}, decoder_pred.{weight, bias}.
    Initialisation (§3.1): Xavier-uniform Linear weights, zero biases, LayerNorm weight 1 / bias 0; pass
    `generator` for an explicitly seeded init (the global RNG is used otherwise).
    """

    count_params = staticmethod(count_params)

    def __init__(self, dim: int, depth: int, heads: int, patch: int, channels: int = 3,
                 mlp_ratio: float = MLP_RATIO, generator: torch.Generator | None = None):
        super().__init__()
        for name, v in (("dim", dim), ("depth", depth), ("heads", heads), ("patch", patch), ("channels", channels)):
            if int(v) != v or v < 1:
                raise UserError(f"FReeNet {name} must be a positive integer, got {v}")
        if dim % heads:
            raise UserError(f"FReeNet width D = {dim} is not divisible by the number of heads h = {heads}")
        hidden = int(dim * mlp_ratio)
        if hidden < 1:
            raise UserError(f"FReeNet mlp_ratio {mlp_ratio} gives an empty MLP at width {dim}")
        self.dim, self.depth, self.heads, self.patch, self.channels = dim, depth, heads, patch, channels
        self.mlp_ratio = mlp_ratio
        self.decoder_blocks = nn.ModuleList(_Block(dim, hidden) for _ in range(depth))
        self.decoder_pred = nn.Linear(dim, channels * patch * patch)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """speed.md §3.1: Xavier-uniform for every Linear weight, biases 0; LayerNorm weight 1, bias 0."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    fan_out, fan_in = m.weight.shape
                    a = math.sqrt(6.0 / (fan_in + fan_out))
                    m.weight.uniform_(-a, a, generator=generator)
                    m.bias.zero_()
                elif isinstance(m, nn.LayerNorm):
                    m.weight.fill_(1.0)
                    m.bias.zero_()

    def codes(self, saet: torch.Tensor, scm: torch.Tensor) -> torch.Tensor:
        """Z (B, L, D): head j's SCM slice (L×K) times head j's columns of E (K×D/h), heads concatenated
        (speed.md §3.2 steps 1-2)."""
        self._check(saet, scm)
        b, h, l, k = scm.shape
        e = saet.reshape(k, h, self.dim // h).transpose(0, 1)       # (h, K, D/h): contiguous column groups
        return torch.matmul(scm, e).transpose(1, 2).reshape(b, l, self.dim)

    def forward(self, saet: torch.Tensor, scm: torch.Tensor) -> torch.Tensor:
        """Decode: saet (1, K, D), scm (B, h, L, K) -> images (B, channels, R, R), R = sqrt(L)·p.

        Z is computed once and re-injected into every block (speed.md §7 improvements; identical math to the
        original's per-block recomputation, §3.2).
        """
        z = self.codes(saet, scm)
        x = None                                                     # X_0 = 0
        for block in self.decoder_blocks:                            # depth >= 1 (checked in __init__)
            x = block(x, z)
        return self.unpatchify(self.decoder_pred(x))

    def unpatchify(self, out: torch.Tensor) -> torch.Tensor:
        """(B, L, channels·p²) -> (B, channels, R, R) (speed.md §3.2 step 5): patch l's vector is a (p, p, channels)
        array [row-in-patch, col-in-patch, channel] placed at grid position (l // g, l % g)."""
        b, l, _ = out.shape
        g, p, c = _grid_side(l), self.patch, self.channels
        return out.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def _check(self, saet: torch.Tensor, scm: torch.Tensor) -> None:
        """Shape consistency (speed.md §7 improvements): SAET dim = FReeNet width, SCM heads/tokens match."""
        if saet.ndim != 3 or saet.shape[0] != 1 or saet.shape[2] != self.dim:
            raise UserError(f"SAET must have shape (1, K, {self.dim}) for this FReeNet, got {tuple(saet.shape)}")
        if scm.ndim != 4 or scm.shape[1] != self.heads or scm.shape[3] != saet.shape[1]:
            raise UserError(f"SCM must have shape (N, {self.heads}, L, {saet.shape[1]}) (heads = FReeNet heads, "
                            f"last axis = number of SAETs), got {tuple(scm.shape)}")
        _grid_side(scm.shape[2])


def _grid_side(tokens: int) -> int:
    g = math.isqrt(tokens)
    if g * g != tokens or g < 1:
        raise UserError(f"the SCM has L = {tokens} patch rows, which is not a square grid (L must be g²)")
    return g


# ================================================================================ configurations (§4, §3.4)

_MODEL_BY_RES = {28: "ConvNet", 32: "ConvNet", 64: "ConvNetD4", 128: "ConvNetD5"}   # speed.md §2 table
_REFERENCE_PREFIX = {"TinyImageNet": "Tiny"}                     # constructor names in the original (§4)
IMAGENET_SUBSET_NAMES = ("imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk", "imageyellow")


@dataclass(frozen=True)
class SpeedConfig:
    """One SPEED configuration (speed.md §4 columns). `n_per_class` = N/c synthetic images per class,
    `num_saet` = K, `top_k` = k, `dim` = D, `depth` = T, `heads` = h; mlp_ratio is 1 and LN eps 1e-6 always.
    `topk_share`: the final share of the iterations trained through the saved top-k codes (None: the reference's
    dense training, every published row; derived rows: DERIVED_TOPK_SHARE)."""
    dataset: str
    ipc: int
    model: str
    resolution: int
    patch: int
    n_per_class: int
    num_saet: int
    top_k: int
    l1_weight: float
    batch_syn: int
    syn_steps: int
    max_start_epoch: int
    dim: int
    depth: int
    heads: int
    topk_share: float | None = None

    def __post_init__(self):
        if self.resolution % self.patch:
            raise UserError(f"SPEED: resolution {self.resolution} is not divisible by the patch size {self.patch}")
        if self.dim % self.heads:
            raise UserError(f"SPEED: width D = {self.dim} is not divisible by the number of heads h = {self.heads}")
        lk = self.tokens_per_image * self.num_saet
        if not 1 <= self.top_k <= lk:
            raise UserError(f"SPEED: top_k = {self.top_k} must lie in [1, L·K = {lk}]")
        if lk > INDEX_RANGE:
            raise UserError(f"SPEED: L·K = {lk} exceeds {INDEX_RANGE}, the range of the 16-bit SCM index "
                            "(speed.md §3.4); use fewer SAETs or a larger patch")
        if self.topk_share is not None and not 0 <= self.topk_share <= 1:
            raise UserError(f"SPEED: topk_share must lie in [0, 1], got {self.topk_share}")
        if min(self.ipc, self.n_per_class, self.num_saet, self.depth, self.batch_syn, self.syn_steps,
               self.max_start_epoch) < 1:
            raise UserError(f"SPEED: every count in the configuration must be >= 1 ({self})")

    @property
    def tokens_per_image(self) -> int:
        """L = (R/p)²."""
        return (self.resolution // self.patch) ** 2

    @property
    def name(self) -> str:
        """Config id in the original's constructor-name pattern (speed.md §4), e.g.
        CIFAR10_IPC10_freenet_patch4_dec96d1b3h (`<dataset>_IPC<ipc>_freenet_patch<p>_dec<D>d<T>b<h>h`)."""
        return self._name(self.dataset)

    @property
    def reference_name(self) -> str:
        """The original's constructor name (Tiny_..., ImageNet_... for the subsets), for locating its files."""
        prefix = "ImageNet" if self.dataset in IMAGENET_SUBSET_NAMES else _REFERENCE_PREFIX.get(self.dataset,
                                                                                                 self.dataset)
        return self._name(prefix)

    def _name(self, prefix: str) -> str:
        return f"{prefix}_IPC{self.ipc}_freenet_patch{self.patch}_dec{self.dim}d{self.depth}b{self.heads}h"


def _row(dataset, ipc, model, r, p, npc, k_saet, top_k, l1, batch_syn, syn_steps, mse, d, t, h) -> SpeedConfig:
    return SpeedConfig(dataset, ipc, model, r, p, npc, k_saet, top_k, l1, batch_syn, syn_steps, mse, d, t, h)


# speed.md §4, all cells as published. Columns: dataset, IPC, model, R, p, N/c, K, k, l1, batch_syn, syn_steps,
# max_start_epoch, D, T, h. (L = (R/p)² is derived.)
_PUBLISHED = [
    ("CIFAR10", 1, "ConvNet", 32, 4, 17, 16, 48, 3e-06, 64, 60, 10, 32, 1, 2),
    ("CIFAR10", 10, "ConvNet", 32, 4, 124, 64, 48, 3e-07, 128, 60, 20, 96, 1, 3),
    ("CIFAR10", 50, "ConvNet", 32, 4, 272, 64, 48, 7e-08, 256, 60, 40, 192, 3, 6),
    ("CIFAR100", 1, "ConvNet", 32, 4, 11, 64, 48, 3e-07, 128, 60, 40, 96, 2, 3),
    ("CIFAR100", 10, "ConvNet", 32, 4, 62, 64, 48, 7e-08, 256, 60, 40, 192, 3, 6),
    ("CIFAR100", 50, "ConvNet", 32, 4, 100, 64, 166, 3e-08, 256, 60, 40, 192, 3, 6),
    ("TinyImageNet", 1, "ConvNetD4", 64, 8, 17, 128, 48, 7e-08, 340, 20, 40, 256, 2, 8),
    ("TinyImageNet", 10, "ConvNetD4", 64, 8, 78, 128, 128, 7e-09, 780, 20, 40, 256, 2, 8),
]
# ImageNet subsets: one row per IPC; l1 7e-7 / 7e-8 for nette, fruit, meow and 3e-7 / 3e-8 for woof, squawk, yellow.
_SUBSET_L1 = {"imagenette": (7e-07, 7e-08), "imagefruit": (7e-07, 7e-08), "imagemeow": (7e-07, 7e-08),
              "imagewoof": (3e-07, 3e-08), "imagesquawk": (3e-07, 3e-08), "imageyellow": (3e-07, 3e-08)}
for _subset in IMAGENET_SUBSET_NAMES:
    _l1_1, _l1_10 = _SUBSET_L1[_subset]
    _PUBLISHED += [(_subset, 1, "ConvNetD5", 128, 8, 15, 256, 192, _l1_1, 32, 60, 10, 192, 2, 4),
                   (_subset, 10, "ConvNetD5", 128, 8, 111, 256, 384, _l1_10, 32, 40, 20, 384, 2, 6)]

SPEED_PRESETS: dict[tuple[str, int], SpeedConfig] = {(r[0], r[1]): _row(*r) for r in _PUBLISHED}


# ----------------------------------------------------------------------------------------- budget (§3.4)

def budget_floats(num_classes: int, ipc: int, channels: int, resolution: int) -> int:
    """The storage budget in fp32 values: C·IPC·channels·R² (speed.md §3.4)."""
    return num_classes * ipc * channels * resolution * resolution


def storage_floats(cfg: SpeedConfig, num_classes: int, channels: int) -> float:
    """What a SPEED set stores, in fp32 units (speed.md §3.4, this toolkit's accounting; the paper's Eq. 7 is
    unconfirmed, §9): K·D (SAET) + FReeNet parameters + 1.5·N·h·k (each kept SCM entry = one fp32 value + one
    16-bit index), N = C·N/c. The scalar learned lr and the implicit labels are not counted."""
    n = num_classes * cfg.n_per_class
    return (cfg.num_saet * cfg.dim + count_params(cfg.dim, cfg.depth, cfg.patch, channels)
            + FLOATS_PER_NONZERO * n * cfg.heads * cfg.top_k)


def check_budget(cfg: SpeedConfig, num_classes: int, channels: int) -> float:
    """Raise UserError when `cfg` stores more than its IPC budget; return cost / budget (speed.md §3.4)."""
    cost = storage_floats(cfg, num_classes, channels)
    budget = budget_floats(num_classes, cfg.ipc, channels, cfg.resolution)
    if cost > budget:
        raise UserError(f"SPEED config {cfg.name} stores {cost:,.0f} floats, over the IPC {cfg.ipc} budget of "
                        f"{budget:,} (speed.md §3.4); lower n_per_class, top_k, K or the FReeNet size")
    return cost / budget


def derive_config(dataset: str, ipc: int, num_classes: int, channels: int, resolution: int, *, patch: int,
                  num_saet: int, dim: int, depth: int, heads: int, top_k: int, l1_weight: float, batch_syn: int,
                  syn_steps: int, max_start_epoch: int, model: str | None = None,
                  topk_share: float | None = None) -> SpeedConfig:
    """A configuration for settings without a published row: the LARGEST n_per_class whose storage fits the
    budget (speed.md §3.4; the published rows sit at 97-99.9 % of it, and this rule reproduces their N/c).

    `model` defaults to the ConvNet depth that reaches a 4×4 map (speed.md §2): 28/32 px ConvNet, 64 ConvNetD4,
    128 ConvNetD5.
    """
    if model is None:
        if resolution not in _MODEL_BY_RES:
            raise UserError(f"SPEED: no default ConvNet for resolution {resolution}; pass model=")
        model = _MODEL_BY_RES[resolution]
    if resolution % patch:
        raise UserError(f"SPEED: resolution {resolution} is not divisible by the patch size {patch}")
    budget = budget_floats(num_classes, ipc, channels, resolution)
    fixed = num_saet * dim + count_params(dim, depth, patch, channels)
    per_class = FLOATS_PER_NONZERO * num_classes * heads * top_k
    n = int((budget - fixed) // per_class) if budget > fixed else 0
    while n > 0 and fixed + n * per_class > budget:      # guard against float rounding at the boundary
        n -= 1
    if n < 1:
        raise UserError(f"SPEED: the IPC {ipc} budget of {budget:,} floats for {dataset} cannot hold one image per "
                        f"class: SAET + FReeNet alone take {fixed:,} and one image per class {per_class:,.0f} "
                        "(speed.md §3.4); use a smaller D, T, K or top_k")
    return SpeedConfig(dataset, ipc, model, resolution, patch, n, num_saet, top_k, l1_weight, batch_syn, syn_steps,
                       max_start_epoch, dim, depth, heads, topk_share)


# ------------------------------------------------------------------ derived defaults (no published row)
# Datasets the paper never ran get their configuration from ONE rule (docs/SPEED_MTT.md, "Derived defaults"),
# applied to the published row nearest in geometry, never to a dataset name:
# - reference row: the published family of the nearest resolution (REFERENCE_FAMILY), at the largest published IPC
#   not above the requested one (the smallest otherwise);
# - patch: the divisor of R nearest to the reference patch scaled by R / R_ref (the code grid L stays ~ the same);
# - width D: the reference D times sqrt(rho), rounded to a multiple of h, where rho = channels·R² / (3·R_ref²) is
#   the per-image budget relative to the reference (FReeNet's cost grows with D², so it keeps its share of it);
# - K, T, h as the reference; k keeps the reference's KEPT FRACTION k / (L·K) of the codes per head;
# - n_per_class: the largest that fits the budget (derive_config, as the published rows do);
# - l1, batch_syn, syn_steps, max_start_epoch and every learning rate: the reference's; the model by resolution;
# - topk_share: the last DERIVED_TOPK_SHARE of the iterations train through the top-k codes that are saved
#   (published rows: None, the reference's dense training). Without it the derived one-channel rows lost to a random
#   real subset at short schedules (docs/RESULTS.md): what is stored was never what was trained (bug 10).
REFERENCE_FAMILY = {32: "CIFAR10", 64: "TinyImageNet", 128: "imagenette"}
DERIVED_TOPK_SHARE = 0.5


def _nearest_divisor(n: int, target: float) -> int:
    """The divisor of n nearest to target (the larger on a tie)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), -d))


def reference_row(resolution: int, ipc: int) -> SpeedConfig:
    """The published row a derived configuration starts from: family of the nearest resolution, largest IPC <= ipc
    (the smallest published IPC when ipc is below all of them)."""
    res = min(REFERENCE_FAMILY, key=lambda r: (abs(r - resolution), -r))
    family = REFERENCE_FAMILY[res]
    ipcs = sorted(i for (d, i) in SPEED_PRESETS if d == family)
    below = [i for i in ipcs if i <= ipc]
    return SPEED_PRESETS[(family, below[-1] if below else ipcs[0])]


def derive_defaults(dataset: str, ipc: int) -> SpeedConfig:
    """The derived configuration of a (dataset, IPC) without a published row (the rule above; speed.md §3.4)."""
    spec = get_dataset_spec(dataset)
    if spec.resolution < 1 or spec.num_classes < 1:
        raise UserError(f"SPEED: {spec.name} has no fixed resolution or class count; pass the code shape explicitly")
    ref = reference_row(spec.resolution, ipc)
    ref_channels = get_dataset_spec(ref.dataset).channels
    patch = _nearest_divisor(spec.resolution, ref.patch * spec.resolution / ref.resolution)
    tokens = (spec.resolution // patch) ** 2
    rho = spec.channels * spec.resolution ** 2 / (ref_channels * ref.resolution ** 2)
    dim = ref.heads * max(1, round(ref.dim * math.sqrt(rho) / ref.heads))
    top_k = min(tokens * ref.num_saet, max(1, round(ref.top_k * tokens / ref.tokens_per_image)))
    return derive_config(spec.name, ipc, spec.num_classes, spec.channels, spec.resolution, patch=patch,
                         num_saet=ref.num_saet, dim=dim, depth=ref.depth, heads=ref.heads, top_k=top_k,
                         l1_weight=ref.l1_weight, batch_syn=ref.batch_syn, syn_steps=ref.syn_steps,
                         max_start_epoch=ref.max_start_epoch, model=_MODEL_BY_RES.get(spec.resolution, ref.model),
                         topk_share=DERIVED_TOPK_SHARE)


# The derived defaults of the registry's datasets without a published row, at the usual IPCs (any other IPC of
# these datasets is derived on demand by speed_preset).
DERIVED_DEFAULTS: dict[tuple[str, int], SpeedConfig] = {
    (name, ipc): derive_defaults(name, ipc) for name in ("FashionMNIST", "MNIST", "SVHN") for ipc in (1, 10, 50)}


def speed_preset(dataset: str, ipc: int) -> SpeedConfig:
    """The published configuration for (dataset, IPC) (speed.md §4), or, for a dataset the paper never ran, the
    derived default (derive_defaults). Dataset names go through the registry (aliases such as "tiny" work)."""
    name = get_dataset_spec(dataset).name
    key = (name, int(ipc))
    if key in SPEED_PRESETS:
        return SPEED_PRESETS[key]
    if key in DERIVED_DEFAULTS:
        return DERIVED_DEFAULTS[key]
    if int(ipc) >= 1 and not any(d == name for (d, _) in SPEED_PRESETS):
        return derive_defaults(name, int(ipc))
    if key == ("TinyImageNet", 50):
        raise UserError("SPEED publishes no TinyImageNet IPC50 configuration (speed.md §4, §7 bug 2); "
                        "build one with utils.speed.derive_config and explicit settings")
    have = sorted({i for (d, i) in (*SPEED_PRESETS, *DERIVED_DEFAULTS) if d == name})
    if have:
        raise UserError(f"no SPEED configuration for {name} IPC {ipc} (have IPC {', '.join(map(str, have))}); "
                        "use utils.speed.derive_config with explicit settings")
    raise UserError(f"no SPEED configuration for {name}; use utils.speed.derive_config with explicit settings")


# ============================================================================ sparsity (§3.3, §5.1, bug 11)

def topk_prune(scm: torch.Tensor, k: int, chunk_elements: int = 1 << 24) -> torch.Tensor:
    """The original's feature sparsification (speed.md §3.3): per (image, head), keep every entry whose |value| is
    >= the k-th largest |value| of that L×K slice (ties keep more than k), zero the rest. No gradient.
    Works through the (image, head) rows in chunks so a multi-GB SCM (Tiny IPC10, §3.9) needs one extra copy only."""
    with torch.no_grad():
        n, h, l, kk = scm.shape
        lk = l * kk
        if not 1 <= k <= lk:
            raise UserError(f"top_k = {k} must lie in [1, L·K = {lk}]")
        flat = scm.detach().reshape(n * h, lk)
        out = torch.zeros_like(flat)
        rows = max(1, chunk_elements // lk)
        for s in range(0, n * h, rows):
            part = flat[s:s + rows]
            mag = part.abs()
            thr = mag.topk(k, dim=-1).values[:, -1:]
            keep = mag >= thr
            out[s:s + rows][keep] = part[keep]
        return out.reshape(n, h, l, kk)


def kept_code_mass(scm: torch.Tensor, k: int, chunk_elements: int = 1 << 24) -> float:
    """The share of the SCM's L1 mass (Σ|A|) that the k largest |value| per (image, head) hold: 1.0 when the saved
    top-k codes are all there is, small when pruning at save time throws most of the trained codes away (bug 10).
    An all-zero SCM counts as fully kept."""
    with torch.no_grad():
        n, h, l, kk = scm.shape
        if not 1 <= k <= l * kk:
            raise UserError(f"top_k = {k} must lie in [1, L·K = {l * kk}]")
        flat = scm.detach().reshape(n * h, l * kk).abs()
        rows = max(1, chunk_elements // (l * kk))
        kept = total = 0.0
        for s in range(0, n * h, rows):
            part = flat[s:s + rows].double()
            kept += float(part.topk(k, dim=-1).values.sum())
            total += float(part.sum())
        return kept / total if total > 0 else 1.0


def straight_through_topk(scm: torch.Tensor, k: int) -> torch.Tensor:
    """A non-default training variant (speed.md §7, "top-k with straight-through in training"): the forward pass
    sees exactly the k largest |value| per (image, head), i.e. the codes that will be saved, while the backward pass
    is the identity, so every entry keeps receiving the dense gradient and may enter the top-k later. Removes the
    train/eval mismatch of bug 10 at the cost of departing from the reference's dense training."""
    n, h, l, kk = scm.shape
    flat = scm.reshape(n, h, l * kk)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, flat.detach().abs().topk(k, dim=-1).indices, True)
    pruned = torch.where(keep, flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
    return (flat + (pruned - flat).detach()).reshape(n, h, l, kk)


def masked_topk(scm: torch.Tensor, k: int) -> torch.Tensor:
    """Like `straight_through_topk` in the forward pass, but the gradient reaches only the k kept entries per
    (image, head): pruned entries receive no matching gradient (only the L1 term moves them). Without the
    straight-through path, the large LayerNorm gradients of all-zero patch rows never reach the pruned codes."""
    n, h, l, kk = scm.shape
    flat = scm.reshape(n, h, l * kk)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, flat.detach().abs().topk(k, dim=-1).indices, True)
    return torch.where(keep, flat, torch.zeros((), dtype=flat.dtype, device=flat.device)).reshape(n, h, l, kk)


def pack_scm(scm: torch.Tensor, k: int, chunk_elements: int = 1 << 24) -> dict[str, torch.Tensor]:
    """Compact storage (speed.md §7 improvements, §3.4): exactly the k largest |value| per (image, head).

    Returns {"index": (N, h, k) int16, "value": (N, h, k) float32}; index is the flat position l·K + j in
    [0, L·K) stored as a uint16 bit pattern (L·K <= 65,536 required). Ties at the threshold are broken towards
    the lower position, and each row is sorted by position, so the result is deterministic. 6 bytes per entry.
    The result is detached and on the CPU (it is what a synthetic set stores).
    """
    with torch.no_grad():
        n, h, l, kk = scm.shape
        lk = l * kk
        if lk > INDEX_RANGE:
            raise UserError(f"SCM slices hold L·K = {lk} entries; the 16-bit index needs L·K <= {INDEX_RANGE}")
        if not 1 <= k <= lk:
            raise UserError(f"top_k = {k} must lie in [1, L·K = {lk}]")
        flat = scm.detach().reshape(n * h, lk)
        rows = max(1, chunk_elements // lk)
        idx_parts, val_parts = [], []
        for s in range(0, n * h, rows):
            part = flat[s:s + rows]
            order = part.abs().sort(dim=-1, descending=True, stable=True).indices[:, :k]
            pos = order.sort(dim=-1).values
            val_parts.append(part.gather(1, pos).float().cpu())
            idx_parts.append(_to_uint16_pattern(pos).cpu())
        empty = torch.empty(0, k)
        index = torch.cat(idx_parts) if idx_parts else empty.to(torch.int16)
        value = torch.cat(val_parts) if val_parts else empty
        return {"index": index.reshape(n, h, k), "value": value.reshape(n, h, k)}


def unpack_scm(packed: dict[str, torch.Tensor], tokens: int, num_saet: int) -> torch.Tensor:
    """The dense (N, h, L, K) SCM of a `pack_scm` result (zeros except the stored entries)."""
    index, value = packed["index"], packed["value"]
    if index.shape != value.shape or index.ndim != 3 or index.dtype != torch.int16:
        raise UserError(f"packed SCM needs int16 index and value of equal shape (N, h, k), got "
                        f"{index.dtype} {tuple(index.shape)} and {tuple(value.shape)}")
    n, h, _ = index.shape
    lk = tokens * num_saet
    pos = _from_uint16_pattern(index)
    if pos.numel() and int(pos.max()) >= lk:
        raise UserError(f"packed SCM index {int(pos.max())} is out of range for L·K = {lk}")
    dense = torch.zeros(n, h, lk, dtype=torch.float32, device=value.device)
    dense.scatter_(-1, pos, value.float())
    return dense.reshape(n, h, tokens, num_saet)


def _to_uint16_pattern(pos: torch.Tensor) -> torch.Tensor:
    return torch.where(pos >= 1 << 15, pos - INDEX_RANGE, pos).to(torch.int16)


def _from_uint16_pattern(index: torch.Tensor) -> torch.Tensor:
    return index.long() & (INDEX_RANGE - 1)


# ========================================================================= synthetic-set decoder (§5.1)

FREENET_PREFIX = "freenet."


def speed_tensors(saet: torch.Tensor, scm_dense: torch.Tensor, freenet: FReeNet, top_k: int
                  ) -> dict[str, torch.Tensor]:
    """The `tensors` of a SPEED synthetic set (writer side): saet (1, K, D), the top-k SCM packed as scm_index /
    scm_value (speed.md §5.1 step 1 with compact storage), and the FReeNet weights under `freenet.<key>`."""
    packed = pack_scm(scm_dense, top_k)
    out = {"saet": saet.detach().float().cpu().clone(), "scm_index": packed["index"], "scm_value": packed["value"]}
    for key, v in freenet.state_dict().items():
        out[FREENET_PREFIX + key] = v.detach().float().cpu().clone()
    return out


def speed_decoder_args(cfg: SpeedConfig, channels: int) -> dict:
    """meta["decoder_args"] for a set made with `cfg`."""
    return {"dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads, "patch": cfg.patch, "channels": channels,
            "resolution": cfg.resolution, "num_saet": cfg.num_saet, "tokens": cfg.tokens_per_image,
            "top_k": cfg.top_k, "mlp_ratio": MLP_RATIO}


def infer_decoder_args(saet: torch.Tensor, scm_dense: torch.Tensor, freenet_state: dict, channels: int = 3
                       ) -> dict:
    """decoder_args read off the original's saved components (§5.3), whose eval.py hard-codes them (§7 bug 1).

    top_k is the largest number of non-zeros in any (image, head) slice, so packing loses nothing even where the
    original's ties kept more than k entries.
    """
    _, k_saet, dim = saet.shape
    n, heads, tokens, _ = scm_dense.shape
    depth = len({key.split(".")[1] for key in freenet_state if key.startswith("decoder_blocks.")})
    out_features, pred_dim = freenet_state["decoder_pred.weight"].shape
    patch = math.isqrt(out_features // channels)
    if patch * patch * channels != out_features or pred_dim != dim:
        raise UserError(f"FReeNet output layer {tuple(freenet_state['decoder_pred.weight'].shape)} does not fit "
                        f"{channels} channels and width {dim}")
    hidden = freenet_state["decoder_blocks.0.mlp.fc1.weight"].shape[0] if depth else dim
    top_k = int((scm_dense.reshape(n, heads, -1) != 0).sum(-1).max()) if n else 1
    return {"dim": dim, "depth": depth, "heads": heads, "patch": patch, "channels": channels,
            "resolution": _grid_side(tokens) * patch, "num_saet": k_saet, "tokens": tokens, "top_k": max(top_k, 1),
            "mlp_ratio": hidden / dim}


def build_freenet(args: dict, state: dict | None = None) -> FReeNet:
    """A FReeNet from decoder_args, with `state` (a state_dict) loaded strictly when given."""
    net = FReeNet(int(args["dim"]), int(args["depth"]), int(args["heads"]), int(args["patch"]),
                  int(args.get("channels", 3)), float(args.get("mlp_ratio", MLP_RATIO)))
    if state is not None:
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"FReeNet weights do not match decoder_args {args}: "
                            f"{str(e).splitlines()[0][:200]}") from None
    return net


@torch.no_grad()
def decode_images(saet: torch.Tensor, packed: dict[str, torch.Tensor], freenet: FReeNet, tokens: int,
                  chunk: int = 0) -> torch.Tensor:
    """Decode every stored image once (speed.md §5.1 step 2), unpacking the SCM chunk by chunk."""
    n, h, _ = packed["index"].shape
    k_saet = saet.shape[1]
    chunk = chunk or max(1, (1 << 24) // max(1, h * tokens * k_saet))
    out = []
    for s in range(0, n, chunk):
        part = {name: t[s:s + chunk] for name, t in packed.items()}
        out.append(freenet(saet.float(), unpack_scm(part, tokens, k_saet)))
    if not out:
        return torch.empty(0, freenet.channels, _grid_side(tokens) * freenet.patch, _grid_side(tokens) * freenet.patch)
    return torch.cat(out)


@register_decoder("speed")
def decode_speed(tensors: dict, labels: torch.Tensor, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic-set decoder (speed.md §5.1): rebuild FReeNet, unpack the top-k SCM, decode all N images."""
    args = meta.get("decoder_args") or {}
    missing = [k for k in ("dim", "depth", "heads", "patch", "tokens", "num_saet") if k not in args]
    if missing:
        raise UserError(f"SPEED set: decoder_args lacks {', '.join(missing)}")
    for name in ("saet", "scm_index", "scm_value"):
        if name not in tensors:
            raise UserError(f"SPEED set: tensor '{name}' is missing")
    state = {k[len(FREENET_PREFIX):]: v for k, v in tensors.items() if k.startswith(FREENET_PREFIX)}
    net = build_freenet(args, state).eval()
    tokens = int(args["tokens"])
    packed = {"index": tensors["scm_index"], "value": tensors["scm_value"]}
    if len(labels) != len(packed["index"]):
        raise UserError(f"SPEED set: {len(packed['index'])} SCM rows but {len(labels)} labels")
    images = decode_images(tensors["saet"], packed, net, tokens)
    res = args.get("resolution")
    if res is not None and images.shape[-1] != int(res):
        raise UserError(f"SPEED set decodes {images.shape[-1]} px images but decoder_args says {res}")
    return images.float(), labels


# ===================================================================== original repository's files (§5.3)

def load_reference_files(saet_path: str | Path, scm_path: str | Path, freenet_path: str | Path,
                         syn_lr_path: str | Path | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor | None]:
    """Read the original SPEED outputs (speed.md §5.3): saet (1, K, D) dense, scm a sparse COO (N, h, L, K)
    (densified here), the FReeNet state_dict and the 0-dim syn_lr. Returns (saet, scm_dense, freenet_state, lr);
    lr is None without a path (the original's eval.py crashes there, §7 bug 6). All loads are weights_only."""
    with warnings.catch_warnings():
        # weights_only validates sparse-tensor invariants on load and says so; that is what we want, quietly.
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        saet = safe_torch_load(saet_path, "SPEED saet")
        scm = safe_torch_load(scm_path, "SPEED scm")
        state = safe_torch_load(freenet_path, "SPEED FReeNet state_dict")
        lr = None if syn_lr_path is None else safe_torch_load(syn_lr_path, "SPEED syn_lr")
        if not isinstance(saet, torch.Tensor) or saet.ndim != 3 or saet.shape[0] != 1:
            raise UserError(f"{saet_path}: expected the SAET tensor (1, K, D), got "
                            f"{tuple(saet.shape) if isinstance(saet, torch.Tensor) else type(saet).__name__}")
        if not isinstance(scm, torch.Tensor) or scm.ndim != 4:
            raise UserError(f"{scm_path}: expected the SCM tensor (N, h, L, K), got "
                            f"{tuple(scm.shape) if isinstance(scm, torch.Tensor) else type(scm).__name__}")
        scm = (scm.coalesce().to_dense() if scm.is_sparse else scm).detach().float()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{freenet_path}: expected a FReeNet state_dict")
    if "decoder_pred.weight" not in state:
        raise UserError(f"{freenet_path}: not a FReeNet state_dict (no decoder_pred.weight)")
    if saet.shape[1] != scm.shape[3]:
        raise UserError(f"SAET has {saet.shape[1]} tokens but the SCM's last axis is {scm.shape[3]}")
    if lr is not None:
        if isinstance(lr, (int, float)):
            lr = torch.tensor(float(lr))
        if not isinstance(lr, torch.Tensor) or lr.numel() != 1:
            raise UserError(f"{syn_lr_path}: expected a scalar learning rate")
        lr = lr.detach().float().reshape(())
    return saet.detach().float(), scm, {k: v.detach().float() for k, v in state.items()}, lr
