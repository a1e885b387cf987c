"""Run plumbing shared by the stage scripts: seeds, device choice, logs, and one-line errors."""
from __future__ import annotations

import csv
import functools
import io
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from utils.errors import UserError
from utils.io import atomic_write_text, write_fault
from utils.signals import Stopped
from utils.progress import progress, step  # noqa: F401  (the stages import them from here)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator seeded the same way for explicit use."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"unknown device '{name}' (auto, cpu, cuda, cuda:N)")
    return torch.device(name)


class RunLog:
    """Console messages and a CSV of rows (dicts). `constant` columns go into every row (e.g. a fingerprint of
    the configuration), and `resume=True` reads back the rows of an existing CSV, so a re-run can skip the work
    they record (`find`)."""

    def __init__(self, csv_path: str | Path | None, quiet: bool = False, constant: dict | None = None,
                 resume: bool = False):
        self.csv_path = Path(csv_path) if csv_path else None
        self.quiet = quiet
        self.constant = dict(constant or {})
        self.rows: list[dict] = []
        if resume and self.csv_path is not None and self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                self.rows = list(csv.DictReader(f))

    def find(self, **match: Any) -> dict | None:
        """The first row whose columns equal `match` (compared as text, since rows read back are text)."""
        return next((r for r in self.rows if all(str(r.get(k)) == str(v) for k, v in match.items())), None)

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def row(self, **values: Any) -> None:
        self.rows.append({**values, **self.constant})
        if self.csv_path is None:
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=keys)   # rewritten whole so new columns stay aligned
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(text.getvalue(), self.csv_path)


def require_at_least(flags: dict[str, int | None], least: int = 1) -> None:
    """One line for a count option below `least` (`flags`: option name -> value; None = not given). Every stage calls
    this first thing in its main for its counts (IPC, epochs, batch sizes, runs, subsets, ...), so a zero or negative
    count stops before any data is read: Python slicing would otherwise turn `--ipc -2` into "all but two images"
    and `--runs 0` into a mean over nothing."""
    for flag, value in flags.items():
        if value is not None and value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")


def user_message(e: UserError) -> str:
    """The one-line message of a UserError. A DataLoader worker's exception reaches the main process re-raised with
    the worker's whole traceback as its message ("Caught UserError in DataLoader worker ...\nOriginal Traceback
    ..."): keep only the original message, its last line."""
    text = str(e)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if last.startswith(("utils.errors.UserError: ", "UserError: ")) else last
    return " ".join(text.split("\n"))


def _stop_exit_status() -> int:
    value = os.environ.get("DDT_STOP_EXIT_STATUS", "").strip()
    return int(value) if value.isdigit() and int(value) < 256 else 143


def cli_errors(fn: Callable) -> Callable:
    """Wrap a stage's main: a UserError becomes `error: <message>` on stderr and exit status 2, and so does an
    operating-system fault of a write (disk full, read-only, permission, a file or folder in the way:
    `utils.io.WRITE_FAULTS`); a stop request honoured at a safe point (utils.signals.Stopped) one line and exit
    status 143, or DDT_STOP_EXIT_STATUS when set (scripts/slurm/torchrun.sbatch sets 0: torchrun then ends as after
    a finished run, without a traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {user_message(e)}", file=sys.stderr)
            raise SystemExit(2)
        except OSError as e:
            fault = write_fault(e)
            if fault is None:
                raise
            print(f"error: {user_message(fault)}", file=sys.stderr)
            raise SystemExit(2)
        except Stopped as e:  # SIGTERM/SIGUSR1 honoured at a safe point (utils/signals.py)
            print(f"{e}", file=sys.stderr)
            raise SystemExit(_stop_exit_status())
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130)
    return wrapper
