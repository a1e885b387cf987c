"""Issue 6 for buffer.py and relabel.py: a run killed with SIGKILL (or stopped by SIGTERM) and re-run gives the
files of an uninterrupted run bitwise; buffer.py checkpoints the expert in training, refuses a NaN loss naming
--lr-teacher while keeping its last good checkpoint, and reports a finished folder without reading the data.

The interrupted runs are real processes (tests/killtools.py); the re-runs and the uninterrupted references run in
this process with one torch thread, as the killed processes do (a different thread count changes float sums)."""
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import buffer as B
import relabel as rl
from tests.killtools import interrupt_when, stage_cmd
from tests.test_relabel import batch_bytes, setup  # noqa: F401  (the module-scoped relabel fixture)
from tests.test_validate import make_mnist_like
from utils.checkpoint import Diverged
from utils.datasets import get_dataset_spec
from utils.trajectory import buffer_files, load_buffer_file

MODEL = "ConvNet-1-w8"
EPOCHS = 40
runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    make_mnist_like(root, n_train=12, n_test=5)
    return root


def buffer_args(data, root, *extra):
    """Two experts of 40 epochs (4 batches each) in one replay_buffer file, with momentum so that the optimiser has
    state to resume. The --ckpt-every of a run never changes its experts, so every variant is compared with one
    uninterrupted reference."""
    return ["--dataset", "MNIST", "--data-path", str(data), "--model", MODEL, "--train-epochs", str(EPOCHS),
            "--num-experts", "2", "--save-interval", "10", "--batch-train", "32", "--mom", "0.5",
            "--buffer-path", str(root), *map(str, extra)]


def expert_dir(root):
    return Path(root) / "MNIST" / MODEL


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    r = runner.invoke(B.app, buffer_args(data, root, "--quiet"))
    assert r.exit_code == 0, r.output
    return expert_dir(root)


def same_buffers(a, b):
    fa, fb = buffer_files(a), buffer_files(b)
    assert [p.name for p in fa] == [p.name for p in fb] == ["replay_buffer_0.pt"]
    ta, tb = load_buffer_file(fa[0]), load_buffer_file(fb[0])
    assert len(ta) == len(tb) == 2 and all(len(t) == EPOCHS + 1 for t in ta)
    assert all(torch.equal(x, y) for ea, eb in zip(ta, tb) for sa, sb in zip(ea, eb) for x, y in zip(sa, sb))


# ------------------------------------------------------------------------------------------------ buffer.py

def test_buffer_killed_mid_expert_resumes_from_its_checkpoint_to_identical_files(data, straight, tmp_path):
    cut = tmp_path / "cut"
    ckpt = expert_dir(cut) / B.EXPERT_CKPT
    rc, err = interrupt_when(stage_cmd("buffer.py", *buffer_args(data, cut, "--ckpt-every", "3", "--quiet")),
                             ready=ckpt.is_file, sig=signal.SIGKILL)
    assert rc == -signal.SIGKILL, err
    assert not buffer_files(expert_dir(cut), required=False)       # killed inside expert 0
    state = torch.load(ckpt, weights_only=True)
    assert state["expert"] == 0 and 3 <= state["epoch"] < EPOCHS and state["epoch"] % 3 == 0

    r = runner.invoke(B.app, buffer_args(data, cut, "--ckpt-every", "3"))
    assert r.exit_code == 0, r.output
    assert f"continuing expert 0 after epoch {state['epoch']}" in r.output   # resumed, not restarted
    assert not ckpt.exists()                                                   # deleted once the expert is saved
    same_buffers(straight, expert_dir(cut))
    rows = (expert_dir(cut) / "log.csv").read_text().strip().splitlines()[1:]
    assert [tuple(x.split(",")[:2]) for x in rows] == [(str(e), str(k)) for e in range(2)
                                                       for k in range(1, EPOCHS + 1)]


def test_buffer_sigterm_writes_a_loadable_expert_checkpoint_and_exits_143(data, straight, tmp_path):
    stopped = tmp_path / "stopped"
    out = expert_dir(stopped)

    def expert_1_checkpointed():   # expert 1 is in training, past its first periodic checkpoint (epoch 7)
        p = out / B.EXPERT_CKPT
        return p.is_file() and torch.load(p, weights_only=True)["expert"] == 1
    rc, err = interrupt_when(stage_cmd("buffer.py", *buffer_args(data, stopped, "--ckpt-every", "7", "--quiet")),
                             ready=expert_1_checkpointed, sig=signal.SIGTERM)
    assert rc == 143, err
    assert "stopped by SIGTERM; expert 1 is checkpointed after epoch" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 2   # 'received SIGTERM ...' + the stop line

    d = torch.load(out / B.EXPERT_CKPT, weights_only=True)
    key = json.loads((out / "buffer_meta.json").read_text())["settings_key"]
    assert d["format"] == B.EXPERT_CKPT_FORMAT and d["fingerprint"] == key and d["expert"] == 1
    # written for the stop, after the epoch in flight: later than the checkpoint seen at epoch 7
    assert f"checkpointed after epoch {d['epoch']} in" in err and 7 < d["epoch"] < EPOCHS
    assert len(d["trajectory"]) == d["epoch"] + 1 and len(d["rows"]) == d["epoch"]
    assert set(d["rng"]) >= {"torch", "numpy", "python"} and d["generator"].dtype == torch.uint8
    fresh = B.build_expert_network(MODEL, get_dataset_spec("MNIST"), seed=0, expert=1)
    assert all(torch.equal(a, b) for a, b in zip(d["trajectory"][0], fresh.parameters()))
    assert all(torch.equal(d["model"][k], v) for k, v in zip(d["model"], d["trajectory"][-1]))
    state = B.read_expert_ckpt(out / B.EXPERT_CKPT, key, 1, EPOCHS, print)
    assert state is not None and state.epoch == d["epoch"]

    # a checkpoint of an expert that is already saved (killed between saving it and deleting the checkpoint) is
    # recognised as stale and deleted, not resumed
    stale = tmp_path / "stale.pt"
    shutil.copy(out / B.EXPERT_CKPT, stale)
    assert B.read_expert_ckpt(stale, key, 2, EPOCHS, lambda msg: None) is None and not stale.exists()
    shutil.copy(out / B.EXPERT_CKPT, stale)
    with pytest.raises(B.UserError, match="other settings"):
        B.read_expert_ckpt(stale, "0" * 12, 1, EPOCHS, print)

    r = runner.invoke(B.app, buffer_args(data, stopped, "--ckpt-every", "7"))
    assert r.exit_code == 0, r.output
    assert f"continuing expert 1 after epoch {d['epoch']}" in r.output
    assert not (out / B.EXPERT_CKPT).exists() and not (out / "partial.pt").exists()
    same_buffers(straight, out)


def small_args(data, root, *extra):
    return ["--dataset", "MNIST", "--data-path", str(data), "--model", MODEL, "--train-epochs", "6",
            "--num-experts", "1", "--batch-train", "32", "--mom", "0.5", "--buffer-path", str(root), "--quiet",
            *map(str, extra)]


def same_expert(a, b):
    ta, tb = (load_buffer_file(expert_dir(r) / "replay_buffer_0.pt")[0] for r in (a, b))
    assert len(ta) == len(tb) == 7
    assert all(torch.equal(x, y) for sa, sb in zip(ta, tb) for x, y in zip(sa, sb))


def test_buffer_stop_request_checkpoints_even_with_ckpt_every_0(data, tmp_path, monkeypatch):
    """--ckpt-every 0 means no periodic checkpoint, but a SIGTERM still writes one after the epoch in flight (here
    the process signals itself during epoch 3), and the re-run continues from it to the uninterrupted expert."""
    real, calls = F.cross_entropy, []

    def signalling(*a, **k):   # 4 batches per epoch: call 9 is in epoch 3
        calls.append(1)
        if len(calls) == 9:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(B.F, "cross_entropy", signalling)
    r = runner.invoke(B.app, small_args(data, tmp_path / "cut", "--ckpt-every", "0"))
    monkeypatch.undo()
    assert r.exit_code == 143, r.output
    assert "stopped by SIGTERM; expert 0 is checkpointed after epoch 3 in" in r.output
    assert torch.load(expert_dir(tmp_path / "cut") / B.EXPERT_CKPT, weights_only=True)["epoch"] == 3
    r = runner.invoke(B.app, small_args(data, tmp_path / "cut", "--ckpt-every", "0"))
    assert r.exit_code == 0, r.output
    r = runner.invoke(B.app, small_args(data, tmp_path / "ref"))
    assert r.exit_code == 0, r.output
    same_expert(tmp_path / "cut", tmp_path / "ref")


def test_buffer_nan_loss_names_lr_teacher_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    out = expert_dir(tmp_path / "nan")
    real, calls = F.cross_entropy, []

    def poisoned(*a, **k):   # 4 batches per epoch: the loss of epoch 5 is NaN
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) > 16 else loss
    monkeypatch.setattr(B.F, "cross_entropy", poisoned)
    r = runner.invoke(B.app, small_args(data, tmp_path / "nan", "--ckpt-every", "2"))
    monkeypatch.undo()
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output
    assert "the loss became nan at expert 0, epoch 5" in errors[0] and "lower --lr-teacher (now 0.01)" in errors[0]
    assert f"the last good checkpoint {out / B.EXPERT_CKPT} is kept" in errors[0]
    assert torch.load(out / B.EXPERT_CKPT, weights_only=True)["epoch"] == 4     # epochs 1-4 were good
    assert not buffer_files(out, required=False) and not (out / "partial.pt").exists()

    # the kept checkpoint is good: the same command continues from it to the uninterrupted expert
    r = runner.invoke(B.app, small_args(data, tmp_path / "nan", "--ckpt-every", "2"))
    assert r.exit_code == 0, r.output
    r = runner.invoke(B.app, small_args(data, tmp_path / "ref"))
    assert r.exit_code == 0, r.output
    same_expert(tmp_path / "nan", tmp_path / "ref")

    # a real absurd learning rate: diverges before any checkpoint, one line naming the setting
    r = runner.invoke(B.app, small_args(data, tmp_path / "huge", "--lr-teacher", "1e12"))
    assert r.exit_code == 2 and len([line for line in r.output.splitlines() if line.startswith("error:")]) == 1
    assert "lower --lr-teacher (now 1e+12)" in r.output and "no checkpoint was written yet" in r.output
    assert issubclass(Diverged, B.UserError)


def test_finished_buffer_returns_at_once_without_reading_the_data(data, tmp_path):
    """A finished folder + a --data-path that does not exist: exit 0, 'complete', nothing touched; a folder that
    still needs experts does need the data (one-line error)."""
    args = ["--dataset", "MNIST", "--model", MODEL, "--train-epochs", "2", "--num-experts", "2", "--batch-train",
            "32", "--buffer-path", str(tmp_path / "b")]
    r = runner.invoke(B.app, args + ["--data-path", str(data), "--quiet"])
    assert r.exit_code == 0, r.output
    out = expert_dir(tmp_path / "b")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    missing = str(tmp_path / "no-such-data")
    r = runner.invoke(B.app, args + ["--data-path", missing])
    assert r.exit_code == 0, r.output
    assert f"{out} is complete: 2 experts in 1 files (--num-experts 2); nothing to train" in r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = runner.invoke(B.app, args + ["--data-path", missing, "--num-experts", "1"])   # fewer wanted: still complete
    assert r.exit_code == 0 and "is complete" in r.output
    r = runner.invoke(B.app, args + ["--data-path", missing, "--num-experts", "3"])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(B.app, args + ["--data-path", missing, "--seed", "1"])           # other settings: not "done"
    assert r.exit_code == 2 and "does not exist" in r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_buffer_help_explains_ckpt_every():
    r = runner.invoke(B.app, ["--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    text = " ".join(r.output.replace("│", " ").split())
    assert "--ckpt-every" in text and "expert_ckpt.pt" in text and "SIGTERM/SIGUSR1" in text
    r = runner.invoke(B.app, ["--dataset", "MNIST", "--ckpt-every", "-1"])
    assert r.exit_code == 2 and "--ckpt-every must be at least 0" in r.output


# ------------------------------------------------------------------------------------------------ relabel.py

def test_relabel_killed_mid_run_resumes_to_byte_identical_files(setup, tmp_path):  # noqa: F811
    def args(out):
        return ["--syn", str(setup["syn"]), "--teacher", str(setup["teacher"]), "--out", str(out), "--epochs", "30",
                "--batch-size", "2", "--device", "cpu", "--quiet"]
    cut = tmp_path / "cut"
    rc, err = interrupt_when(stage_cmd("relabel.py", *args(cut)), sig=signal.SIGKILL,
                             ready=lambda: len(list(cut.glob("epoch_*/batch_*.pt"))) >= 5)
    assert rc == -signal.SIGKILL, err
    written = batch_bytes(cut)
    assert 5 <= len(written) < 150
    for name in written:   # every file under its final name is whole
        rec = torch.load(cut / name, weights_only=True)
        assert {"indices", "coords", "flip", "logits"} <= set(rec)
    assert not json.loads((cut / "relabel.json").read_text())["complete"]

    r = runner.invoke(rl.app, args(cut))
    assert r.exit_code == 0, r.output
    r = runner.invoke(rl.app, args(tmp_path / "straight"))
    assert r.exit_code == 0, r.output
    resumed, ref = batch_bytes(cut), batch_bytes(tmp_path / "straight")
    assert len(ref) == 150 and resumed == ref
    assert all(resumed[k] == v for k, v in written.items())    # files from before the kill were kept as they are
    assert json.loads((cut / "relabel.json").read_text())["complete"]


def test_relabel_documents_that_every_batch_file_is_a_checkpoint():
    r = runner.invoke(rl.app, ["--help"], env={"COLUMNS": "240", "TERM": "dumb"})
    text = " ".join(r.output.replace("│", " ").split())
    assert "every batch file is a checkpoint" in text and "no --ckpt-every" in text
    assert "every batch file is a checkpoint" in rl.__doc__
