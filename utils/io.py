"""File I/O shared by every stage: atomic writes and safe loads.

Every artefact is written to a temporary file in the destination folder and renamed into place, so a
killed job never leaves a half-written file under the final name. Every `torch.load` goes through
`safe_torch_load`, which uses `weights_only=True`: a file carrying pickled code is refused, not run.
"""
from __future__ import annotations

import fcntl
import json
import os
import pickle
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from utils.errors import UserError


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` to a temp file then rename: readers see the old file or the new one, never half."""
    _atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    _atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))


def atomic_write_text(text: str, path: str | Path) -> None:
    _atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def atomic_write_json(obj: Any, path: str | Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", path)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def safe_torch_load(path: str | Path, what: str = "file") -> Any:
    """Load a torch file with `weights_only=True`, turning every failure into a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global that is not a tensor/container: pickled code lands here.
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported pickle content"
        raise UserError(f"refusing to load {path}: it is not a plain tensor file ({first[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {what} {path}: corrupt or truncated ({first[:160]})") from None


@contextmanager
def run_lock(folder: str | Path, stage: str, name: str = ".lock") -> Iterator[None]:
    """Hold an exclusive lock on `<folder>/<name>` while a stage writes `folder` (or one output file in it), so a
    second process started on the same output (a double-submitted job, a requeue racing its old copy) fails with one
    line instead of interleaving its files. flock locks vanish with their process, so a SIGKILLed run never leaves
    a stale lock. (flock is per host on most network file systems: two hosts are not excluded there.)"""
    folder = Path(folder)
    created = [] if folder.is_dir() else [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / name, "a+")
    locked = False
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown process"
            raise UserError(f"{folder} is being written by another {stage} process ({holder}); wait for it to end "
                            "or choose another output folder") from None
        locked = True
        if name == ".lock":   # the whole folder is ours: temp files of writes killed midway are garbage now
            for stale in folder.rglob(".*.tmp"):
                stale.unlink(missing_ok=True)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        if locked:   # leave no trace: the lock file goes, and so do the folders we made if nothing else was written
            (folder / name).unlink(missing_ok=True)
            for p in created:
                try:
                    p.rmdir()
                except OSError:
                    break
        f.close()   # closing releases the lock
