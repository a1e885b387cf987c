"""What stages leave on disk for other people and other processes: permissions that follow the user's umask,
an output folder that is not inside the input dataset, and one writer per output."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import coreset
from tests.test_validate import make_mnist_like
from utils.io import atomic_torch_save, atomic_write_json


@pytest.fixture
def umask():
    """Set the process umask for one test (and put the old one back)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_artefacts_and_folders_follow_the_umask(tmp_path, umask, mask):
    """Files are 0666 & ~umask and folders 0777 & ~umask, as `touch` / `mkdir` would make them: atomic writes go
    through temp files and temp folders (0600 / 0700 by default), which must not leak their mode into the result,
    or colleagues on a shared cluster folder cannot read the results."""
    umask(mask)
    atomic_torch_save({"x": torch.zeros(2)}, tmp_path / "a.pt")
    atomic_write_json({"a": 1}, tmp_path / "b.json")
    assert _mode(tmp_path / "a.pt") == 0o666 & ~mask
    assert _mode(tmp_path / "b.json") == 0o666 & ~mask
    data = tmp_path / "mnist"
    data.mkdir()
    make_mnist_like(data, n_train=4, n_test=2)
    out = tmp_path / "runs" / "set"
    r = CliRunner().invoke(coreset.app, ["-d", "MNIST", "--data-path", str(data), "--ipc", "2", "--out", str(out),
                                         "--export-imagefolder"])
    assert r.exit_code == 0, r.output
    folders = [out, out / "images", *[p for p in (out / "images").iterdir()]]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 3 + 20
    assert {_mode(d) for d in folders} == {0o777 & ~mask}, [(d, oct(_mode(d))) for d in folders]
    assert {_mode(f) for f in files} == {0o666 & ~mask}, [(f, oct(_mode(f))) for f in files]


# ------------------------------------------------------------------------ output folders vs the input dataset

@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    make_mnist_like(root, n_train=4, n_test=2)
    return root


def _stage_args(stage: str, data: Path, out: Path) -> list[str]:
    return {
        "coreset": ["-d", "MNIST", "--data-path", str(data), "--ipc", "1", "--out", str(out)],
        "condense": ["-d", "MNIST", "--data-path", str(data), "--ipc", "1", "--net", "ConvNet-1-w8",
                     "--outer-iterations", "1", "--out", str(out), "--quiet"],
        "buffer": ["--dataset", "MNIST", "--data-path", str(data), "--model", "ConvNet-1-w8", "--train-epochs", "1",
                   "--num-experts", "1", "--buffer-path", str(out), "--quiet"],
    }[stage]


def _apps():
    import buffer
    import condense
    return {"coreset": coreset.app, "condense": condense.app, "buffer": buffer.app}


@pytest.mark.parametrize("stage", ["coreset", "condense", "buffer"])
@pytest.mark.parametrize("where", ["inside", "same", "around"])
def test_an_output_folder_overlapping_the_input_dataset_is_refused(mnist, tmp_path, stage, where):
    """An output inside the dataset becomes part of it (a new class folder, stray images); one that holds the
    dataset may be replaced whole (--overwrite). Refused with one line before anything is written."""
    import shutil
    data = tmp_path / "root" / "data"
    shutil.copytree(mnist, data)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = {"inside": data / "train" / "syn", "same": data, "around": tmp_path / "root"}[where]
    r = CliRunner().invoke(_apps()[stage], _stage_args(stage, data, out))
    errors = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "Traceback" not in r.output, r.output
    assert "input dataset" in errors[0] and "--data-path" in errors[0], errors[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# ------------------------------------------------------------------------------------ one writer per output

def test_a_second_coreset_writer_of_the_same_out_is_refused(mnist, tmp_path, monkeypatch):
    """A double-submitted job: while the first coreset.py is selecting, a second one on the same --out (with
    --overwrite) starts. It must stop with one line instead of replacing the first's set."""
    out = tmp_path / "set"
    args = ["-d", "MNIST", "--data-path", str(mnist), "--ipc", "1", "--out", str(out), "--overwrite"]
    second = {}

    def first_selector(labels, num_classes, ipc, seed, **_):
        second["result"] = CliRunner().invoke(coreset.app, args + ["--seed", "5"])   # the second job, meanwhile
        return coreset.select_first(labels, num_classes, ipc, seed)
    monkeypatch.setitem(coreset.SELECTORS, "first-slow", first_selector)
    r = CliRunner().invoke(coreset.app, args + ["--method", "first-slow"])
    assert r.exit_code == 0, r.output
    s = second["result"]
    assert s.exit_code == 2 and "being written by another coreset.py process (pid" in s.output, s.output
    assert json.loads((out / "meta.json").read_text())["method"] == "coreset-first-slow"   # the first's set
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]                  # no lock or temp left


def test_a_second_rank_select_writer_of_the_same_out_is_refused(tmp_path, monkeypatch):
    import rank_select
    from tests.test_rank_select import make_folder, make_teacher
    data, teacher = make_folder(tmp_path / "data"), make_teacher(tmp_path / "teacher.pt")
    out = tmp_path / "init"
    args = ["--teacher", str(teacher), "--dataset", "ImageFolder", "--data-path", str(data), "--ipc", "1",
            "--selection", "top", "--out",
            str(out), "--device", "cpu", "--quiet"]
    real, second = rank_select.select, {}

    def select_meanwhile(*a, **k):
        second["result"] = CliRunner().invoke(rank_select.app, args[:-3] + ["--selection", "min"] + args[-3:])
        return real(*a, **k)
    monkeypatch.setattr(rank_select, "select", select_meanwhile)
    r = CliRunner().invoke(rank_select.app, args)
    assert r.exit_code == 0, r.output
    s = second["result"]
    assert s.exit_code == 2 and "being written by another rank_select.py process (pid" in s.output, s.output
    assert json.loads((out / "selection.json").read_text())["selection"] == "top"
