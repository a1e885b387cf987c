"""Operating-system faults are one line (docs/RELIABILITY.md, "Operating-system faults"): a full disk, a read-only or
forbidden folder, an output path that is an existing file (or lies under one), `--results` that is a folder. Outputs
are probed before any training, so a run never trains and then fails to write; and a failed write leaves no temp
file, `.old-<pid>` folder or half-written artefact behind.

How each fault is made (the tests run as root, so chmod cannot forbid anything): a full disk by sending every
`torch.save` and every plain file write to /dev/full, the kernel's always-full device (its real ENOSPC, and torch's
real error for it); a read-only or forbidden folder by making the probe's temp-file creation fail with EROFS or
EACCES; files in the way are real files."""
from __future__ import annotations

import builtins
import errno
import io
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import validate
from tests.test_bad_numbers import DISTILL, RANK, RECOVER, RELABEL
from tests.test_reliability import APPS, _args, _stage, data  # noqa: F401  (data is a fixture)

runner = CliRunner()

# (stage, command line with {out} as its output, the output's flag); folder outputs first, then file outputs
FOLDER_OUTPUTS = [
    ("coreset", _stage("coreset"), "--out"),
    ("condense", _stage("condense"), "--out"),
    ("buffer", _stage("buffer"), "--buffer-path"),
    ("distill", DISTILL, "--out"),
    ("rank_select", RANK, "--out"),
    ("recover", RECOVER, "--out"),
    ("relabel", RELABEL, "--fkd-path"),
]
FILE_OUTPUTS = [
    ("validate", _stage("validate")[:-3] + ["--results", "{out}", "--quiet"], "--results"),
    ("squeeze", _stage("squeeze")[:-3] + ["--out", "{out}", "--quiet"], "--out"),
]


def _run(stage: str, template: list[str], data: dict, out: Path):
    r = runner.invoke(APPS[stage], _args(template, data, out))
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "Traceback" not in r.output, r.output
    return errors[0]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("stage,template,flag", FOLDER_OUTPUTS, ids=[s for s, _, _ in FOLDER_OUTPUTS])
def test_folder_output_that_is_an_existing_file_is_one_line_and_untouched(stage, template, flag, data, tmp_path):
    out = tmp_path / "out"
    out.write_text("keep me")
    line = _run(stage, template, data, out)
    assert f"{flag} {out} is an existing file, not a folder" in line, line
    assert out.read_text() == "keep me" and _listing(tmp_path) == ["out"]


@pytest.mark.parametrize("stage,template,flag", FILE_OUTPUTS, ids=[s for s, _, _ in FILE_OUTPUTS])
def test_file_output_that_is_a_folder_is_one_line_before_any_training(stage, template, flag, data, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(validate, "validate", lambda *a, **k: pytest.fail("trained before checking --results"))
    out = tmp_path / "out"
    (out / "inside").mkdir(parents=True)
    line = _run(stage, template, data, out)
    assert f"{flag} {out} is a folder; give a file name" in line, line
    assert _listing(tmp_path) == ["out", "out/inside"]


@pytest.mark.parametrize("stage,template,flag", FOLDER_OUTPUTS + FILE_OUTPUTS,
                         ids=[s for s, _, _ in FOLDER_OUTPUTS + FILE_OUTPUTS])
def test_output_under_an_existing_file_is_one_line(stage, template, flag, data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "sub" / "out"
    line = _run(stage, template, data, out)
    assert f"{flag} {out} cannot be written: {blocker} is a file, not a folder" in line, line
    assert _listing(tmp_path) == ["a_file"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("stage,template,flag", [FOLDER_OUTPUTS[0], FILE_OUTPUTS[0]], ids=["coreset", "validate"])
def test_read_only_or_forbidden_output_is_one_line_before_any_training(stage, template, flag, code, data, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setattr(validate, "validate", lambda *a, **k: pytest.fail("trained before checking --results"))
    real = tempfile.mkstemp

    def refuse(*a, dir=None, **k):
        if dir is not None and Path(dir).resolve().is_relative_to(tmp_path.resolve()):
            raise OSError(code, os.strerror(code), str(dir))
        return real(*a, dir=dir, **k)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = tmp_path / "out"
    line = _run(stage, template, data, out)
    assert f"{flag} {out} is not writable: {os.strerror(code)} ({tmp_path})" in line, line
    assert _listing(tmp_path) == []


@pytest.fixture
def disk_full(monkeypatch):
    """Every torch.save to a path and every file opened for writing ("w", "x") lands on /dev/full instead: the kernel answers
    ENOSPC exactly as a full disk does (torch.save fails with its own RuntimeError there). Reads are untouched."""
    real_save, real_open = torch.save, builtins.open

    def save(obj, f, *a, **k):
        return real_save(obj, "/dev/full" if isinstance(f, (str, os.PathLike)) else f, *a, **k)

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wx") and str(file).startswith("/tmp"):
            file = "/dev/full"
        return real_open(file, mode, *a, **k)
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)   # pathlib's write_text/write_bytes open through io.open


@pytest.mark.parametrize("stage,template", [("coreset", _stage("coreset")),
                                            ("validate", _stage("validate")),
                                            ("squeeze", _stage("squeeze"))])
def test_disk_full_is_one_line_and_leaves_no_temp_files(stage, template, data, tmp_path, disk_full):
    line = _run(stage, template, data, tmp_path / "out")
    assert re.search(r"cannot write .*: No space left on device", line), line
    left = [p for p in _listing(tmp_path) if Path(p).name.startswith(".") or ".old-" in p or p.endswith(".tmp")]
    assert not left, left


def test_a_failed_replace_of_an_existing_set_puts_the_old_set_back(tmp_path, monkeypatch):
    """save_synset moves an existing set aside (`.<name>.old-<pid>`) before renaming the new one into place; when
    that rename fails, the old set goes back under its name and nothing is left beside it."""
    from utils.datasets import get_dataset_spec
    from utils.errors import UserError
    from utils.synset import load_synset, pixel_set, save_synset
    spec = get_dataset_spec("MNIST")
    save_synset(pixel_set(torch.zeros(10, 1, 28, 28), torch.arange(10), spec, method="old"), tmp_path / "set",
                grid=False)
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:   # the new set into place
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UserError, match=r"cannot write .*set: No space left on device"):
        save_synset(pixel_set(torch.ones(10, 1, 28, 28), torch.arange(10), spec, method="new"), tmp_path / "set",
                    grid=False)
    monkeypatch.setattr(os, "replace", real)
    assert _listing(tmp_path) == ["set", "set/meta.json", "set/synset.pt"]
    assert load_synset(tmp_path / "set").meta["method"] == "old"

