"""Helpers for the interruption tests: run a stage script as a real process, kill it with SIGKILL (or signal it)
once a condition on its output folder holds, and run it again. Every run uses one thread, because a different
thread count changes float sums and so the results the tests compare bitwise."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def stage_cmd(script: str, *args) -> list[str]:
    return [sys.executable, str(ROOT / script), *map(str, args)]


def run_ok(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run to the end; fail the test with the process's stderr when it does not exit 0."""
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ONE_THREAD)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-3000:]}"
    return r


def interrupt_when(cmd: list[str], ready: Callable[[], bool], sig: int = signal.SIGKILL, delay: float = 0.0,
                   timeout: float = 180) -> tuple[int, str]:
    """Start `cmd`, wait until `ready()` (polled every 10 ms), wait `delay` more seconds, send `sig`, and return
    (exit status, stderr). Fails if the process ends before it could be interrupted."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=ONE_THREAD)
    end = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"{' '.join(cmd)} ended (exit {proc.returncode}) before it could be interrupted:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if time.time() > end:
            proc.kill()
            raise AssertionError("the interruption point was never reached")
        time.sleep(0.01)
    if delay:
        time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def csv_rows(path: Path) -> int:
    """Data rows in a log CSV (0 when it does not exist yet)."""
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0
