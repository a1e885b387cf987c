"""squeeze.py resume (issue 6): mid-epoch checkpoints (--ckpt-every), SIGKILL and SIGTERM inside an epoch followed by
a re-run give the uninterrupted teacher bit for bit (in-memory and streamed splits), torchrun ranks stop after the
same step, a NaN loss keeps the last good checkpoint, and checkpoints of other settings or of the previous format
are handled."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import squeeze
from tests.killtools import ONE_THREAD, ROOT, stage_cmd
from tests.test_squeeze import make_folder, rows
from utils.io import atomic_torch_save, safe_torch_load
from utils.signals import Stopped

NET = "ConvNet-2-BN-w16"
runner = CliRunner()
# 200 training images in batches of 4: 50 optimiser steps per epoch, so a signal lands inside an epoch
STEPS_PER_EPOCH = 50
SETTINGS = {"--dataset": "ImageFolder", "--arch": NET, "--epochs": 4, "--lr": 0.05, "--batch-size": 4,
            "--eval-every": 2, "--seed": 3, "--device": "cpu"}


def flags(data: Path, out: Path, **over) -> list[str]:
    """The command-line flags of a run: SETTINGS with `over` (ckpt_every=7 -> --ckpt-every 7; True: a switch)."""
    values = {**SETTINGS, "--data-path": data, "--out": out,
              **{"--" + k.replace("_", "-"): v for k, v in over.items()}}
    return [str(x) for k, v in values.items() for x in ((k,) if v is True else (k, v))]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One thread (bitwise comparisons) and a private decoded-split cache for the stage processes."""
    return {**ONE_THREAD, "DDT_CACHE": str(tmp_path_factory.mktemp("cache"))}


def cmd(data: Path, out: Path, **over) -> list[str]:
    return stage_cmd("squeeze.py", *flags(data, out, **over))


def run(c: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    r = subprocess.run(c, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def straight(data, env, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "t.pt"
    run(cmd(data, out), env)
    return out


def assert_same_run_epochs(a: Path, b: Path, epochs: int) -> None:
    """Same teacher tensors bit for bit, same log rows (but the wall-clock column)."""
    ta, tb = safe_torch_load(a)["model"], safe_torch_load(b)["model"]
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])]

    def logged(p):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows(p.with_name(p.stem + "_log.csv"))]
    assert logged(a) == logged(b) and len(logged(a)) == epochs


def assert_same_run(a: Path, b: Path) -> None:
    assert_same_run_epochs(a, b, SETTINGS["--epochs"])


def ckpt_of(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt")


def freeze_on_checkpoint(proc: subprocess.Popen, ckpt: Path, wanted, timeout: float = 180) -> dict:
    """Poll `ckpt`; whenever a new one appears, freeze the process (SIGSTOP) and read it. Return it, the process
    still frozen, once `wanted(ckpt dict)` holds; otherwise let the process go on. Freezing makes "the checkpoint on
    disk at the moment of the interruption" a known quantity instead of a race."""
    seen = None
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before it could be interrupted:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        try:
            st = ckpt.stat()
        except FileNotFoundError:
            time.sleep(0.005)
            continue
        if (st.st_ino, st.st_mtime_ns) != seen:
            proc.send_signal(signal.SIGSTOP)
            try:
                seen = (ckpt.stat().st_ino, ckpt.stat().st_mtime_ns)   # nothing moves while frozen
                state = torch.load(ckpt, weights_only=True)
            except BaseException:
                proc.kill()   # never leave a frozen process behind
                raise
            if wanted(state):
                return state
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("the wanted checkpoint never appeared")


def test_sigkill_inside_an_epoch_then_rerun_equals_the_uninterrupted_run(data, env, straight, tmp_path):
    out = tmp_path / "killed.pt"
    c = cmd(data, out, ckpt_every=7)   # 7 does not divide 50: most checkpoints fall inside an epoch
    proc = subprocess.Popen(c, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    st = freeze_on_checkpoint(proc, ckpt_of(out), lambda s: s["epoch"] >= 1 and s["step"] > 0)
    proc.send_signal(signal.SIGKILL)   # killed while frozen: whatever it was writing stays half-done
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < st["step"] < STEPS_PER_EPOCH and (st["epoch"] * STEPS_PER_EPOCH + st["step"]) % 7 == 0
    assert len(st["history"]) == st["epoch"] and st["stats"][2] == 4 * st["step"]   # the epoch's sums so far
    assert not out.exists()
    r = run(c, env)
    assert f"after epoch {st['epoch']}/4 and step {st['step']} of epoch {st['epoch'] + 1}" in r.stderr
    assert_same_run(out, straight)
    assert not ckpt_of(out).exists()


def test_sigterm_checkpoints_inside_the_epoch_exits_143_and_rerun_equals(data, env, straight, tmp_path):
    """With the default --ckpt-every 0 only epochs end in checkpoints, so a checkpoint inside an epoch can only
    come from the stop request."""
    out = tmp_path / "stopped.pt"
    c = cmd(data, out)
    done = 0
    for _ in range(3):   # a signal that lands in an epoch's last step stops at its end: try the next epoch
        proc = subprocess.Popen(c, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        freeze_on_checkpoint(proc, ckpt_of(out), lambda s: s["step"] == 0 and s["epoch"] > done)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("stopped by SIGTERM; checkpoint written after ") and \
            last.endswith("re-run the same command to continue") and "Traceback" not in err
        st = torch.load(ckpt_of(out), weights_only=True)   # whole and plain: loads with weights_only
        assert st["format"] == squeeze.CKPT_FORMAT and not out.exists()
        if st["step"]:
            break
        done = st["epoch"]
    assert 0 < st["step"] < STEPS_PER_EPOCH, "every stop landed on an epoch's end"
    assert f"step {st['step']} of epoch {st['epoch'] + 1}" in last
    run(c, env)
    assert_same_run(out, straight)


def cli(*args) -> tuple[int, list[str]]:
    r = runner.invoke(squeeze.app, [str(a) for a in args])
    return r.exit_code, [ln for ln in r.output.splitlines() if ln.strip()]


def test_nan_loss_keeps_the_last_good_checkpoint_and_names_lr(data, tmp_path):
    # warm-up epoch at lr 0.1, then 1e12: the second epoch diverges
    out = tmp_path / "nan.pt"
    code, lines = cli(*flags(data, out, epochs=3, batch_size=32, lr=1e12, warmup_epochs=1, warmup_factor=1e-13,
                             quiet=True))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: the loss became") and "at epoch 2" in lines[0] and "lower --lr" in lines[0]
    assert f"the last good checkpoint {ckpt_of(out)} is kept" in lines[0]
    st = torch.load(ckpt_of(out), weights_only=True)
    assert (st["epoch"], st["step"]) == (1, 0) and len(st["history"]) == 1
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())
    assert not out.exists()
    # absurd from the first step: nothing to keep, nothing written but the config
    out = tmp_path / "nan2.pt"
    code, lines = cli(*flags(data, out, batch_size=32, lr=1e12, ckpt_every=3, quiet=True))
    assert code == 2 and len(lines) == 1 and "lower --lr" in lines[0] and "no checkpoint was written yet" in lines[0]
    assert not out.exists() and not ckpt_of(out).exists()


def test_checkpoint_of_other_settings_is_refused_unless_overwrite(data, tmp_path):
    out = tmp_path / "t.pt"
    assert squeeze.squeeze("ImageFolder", data, out, None, dict(arch=NET, epochs=4, lr=0.05, batch_size=32,
                                                              eval_every=2, seed=3), stop_after=1) is None
    before = ckpt_of(out).read_bytes()
    code, lines = cli(*flags(data, out, batch_size=32, lr=0.02, quiet=True))
    assert code == 2 and len(lines) == 1 and "other settings" in lines[0] and "--overwrite" in lines[0], lines
    assert ckpt_of(out).read_bytes() == before and not out.exists()
    # --overwrite starts afresh: the same teacher as a run that never saw the old checkpoint
    code, lines = cli(*flags(data, out, batch_size=32, lr=0.02, quiet=True, overwrite=True, ckpt_every=5))
    assert code == 0, lines
    code, lines = cli(*flags(data, tmp_path / "fresh.pt", batch_size=32, lr=0.02, quiet=True))
    assert code == 0, lines
    a, b = safe_torch_load(out)["model"], safe_torch_load(tmp_path / "fresh.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [int(r["epoch"]) for r in rows(tmp_path / "t_log.csv")] == [1, 2, 3, 4]
    # a finished teacher is kept as it is, by the CLI too
    before = out.read_bytes()
    code, lines = cli(*flags(data, out, batch_size=32, quiet=True))
    assert code == 2 and len(lines) == 1 and "already exists" in lines[0] and "--overwrite" in lines[0]
    assert out.read_bytes() == before


def test_streamed_split_stopped_inside_an_epoch_resumes_exactly(data, tmp_path, monkeypatch):
    """Splits streamed from their files (DataLoader workers) skip the batches already done on resume: the stop
    request arrives (in this process) right after the first mid-epoch checkpoint of epoch 2."""
    settings = dict(arch=NET, epochs=3, lr=0.05, batch_size=16, eval_every=0, seed=7)
    stream = dict(max_memory_gb=1e-6, workers=1, quiet=True)
    squeeze.squeeze("ImageFolder", data, tmp_path / "whole.pt", None, settings, **stream)
    real_save = squeeze.save_state

    def save_then_signal(st, *a, **k):
        real_save(st, *a, **k)
        if (st.epoch, st.step) == (1, 2):   # 13 steps per epoch: global step 15
            os.kill(os.getpid(), signal.SIGTERM)   # handled by squeeze's StopRequest: stop after the next step
    monkeypatch.setattr(squeeze, "save_state", save_then_signal)
    out = tmp_path / "part.pt"
    with pytest.raises(Stopped, match=r"stopped by SIGTERM; checkpoint written after step 3 of epoch 2"):
        squeeze.squeeze("ImageFolder", data, out, None, settings, ckpt_every=5, **stream)
    st = torch.load(ckpt_of(out), weights_only=True)
    assert (st["epoch"], st["step"]) == (1, 3) and not out.exists()   # written on the stop: 16 is no multiple of 5
    monkeypatch.setattr(squeeze, "save_state", real_save)
    squeeze.squeeze("ImageFolder", data, out, None, settings, ckpt_every=5, **stream)
    assert_same_run_epochs(out, tmp_path / "whole.pt", 3)


def test_previous_checkpoint_format_still_resumes_exactly(data, tmp_path):
    """Runs interrupted before mid-epoch checkpoints existed (format 1: epoch ends, squeeze's own RNG keys)."""
    settings = dict(arch=NET, epochs=3, lr=0.05, batch_size=32, eval_every=0, seed=5)
    squeeze.squeeze("ImageFolder", data, tmp_path / "whole.pt", None, settings, quiet=True)
    out = tmp_path / "old.pt"
    squeeze.squeeze("ImageFolder", data, out, None, settings, quiet=True, stop_after=2)
    new = torch.load(ckpt_of(out), weights_only=True)
    old = {k: new[k] for k in ("epoch", "model", "optimizer", "generator", "history", "elapsed", "fingerprint")}
    old.update(format="ddtoolkit-squeeze-ckpt-1", torch_rng=new["rng"]["torch"], python_rng=new["rng"]["python"],
               numpy_rng=new["rng"]["numpy"])
    atomic_torch_save(old, ckpt_of(out))
    squeeze.squeeze("ImageFolder", data, out, None, settings, quiet=True)
    a, b = safe_torch_load(tmp_path / "whole.pt")["model"], safe_torch_load(out)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ckpt_every_is_documented_and_checked(data, tmp_path):
    r = runner.invoke(squeeze.app, ["--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert r.exit_code == 0 and "--ckpt-every" in r.output and "SIGTERM" in r.output
    code, lines = cli(*flags(data, tmp_path / "x.pt", ckpt_every=-1))
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --ckpt-every must be 0")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x_config.json").exists()


# ------------------------------------------------------------------------------------------- torchrun

def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _rank_of(pid: int) -> int | None:
    try:
        text = (Path("/proc") / str(pid) / "environ").read_text()
        env = dict(kv.split("=", 1) for kv in text.split("\0") if "=" in kv)
    except OSError:
        return None
    return int(env["RANK"]) if "RANK" in env else None


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_torchrun_ranks_stop_after_the_same_step_when_one_rank_is_signalled(data, env, tmp_path):
    """SIGUSR1 reaches rank 1 only: the per-step vote stops rank 0 after the same step, both exit 143 and rank 0
    writes the checkpoint. The re-run is left out (two more torchrun start-ups): it takes the resume path the
    single-process tests check, with rank 0 carrying the epoch's running sums of all ranks."""
    from tests.test_squeeze import _free_port
    out = tmp_path / "ddp.pt"
    c = [*stage_cmd("squeeze.py")[:1], "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(_free_port()), str(ROOT / "squeeze.py"), *flags(data, out, batch_size=8)]
    proc = subprocess.Popen(c, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    end = time.time() + 180
    rank1 = None
    while not (ckpt_of(out).exists() and rank1):   # training is under way (epoch 1 is on disk) on both ranks
        assert proc.poll() is None and time.time() < end, proc.stderr.read()[-3000:]
        rank1 = next((c for c in _children(proc.pid) if _rank_of(c) == 1), None)
        time.sleep(0.01)
    os.kill(rank1, signal.SIGUSR1)   # not under Slurm: no requeue
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and err.count("exitcode  : 143") == 2, err[-3000:]   # torchrun's report
    stops = sorted(ln for ln in err.splitlines() if ln.startswith("stopped by "))
    assert len(stops) == 2, err[-3000:]
    # rank 0 got no signal, yet stopped after the same step as rank 1 (the message names the same point)
    assert stops[0].startswith("stopped by SIGUSR1; checkpoint written after ")
    assert stops[1].startswith("stopped by a stop request on another rank; checkpoint written after ")
    assert stops[0].split("written after ")[1] == stops[1].split("written after ")[1]
    st = torch.load(ckpt_of(out), weights_only=True)
    assert st["epoch"] >= 1 and not out.exists()
    assert f"after step {st['step']} of epoch {st['epoch'] + 1} " in stops[0] if st["step"] else \
        f"after epoch {st['epoch']} " in stops[0]
    assert st["stats"][2] == 8 * st["step"]   # the running sums of both ranks' slices (batch 8 = 2 x 4)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="the template finds torchrun's workers through /proc")
def test_torchrun_sbatch_requeue_stops_the_workers_without_a_traceback(data, env, tmp_path):
    """scripts/slurm/torchrun.sbatch as Slurm runs it: USR1 to the batch shell requeues the job; SIGTERM reaches the
    torchrun workers (each in a session of its own), which checkpoint after the same step and exit 0, so torchrun
    ends cleanly: the job's log holds the stop lines and no Python traceback."""
    import sys
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "scontrol calls"
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    (fake_bin / "torchrun").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')
    for f in fake_bin.iterdir():
        f.chmod(0o755)
    out = tmp_path / "ddp.pt"
    job_env = {**env, "SLURM_JOB_ID": "91", "SLURM_SUBMIT_DIR": str(ROOT), "GPUS": "2",
               "PATH": f"{fake_bin}:{env['PATH']}"}
    # 400 epochs: the run is still training when the signal comes (a worker that has already finished, or is
    # still starting, dies from SIGTERM and torchrun reports it: the template's comment says so)
    sbatch = ["bash", str(ROOT / "scripts" / "slurm" / "torchrun.sbatch"), "squeeze.py",
              *flags(data, out, batch_size=8, epochs=400)]
    job = subprocess.Popen(sbatch, cwd=ROOT, env=job_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    end = time.time() + 180
    while not ckpt_of(out).exists():   # epoch 1 is on disk: both ranks are training
        assert job.poll() is None and time.time() < end, job.communicate()[0][-3000:]
        time.sleep(0.02)
    job.send_signal(signal.SIGUSR1)
    log, _ = job.communicate(timeout=150)
    assert job.returncode == 0, log[-3000:]
    assert calls.read_text().split() == ["requeue", "91"]
    assert "Traceback" not in log and "ChildFailedError" not in log and "SignalException" not in log, log[-3000:]
    stops = [ln for ln in log.splitlines() if ln.startswith("stopped by ")]
    assert len(stops) == 2 and stops[0].split("written after ")[1] == stops[1].split("written after ")[1], log
    assert torch.load(ckpt_of(out), weights_only=True)["epoch"] >= 1 and not out.exists()


def test_sigterm_in_the_last_batch_of_an_epoch_stops_before_the_evaluation(data, straight, tmp_path, monkeypatch):
    """In process: SIGTERM arrives during the last batch of epoch 2, whose end evaluates on the test split (which on
    ImageNet takes minutes: longer than Slurm's grace period). The run checkpoints after that batch and exits 143
    without evaluating; the re-run evaluates, and the teacher and log equal the uninterrupted run's."""
    real = squeeze.get_network
    forwards = {"n": 0}
    evaluations = []

    def signalling(*a, **k):
        net = real(*a, **k)

        def pre_hook(module, inputs):
            if module.training:
                forwards["n"] += 1
                if forwards["n"] == 2 * STEPS_PER_EPOCH:
                    os.kill(os.getpid(), signal.SIGTERM)
        net.register_forward_pre_hook(pre_hook)
        return net
    real_evaluate = squeeze.evaluate
    monkeypatch.setattr(squeeze, "get_network", signalling)
    monkeypatch.setattr(squeeze, "evaluate", lambda *a, **k: evaluations.append(1) or real_evaluate(*a, **k))
    out = tmp_path / "stopped.pt"
    r = runner.invoke(squeeze.app, flags(data, out))
    assert r.exit_code == 143, r.output
    assert not evaluations
    st = torch.load(ckpt_of(out), weights_only=True)
    assert (st["epoch"], st["step"]) == (1, STEPS_PER_EPOCH)
    monkeypatch.setattr(squeeze, "get_network", real)
    r = runner.invoke(squeeze.app, flags(data, out))
    assert r.exit_code == 0, r.output
    assert_same_run(out, straight)
