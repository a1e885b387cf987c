"""Progress that is visible wherever a stage runs: a terminal, a log file under nohup, a Slurm job.

- `progress(iterable, total, desc)`: on a terminal a tqdm bar; when stderr is not a terminal (nohup, Slurm, a pipe)
  a plain line at most every `INTERVAL_S` seconds with position, rate and ETA, and a closing line when the loop
  has printed anything, so a log never shows a long silence and never receives a carriage return.
- `step(desc)`: a long step that is not a loop (decoding a split, fitting ZCA, clustering) announces itself when
  it starts and, when it took more than a few seconds, says how long it took.

Only rank 0 of a torchrun job prints (its `RANK` variable is absent or 0), so ranks do not interleave.
`DDT_PROGRESS` overrides the choice: `bar` (or `1`) forces the bar, `lines` the lines, `0` / `off` silences both.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TextIO

INTERVAL_S = 30.0       # at most one line per this many seconds per loop when stderr is not a terminal
STEP_DONE_AFTER_S = 2.0  # a step shorter than this ends silently


def is_main_rank() -> bool:
    """True unless torchrun's RANK names another process than rank 0."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def progress_mode(stream: TextIO | None = None) -> str:
    """'bar', 'lines' or 'off' for this process, writing to `stream` (stderr)."""
    if not is_main_rank():
        return "off"
    forced = os.environ.get("DDT_PROGRESS", "").strip().lower()
    if forced in ("0", "off", "none"):
        return "off"
    if forced in ("1", "bar"):
        return "bar"
    if forced == "lines":
        return "lines"
    stream = stream if stream is not None else sys.stderr
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or unusual stream
        return "lines"


def format_duration(seconds: float) -> str:
    """Seconds as H:MM:SS (or M:SS under an hour)."""
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def human_bytes(n: float) -> str:
    """A size in B / KB / MB / GB (powers of 1000)."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _rate(n: int, elapsed: float) -> str:
    if elapsed <= 0 or n <= 0:
        return "? it/s"
    r = n / elapsed
    return f"{r:.3g} it/s" if r >= 1 else f"{1 / r:.3g} s/it"


class LineProgress:
    """Iterates `iterable`, writing `desc: n/total (p%), rate, elapsed, ETA` to `stream` at most every `interval`
    seconds of `clock` (and a closing line if it wrote any). Position counts the items already processed."""

    def __init__(self, iterable: Iterable, total: int | None = None, desc: str = "", stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, interval: float = INTERVAL_S):
        self.iterable = iterable
        if total is None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total, self.desc, self.clock, self.interval = total, desc, clock, interval
        self.stream = stream
        self.lines = 0

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("length unknown")
        return self.total

    def _write(self, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        print(text, file=stream, flush=True)
        self.lines += 1

    def line(self, n: int, elapsed: float, done: bool = False) -> str:
        head = f"{self.desc}: " if self.desc else ""
        if done:
            return f"{head}done, {n} in {format_duration(elapsed)} ({_rate(n, elapsed)})"
        if self.total:
            eta = format_duration(elapsed / n * (self.total - n)) if n else "?"
            return (f"{head}{n}/{self.total} ({100 * n / self.total:.0f}%), {_rate(n, elapsed)}, "
                    f"elapsed {format_duration(elapsed)}, ETA {eta}")
        return f"{head}{n}, {_rate(n, elapsed)}, elapsed {format_duration(elapsed)}"

    def __iter__(self) -> Iterator:
        start = last = self.clock()
        n = 0
        for item in self.iterable:
            yield item
            n += 1
            now = self.clock()
            if now - last >= self.interval:
                self._write(self.line(n, now - start))
                last = now
        if self.lines:
            self._write(self.line(n, self.clock() - start, done=True))


def progress(iterable: Iterable, total: int | None = None, desc: str = "", disable: bool | None = None, *,
             stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
             interval: float = INTERVAL_S) -> Iterable:
    """`iterable`, reporting progress on stderr: a bar on a terminal, a line at most every `interval` s otherwise.
    `disable=True` silences it (a stage's --quiet); None leaves the choice to `progress_mode`."""
    mode = "off" if disable else progress_mode(stream)
    if mode == "off":
        return iterable
    if mode == "bar":
        from tqdm import tqdm
        return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                    file=stream if stream is not None else sys.stderr)
    return LineProgress(iterable, total=total, desc=desc, stream=stream, clock=clock, interval=interval)


@contextmanager
def step(desc: str, quiet: bool = False, *, stream: TextIO | None = None,
         clock: Callable[[], float] = time.monotonic, done_after: float = STEP_DONE_AFTER_S):
    """Announce a long step (`desc ...`) and, if it took `done_after` seconds or more, its duration. Silent on
    ranks other than 0, with `quiet`, or with DDT_PROGRESS=0."""
    out = stream if stream is not None else sys.stderr
    speak = not quiet and progress_mode(stream) != "off"
    if speak:
        print(f"{desc} ...", file=out, flush=True)
    start = clock()
    yield
    elapsed = clock() - start
    if speak and elapsed >= done_after:
        print(f"{desc}: done in {format_duration(elapsed)}", file=out, flush=True)
