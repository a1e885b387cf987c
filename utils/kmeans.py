"""Batched, seeded k-means in torch (runs wherever its input lives, GPU included), for DREAM's representative
matching (idc_dream.md §7.1) and clustering-based initialisation (§7.2).

Differences from the `fast_pytorch_kmeans` package the reference uses, following §9.2's recommendations:
* starting centres are k distinct data points drawn with a torch.Generator (the library draws with replacement in
  its 0.2.x releases, which produces duplicate centres and empty clusters);
* an empty cluster is re-seeded at the point farthest from its centre instead of collapsing to the zero vector;
* several problems of equal size are solved at once (a leading batch dimension, e.g. one per class).
Stopping rule as in the library: stop when the summed squared centre shift falls below `tol`, or after `iters`.
"""
from __future__ import annotations

import torch


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [B, n, k] between rows of x [B, n, d] and centres c [B, k, d]."""
    d = (x * x).sum(-1, keepdim=True) - 2 * x @ c.transpose(1, 2) + (c * c).sum(-1).unsqueeze(1)
    return d.clamp_min_(0)


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator | None = None, iters: int = 100,
           tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster x [n, d] or [B, n, d] into k clusters; returns (centres [B?, k, d], assignment [B?, n]).

    Deterministic given the generator (which may live on the CPU while x is on the GPU).
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(0)
    b, n, _ = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n points (k={k}, n={n})")
    x = x.float()
    start = torch.stack([torch.randperm(n, generator=generator)[:k] for _ in range(b)]).to(x.device)
    centres = torch.gather(x, 1, start.unsqueeze(-1).expand(-1, -1, x.shape[-1])).clone()
    assign = torch.zeros(b, n, dtype=torch.long, device=x.device)
    for _ in range(iters):
        dist = _sq_dist(x, centres)
        assign = dist.argmin(-1)
        onehot = torch.zeros(b, n, k, device=x.device, dtype=x.dtype).scatter_(2, assign.unsqueeze(-1), 1.0)
        counts = onehot.sum(1)                                            # [B, k]
        new = onehot.transpose(1, 2) @ x / counts.clamp_min(1).unsqueeze(-1)
        empty = counts == 0
        if empty.any():  # re-seed each empty cluster at the point farthest from its assigned centre
            far = dist.gather(2, assign.unsqueeze(-1)).squeeze(-1)        # [B, n]
            for bi, ki in empty.nonzero().tolist():
                i = int(far[bi].argmax())
                new[bi, ki] = x[bi, i]
                far[bi, i] = -1.0
        shift = ((new - centres) ** 2).sum((1, 2))
        centres = new
        if bool((shift < tol).all()):
            break
    assign = _sq_dist(x, centres).argmin(-1)
    return (centres[0], assign[0]) if squeeze else (centres, assign)


def nearest_to_centres(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the data point nearest each centre (one per centre; duplicates possible, as in DREAM §7.1)."""
    squeeze = x.dim() == 2
    if squeeze:
        x, centres = x.unsqueeze(0), centres.unsqueeze(0)
    idx = _sq_dist(x.float(), centres.float()).argmin(1)                   # [B, k]
    return idx[0] if squeeze else idx


def representatives(x: torch.Tensor, k: int, generator: torch.Generator | None = None, iters: int = 100,
                    tol: float = 1e-4) -> torch.Tensor:
    """DREAM's query: k-means with k centres, then the nearest sample to each centre (idc_dream.md §7.1)."""
    centres, _ = kmeans(x, k, generator, iters, tol)
    return nearest_to_centres(x, centres)
