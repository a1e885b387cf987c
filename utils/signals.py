"""Stop requests from the scheduler: SIGTERM and SIGUSR1 ask a stage to stop at its next safe point.

Slurm sends SIGUSR1 (`#SBATCH --signal=USR1@120`, or `B:USR1` to the batch shell, which the templates in
scripts/slurm/ forward) shortly before the time limit, and SIGTERM on preemption or `scancel`. A stage keeps one
`StopRequest` installed while it works and checks `stop.requested` at points where everything done so far is on
disk (a finished work unit, a written checkpoint); it then raises `Stopped`, which `utils.misc.cli_errors` turns into
one line and exit status 143 (128 + SIGTERM). Re-running the same command continues. Under Slurm (`SLURM_JOB_ID`
set) SIGUSR1 also asks Slurm to requeue the job (`scontrol requeue`), so a requeued job resumes by itself.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(Exception):
    """Raised by a stage at a safe point after a stop request; its message says how to continue."""


def requeue_slurm_job() -> bool:
    """`scontrol requeue $SLURM_JOB_ID`; False (with a message) when not under Slurm or scontrol fails."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=30)
        print(f"requeued Slurm job {job}", file=sys.stderr, flush=True)
        return True
    except (OSError, subprocess.SubprocessError) as e:
        print(f"warning: could not requeue Slurm job {job} ({e}); resubmit the same command to continue",
              file=sys.stderr, flush=True)
        return False


class StopRequest:
    """Context manager: while inside, SIGTERM/SIGUSR1 set `signal` (the first one received) instead of killing the
    process; the previous handlers come back on exit. Only the main thread can install handlers, so elsewhere this
    is a no-op that never reports a request."""

    def __init__(self, requeue: bool = True):
        self.signal: int | None = None
        self.requeue = requeue
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def _handle(self, signum, frame) -> None:
        first = self.signal is None
        self.signal = self.signal or signum
        if first:
            print(f"received {signal.Signals(signum).name}: stopping at the next safe point", file=sys.stderr,
                  flush=True)
            if signum == signal.SIGUSR1 and self.requeue:
                requeue_slurm_job()

    def __enter__(self) -> "StopRequest":
        try:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def check(self, what: str) -> None:
        """Raise Stopped if a stop was requested; `what` says what is safely on disk."""
        if self.requested:
            raise Stopped(f"stopped by {self.name}; {what}; re-run the same command to continue")
