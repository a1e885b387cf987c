"""What stages leave on disk for other people and other processes: permissions that follow the user's umask,
an output folder that is not inside the input dataset, and one writer per output."""
from __future__ import annotations

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
