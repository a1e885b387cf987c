"""coreset.py: seeded per-class selection written as a synthetic set."""
import json

import torch
from typer.testing import CliRunner

import coreset
from tests.test_validate import make_mnist_like
from utils.synset import load_synset


def test_selectors():
    labels = torch.arange(10).repeat(5)  # 5 per class, interleaved
    a = coreset.select_random(labels, 10, 2, seed=0)
    assert labels[a].tolist() == sorted(list(range(10)) * 2)
    assert torch.equal(a, coreset.select_random(labels, 10, 2, seed=0))
    assert not torch.equal(a, coreset.select_random(labels, 10, 2, seed=1))
    first = coreset.select_first(labels, 10, 2, seed=0)
    assert first[:2].tolist() == [0, 10]  # the first two images of class 0 in dataset order


def test_cli_writes_a_set_and_refuses_bad_input(tmp_path):
    make_mnist_like(tmp_path)
    out = tmp_path / "set"
    args = ["--dataset", "MNIST", "--data-path", str(tmp_path), "--ipc", "3", "--out", str(out)]
    r = CliRunner().invoke(coreset.app, args + ["--export-imagefolder"])
    assert r.exit_code == 0, r.output
    syn = load_synset(out)
    x, y = syn.decode()
    assert x.shape == (30, 1, 28, 28) and y.bincount().tolist() == [3] * 10
    assert 0 <= x.min() and x.max() <= 1 and syn.space == "pixel"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["method"] == "coreset-random" and meta["args"]["ipc"] == 3 and meta["ipc"] == 3
    assert (out / "grid.png").is_file() and len(list((out / "images").rglob("*.png"))) == 30
    r = CliRunner().invoke(coreset.app, args)
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = CliRunner().invoke(coreset.app, args[:-1] + [str(tmp_path / "big"), "--ipc", "21"])
    assert r.exit_code == 2 and "per class were asked for" in r.output
    assert not (tmp_path / "big").exists()  # nothing half-written
    r = CliRunner().invoke(coreset.app, ["--dataset", "Nope", "--ipc", "1", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown dataset 'Nope'" in r.output
