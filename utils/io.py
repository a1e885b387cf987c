"""File I/O shared by every stage: atomic writes and safe loads.

Every artefact is written to a temporary file in the destination folder and renamed into place, so a
killed job never leaves a half-written file under the final name. Temp files and folders get the mode a plain
`open` / `mkdir` would give (0666 / 0777 less the umask), not mkstemp's 0600 / mkdtemp's 0700: the result keeps
its temp file's mode, and colleagues reading a shared results folder must be able to open it.
Every `torch.load` goes through `safe_torch_load`, which uses `weights_only=True`: a file carrying pickled code is
refused, not run.
"""
from __future__ import annotations

import errno
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


def current_umask() -> int:
    """The process umask, read from /proc where Linux offers it (setting it to read it back is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """`tempfile.mkdtemp` in `parent`, with the mode `mkdir` would give: a temp folder renamed into place as the
    result (a synthetic set, an export) keeps its mode, and mkdtemp's 0700 locks everyone else out."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


# What the operating system answers when a file cannot be written where the user pointed: each becomes one line
# naming the file (`write_fault`), in the atomic writes below and in `utils.misc.cli_errors` for any other write.
WRITE_FAULTS = {
    errno.ENOSPC: "the disk is full; free some space or choose another output folder",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another output folder",
    errno.EFBIG: "the file is too large for its file system",
    errno.EROFS: "the file system is read-only; choose another output folder",
    errno.EACCES: "permission denied; choose an output folder you may write",
    errno.EPERM: "operation not permitted; choose an output folder you may write",
    errno.EISDIR: "a folder stands where a file is to be written",
    errno.ENOTDIR: "a file stands where a folder is expected",
    errno.EEXIST: "a file stands where a folder is to be made",
    errno.ENAMETOOLONG: "the name is too long for the file system",
}


def write_fault(e: OSError, path: str | Path | None = None) -> UserError | None:
    """The one-line error for an OSError of `WRITE_FAULTS` met while writing `path` (else e.filename); None for any
    other error, which is left to surface as it is."""
    if e.errno not in WRITE_FAULTS:
        return None
    where = path if path is not None else (e.filename or "a file")
    return UserError(f"cannot write {where}: {e.strerror or os.strerror(e.errno)} ({WRITE_FAULTS[e.errno]})")


def check_writable(path: str | Path, flag: str, folder: bool = True) -> None:
    """Fail now, in one line, when the output `path` (a folder when `folder`, else a file) cannot be written: a
    stage calls this before it reads data or trains, so a mistake costs seconds, not a night's run. The nearest
    existing folder is probed with a temp file that is removed at once; nothing is created."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is an existing file, not a folder")
    if not folder and path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    d = path if folder else path.parent
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise UserError(f"{flag} {path} cannot be written: {d} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable: {e.strerror} ({d})") from None


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise (write_fault(e, path) or e) from None
    os.fchmod(fd, 0o666 & ~current_umask())   # mkstemp's 0600 would become the artefact's mode
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        fault = write_fault(e, path) if isinstance(e, OSError) else None
        if fault is not None:
            raise fault from None
        raise


def torch_save_file(obj: Any, path: str | Path) -> None:
    """`torch.save` through an unbuffered Python file: a full disk then surfaces as OSError(ENOSPC), where torch's own
    file writer reports only an opaque "unexpected pos" RuntimeError. (The archive inside is then named "archive"
    instead of after the temp file, so the same object gives the same bytes.)"""
    with open(path, "wb", buffering=0) as f:
        torch.save(obj, f)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` to a temp file then rename: readers see the old file or the new one, never half."""
    _atomic_write(Path(path), lambda tmp: torch_save_file(obj, tmp))


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


def refuse_overlap(out: str | Path, out_flag: str, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output folder inside an input dataset folder (its files would become part of the data the next
    run reads: a new class folder, stray images) or holding one (a stage that replaces its output whole would
    delete the data). `inputs`: flag -> folder; archives, missing paths and None are skipped."""
    o = Path(out).expanduser().resolve()
    for flag, src in inputs.items():
        if src is None or not Path(src).expanduser().is_dir():
            continue
        s = Path(src).expanduser().resolve()
        if o == s or s in o.parents:
            raise UserError(f"{out_flag} {out} is inside the input dataset {flag} {src}: what is written there would "
                            "become part of the data; choose an output folder outside it")
        if o in s.parents:
            raise UserError(f"{out_flag} {out} holds the input dataset {flag} {src}: replacing the output would "
                            "touch the data; choose an output folder that does not contain it")


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
