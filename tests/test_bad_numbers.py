"""Bad numbers are refused before any work (docs/RELIABILITY.md, "Bad input"): a zero or negative count
(`--ipc`, `--train-subset`, `--epochs`, `--batch-size`, `--runs`, ...) on any of the nine stages is one line
`error: <flag> must be at least 1, got <value>`, exit 2, and nothing written; and a `--data-path` that was given but
does not exist never falls back to the dataset's system-wide default folder.

Each case runs the stage's real typer app in-process on the tiny data of tests/test_reliability.py."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import utils.datasets as D
from tests.test_reliability import _one_line_error, _stage, data  # noqa: F401  (data is a fixture)
from tests.test_validate import make_mnist_like

RECOVER = ["--teacher", "{teacher}", "--ipc", "1", "--iterations", "1", "--out", "{out}"]
RANK = ["--teacher", "{teacher10}", "--data-path", "{cifar}", "-d", "CIFAR10", "--ipc", "1", "--out", "{out}"]
RELABEL = ["--syn", "{syn4}", "--teacher", "{teacher}", "--fkd-path", "{out}", "--epochs", "1", "-b", "4", "--quiet"]
DISTILL = ["--dataset", "MNIST", "--data-path", "{mnist}", "--buffer-path", "{root}/buffers", "--model",
           "ConvNet-1-w8", "--ipc", "1", "--iterations", "1", "--out", "{out}", "--quiet"]

# (stage, working command line, count flag): the flag is appended last, so it wins over the template's value
COUNTS = [
    *[("validate", _stage("validate"), f) for f in ("--ipc", "--runs", "--epochs", "--batch-size", "--train-subset",
                                                    "--full-epochs")],
    ("coreset", _stage("coreset"), "--ipc"),
    *[("condense", _stage("condense"), f) for f in ("--ipc", "--train-subset", "--batch-real", "--inner-loop",
                                                    "--n-data", "--factor")],
    *[("buffer", _stage("buffer"), f) for f in ("--num-experts", "--train-epochs", "--batch-train",
                                                "--train-subset")],
    *[("distill", DISTILL, f) for f in ("--ipc", "--syn-steps", "--expert-epochs", "--batch-syn", "--train-subset")],
    *[("squeeze", _stage("squeeze"), f) for f in ("--epochs", "--batch-size", "--train-per-class")],
    *[("rank_select", RANK, f) for f in ("--ipc", "--batch-size")],
    *[("recover", RECOVER, f) for f in ("--ipc", "--iterations", "--batch-size")],
    *[("relabel", RELABEL, f) for f in ("--epochs", "--batch-size")],
]


@pytest.mark.parametrize("value", ["0", "-2"])
@pytest.mark.parametrize("stage,template,flag", COUNTS, ids=[f"{s}{f}" for s, _, f in COUNTS])
def test_zero_or_negative_count_is_refused_before_any_work(stage, template, flag, value, data, tmp_path):
    _one_line_error(stage, template + [flag, value], data, tmp_path, rf"^error: {flag} must be at least 1, got {value}$")


@pytest.fixture
def fashion_default(tmp_path, monkeypatch):
    """FashionMNIST's system-wide default folder, pointed at tiny idx files made here (so the test does not depend on
    the machine having /usr/share/datasets/fashion-mnist)."""
    folder = tmp_path / "system-fashion"
    folder.mkdir()
    make_mnist_like(folder, n_train=6, n_test=3)
    spec = replace(D.DATASETS["FashionMNIST"], default_paths=(str(folder),))
    monkeypatch.setitem(D.DATASETS, "FashionMNIST", spec)
    monkeypatch.setenv("DDT_CACHE", str(tmp_path / "cache"))
    return folder


@pytest.mark.parametrize("stage", ["validate", "coreset", "condense", "squeeze", "buffer"])
def test_given_data_path_that_does_not_exist_never_falls_back_to_the_default(stage, fashion_default, data,
                                                                             tmp_path):
    line = _one_line_error(stage, _stage(stage, dataset="FashionMNIST", path="{root}/typo/fashion"), data, tmp_path,
                           r"FashionMNIST: data path .*typo/fashion does not exist")
    assert str(fashion_default) not in line


def test_given_data_path_without_the_files_never_falls_back_to_the_default(fashion_default, data, tmp_path):
    line = _one_line_error("coreset", _stage("coreset", dataset="FashionMNIST", path="{cifar}"), data, tmp_path,
                           r"FashionMNIST: no train-images-idx3-ubyte\[\.gz\] found in .*cifar")
    assert str(fashion_default) not in line


def test_the_default_data_path_still_finds_the_system_copy(fashion_default, tmp_path, monkeypatch):
    """Without --data-path (the default `data`, absent here), the system-wide copy is used, as before."""
    monkeypatch.chdir(tmp_path)
    split, spec = D.load_split("FashionMNIST", Path("data"), "train")
    assert spec.name == "FashionMNIST" and len(split.labels) == 60
