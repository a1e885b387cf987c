"""utils/signals.py and its use in recover.py: SIGTERM/SIGUSR1 stop a stage at a safe point with exit status 143,
what is on disk stays whole, a re-run continues, and under Slurm SIGUSR1 requeues the job."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_recover import _files, _teacher_file
from utils.signals import StopRequest, Stopped

ROOT = Path(__file__).resolve().parent.parent


def test_stop_request_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(requeue=False) as stop:
        assert not stop.requested
        stop.check("nothing")                      # no request: no exception
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGUSR1"
        with pytest.raises(Stopped, match="stopped by SIGUSR1; unit 3 is on disk; re-run"):
            stop.check("unit 3 is on disk")
    assert signal.getsignal(signal.SIGTERM) is before


def _recover(out: Path, teacher: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "recover.py"), "--teacher", str(teacher), "--ipc", "6",
                             "--iterations", "60", "--batch-size", "4", "--out", str(out), "--quiet"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _wait_for_units(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if len(list((out / ".units").glob("*.json"))) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no unit finished in time")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_recover_stops_cleanly_and_resumes(tmp_path, sig):
    teacher = _teacher_file(tmp_path)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "scontrol_calls"
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    (fake_bin / "scontrol").chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    out = tmp_path / "syn"
    proc = _recover(out, teacher, env)
    _wait_for_units(out, 1, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert f"stopped by {sig.name}" in err and "re-run the same command" in err and "Traceback" not in err
    done = sorted((out / ".units").glob("*.json"))
    assert 1 <= len(done) < 6
    for manifest in done:   # every unit that says it is done has all its images, readable
        key = manifest.stem
        k = int(key[3:7])
        assert all((out / f"new{c:03d}" / f"class{c:03d}_id{k:03d}.jpg").stat().st_size > 0 for c in range(4))
    if sig == signal.SIGUSR1:
        assert calls.read_text().split() == ["requeue", "4242"]
    else:
        assert not calls.exists()
    resumed = _recover(out, teacher)
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    straight = _recover(tmp_path / "straight", teacher)
    straight.communicate(timeout=240)
    assert _files(out) == _files(tmp_path / "straight") and len(_files(out)) == 24
