"""The bad-input rows of docs/RELIABILITY.md, across the stage scripts: every one ends in exactly one
`error: ...` line, a non-zero exit, no traceback, and nothing written under the output path. Plus the
untrusted-file rows: pickled code is refused (and never runs), truncated files are named, every torch.load in
the code base is weights_only, and the shell scripts quote their variables.

Each case runs the stage's real typer app in-process on tiny data made here."""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import buffer
import condense
import coreset
import distill
import rank_select
import recover
import relabel
import squeeze
import validate
from tests.test_recover import _teacher_file
from tests.test_validate import make_mnist_like
from utils.datasets import CIFAR10_CLASSES, load_split, to_pixels
from utils.synset import pixel_set, save_synset

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
APPS = {"buffer": buffer.app, "condense": condense.app, "coreset": coreset.app, "distill": distill.app,
        "rank_select": rank_select.app, "recover": recover.app, "relabel": relabel.app, "squeeze": squeeze.app,
        "validate": validate.app}


def _jpeg(path: Path, seed: int, res: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (res, res, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """mnist: idx files (10 classes x 6); cifar: a CIFAR-10 JPEG tree (10 x 3); corrupt: the same tree with one
    truncated JPEG; flat: JPEGs directly under train/ (no class folders); teacher: a 4-class 16 px teacher file;
    syn4: a 4-class synthetic set (MNIST, 28 px); syn16: a 10-class MNIST-named set of 16 px images."""
    root = tmp_path_factory.mktemp("data")
    d = {"root": root, "mnist": root / "mnist", "cifar": root / "cifar", "corrupt": root / "corrupt",
         "flat": root / "flat"}
    d["mnist"].mkdir()
    make_mnist_like(d["mnist"], n_train=6, n_test=3)
    for tree in ("cifar", "corrupt"):
        for split in ("train", "test"):
            for c, name in enumerate(CIFAR10_CLASSES):
                for k in range(3):
                    _jpeg(d[tree] / split / name / f"{k}.jpg", seed=100 * c + k)
    bad = d["corrupt"] / "train" / "cat" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:60])                         # truncated mid-header
    d["bad_jpeg"] = bad
    for k in range(4):
        _jpeg(d["flat"] / "train" / f"{k}.jpg", seed=k)
        _jpeg(d["flat"] / "test" / f"{k}.jpg", seed=k)
    d["teacher"] = _teacher_file(root)
    (root / "t10").mkdir()
    d["teacher10"] = _teacher_file(root / "t10", classes=10, res=32)
    tr, spec = load_split("MNIST", d["mnist"], "train")
    keep = tr.labels < 4
    syn4 = pixel_set(to_pixels(tr.images[keep][:8]), tr.labels[keep][:8], spec, method="x")
    syn4.meta.update(num_classes=4, class_names=syn4.meta["class_names"][:4])   # as if made for a 4-class dataset
    save_synset(syn4, root / "syn4")
    d["syn4"] = root / "syn4"
    small = torch.nn.functional.interpolate(to_pixels(tr.images[:20]), size=16)
    syn16 = pixel_set(small, tr.labels[:20], spec, method="x")
    syn16.meta["resolution"] = 16
    save_synset(syn16, root / "syn16")
    d["syn16"] = root / "syn16"
    return d


def _args(template: list[str], data: dict, out: Path) -> list[str]:
    subs = {f"{{{k}}}": str(v) for k, v in data.items()} | {"{out}": str(out)}
    result = []
    for a in template:
        for k, v in subs.items():
            a = a.replace(k, v)
        result.append(a)
    return result


def _one_line_error(stage: str, template: list[str], data: dict, tmp_path: Path, expected: str,
                    allowed: tuple[str, ...] = ()) -> str:
    """Run, expect one `error:` line matching `expected`, and nothing under the output path (but `allowed` names:
    whole files a run writes before it can meet the fault, e.g. its resolved settings)."""
    out = tmp_path / "out"
    r = runner.invoke(APPS[stage], _args(template, data, out))
    assert r.exit_code not in (0, None), r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.output, r.output
    assert re.search(expected, errors[0]), errors[0]
    left = sorted(p for p in out.rglob("*") if p.name not in allowed) if out.exists() else []
    assert not left, left                            # nothing half-written
    return errors[0]


# ----------------------------------------------------------------------------- bad paths and names

STAGE_ARGS = {   # a working command line per stage, with {dataset}, {path} and {net} to vary
    "buffer": ["--dataset", "{dataset}", "--data-path", "{path}", "--model", "{net}", "--train-epochs", "1",
               "--num-experts", "1", "--buffer-path", "{out}", "--quiet"],
    "condense": ["-d", "{dataset}", "--data-path", "{path}", "--ipc", "1", "--net", "{net}", "--outer-iterations",
                 "1", "--out", "{out}", "--quiet"],
    "squeeze": ["--dataset", "{dataset}", "--data-path", "{path}", "--arch", "{net}", "--epochs", "1", "--out",
                "{out}/teacher.pt", "--quiet"],
    "validate": ["--baseline", "random", "--ipc", "1", "--dataset", "{dataset}", "--data-path", "{path}",
                 "--model", "{net}", "--epochs", "1", "--results", "{out}/r.json", "--quiet"],
    "coreset": ["--dataset", "{dataset}", "--data-path", "{path}", "--ipc", "1", "--out", "{out}"],
}


def _stage(stage: str, dataset="MNIST", path="{mnist}", net="ConvNet-1-w8") -> list[str]:
    return [a.replace("{dataset}", dataset).replace("{path}", path).replace("{net}", net) for a in STAGE_ARGS[stage]]


@pytest.mark.parametrize("stage", STAGE_ARGS)
def test_missing_data_path(stage, data, tmp_path):
    _one_line_error(stage, _stage(stage, path="{root}/no/such/folder"), data, tmp_path, r"does not exist|not found")


@pytest.mark.parametrize("stage", STAGE_ARGS)
def test_wrong_data_path_holding_no_dataset(stage, data, tmp_path):
    _one_line_error(stage, _stage(stage, path="{cifar}"), data, tmp_path, r"MNIST: no .* found in")


@pytest.mark.parametrize("stage", STAGE_ARGS)
def test_unknown_dataset_name(stage, data, tmp_path):
    _one_line_error(stage, _stage(stage, dataset="CIFAR11"), data, tmp_path, r"unknown dataset 'CIFAR11'")


@pytest.mark.parametrize("stage", [s for s in STAGE_ARGS if s != "coreset"])   # coreset's random rule has no net
def test_unknown_network_name(stage, data, tmp_path):
    _one_line_error(stage, _stage(stage, net="ResNet-7"), data, tmp_path, r"unknown network 'ResNet-7'")


@pytest.mark.parametrize("stage", ["condense", "squeeze", "validate", "coreset"])
def test_dataset_folder_in_the_wrong_layout(stage, data, tmp_path):
    _one_line_error(stage, _stage(stage, dataset="CIFAR10", path="{flat}", net="ConvNet-1-w8"), data, tmp_path,
                    r"class folders in .* do not match its 10 classes")


@pytest.mark.parametrize("stage", ["condense", "validate", "coreset", "squeeze"])
def test_corrupt_jpeg_in_an_imagefolder_names_the_file(stage, data, tmp_path, monkeypatch):
    monkeypatch.setenv("DDT_CACHE", str(tmp_path / "cache"))
    line = _one_line_error(stage, _stage(stage, dataset="CIFAR10", path="{corrupt}", net="ConvNet-1-w8"), data,
                           tmp_path, r"corrupt or unreadable image")
    assert str(Path("train") / "cat" / "1.jpg") in line


def test_corrupt_jpeg_met_by_a_dataloader_worker_is_one_line(data, tmp_path, monkeypatch):
    """squeeze.py streams large splits from their files through DataLoader workers, which re-raise a worker's
    error with the worker's traceback as its message; the one line must survive that."""
    monkeypatch.setenv("DDT_CACHE", str(tmp_path / "cache"))
    line = _one_line_error("squeeze", _stage("squeeze", dataset="CIFAR10", path="{corrupt}") +
                           ["--workers", "1", "--max-memory-gb", "0"], data, tmp_path, r"corrupt or unreadable image",
                           allowed=("teacher_config.json", ".lock"))   # written before the stream meets the file
    assert str(Path("train") / "cat" / "1.jpg") in line and "Original Traceback" not in line


def test_corrupt_jpeg_in_a_synthetic_imagefolder_names_the_file(data, tmp_path):
    syn = tmp_path / "synfolder"
    for c in range(10):
        _jpeg(syn / f"{c:03d}" / "0.png", seed=c, res=28)
    (syn / "003" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    line = _one_line_error("validate", ["--syn", str(syn), "--dataset", "MNIST", "--data-path", "{mnist}",
                                        "--epochs", "1", "--results", "{out}/r.json"], data, tmp_path,
                           r"corrupt or unreadable image")
    assert str(syn / "003" / "0.png") in line


@pytest.mark.parametrize("stage,template,expected", [
    ("condense", _stage("condense") + ["--ipc", "7"], r"class \d has 6 training images"),
    ("coreset", _stage("coreset") + ["--ipc", "7"], r"class \d has only 6 images, 7 per class"),
    ("validate", _stage("validate") + ["--ipc", "7"], r"class \d has only 6 images, 7 per class"),
    ("rank_select", ["--teacher", "{teacher10}", "--data-path", "{cifar}", "-d", "CIFAR10", "--ipc", "4", "--out",
                     "{out}"], r"has 3 images|holds 3|only 3"),
])
def test_ipc_larger_than_the_images_available(stage, template, expected, data, tmp_path):
    _one_line_error(stage, template, data, tmp_path, expected)


@pytest.mark.parametrize("syn,dataset,expected", [
    ("{syn4}", "MNIST", r"4 classes, MNIST has 10"),
    ("{syn16}", "MNIST", r"synthetic images are \(1, 16, 16\), MNIST data is"),
    ("{syn4}", "FashionMNIST", r"made for MNIST, not FashionMNIST"),
])
def test_synthetic_set_that_does_not_fit_the_dataset(syn, dataset, expected, data, tmp_path):
    _one_line_error("validate", ["--syn", syn, "--dataset", dataset, "--data-path", "{mnist}", "--epochs", "1",
                                 "--results", "{out}/r.json"], data, tmp_path, expected)


def test_teacher_of_another_class_count_is_refused(data, tmp_path):
    _one_line_error("validate", ["--syn", "{syn4}", "--teacher", "{teacher}", "--dataset", "MNIST", "--data-path",
                                 "{mnist}", "--epochs", "1", "--results", "{out}/r.json"], data, tmp_path,
                    r"has 4 classes but the MNIST data has 10|channels|classes")


# ------------------------------------------------------------------------------------- untrusted files

MARKER = Path("/tmp") / f"ddt_pickle_ran_{os.getpid()}"


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _malicious(path: Path, payload=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload if payload is not None else {"weights": torch.zeros(2), "x": _RunsCode()}, path)
    return path


@pytest.mark.parametrize("case", ["synset", "ckpt", "teacher", "buffer", "zca", "network", "any"])
def test_pickled_code_is_refused_and_never_runs(case, data, tmp_path):
    MARKER.unlink(missing_ok=True)
    if case == "synset":
        syn = tmp_path / "syn"
        save_synset(pixel_set(torch.rand(10, 1, 28, 28), torch.arange(10), load_split("MNIST", data["mnist"],
                                                                                         "test")[1], method="x"), syn)
        _malicious(syn / "synset.pt")
        stage, args = "validate", ["--syn", str(syn), "--data-path", "{mnist}", "--epochs", "1", "--results",
                                   "{out}/r.json"]
    elif case == "ckpt":
        run = tmp_path / "out"
        _malicious(run / "ckpt.pt")
        stage, args = "condense", _stage("condense")
    elif case == "teacher":
        stage, args = "recover", ["--teacher", str(_malicious(tmp_path / "t.pt")), "--ipc", "1", "--iterations",
                                  "1", "--out", "{out}"]
    elif case == "buffer":
        folder = tmp_path / "buffers" / "MNIST" / "ConvNet-1-w8"
        _malicious(folder / "replay_buffer_0.pt", [[_RunsCode()]])
        stage, args = "distill", ["--dataset", "MNIST", "--data-path", "{mnist}", "--buffer-path",
                                  str(tmp_path / "buffers"), "--model", "ConvNet-1-w8", "--ipc", "1",
                                  "--iterations", "1", "--out", "{out}", "--quiet"]
    elif case == "zca":   # a ZCA-space set whose zca.pt carries code
        from utils.zca import ZCA
        spec = load_split("MNIST", data["mnist"], "test")[1]
        syn = tmp_path / "zcaset"
        save_synset(pixel_set(torch.rand(10, 1, 28, 28), torch.arange(10), spec, method="x"), syn)
        meta = __import__("json").loads((syn / "meta.json").read_text())
        meta.update(space="zca", zca={"eps": 0.1, "file": "zca.pt"})
        (syn / "meta.json").write_text(__import__("json").dumps(meta))
        _malicious(syn / "zca.pt", {"state": ZCA.fit(torch.rand(20, 1, 4, 4)).state_dict(), "x": _RunsCode()})
        stage, args = "validate", ["--syn", str(syn), "--data-path", "{mnist}", "--epochs", "1", "--results",
                                   "{out}/r.json"]
    elif case == "any":   # the one loader every stage goes through
        from utils.errors import UserError
        from utils.io import safe_torch_load
        with pytest.raises(UserError, match="refusing to load .*: it is not a plain tensor file"):
            safe_torch_load(_malicious(tmp_path / "x.pt"))
        assert not MARKER.exists()
        return
    else:
        from networks.registry import get_network, load_weights
        with pytest.raises(Exception, match="refusing|not a plain|cannot"):
            load_weights(get_network("ConvNet-1-w8", 1, 10, 28), _malicious(tmp_path / "w.pt"))
        assert not MARKER.exists()
        return
    if case == "ckpt":   # the checkpoint sits in --out itself: only compare the message
        r = runner.invoke(APPS[stage], _args(args, data, tmp_path / "out"))
        assert r.exit_code == 2 and "refusing to load" in r.output and "Traceback" not in r.output, r.output
    else:
        _one_line_error(stage, args, data, tmp_path, r"refusing to load .*: it is not a plain tensor file")
    assert not MARKER.exists()


def test_truncated_checkpoint_is_named_in_one_line(data, tmp_path):
    good = tmp_path / "out" / "ckpt.pt"
    good.parent.mkdir()
    torch.save({"format": "x", "S": torch.zeros(100, 100)}, good)
    good.write_bytes(good.read_bytes()[:500])
    r = runner.invoke(condense.app, _args(_stage("condense"), data, tmp_path / "out"))
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert re.search(r"cannot read .*ckpt\.pt: corrupt or truncated", r.output), r.output


def _torch_load_calls():
    for path in sorted(ROOT.rglob("*.py")):
        if any(part in (".venv", "venv", "tests", "runs") or part.startswith(".") for part in path.relative_to(
                ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and ast.unparse(node.func.value) in ("torch", '__import__("torch")', "__import__('torch')"):
                yield path.relative_to(ROOT), node
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("load_state_dict_from_url"):
                yield path.relative_to(ROOT), node


def test_every_torch_load_in_the_code_base_is_weights_only():
    calls = list(_torch_load_calls())
    assert len(calls) >= 5                          # the scan does find the loads
    for where, node in calls:
        kw = {k.arg: k.value for k in node.keywords}
        assert "weights_only" in kw and ast.literal_eval(kw["weights_only"]) is True, \
            f"{where}:{node.lineno} torch.load without weights_only=True"


# A `$name` / `${name...}` / `$1` / `$@` expansion outside double quotes, in the text of a shell line. Expansions
# inside `[[ ]]`, `(( ))`, `$(( ))`, assignments (`x=$y`) and `case $x in` do not split, so they are allowed.
_EXPANSION = re.compile(r"\$(\{[^}]*\}|[A-Za-z_][A-Za-z_0-9]*|[0-9@*#?$!])")


def _unquoted_expansions(line: str) -> list[str]:
    code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
    if not code.strip() or re.match(r"\s*(case|for)\b", code):
        return []
    code = re.sub(r"\[\[.*?\]\]|\(\(.*?\)\)|\$\(\(.*?\)\)", "", code)
    code = re.sub(r"'[^']*'", "", code)             # single-quoted text expands nothing
    found, quoted, stack, i = [], False, [], 0
    while i < len(code):
        ch = code[i]
        if ch == "\\":
            i += 2
            continue
        if code.startswith("$(", i):      # a command substitution starts a fresh quoting context
            stack.append(quoted)
            quoted = False
            i += 2
            continue
        if ch == ")" and stack and not quoted:
            quoted = stack.pop()
        elif ch == '"':
            quoted = not quoted
        elif ch == "$" and not quoted:
            m = _EXPANSION.match(code, i)
            start = code.rfind(" ", 0, i) + 1
            is_assignment = re.match(r"(local |export |readonly )?[A-Za-z_][A-Za-z_0-9]*=", code[start:i + 1])
            if m and m.group(1) not in ("#", "?", "$", "!") and not is_assignment:
                found.append(m.group(0))
        i += 1
    return found


def test_shell_scripts_quote_every_variable():
    scripts = sorted(ROOT.glob("scripts/**/*.sh")) + sorted(ROOT.glob("scripts/**/*.sbatch")) + [ROOT / ".ci" / "run"]
    assert len(scripts) > 20
    problems = [f"{p.relative_to(ROOT)}:{n}: {e} in: {line.strip()}"
                for p in scripts for n, line in enumerate(p.read_text().splitlines(), 1)
                for e in _unquoted_expansions(line)]
    assert not problems, "\n".join(problems[:30])


def test_the_quoting_check_can_fail():
    assert _unquoted_expansions('python x.py --out $OUT') == ["$OUT"]
    assert _unquoted_expansions('python x.py "$@" ${ARGS}') == ["${ARGS}"]
    assert _unquoted_expansions('python x.py --out "$OUT/a b" "${ARGS[@]}"') == []
    assert _unquoted_expansions("echo '$HOME'; x=$y; [[ -n $z ]]") == []
    assert _unquoted_expansions('cd "$(dirname "$0")/.."; n=$(ls $D | wc -l)') == ["$D"]


def test_run_lock_admits_one_writer_and_is_released_on_exit(tmp_path):
    from utils.errors import UserError
    from utils.io import run_lock
    with run_lock(tmp_path / "out", "x.py"):
        with pytest.raises(UserError, match=r"being written by another x.py process \(pid \d+ on "):
            with run_lock(tmp_path / "out", "x.py"):
                pass
    stale = tmp_path / "out" / "snapshots" / ".synset.pt.abc123.tmp"   # a write killed midway
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    with run_lock(tmp_path / "out", "x.py"):    # released: the next run gets it, and sweeps the stale temp file
        assert not stale.exists()


def test_every_row_names_an_existing_test():
    """docs/RELIABILITY.md is the contract: each row of its fault tables names at least one test, and each named
    test exists."""
    rows, in_fault_table = [], False
    for line in (ROOT / "docs" / "RELIABILITY.md").read_text().splitlines():
        if re.match(r"\| (fault|bad input|threat) \|", line):
            in_fault_table = True
        elif not line.startswith("|"):
            in_fault_table = False
        elif in_fault_table and not line.startswith("|---"):
            rows.append(line)
    assert len(rows) > 50
    defined: dict[str, set[str]] = {}
    for row in rows:
        named = re.findall(r"(tests/[\w/]+\.py)::(\w+)", row)
        assert named, f"row without a test: {row}"
        for path, name in named:
            if path not in defined:
                tree = ast.parse((ROOT / path).read_text())
                defined[path] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name in defined[path], f"{path}::{name} named in docs/RELIABILITY.md does not exist"
