"""recover.py mid-group resume (issue 6): the group in flight is checkpointed every --ckpt-every iterations and on
SIGTERM/SIGUSR1; a run killed with SIGKILL at any point and re-run writes the same bytes as an uninterrupted run,
for SRe2L, DWA and DELT; a checkpoint of other settings is refused with one line; a non-finite loss stops the run
with one line naming --lr and keeps the last good checkpoint.

Interrupted runs are real processes (tests/killtools.py); the uninterrupted and resumed runs run in-process (one
thread, as tests/conftest.py sets), which saves a process start each and gives the same bits."""
import os
import signal
from pathlib import Path

import pytest
import torch

import recover as R
from networks.registry import get_network
from tests.killtools import csv_rows, interrupt_when, stage_cmd
from tests.test_recover import _init_folder, _run, _teacher_file
from utils.teacher import save_teacher

T = 60          # iterations per unit: a kill or a stop lands well inside one
EVERY = 5       # --ckpt-every of the interrupted runs

# method -> the flags that decide its images. SRe2L groups its first two units (one checkpoint, two generators),
# DWA carries perturbed weights, DELT has two EarlyLate rounds with inactive images and a crop schedule.
SETTINGS = {
    "sre2l": ["--method", "sre2l", "--ipc", 3, "--rrc", "--flip", "--jitter", 2, "--group", 2],
    "dwa": ["--method", "dwa", "--ipc", 2, "--steps", 2, "--rho", 0.05],
    "delt": ["--method", "delt", "--ipc", 3, "--round-iterations", T // 2, "--use-early-late"],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return {"teacher": _teacher_file(root), "init": _init_folder(root), "straight": {}, "root": root}


def _args(inputs, method: str, out: Path, *extra) -> list:
    init = ["--init-path", inputs["init"]] if method != "sre2l" else []
    return ["--teacher", inputs["teacher"], *SETTINGS[method], *init, "--batch-size", 4, "--iterations", T,
            "--out", out, *extra]


def _results(out: Path) -> dict[str, bytes]:
    """What a run leaves besides timings: the images, grid.png and log.csv (loss terms of every logged step)."""
    files = sorted(out.glob("new*/*")) + [out / "grid.png", out / "log.csv"]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def _straight(inputs, method: str) -> dict[str, bytes]:
    """The uninterrupted run (no checkpoint at all), once per method for the module."""
    if method not in inputs["straight"]:
        out = inputs["root"] / f"straight-{method}"
        r = _run(_args(inputs, method, out, "--ckpt-every", 0, "--log-every", 3))
        assert r.returncode == 0, r.stderr
        inputs["straight"][method] = _results(out)
    return inputs["straight"][method]


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / ".units").glob("group-*.ckpt.pt"))


def _signal_self_at(monkeypatch, call: int, sig: int = signal.SIGTERM) -> None:
    """Deliver `sig` to this process during the `call`-th teacher forward of an in-process run: a stop request at
    a known iteration."""
    real = R.BNStatHooks.losses
    calls = [0]

    def losses(self, groups):
        calls[0] += 1
        if calls[0] == call:
            # without recover's handler the signal would end pytest itself: fail the test instead
            assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN, None), "no stop handler installed"
            os.kill(os.getpid(), sig)
        return real(self, groups)
    monkeypatch.setattr(R.BNStatHooks, "losses", losses)


# ------------------------------------------------------------------------------------------------ SIGKILL


@pytest.mark.parametrize("method", ["sre2l", "dwa", "delt"])
def test_sigkill_mid_group_then_rerun_equals_uninterrupted(tmp_path, inputs, method):
    want = _straight(inputs, method)
    out = tmp_path / "killed"
    args = _args(inputs, method, out, "--ckpt-every", EVERY, "--log-every", 3)
    rc, err = interrupt_when(stage_cmd("recover.py", *args), lambda: bool(_checkpoints(out)), signal.SIGKILL)
    assert rc == -signal.SIGKILL, err
    # killed inside a unit: its group's checkpoint is on disk at a multiple of --ckpt-every, its images are not
    [ckpt] = _checkpoints(out)
    state = torch.load(ckpt, weights_only=True)
    assert state["format"] == R.CKPT_FORMAT and 0 < state["it"] < T and state["it"] % EVERY == 0
    assert (state["perturbed"] is not None) == (method == "dwa")
    key = ckpt.name[len("group-"):-len(".ckpt.pt")]
    assert not (out / ".units" / f"{key}.json").exists()
    r = _run(args)
    assert r.returncode == 0, r.stderr
    assert f"resuming {key} " in r.stderr and f"at iteration {state['it']}/{T}" in r.stderr
    assert _results(out) == want
    assert not _checkpoints(out) and not list((out / ".units").glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------ SIGTERM


def test_sigterm_mid_group_checkpoints_the_iteration_in_flight_and_resumes(tmp_path, inputs):
    want = _straight(inputs, "sre2l")
    out = tmp_path / "stopped"
    # --ckpt-every 0: no scheduled checkpoint, so the one found afterwards was written by the stop request
    args = _args(inputs, "sre2l", out, "--ckpt-every", 0, "--log-every", 3)
    # the first group (two units) has logged all its rows: it is written, and the last unit is in flight
    rows_per_group = len({*range(0, T, 3), T - 1})
    first_group_done = lambda: csv_rows(out / "log.csv") >= rows_per_group   # noqa: E731
    rc, err = interrupt_when(stage_cmd("recover.py", *args), first_group_done, signal.SIGTERM, delay=0.02)
    assert rc == 143, err
    assert "Traceback" not in err
    state = torch.load(out / ".units" / "group-ipc0002_c0000.ckpt.pt", weights_only=True)
    assert 0 < state["it"] < T
    assert (f"stopped by SIGTERM in unit ipc0002_c0000; checkpoint written after iteration {state['it']} of {T}"
            in err.strip().splitlines()[-1])
    assert state["x"].shape == (1, 4, 3, 16, 16) and state["opt"]["state"][0]["step"] == state["it"]
    assert not list(out.glob("new*/class*_id002.jpg"))        # the stopped unit wrote nothing
    r = _run(args)
    assert r.returncode == 0, r.stderr
    assert f"resuming ipc0002_c0000 (+0) at iteration {state['it']}/{T}" in r.stderr
    assert _results(out) == want and not _checkpoints(out)


def test_stop_at_a_known_iteration_writes_it_between_scheduled_checkpoints(tmp_path, inputs, monkeypatch):
    """In-process SIGUSR1 during iteration 42 with --ckpt-every 5: the checkpoint holds iteration 43, not 40, and
    the re-run continues from it, inside DELT's second EarlyLate round, to the uninterrupted result."""
    want = _straight(inputs, "delt")
    out = tmp_path / "stopped"
    args = _args(inputs, "delt", out, "--ckpt-every", EVERY, "--log-every", 3)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)     # SIGUSR1 would requeue a CI job running under Slurm
    _signal_self_at(monkeypatch, 43, signal.SIGUSR1)
    r = _run(args)
    assert r.returncode == 143, r.stderr
    assert f"checkpoint written after iteration 43 of {T}" in r.stderr
    assert torch.load(out / ".units" / "group-c0000_i0000.ckpt.pt", weights_only=True)["it"] == 43
    monkeypatch.undo()
    r = _run(args)
    assert r.returncode == 0, r.stderr
    assert _results(out) == want


# ------------------------------------------------------------------------------------------------ refusals


def _retrained_teacher(path: Path) -> None:
    """Another teacher of the same architecture written over `path` (as a re-run of squeeze.py would)."""
    torch.manual_seed(1)
    net = get_network("ConvNet-2-BN-w8", 3, 4, 16)
    net.train()
    with torch.no_grad():
        for _ in range(4):
            net(torch.randn(16, 3, 16, 16) * 0.5 + 0.1)
    save_teacher(path, net, arch="ConvNet-2-BN-w8", dataset="CIFAR10", num_classes=4, channels=3, resolution=16,
                 mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))


def _private_teacher(inputs, tmp_path):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(Path(inputs["teacher"]).read_bytes())
    return teacher


@pytest.mark.parametrize("change", ["retrained-teacher", "other-group", "corrupt"])
def test_checkpoint_of_other_settings_is_refused_then_dropped_with_overwrite(tmp_path, inputs, monkeypatch,
                                                                             change):
    local = {**inputs, "teacher": _private_teacher(inputs, tmp_path)}     # a copy this test may overwrite
    out = tmp_path / "run"
    args = _args(local, "sre2l", out, "--ckpt-every", EVERY, "--quiet")
    _signal_self_at(monkeypatch, 8)
    assert _run(args).returncode == 143
    monkeypatch.undo()
    ckpt = out / ".units" / "group-ipc0000_c0000.ckpt.pt"
    assert ckpt.is_file()
    if change == "retrained-teacher":       # same path, so meta.json agrees; the teacher's weights do not
        _retrained_teacher(local["teacher"])
        message = "belongs to a run with other settings; pass --overwrite"
    elif change == "other-group":
        args[args.index("--group") + 1] = 1
        message = "was written for another grouping of the units (another --group)"
    else:
        ckpt.write_bytes(ckpt.read_bytes()[:100])
        message = "corrupt or truncated"
    r = _run(args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert ckpt.is_file() and not list(out.glob("new*/*"))              # refused: nothing touched
    r = _run([*args, "--overwrite"])
    assert r.returncode == 0, r.stderr
    assert not _checkpoints(out) and len(list(out.glob("new*/*"))) == 12
    if change == "retrained-teacher":       # the stale state was not used: same images as a fresh run
        fresh = tmp_path / "fresh"
        assert _run(_args(local, "sre2l", fresh, "--quiet")).returncode == 0
        assert _results(out)["new000/class000_id000.jpg"] == _results(fresh)["new000/class000_id000.jpg"]


# ------------------------------------------------------------------------------------------------ bad input


def test_nonfinite_loss_keeps_the_last_checkpoint_and_names_lr(tmp_path, inputs, monkeypatch):
    """A NaN loss in iteration 12 of the second DWA unit (loss number T + 13: unit ipc0000 computes T; DWA's ascent
    passes compute none): one line naming --lr, exit 2, the checkpoint of iteration 10 kept, no image of that
    unit; once the cause is gone, the re-run continues from that checkpoint to the uninterrupted result."""
    want = _straight(inputs, "dwa")
    out = tmp_path / "run"
    args = _args(inputs, "dwa", out, "--ckpt-every", EVERY, "--log-every", 3)
    real = R.BNStatHooks.losses
    calls = [0]

    def losses(self, groups):
        calls[0] += 1
        value = real(self, groups)
        return value * float("nan") if calls[0] == T + 13 else value
    monkeypatch.setattr(R.BNStatHooks, "losses", losses)
    r = _run(args)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    ckpt = out / ".units" / "group-ipc0001_c0000.ckpt.pt"
    assert line.startswith("error: the loss became nan at iteration 12 of unit ipc0001_c0000")
    assert f"the last good checkpoint {ckpt} is kept" in line and "lower --lr (now 0.25)" in line
    assert torch.load(ckpt, weights_only=True)["it"] == 10
    assert len(list(out.glob("new*/class*_id000.jpg"))) == 4 and not list(out.glob("new*/class*_id001.jpg"))
    monkeypatch.undo()
    r = _run(args)
    assert r.returncode == 0, r.stderr
    assert f"resuming ipc0001_c0000 (+0) at iteration 10/{T}" in r.stderr
    assert _results(out) == want


@pytest.mark.parametrize("flags, message", [
    (["--r-bn", 1e39], "error: the loss became inf at iteration 0 of unit ipc0000_c0000; no checkpoint was "
                       "written yet; lower --lr (now 0.25) or --r-bn (now 1e+39)"),
    (["--lr", 1e39], "error: --lr must be a positive number no larger than 1.7e+38"),
    (["--ckpt-every", -1], "error: --ckpt-every must be >= 0"),
])
def test_absurd_values_stop_with_one_line_and_no_image(tmp_path, inputs, flags, message):
    out = tmp_path / "run"
    r = _run(_args(inputs, "sre2l", out, "--quiet", *flags))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith(message) and len(r.stderr.strip().splitlines()) == 1
    assert not list(out.glob("new*/*")) and not list(out.glob(".units/*"))
