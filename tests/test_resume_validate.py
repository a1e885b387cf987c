"""validate.py resume (issue 6): the training run in flight is checkpointed beside the results, SIGKILL or
SIGTERM mid-training followed by the same command records exactly the numbers of an uninterrupted run, and a NaN
loss stops with one line naming the lr flag while the last good checkpoint is kept.

The comparisons run validate.py as single-threaded processes (tests/killtools.py): thread counts change float sums."""
import copy
import csv
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import validate
from networks import get_network
from tests.killtools import csv_rows, interrupt_when, run_ok, stage_cmd
from tests.test_validate import write_idx
from utils import kd
from utils.datasets import get_dataset_spec, load_split, normalize, to_pixels
from utils.dsa import DSA
from utils.synset import pixel_set, save_synset
from utils.teacher import freeze, save_teacher
from utils.train import TrainRecipe, TrainResume, train_network

EPOCHS = 60          # long enough that a signal sent once the first run is recorded lands inside the second
KD_EPOCHS = 30
TEACHER = "ConvNet-1-w8"
STUDENT = "ConvNet-1-BN-w8"   # BatchNorm: its running buffers are part of what a checkpoint must carry


# ------------------------------------------------------------------------------------------- fixtures

def _make_hard_mnist_like(root: Path, n_train: int, n_test: int) -> None:
    """tests.test_validate.make_mnist_like with a faint class block in strong noise, so test accuracies stay
    below 1 and comparing them tells runs apart."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.repeat(np.arange(10), n)
        images = rng.integers(0, 200, size=(len(labels), 28, 28))
        for i, c in enumerate(labels):
            r, col = 2 + 8 * (c // 3), 2 + 8 * (c % 3)
            images[i, r:r + 6, col:col + 6] += 50
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """MNIST-like data (4 train / 10 test images per class), a pixel set of 2 per class, an MNIST teacher."""
    root = tmp_path_factory.mktemp("resume_validate")
    (root / "data").mkdir()
    _make_hard_mnist_like(root / "data", n_train=4, n_test=10)
    tr, spec = load_split("MNIST", root / "data", "train")
    save_synset(pixel_set(to_pixels(tr.images[::2]), tr.labels[::2], spec, method="every-2nd"), root / "set")
    torch.manual_seed(0)
    teacher = get_network(TEACHER, 1, 10, 28)
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    x = normalize(to_pixels(tr.images), spec.mean, spec.std)
    for _ in range(40):   # well above chance on the test split, so the students' accuracies differ by run
        loss = F.cross_entropy(teacher(x), tr.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_teacher(root / "teacher.pt", freeze(teacher), arch=TEACHER, dataset="MNIST", num_classes=10, channels=1,
                 resolution=28, mean=spec.mean, std=spec.std)
    return root


def _ce_cmd(root: Path, results: Path, *extra) -> list[str]:
    # DSA and CutMix on: both draw from the run's generator, whose state the checkpoint must carry
    return stage_cmd("validate.py", "--syn", root / "set", "--data-path", root / "data", "--model", "ConvNet-1-w8",
                     "--epochs", EPOCHS, "--runs", 2, "--batch-size", 10, "--mix-p", 0.5, "--lr", 0.005,
                     "--results", results, *extra)


def _kd_cmd(root: Path, results: Path, *extra) -> list[str]:
    return stage_cmd("validate.py", "--syn", root / "set", "--data-path", root / "data", "--teacher",
                     root / "teacher.pt", "--model", STUDENT, "--epochs", KD_EPOCHS, "--runs", 2, "--batch-size", 8,
                     "--lr", 0.003, "-T", 4, "--results", results, *extra)


def _report(results: Path) -> tuple[list[dict], dict]:
    """The CSV rows without their wall-clock column, and the accuracies of the JSON report."""
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(results.with_suffix(".csv")))]
    return rows, json.loads(results.read_text())["by_model"]


def _straight(cmd: list[str]) -> tuple[list[dict], dict]:
    """The uninterrupted reference, run in this process (saves an interpreter start) on one thread like the
    processes it is compared with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = CliRunner().invoke(validate.app, [str(a) for a in cmd[2:]])
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    rows, by_model = _report(Path(cmd[cmd.index("--results") + 1]))
    assert all(0.1 < float(row["test_acc"]) < 1 for row in rows)   # neither chance nor saturated: a real check
    return rows, by_model


@pytest.fixture(scope="module")
def straight_ce(files):
    return _straight(_ce_cmd(files, files / "straight_ce" / "r.json", "--quiet"))


def _load(path: Path):
    """A checkpoint as another process sees it while validate.py runs (absent between runs)."""
    try:
        return torch.load(path, weights_only=True)
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


def _second_run_checkpointed(ckpt: Path):
    def ready() -> bool:
        d = _load(ckpt)
        return d is not None and d["seed"] == 1
    return ready


# ----------------------------------------------------------------------------- the training loops' hooks

def _snapshot(at: int, into: dict, gen: torch.Generator):
    def on_epoch_end(done, net, opt, losses):
        if done == at:
            into.update(net={k: v.clone() for k, v in net.state_dict().items()}, opt=copy.deepcopy(opt.state_dict()),
                        gen=gen.get_state(), rng=torch.get_rng_state(), losses=list(losses))
    return on_epoch_end


@pytest.mark.parametrize("schedule,at", [("step", 3), ("mtt", 5), ("mtt", 6)])
def test_train_network_resumed_from_its_epoch_hook_equals_one_go(schedule, at):
    """Resuming after `at` epochs gives the same weights and losses, bit for bit, as training in one go; for 'mtt'
    (8 epochs: a fresh optimiser at the start of epoch index 5) both at that epoch and after it."""
    torch.manual_seed(0)
    x, y = torch.rand(12, 1, 8, 8), torch.arange(12) % 3
    recipe = TrainRecipe(epochs=8, lr=0.05, batch_size=5, schedule=schedule, dsa=DSA("color_crop_flip_scale_rotate"),
                         mix_p=0.5)
    torch.manual_seed(1)
    net = get_network("ConvNet-1-w8", 1, 3, 8)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    gen, snap = torch.Generator().manual_seed(2), {}
    losses = train_network(net, x, y, recipe, gen, torch.device("cpu"), on_epoch_end=_snapshot(at, snap, gen))
    resumed = get_network("ConvNet-1-w8", 1, 3, 8)
    resumed.load_state_dict(snap["net"])
    gen2 = torch.Generator()
    gen2.set_state(snap["gen"])
    rest = train_network(resumed, x, y, recipe, gen2, torch.device("cpu"),
                         resume=TrainResume(at, snap["opt"], snap["losses"]))
    assert rest == losses and len(losses) == 8
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), resumed.state_dict().values()))
    assert not all(torch.equal(init[k], v) for k, v in net.state_dict().items())   # it did train


def _kd_one_go_then_resumed(epochs: int, hook: dict, resume_from) -> dict:
    """Train a KD student in one go with `hook` (on_epoch_end / on_step) filling a snapshot, train a fresh one
    resumed from that snapshot, and assert both end with the same losses and weights."""
    spec = get_dataset_spec("MNIST")
    torch.manual_seed(0)
    x, y = torch.rand(10, 1, 28, 28), torch.arange(10)
    soft = kd.teacher_soft_targets(freeze(get_network(STUDENT, 1, 10, 28)))
    recipe = kd.KDRecipe(epochs=epochs, lr=3e-3, batch_size=4, temperature=4.0, mix="cutmix", crop="rrc",
                         crop_scale=(0.5, 1.0))
    prep = lambda v: normalize(v, spec.mean, spec.std)  # noqa: E731
    torch.manual_seed(1)
    net = get_network(STUDENT, 1, 10, 28)
    gen, snap = torch.Generator().manual_seed(2), {}
    (name, make_hook), = hook.items()
    losses = kd.train_network_kd(net, x, y, recipe, gen, torch.device("cpu"), soft_targets=soft, prepare=prep,
                                 **{name: make_hook(snap, gen)})
    resumed = get_network(STUDENT, 1, 10, 28)
    resumed.load_state_dict(snap["net"])
    gen2 = torch.Generator()
    gen2.set_state(snap["gen"])
    rest = kd.train_network_kd(resumed, x, y, recipe, gen2, torch.device("cpu"), soft_targets=soft, prepare=prep,
                               resume=resume_from(snap))
    assert rest == losses
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), resumed.state_dict().values()))
    return snap


def test_train_network_kd_resumed_from_its_epoch_hook_equals_one_go():
    _kd_one_go_then_resumed(5, {"on_epoch_end": lambda snap, gen: _snapshot(2, snap, gen)},
                            lambda snap: TrainResume(2, snap["opt"], snap["losses"]))


# --------------------------------------------------------------------------------------- the stage

def test_sigkill_mid_training_then_rerun_records_the_uninterrupted_numbers(files, straight_ce):
    results = files / "killed_ce" / "r.json"
    ckpt = validate.ckpt_path_for(results)
    rc, _ = interrupt_when(_ce_cmd(files, results, "--ckpt-every", 4, "--quiet"), _second_run_checkpointed(ckpt),
                           signal.SIGKILL)
    assert rc == -signal.SIGKILL
    left = torch.load(ckpt, weights_only=True)
    assert left["seed"] == 1 and 4 <= left["epoch"] < EPOCHS and left["epoch"] % 4 == 0
    assert csv_rows(results.with_suffix(".csv")) == 1 and not results.exists()
    r = run_ok(_ce_cmd(files, results, "--ckpt-every", 4))         # not --quiet: the resume is announced
    assert f"seed 1: resuming after epoch {left['epoch']}" in r.stderr
    assert _report(results) == straight_ce
    assert not ckpt.exists()                                      # deleted once its run was recorded


def test_sigkill_mid_kd_training_then_rerun_records_the_uninterrupted_numbers(files):
    straight = _straight(_kd_cmd(files, files / "straight_kd" / "r.json", "--quiet"))
    results = files / "killed_kd" / "r.json"
    ckpt = validate.ckpt_path_for(results)
    rc, _ = interrupt_when(_kd_cmd(files, results, "--ckpt-every", 3, "--quiet"), _second_run_checkpointed(ckpt),
                           signal.SIGKILL)
    assert rc == -signal.SIGKILL
    left = torch.load(ckpt, weights_only=True)
    assert left["seed"] == 1 and 3 <= left["epoch"] < KD_EPOCHS
    r = run_ok(_kd_cmd(files, results, "--ckpt-every", 3))
    assert f"seed 1: resuming after epoch {left['epoch']}" in r.stderr
    assert _report(results) == straight
    assert not ckpt.exists()


def test_sigterm_checkpoints_inside_the_run_exits_143_and_rerun_continues(files, straight_ce):
    results = files / "stopped_ce" / "r.json"
    ckpt = validate.ckpt_path_for(results)
    # --ckpt-every 0: no periodic checkpoint, so the file can only come from the stop request
    cmd = _ce_cmd(files, results, "--ckpt-every", 0, "--quiet")
    rc, err = interrupt_when(cmd, lambda: csv_rows(results.with_suffix(".csv")) == 1, signal.SIGTERM, delay=0.1)
    assert rc == 143, err
    assert "stopped by SIGTERM; checkpoint written after batch" in err and "re-run the same command" in err
    assert "Traceback" not in err
    state = torch.load(ckpt, weights_only=True)
    assert state["format"] == validate.CKPT_FORMAT and (state["model"], state["arm"], state["seed"]) == (
        "ConvNet-1-w8", "syn", 1)
    # stopped after the batch in flight (2 batches per epoch), inside the epoch
    assert 0 <= state["epoch"] < EPOCHS and len(state["losses"]) == state["epoch"] and state["step"] in (1, 2)
    assert f"after batch {state['step']} of epoch {state['epoch'] + 1}/{EPOCHS} of ConvNet-1-w8 syn seed 1" in err
    assert csv_rows(results.with_suffix(".csv")) == 1 and not results.exists()
    run_ok(cmd)
    assert _report(results) == straight_ce
    assert not ckpt.exists()


@pytest.mark.parametrize("extra,flag,recorded", [
    (["--lr", "1e30"], "--lr (now 1e+30)", []),
    (["--baseline", "full", "--full-epochs", "3", "--full-lr", "1e30"], "--full-lr (now 1e+30)", ["syn"]),
])
def test_nan_loss_names_the_lr_flag_keeps_the_checkpoint_and_records_no_row(files, tmp_path, extra, flag,
                                                                            recorded):
    results = tmp_path / "r.json"
    args = ["--syn", str(files / "set"), "--data-path", str(files / "data"), "--model", "ConvNet-1-w8", "--epochs",
            "3", "--runs", "1", "--batch-size", "64", "--ckpt-every", "1", "--results", str(results), "--quiet",
            *extra]
    r = CliRunner().invoke(validate.app, args)
    assert r.exit_code == 2 and "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the loss became")
    ckpt = validate.ckpt_path_for(results)
    assert f"lower {flag} and re-run" in lines[0] and f"last good checkpoint {ckpt} is kept" in lines[0]
    kept = torch.load(ckpt, weights_only=True)        # written after the last finite epoch, never after the NaN
    assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["net"].values())
    if recorded:   # the runs before the diverged one keep their rows; the diverged one has none
        assert [row["arm"] for row in csv.DictReader(open(results.with_suffix(".csv")))] == recorded
    else:
        assert not results.with_suffix(".csv").exists()
    assert not results.exists()
    # the advice holds: a lower lr is another configuration, refused until --overwrite
    lowered = [a if a != "1e30" else "0.01" for a in args]
    r = CliRunner().invoke(validate.app, lowered)
    assert r.exit_code == 2 and re.search(r"(another configuration|other settings); pass --overwrite", r.output)
    r = CliRunner().invoke(validate.app, lowered + ["--overwrite"])
    assert r.exit_code == 0, r.output
    assert results.exists() and not ckpt.exists()


def test_ckpt_every_is_documented_and_checked(files):
    r = CliRunner().invoke(validate.app, ["--help"])
    assert "--ckpt-every" in r.output and "ckpt.pt" in r.output
    r = CliRunner().invoke(validate.app, ["--syn", str(files / "set"), "--data-path", str(files / "data"),
                                          "--ckpt-every", "-1"])
    assert r.exit_code == 2 and "--ckpt-every must be 0" in r.output


def test_sigusr1_under_slurm_checkpoints_requeues_and_the_rerun_matches(files, tmp_path, monkeypatch):
    """In process: SIGUSR1 raised during epoch 3 of the run stops it after that epoch (exit 143), asks Slurm to
    requeue the job, and the same command then finishes with the uninterrupted run's numbers."""
    calls = tmp_path / "scontrol_calls"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    def args(name):
        return ["--syn", str(files / "set"), "--data-path", str(files / "data"), "--model", "ConvNet-1-w8",
                "--epochs", "8", "--runs", "1", "--batch-size", "10", "--mix-p", "0.5", "--ckpt-every", "0",
                "--results", str(tmp_path / name / "r.json"), "--quiet"]
    straight = CliRunner().invoke(validate.app, args("straight"))
    assert straight.exit_code == 0, straight.output
    real = validate.train_network

    def signalled(*a, on_epoch_end=None, **k):
        def hook(done, *rest):
            if done == 3:
                os.kill(os.getpid(), signal.SIGUSR1)   # handled before the hook looks for a stop request
            on_epoch_end(done, *rest)
        return real(*a, on_epoch_end=hook, **k)
    monkeypatch.setattr(validate, "train_network", signalled)
    r = CliRunner().invoke(validate.app, args("stopped"))
    assert r.exit_code == 143 and "stopped by SIGUSR1; checkpoint written after epoch 3/8" in r.output
    assert calls.read_text().split() == ["requeue", "77"]
    assert torch.load(validate.ckpt_path_for(tmp_path / "stopped" / "r.json"), weights_only=True)["epoch"] == 3
    monkeypatch.setattr(validate, "train_network", real)
    r = CliRunner().invoke(validate.app, args("stopped"))
    assert r.exit_code == 0, r.output
    assert _report(tmp_path / "stopped" / "r.json") == _report(tmp_path / "straight" / "r.json")


# ------------------------------------------------------------- a stop request inside an epoch (issue 13, point 6)

def _stop_after_step(k: int, into: dict, gen: torch.Generator):
    """on_step hook recording the loop's position, weights, optimiser and generator after its k-th step overall."""
    def on_step(position, net, opt):
        into["steps"] = into.get("steps", 0) + 1
        if into["steps"] == k:
            into.update(position=copy.deepcopy(position), net={n: v.clone() for n, v in net.state_dict().items()},
                        opt=copy.deepcopy(opt.state_dict()), gen=gen.get_state())
    return on_step


def _resume_from(snap: dict) -> TrainResume:
    p = snap["position"]
    return TrainResume(p.epoch, snap["opt"], p.losses, step=p.step, order=p.order, total=p.total, count=p.count)


@pytest.mark.parametrize("schedule,k", [("step", 7), ("mtt", 16), ("mtt", 18), ("step", 9)])
def test_train_network_resumed_from_inside_an_epoch_equals_one_go(schedule, k):
    """12 images in batches of 5: 3 steps per epoch. Resuming after step k (k = 16: the first step of epoch index 5,
    where 'mtt' starts a fresh optimiser; k = 9: the last step of an epoch) gives the same weights and losses, bit
    for bit, as training in one go."""
    torch.manual_seed(0)
    x, y = torch.rand(12, 1, 8, 8), torch.arange(12) % 3
    recipe = TrainRecipe(epochs=8, lr=0.05, batch_size=5, schedule=schedule, dsa=DSA("color_crop_flip_scale_rotate"),
                         mix_p=0.5)
    torch.manual_seed(1)
    net = get_network("ConvNet-1-w8", 1, 3, 8)
    gen, snap = torch.Generator().manual_seed(2), {}
    losses = train_network(net, x, y, recipe, gen, torch.device("cpu"), on_step=_stop_after_step(k, snap, gen))
    assert snap["position"].step == (k - 1) % 3 + 1 and snap["position"].epoch == (k - 1) // 3
    resumed = get_network("ConvNet-1-w8", 1, 3, 8)
    resumed.load_state_dict(snap["net"])
    gen2 = torch.Generator()
    gen2.set_state(snap["gen"])
    rest = train_network(resumed, x, y, recipe, gen2, torch.device("cpu"), resume=_resume_from(snap))
    assert rest == losses and len(losses) == 8
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), resumed.state_dict().values()))


def test_train_network_kd_resumed_from_inside_an_epoch_equals_one_go():
    snap = _kd_one_go_then_resumed(4, {"on_step": lambda snap, gen: _stop_after_step(5, snap, gen)}, _resume_from)
    assert (snap["position"].epoch, snap["position"].step) == (1, 2)   # 3 steps per epoch: epoch 1, step 2


@pytest.mark.parametrize("protocol", ["ce", "kd"])
def test_sigterm_inside_a_long_epoch_stops_after_the_batch_in_flight_and_rerun_matches(protocol, files, tmp_path,
                                                                                      monkeypatch):
    """In process: SIGTERM arrives during the 4th training batch of the first epoch (10 batches per epoch). The run
    checkpoints after that batch, not at the end of the epoch, exits 143, and the same command then finishes with
    the uninterrupted run's numbers."""
    def args(name):
        common = ["--syn", str(files / "set"), "--data-path", str(files / "data"), "--epochs", "2", "--runs", "1",
                  "--batch-size", "2", "--ckpt-every", "0", "--results", str(tmp_path / name / "r.json"), "--quiet"]
        if protocol == "ce":
            return common + ["--model", "ConvNet-1-w8", "--mix-p", "0.5", "--lr", "0.005"]
        return common + ["--teacher", str(files / "teacher.pt"), "--model", STUDENT, "--lr", "0.003", "-T", "4"]
    straight = CliRunner().invoke(validate.app, args("straight"))
    assert straight.exit_code == 0, straight.output
    real = validate.get_network
    forwards = {"n": 0}

    def signalling(*a, **k):
        net = real(*a, **k)

        def pre_hook(module, inputs):
            if module.training:
                forwards["n"] += 1
                if forwards["n"] == 4:
                    os.kill(os.getpid(), signal.SIGTERM)
        net.register_forward_pre_hook(pre_hook)
        return net
    monkeypatch.setattr(validate, "get_network", signalling)
    r = CliRunner().invoke(validate.app, args("stopped"))
    assert r.exit_code == 143, r.output
    assert "stopped by SIGTERM; checkpoint written after batch 4 of epoch 1/2 of " in r.output, r.output
    state = torch.load(validate.ckpt_path_for(tmp_path / "stopped" / "r.json"), weights_only=True)
    assert (state["epoch"], state["step"], state["losses"]) == (0, 4, [])
    monkeypatch.setattr(validate, "get_network", real)
    r = CliRunner().invoke(validate.app, args("stopped"))
    assert r.exit_code == 0, r.output
    assert _report(tmp_path / "stopped" / "r.json") == _report(tmp_path / "straight" / "r.json")
