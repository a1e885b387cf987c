"""Fingerprints of what a run reads, so that a result or a checkpoint is tied to the content of its inputs and
not only to their paths (a set replaced at the same path must not inherit the old set's numbers).

Two kinds of record per file, chosen by what the file is:
- bytes: the file's size and the SHA-1 of its bytes, streamed. For files a run reads whole anyway and that are
  small next to the work done with them: synthetic sets (synset.pt, meta.json, zca.pt), teacher files, JSON
  records. Robust to copies and to edits that keep size and modification time.
- stat: the file's size and modification time (ns). For inputs too large to hash at every start: the images of
  a dataset or of an ImageFolder set, expert trajectory files (a CIFAR-10 buffer is several GB). Every tool that
  rewrites a file (buffer.py --overwrite, an image editor, rsync without -t) moves its modification time; an edit
  that keeps both size and modification time (touch -r, a copy with preserved times onto the same size) is not
  seen, and a copy with fresh times counts as a change.

`files_digest` returns one short hex string over all records (names included, so a renamed or added file counts);
`tensor_checksum` is the SHA-1 of a tensor's bytes (the dataset cache checks its entries with it).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable

import torch

CHUNK = 1 << 22   # 4 MiB reads: streamed, never the whole file in memory


def bytes_sha1(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | Path, by_bytes: bool) -> str:
    """One file as text: `size:sha1` (by_bytes) or `size@mtime_ns`; `missing` for a file that is not there."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    return f"{st.st_size}:{bytes_sha1(path)}" if by_bytes else f"{st.st_size}@{st.st_mtime_ns}"


def files_digest(files: Iterable[str | Path], root: str | Path | None = None,
                 by_bytes: bool | Callable[[Path], bool] = True) -> str:
    """A 16-hex-digit fingerprint of `files` (their names relative to `root`, in the order given, and each file's
    record). `by_bytes`: hash every file's bytes (True), record size and mtime only (False), or decide per file."""
    h = hashlib.sha1()
    for f in files:
        p = Path(f)
        name = p.relative_to(root).as_posix() if root is not None else str(p)
        hashed = by_bytes(p) if callable(by_bytes) else by_bytes
        h.update(f"{name}\0{file_record(p, hashed)}\n".encode())
    return h.hexdigest()[:16]


def tensor_checksum(t: torch.Tensor) -> str:
    """SHA-1 of a CPU tensor's bytes (with its dtype and shape), for verifying a stored tensor before use."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def changed_inputs(recorded: dict | None, current: dict[str, str], when: str) -> str | None:
    """Compare the input fingerprints a record was made with (`{description: digest}`, e.g.
    `{"the synthetic set runs/x": "3f0c..."}`) to the current ones: None when they agree, else a clause for the
    one-line refusal, e.g. "the synthetic set runs/x changed since this checkpoint was written" for `when` =
    "this checkpoint was written". A record from before fingerprints (None) agrees only when nothing is
    fingerprinted now."""
    if recorded is None:
        if not current:
            return None
        return f"{when} before the toolkit fingerprinted its inputs, so whether {' or '.join(current)} changed " \
               "since cannot be told"
    changed = [k for k in current if recorded.get(k) != current[k]] + [k for k in recorded if k not in current]
    return f"{' and '.join(changed)} changed since {when}" if changed else None
