"""What every parity check shares: one compared quantity (ParityLine) and how two tensors are compared.
Used by bench/parity.py and its family modules (parity_gm, parity_tm, parity_decoupled)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_RTOL = 1e-5


@dataclass
class ParityLine:
    """One compared quantity. `gating` False marks an informational line (our default vs the original where the
    default deliberately differs; `note` names the fix)."""
    method: str
    quantity: str
    max_abs: float
    rel: float
    tol: float
    gating: bool = True
    note: str = ""

    @property
    def ok(self) -> bool:
        return (not self.gating) or (math.isfinite(self.rel) and self.rel <= self.tol)

    def render(self) -> str:
        status = "OK  " if self.ok and self.gating else ("INFO" if not self.gating else "FAIL")
        note = f"  ({self.note})" if self.note else ""
        return (f"{status} {self.method:<6} {self.quantity:<48} max_abs={self.max_abs:.3e} rel={self.rel:.3e} "
                f"tol={self.tol:.0e}{note}")


def compare(method: str, quantity: str, ours, theirs, *, tol: float = DEFAULT_RTOL, gating: bool = True,
            note: str = "") -> ParityLine:
    """Max absolute error, and the relative error max|ours - theirs| / max|theirs| (a norm-wise ratio, so entries
    near zero do not blow it up). Shapes must agree exactly; a mismatch is a failed line, not an exception."""
    ours = torch.as_tensor(ours).detach().double().cpu()
    theirs = torch.as_tensor(theirs).detach().double().cpu()
    if ours.shape != theirs.shape:
        return ParityLine(method, quantity, math.inf, math.inf, tol, gating,
                          f"shape {tuple(ours.shape)} vs original {tuple(theirs.shape)}" + (f"; {note}" if note else ""))
    if ours.numel() == 0:
        return ParityLine(method, quantity, 0.0, 0.0, tol, gating, note)
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    return ParityLine(method, quantity, diff, rel, tol, gating, note)
