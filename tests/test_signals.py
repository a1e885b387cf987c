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
# every run of a comparison uses one thread: a different thread count changes float sums, hence the results
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


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


def _signal_after_first_row(cmd: list[str], log_csv: Path, sig=signal.SIGTERM) -> tuple[int, str]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    end = time.time() + 120
    while time.time() < end and proc.poll() is None:
        if log_csv.is_file() and len(log_csv.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


def test_condense_checkpoints_on_sigterm_and_resumes_to_the_same_set(tmp_path):
    import torch
    from tests.test_validate import make_mnist_like
    (tmp_path / "data").mkdir()
    make_mnist_like(tmp_path / "data", n_train=12, n_test=4)

    def cmd(out):
        return [sys.executable, str(ROOT / "condense.py"), "-d", "mnist", "--data-path", str(tmp_path / "data"),
                "--ipc", "1", "-f", "2", "--reproduce", "--net", "ConvNet-3-w8", "--outer-iterations", "60",
                "--inner-loop", "1", "--batch-real", "4", "--n-data", "4", "--ckpt-every", "1000", "--out", str(out),
                "--quiet"]
    out = tmp_path / "run"
    rc, err = _signal_after_first_row(cmd(out), out / "log.csv")
    assert rc == 143, err
    assert "stopped by SIGTERM; checkpoint written after outer iteration" in err and "Traceback" not in err
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert 1 <= ckpt["it"] < 60                         # written on the stop, not by --ckpt-every
    assert not (out / "synset.pt").exists()
    assert subprocess.run(cmd(out), cwd=ROOT, capture_output=True, timeout=240, env=ONE_THREAD).returncode == 0
    straight = tmp_path / "straight"
    assert subprocess.run(cmd(straight), cwd=ROOT, capture_output=True, timeout=240, env=ONE_THREAD).returncode == 0
    a = torch.load(out / "synset.pt", weights_only=True)["tensors"]["images"]
    b = torch.load(straight / "synset.pt", weights_only=True)["tensors"]["images"]
    assert torch.equal(a, b)


def test_distill_checkpoints_on_sigterm_and_resumes_to_the_same_set(tmp_path):
    import torch
    from typer.testing import CliRunner

    import buffer as B
    from tests.test_validate import make_mnist_like
    (tmp_path / "data").mkdir()
    make_mnist_like(tmp_path / "data", n_train=12, n_test=5)
    r = CliRunner().invoke(B.app, ["--dataset", "MNIST", "--data-path", str(tmp_path / "data"), "--model",
                                   "ConvNet-1-w8", "--train-epochs", "3", "--num-experts", "2", "--batch-train", "32",
                                   "--buffer-path", str(tmp_path / "buffers"), "--quiet"])
    assert r.exit_code == 0, r.output

    def cmd(out):
        return [sys.executable, str(ROOT / "distill.py"), "--dataset", "MNIST", "--ipc", "1", "--method", "mtt",
                "--model", "ConvNet-1-w8", "--data-path", str(tmp_path / "data"), "--buffer-path",
                str(tmp_path / "buffers"), "--iterations", "80", "--syn-steps", "3", "--max-start-epoch", "1",
                "--batch-syn", "16", "--ckpt-every", "1000", "--out", str(out), "--quiet"]
    out = tmp_path / "run"
    rc, err = _signal_after_first_row(cmd(out), out / "log.csv", signal.SIGUSR1)   # not under Slurm: no requeue
    assert rc == 143, err
    assert "stopped by SIGUSR1; checkpoint written after iteration" in err and "Traceback" not in err
    assert 1 <= torch.load(out / "ckpt.pt", weights_only=True)["it"] < 80
    assert subprocess.run(cmd(out), cwd=ROOT, capture_output=True, timeout=240, env=ONE_THREAD).returncode == 0
    straight = tmp_path / "straight"
    assert subprocess.run(cmd(straight), cwd=ROOT, capture_output=True, timeout=240, env=ONE_THREAD).returncode == 0
    a = torch.load(out / "synset.pt", weights_only=True)["tensors"]
    b = torch.load(straight / "synset.pt", weights_only=True)["tensors"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_buffer_stops_inside_an_expert_and_resumes_to_the_same_files(tmp_path):
    import torch
    from tests.test_validate import make_mnist_like
    (tmp_path / "data").mkdir()
    make_mnist_like(tmp_path / "data", n_train=12, n_test=5)

    def cmd(root):
        return [sys.executable, str(ROOT / "buffer.py"), "--dataset", "MNIST", "--data-path", str(tmp_path / "data"),
                "--model", "ConvNet-1-w8", "--train-epochs", "40", "--num-experts", "3", "--save-interval", "10",
                "--batch-train", "32", "--buffer-path", str(root), "--quiet"]
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(cmd(stopped), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    end = time.time() + 120
    while time.time() < end and proc.poll() is None and not list(stopped.rglob("partial.pt")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)               # the first expert is in partial.pt, the second in training
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM; expert" in err and "Traceback" not in err
    assert subprocess.run(cmd(stopped), cwd=ROOT, capture_output=True, timeout=240, env=ONE_THREAD).returncode == 0
    straight = tmp_path / "straight"
    assert subprocess.run(cmd(straight), cwd=ROOT, capture_output=True, timeout=240, env=ONE_THREAD).returncode == 0
    a, b = sorted(stopped.rglob("replay_buffer_*.pt")), sorted(straight.rglob("replay_buffer_*.pt"))
    assert [p.name for p in a] == [p.name for p in b] == ["replay_buffer_0.pt"]
    ta, tb = (torch.load(p, weights_only=True) for p in (a[0], b[0]))
    assert len(ta) == len(tb) == 3
    assert all(torch.equal(x, y) for ea, eb in zip(ta, tb) for sa, sb in zip(ea, eb) for x, y in zip(sa, sb))
