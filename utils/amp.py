"""Mixed precision shared by every stage with a training or optimisation loop (`--amp {off,bf16,fp16}`).

`resolve_amp(mode, device)` turns the flag into an `Amp`: its `autocast()` wraps a stage's hot forward passes
(convolutions and matrix products run in the low precision; PyTorch's autocast policy already keeps losses,
softmax and reductions in fp32), its `scaler()` is a GradScaler for fp16 and a no-op pass-through otherwise.
What stays fp32 is the stage's job and is done by calling `fp32(x)` on what leaves the autocast region: logits
before a loss, BN statistics hooked in recover.py, the gradient-matching metric, ZCA (never autocast).

Modes: `off` (default, bitwise the fp32 code path: autocast is not even entered), `bf16` on a CUDA GPU or on a
CPU with native bf16 instructions (avx512_bf16 / AMX, as oneDNN reports them; elsewhere bf16 is emulated and
slower, so it is refused), `fp16` on a CUDA GPU only (CPU fp16 autocast is slow and has no scaler benefit).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from utils.errors import UserError

AMP_MODES = ("off", "bf16", "fp16")
AMP_HELP = ("Mixed precision of the hot forward/backward passes: off (fp32, default), bf16 (CUDA, or a CPU with "
            "avx512_bf16/AMX), fp16 (CUDA, with a grad scaler). BN statistics, losses and metrics stay fp32.")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 convolutions/GEMMs natively on this CPU (avx512_bf16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _NoScaler:
    """GradScaler's interface for bf16/fp32: scale is 1, step is the optimiser's own step."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale_(self, opt: torch.optim.Optimizer) -> None:
        pass

    def step(self, opt: torch.optim.Optimizer) -> None:
        opt.step()

    def update(self) -> None:
        pass

    def is_enabled(self) -> bool:
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass(frozen=True)
class Amp:
    """A resolved `--amp` mode for one device."""
    mode: str = "off"
    device_type: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES.get(self.mode, torch.float32)

    def autocast(self):
        """The autocast region for hot forward passes; a null context for `off` (so fp32 is untouched)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def scaler(self):
        """torch.amp.GradScaler for fp16 (gradients would underflow), a pass-through otherwise."""
        if self.mode == "fp16":
            return torch.amp.GradScaler(self.device_type)
        return _NoScaler()

    def wrap(self, fn: Callable) -> Callable:
        """`fn` run inside this autocast region, its tensor result returned in fp32."""
        if not self.enabled:
            return fn

        def run(*args: Any, **kwargs: Any):
            with self.autocast():
                return fp32(fn(*args, **kwargs))
        return run


OFF = Amp()


def fp32(x):
    """A tensor (or tuple/list of tensors) leaving an autocast region, back in fp32 for losses and metrics."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
    if isinstance(x, (tuple, list)):
        return type(x)(fp32(v) for v in x)
    return x


def as_amp(amp, device: torch.device | str) -> Amp:
    """An Amp as is; a mode name (or the old boolean) resolved for `device`."""
    return amp if isinstance(amp, Amp) else resolve_amp(amp, device)


def resolve_amp(mode: str | bool | None, device: torch.device | str, allow_fp16: bool = True,
                fp16_reason: str = "") -> Amp:
    """Check `--amp MODE` against the device and return the Amp to use; every refusal is one UserError line.

    `allow_fp16=False` is for stages whose pixel gradient goes through a double backward or an unrolled inner
    loop, where a GradScaler cannot rescale the inner gradients (`fp16_reason` says why)."""
    if mode is None or mode is False:
        mode = "off"
    if mode is True:    # the old boolean `--amp` of the Python API meant bf16
        mode = "bf16"
    mode = str(mode).lower()
    if mode not in AMP_MODES:
        raise UserError(f"--amp must be one of {', '.join(AMP_MODES)} (got '{mode}')")
    dev = torch.device(device)
    if mode == "off":
        return Amp("off", dev.type)
    if mode == "fp16":
        if dev.type != "cuda":
            raise UserError("--amp fp16 needs a CUDA GPU (fp16 autocast on CPU is slow); use --amp bf16 or off")
        if not allow_fp16:
            raise UserError(f"--amp fp16 is not supported here ({fp16_reason}); use --amp bf16")
    if mode == "bf16" and dev.type == "cpu" and not cpu_has_native_bf16():
        raise UserError("--amp bf16 on this CPU would be emulated and slower (no avx512_bf16/AMX); use --amp off")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--amp {mode} is not supported on device '{dev.type}'")
    return Amp(mode, dev.type)
