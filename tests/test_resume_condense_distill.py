"""condense.py and distill.py killed with SIGKILL (no chance to clean up) at points before and after their first
checkpoint, then re-run with the same command: the final synthetic set equals an uninterrupted run's bit for bit,
and the log holds each iteration once. Also: one writer per output folder, and a diverging loss stops the run
keeping its last good checkpoint."""
import re
import signal
import subprocess
import time

import pytest
import torch
from typer.testing import CliRunner

from tests.killtools import ONE_THREAD, ROOT, csv_rows, interrupt_when, run_ok, stage_cmd
from tests.test_validate import make_mnist_like


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    make_mnist_like(root, n_train=12, n_test=5)
    return root


def _condense(mnist, out, *extra):
    return stage_cmd("condense.py", "-d", "mnist", "--data-path", mnist, "--ipc", "1", "-f", "2", "--reproduce",
                     "--net", "ConvNet-3-w8", "--outer-iterations", "40", "--inner-loop", "1", "--batch-real", "4",
                     "--n-data", "4", "--ckpt-every", "5", "--out", out, "--quiet", *extra)


def _set(out):
    return torch.load(out / "synset.pt", weights_only=True)


def _same_tensors(a, b, where="ckpt") -> None:
    """Every tensor and number of two checkpoints equal (wall-clock `seconds` entries excepted)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k != "seconds":
                _same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _its(out):
    return [int(line.split(",")[0]) for line in (out / "log.csv").read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def condense_straight(mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("condense") / "straight"
    run_ok(_condense(mnist, out))
    return out


@pytest.mark.parametrize("after_rows", [2, 13], ids=["before-first-checkpoint", "between-checkpoints"])
def test_condense_killed_then_rerun_equals_uninterrupted(mnist, tmp_path, condense_straight, after_rows):
    out = tmp_path / "killed"
    rc, _ = interrupt_when(_condense(mnist, out), lambda: csv_rows(out / "log.csv") >= after_rows)
    assert rc == -signal.SIGKILL
    assert not (out / "synset.pt").exists()
    if after_rows > 5:
        assert 5 <= torch.load(out / "ckpt.pt", weights_only=True)["it"] < 40
    run_ok(_condense(mnist, out))
    a, b = _set(out), _set(condense_straight)
    assert torch.equal(a["tensors"]["images"], b["tensors"]["images"]) and torch.equal(a["labels"], b["labels"])
    assert _its(out) == list(range(1, 41))          # every outer iteration logged once
    # the final checkpoints agree too, global RNG included: the resumed run drew exactly what the straight one did
    _same_tensors(torch.load(out / "ckpt.pt", weights_only=True),
                  torch.load(condense_straight / "ckpt.pt", weights_only=True))


def test_condense_refuses_a_second_writer_of_the_same_folder(mnist, tmp_path):
    out = tmp_path / "busy"
    first_cmd = _condense(mnist, out)
    first_cmd[first_cmd.index("40")] = "400"
    first = subprocess.Popen(first_cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    try:
        end = time.time() + 120
        while csv_rows(out / "log.csv") < 1 and time.time() < end:
            assert first.poll() is None
            time.sleep(0.02)
        second = subprocess.run(first_cmd, cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD, timeout=120)
        assert second.returncode == 2
        assert second.stderr.startswith("error: ") and "being written by another condense.py process (pid" \
            in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert first.poll() is None                 # the first run was not disturbed
    finally:
        first.kill()
        first.wait()


def test_condense_diverging_loss_stops_and_keeps_the_last_good_checkpoint(mnist, tmp_path, monkeypatch):
    import condense as C
    calls = {"n": 0}
    real = C.class_match_grad

    def diverging_after_5_iterations(*a, **k):   # 10 classes x 1 inner step per outer iteration
        calls["n"] += 1
        g, loss = real(*a, **k)
        return g, (float("nan") if calls["n"] > 50 else loss)
    monkeypatch.setattr(C, "class_match_grad", diverging_after_5_iterations)
    out = tmp_path / "nan"
    r = CliRunner().invoke(C.app, ["-d", "mnist", "--data-path", str(mnist), "--ipc", "1", "-f", "1", "--reproduce",
                                   "--net", "ConvNet-3-w8", "--outer-iterations", "9", "--inner-loop", "1",
                                   "--batch-real", "4", "--n-data", "4", "--ckpt-every", "2", "--out", str(out),
                                   "--quiet"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.startswith("error: the loss became nan at outer iteration 5;")
    assert "lower --lr-img" in r.output and len(r.output.strip().splitlines()) == 1
    assert torch.load(out / "ckpt.pt", weights_only=True)["it"] == 4     # the last good checkpoint, untouched
    assert not (out / "synset.pt").exists()


def _distill(mnist, buffers, out):
    return stage_cmd("distill.py", "--dataset", "MNIST", "--ipc", "1", "--method", "mtt", "--model", "ConvNet-1-w8",
                     "--data-path", mnist, "--buffer-path", buffers, "--iterations", "60", "--syn-steps", "3",
                     "--max-start-epoch", "1", "--batch-syn", "16", "--ckpt-every", "7", "--out", out, "--quiet")


@pytest.fixture(scope="module")
def buffers(mnist, tmp_path_factory):
    root = tmp_path_factory.mktemp("buffers")
    run_ok(stage_cmd("buffer.py", "--dataset", "MNIST", "--data-path", mnist, "--model", "ConvNet-1-w8",
                     "--train-epochs", "3", "--num-experts", "2", "--batch-train", "32", "--buffer-path", root,
                     "--quiet"))
    return root


@pytest.fixture(scope="module")
def distill_straight(mnist, buffers, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "straight"
    run_ok(_distill(mnist, buffers, out))
    return out


@pytest.mark.parametrize("after_rows", [3, 30], ids=["before-first-checkpoint", "between-checkpoints"])
def test_distill_killed_then_rerun_equals_uninterrupted(mnist, buffers, distill_straight, tmp_path, after_rows):
    out, straight = tmp_path / "killed", distill_straight
    rc, _ = interrupt_when(_distill(mnist, buffers, out), lambda: csv_rows(out / "log.csv") >= after_rows)
    assert rc == -signal.SIGKILL and not (out / "synset.pt").exists()
    if after_rows > 7:
        assert 7 <= torch.load(out / "ckpt.pt", weights_only=True)["it"] < 60
    run_ok(_distill(mnist, buffers, out))
    a, b = _set(out), _set(straight)
    assert a["tensors"].keys() == b["tensors"].keys()
    assert all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])
    assert _its(out) == list(range(60))
    _same_tensors(torch.load(out / "ckpt.pt", weights_only=True), torch.load(straight / "ckpt.pt", weights_only=True))


def test_distill_output_folder_of_a_different_run_is_refused_unless_overwrite(mnist, buffers, tmp_path):
    import distill as D
    out = tmp_path / "run"
    base = _distill(mnist, buffers, out)[2:]
    base[base.index("--iterations") + 1] = "2"
    assert CliRunner().invoke(D.app, base).exit_code == 0
    before = _set(out)["tensors"]
    other = list(base)
    other[other.index("--syn-steps") + 1] = "2"
    r = CliRunner().invoke(D.app, other)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "belongs to a run with other settings; pass --overwrite" in r.output
    assert all(torch.equal(before[k], _set(out)["tensors"][k]) for k in before)     # untouched
    assert CliRunner().invoke(D.app, other + ["--overwrite"]).exit_code == 0
    assert torch.load(out / "ckpt.pt", weights_only=True)["it"] == 2


def test_distill_exploding_learned_lr_stops_keeping_the_last_good_checkpoint(mnist, buffers, tmp_path):
    import distill as D
    out = tmp_path / "run"
    args = _distill(mnist, buffers, out)[2:] + ["--lr-lr", "1e12"]
    args[args.index("--ckpt-every") + 1] = "1"
    r = CliRunner().invoke(D.app, args)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    line = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and re.search(r"the (learned lr|matching loss) became .* at iteration (\d+)", line[0])
    assert "--lr-lr" in line[0] and "the last checkpoint is kept" in line[0]
    failed_at = int(re.search(r"at iteration (\d+)", line[0]).group(1))
    if failed_at > 0:   # every finished iteration was checkpointed, and the diverged one was not
        assert torch.load(out / "ckpt.pt", weights_only=True)["it"] == failed_at
    assert not (out / "synset.pt").exists()


def test_sbatch_usr1_requeues_and_the_requeued_job_finishes_the_same_set(mnist, condense_straight, tmp_path):
    """scripts/slurm/condense.sbatch as Slurm runs it: USR1 to the batch shell (--signal=B:USR1@120) calls
    `scontrol requeue <job>` and SIGTERMs the experiment, whose condense.py writes its checkpoint and stops; the
    requeued job (the same batch script again) finishes the same set as an uninterrupted run."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "scontrol calls"
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    (fake_bin / "scontrol").chmod(0o755)
    out = tmp_path / "job out"
    script = tmp_path / "row script.sh"
    script.write_text("set -euo pipefail\n" + " ".join(f"'{a}'" for a in _condense(mnist, out)) + "\n")
    env = {**ONE_THREAD, "SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(ROOT),
           "PATH": f"{fake_bin}:{ONE_THREAD['PATH']}"}
    sbatch = [str(ROOT / "scripts" / "slurm" / "condense.sbatch"), str(script)]
    job = subprocess.Popen(["bash", *sbatch], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    end = time.time() + 120
    while csv_rows(out / "log.csv") < 2 and time.time() < end:
        assert job.poll() is None, job.communicate()
        time.sleep(0.02)
    job.send_signal(signal.SIGUSR1)
    log, _ = job.communicate(timeout=120)
    assert job.returncode == 0, log
    assert calls.read_text().split() == ["requeue", "77"]
    assert "stopped by SIGTERM; checkpoint written after outer iteration" in log
    assert 1 <= torch.load(out / "ckpt.pt", weights_only=True)["it"] < 40 and not (out / "synset.pt").exists()
    requeued = subprocess.run(["bash", *sbatch], cwd=ROOT, env={**env, "SLURM_RESTART_COUNT": "1"},
                              capture_output=True, text=True, timeout=240)
    assert requeued.returncode == 0, requeued.stdout + requeued.stderr
    assert torch.equal(_set(out)["tensors"]["images"], _set(condense_straight)["tensors"]["images"])
