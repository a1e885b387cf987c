"""Resume checkpoints of the stage scripts: a plain dict of a dataclass's fields, tagged with a format name and a
fingerprint of the settings, written atomically and read back with weights_only=True.

A stage keeps its own state dataclass (what it needs to continue) and calls `save_state` every --ckpt-every
iterations; `load_state` refuses a file of another stage or of other settings with one line.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from utils.digest import changed_inputs
from utils.errors import UserError
from utils.io import atomic_torch_save, safe_torch_load

T = TypeVar("T")


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """A short stable hash of the settings that decide a run's result (JSON with sorted keys)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def state_dict(state: Any, fmt: str, fingerprint: str, inputs: dict[str, str] | None = None) -> dict:
    """The checkpoint dict of a dataclass instance: its fields plus `format`, `fingerprint` and, when given, the
    content fingerprints of the files the run reads (`inputs`, utils/digest.py)."""
    d = {f.name: getattr(state, f.name) for f in fields(state)}
    d.update(format=fmt, fingerprint=fingerprint)
    if inputs is not None:
        d["inputs"] = dict(inputs)
    return d


def save_state(state: Any, path: str | Path, fmt: str, fingerprint: str,
               inputs: dict[str, str] | None = None) -> None:
    atomic_torch_save(state_dict(state, fmt, fingerprint, inputs), path)


def check_inputs(d: dict, path: str | Path, inputs: dict[str, str] | None, out_flag: str) -> None:
    """Refuse a checkpoint recorded against other contents of the run's input files (same paths, new files)."""
    if inputs is None:
        return
    changed = changed_inputs(d.get("inputs"), inputs, "this checkpoint was written")
    if changed:
        raise UserError(f"{path} cannot be continued: {changed}; pass --overwrite to start afresh or use another "
                        f"{out_flag}")


def load_state(path: str | Path, cls: type[T], fmt: str, fingerprint: str, stage: str, out_flag: str = "--out",
               inputs: dict[str, str] | None = None) -> T:
    """Read a checkpoint written by `save_state` for `cls`; one-line errors for another stage, other settings or
    (with `inputs`) input files whose content changed since (`out_flag`: the stage's flag that names where the
    checkpoint lives, for the message)."""
    d = safe_torch_load(path, f"{stage} checkpoint")
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise UserError(f"{path} is not a {stage} checkpoint; move it away or choose another {out_flag}")
    if d.get("fingerprint") != fingerprint:
        raise UserError(f"{path} belongs to a run with other settings; pass --overwrite to start afresh or use "
                        f"another {out_flag}")
    bad = first_nonfinite(d)
    if bad is not None:   # resuming would train on, and report, garbage (or blame the lr for the NaN loss)
        raise UserError(f"{path} holds NaN/Inf values in '{bad}': the checkpoint is damaged; pass --overwrite to "
                        f"start afresh or use another {out_flag}")
    check_inputs(d, path, inputs, out_flag)
    try:   # fields added later have defaults, so an older checkpoint of the same format still loads
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
    except TypeError as e:
        raise UserError(f"{path} is an incomplete {stage} checkpoint ({e})") from None


def first_nonfinite(obj: Any, where: str = "") -> str | None:
    """The key path of the first floating tensor holding NaN/Inf inside nested dicts/lists, or None."""
    if isinstance(obj, torch.Tensor):
        return (where or "tensor") if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = first_nonfinite(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def resume_or_start(out: str | Path, load: Callable[[Path], T], overwrite: bool,
                    run_files: tuple[str, ...] = ("ckpt.pt", "log.csv")) -> T | None:
    """The run-folder protocol of the stages that write a set into their output folder: a checkpoint there is
    resumed (`load` checks it belongs to these settings); a finished set without one is refused; `overwrite`
    deletes the run's own files (`run_files`) and starts afresh. Returns the loaded state, or None for a fresh run."""
    out = Path(out)
    ckpt = out / "ckpt.pt"
    if ckpt.exists() and not overwrite:
        return load(ckpt)
    if (out / "synset.pt").exists() and not overwrite:
        raise UserError(f"{out} already holds a finished set; pass --overwrite or choose another --out")
    if overwrite:
        for name in run_files:
            (out / name).unlink(missing_ok=True)
    return None


def capture_rng() -> dict:
    """The process-wide random states (torch CPU, CUDA when present, numpy, python) as plain data, so a resume
    checkpoint holding them stays readable with weights_only=True. Run-local generators (a stage's
    torch.Generator, DSA's seed stream) are saved by the stage beside this."""
    np_state = np.random.get_state()
    py = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "python": [py[0], list(py[1]), py[2]],
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached": float(np_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Put back what `capture_rng` returned (CUDA states only when this process has the same devices)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class Diverged(UserError):
    """A loss or a learned rate became NaN/inf: the stage stops without overwriting its last good checkpoint."""


def check_finite(value: float, where: str, lower: str, ckpt: str | Path | None = None) -> None:
    """Raise `Diverged` when `value` is NaN or inf. `where` says when (e.g. "iteration 120"), `lower` which setting
    to lower (e.g. "--lr-img"), `ckpt` the last good checkpoint that is kept (None: the run has none yet)."""
    if math.isfinite(float(value)):
        return
    if ckpt is None:
        kept = "the run's last checkpoint (if one was written) is kept"
    elif Path(ckpt).exists():
        kept = f"the last good checkpoint {ckpt} is kept"
    else:
        kept = "no checkpoint was written yet"
    raise Diverged(f"the loss became {float(value)} at {where}; {kept}; lower {lower} and re-run "
                   "(pass --overwrite to start afresh with the new value)")
