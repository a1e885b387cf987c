"""ZCA whitening as used by MTT/SPEED on CIFAR (speed.md §1.2).

Fitted on the TRAIN split only; the same train mean and matrices are applied to any other split.

    mu    = per-feature train mean (features = C*H*W, flattened in C, H, W order)
    Sigma = (X - mu)^T (X - mu) / (N - 1)          unbiased, as kornia's ZCAWhitening(unbiased=True)
    Sigma = U diag(S) U^T                          SVD, as kornia
    W     = U diag((S + eps)^(-1/2)) U^T           whitening matrix (eps = 0.1)
    W^-1  = U diag((S + eps)^(+1/2)) U^T           its inverse
    transform(x) = (x - mu) W,   inverse(z) = z W^-1 + mu

Storage decision: the state dict holds the eigenvectors U (D x D), the eigenvalues S (D), the mean (D) and
eps; W and W^-1 are derived on first use and cached per device. That is one D x D matrix on disk (36 MB for
CIFAR) instead of two.

Fit decision: the covariance is accumulated in row chunks (float32 products summed in float64) instead of
calling kornia's `zca_mean` on the whole set, which would hold a second centred N x D copy (+614 MB for
CIFAR-10). The decomposition and the matrix formulas are kornia's (SVD of the covariance in float64, U and
S kept in float32, W = U (S+eps)^(-1/2) U^T built in float32); tests check the result against
`kornia.enhance.ZCAWhitening` on the same data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from utils.errors import UserError

_FORMAT = "zca-usv-1"
_ROW_CHUNK = 4096  # rows per covariance / transform step: bounds the temporaries to chunk x D floats


class ZCA:
    """A fitted ZCA whitening (speed.md §1.2); build it with `ZCA.fit` or `ZCA.from_state_dict`."""

    def __init__(self, mean: Tensor, eigvecs: Tensor, eigvals: Tensor, eps: float, shape: tuple[int, ...]):
        self.mean = mean.detach().float().reshape(-1).cpu()
        self.eigvecs = eigvecs.detach().float().cpu()
        self.eigvals = eigvals.detach().float().reshape(-1).cpu()
        self.eps = float(eps)
        self.shape = tuple(int(s) for s in shape)
        d = self.mean.numel()
        if self.eigvecs.shape != (d, d) or self.eigvals.numel() != d or _prod(self.shape) != d:
            raise UserError(
                f"inconsistent ZCA data: mean has {d} features, eigenvectors {tuple(self.eigvecs.shape)}, "
                f"eigenvalues {self.eigvals.numel()}, image shape {self.shape}"
            )
        self._cache: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    # ------------------------------------------------------------------------------------------------
    # Fitting
    # ------------------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, x: Tensor, eps: float = 0.1) -> "ZCA":
        """Fit on train images x of shape (N, C, H, W) (speed.md §1.2 steps 1-5).

        Works on x's device; the covariance is built in chunks of rows so that a full CIFAR train set
        (50,000 x 3072) needs only the covariance and one chunk of temporaries besides x itself.
        """
        if x.dim() != 4:
            raise ValueError(f"ZCA.fit expects (N, C, H, W) images, got shape {tuple(x.shape)}")
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"ZCA.fit needs at least two images for an unbiased covariance, got {n}")
        flat = x.detach().reshape(n, -1)
        mean = _chunked_mean(flat)
        cov = _chunked_covariance(flat, mean)
        # kornia takes an SVD of the covariance in float64. The covariance is symmetric PSD, so its eigh gives the
        # same eigenpairs (up to order and sign, which W = U f(S) U^T does not see) several times faster on CPU.
        # Clamp tiny negative round-off eigenvalues to 0, where the SVD's singular values would be.
        s, u = torch.linalg.eigh(cov.double())
        s, u = s.flip(0).clamp_min(0), u.flip(1)  # descending, like the SVD
        return cls(mean.float(), u.float(), s.float(), eps, tuple(x.shape[1:]))

    # ------------------------------------------------------------------------------------------------
    # Applying
    # ------------------------------------------------------------------------------------------------

    def _matrices(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, W, W^-1) on device, derived from U and S once per device (speed.md §1.2 step 5)."""
        key = torch.device(device)
        if key not in self._cache:
            u = self.eigvecs.to(device)
            s = self.eigvals.to(device).reshape(-1, 1)
            # Same products as kornia: U @ (d * U^T) with d = (S + eps)^(-1/2) or (S + eps)^(1/2).
            w = u.mm(torch.rsqrt(s + self.eps) * u.t())
            w_inv = u.mm(torch.sqrt(s + self.eps) * u.t())
            self._cache[key] = (self.mean.to(device), w, w_inv)
        return self._cache[key]

    def _check(self, x: Tensor) -> None:
        """Reject images whose trailing (C, H, W) differ from the fitted ones."""
        if x.dim() < 3 or tuple(x.shape[-3:]) != self.shape:
            raise UserError(
                f"ZCA was fitted on images of shape {self.shape} but got a tensor of shape {tuple(x.shape)}; "
                f"use the ZCA file of the same dataset"
            )

    def transform(self, x: Tensor) -> Tensor:
        """Whiten x of shape (..., C, H, W) with the TRAIN mean: (x - mu) W. Same shape, dtype and device."""
        self._check(x)
        mean, w, _ = self._matrices(x.device)
        return _rowwise(x, lambda rows: (rows - mean).mm(w), len(self.shape))

    def inverse(self, z: Tensor) -> Tensor:
        """Undo `transform`: z W^-1 + mu (equal to kornia's (z + mu W) W^-1 since W W^-1 = I)."""
        self._check(z)
        mean, _, w_inv = self._matrices(z.device)
        return _rowwise(z, lambda rows: rows.mm(w_inv) + mean, len(self.shape))

    __call__ = transform

    # ------------------------------------------------------------------------------------------------
    # Saving and loading
    # ------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain tensors, floats, ints and strings, loadable with torch.load(weights_only=True)."""
        return {
            "format": _FORMAT,
            "eps": self.eps,
            "shape": list(self.shape),
            "mean": self.mean.clone(),
            "eigvecs": self.eigvecs.clone(),
            "eigvals": self.eigvals.clone(),
        }

    @classmethod
    def from_state_dict(cls, d: dict) -> "ZCA":
        """Rebuild a ZCA saved by `state_dict`; a foreign or damaged dict is a user error."""
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise UserError(f"not a ZCA state (expected format {_FORMAT!r}, found {found!r})")
        missing = [k for k in ("eps", "shape", "mean", "eigvecs", "eigvals") if k not in d]
        if missing:
            raise UserError(f"ZCA state is missing {', '.join(missing)}")
        return cls(d["mean"], d["eigvecs"], d["eigvals"], d["eps"], tuple(d["shape"]))


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _chunked_mean(flat: Tensor) -> Tensor:
    """Per-feature mean of (N, D) rows in float64, one chunk at a time."""
    total = torch.zeros(flat.shape[1], dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[0], _ROW_CHUNK):
        total += flat[start : start + _ROW_CHUNK].double().sum(0)
    return total / flat.shape[0]


def _chunked_covariance(flat: Tensor, mean: Tensor) -> Tensor:
    """Unbiased covariance (X - mu)^T (X - mu) / (N - 1) in float64, from float32 chunk products.

    Chunk products run in float32 (fast on CPU and GPU); summing them in float64 keeps the error of the
    50,000-row sum from growing with N.
    """
    d = flat.shape[1]
    cov = torch.zeros(d, d, dtype=torch.float64, device=flat.device)
    mean32 = mean.float()
    for start in range(0, flat.shape[0], _ROW_CHUNK):
        centred = flat[start : start + _ROW_CHUNK].float() - mean32
        cov += centred.t().mm(centred).double()
    return cov / (flat.shape[0] - 1)


def _rowwise(x: Tensor, fn, feature_dims: int) -> Tensor:
    """Apply fn to x flattened to (rows, D) in float32, chunked for large inputs, and restore shape/dtype.

    Small inputs (or inputs needing gradients) go in one step; large ones are processed in chunks written
    into a preallocated output so a 50,000-image split needs no full-size temporaries.
    """
    shape, dtype = x.shape, x.dtype
    rows = x.reshape(-1, _prod(shape[-feature_dims:])).float()
    if rows.shape[0] <= _ROW_CHUNK or rows.requires_grad:
        out = fn(rows)
    else:
        out = torch.empty_like(rows)
        for start in range(0, rows.shape[0], _ROW_CHUNK):
            out[start : start + _ROW_CHUNK] = fn(rows[start : start + _ROW_CHUNK])
    return out.reshape(shape).to(dtype)
