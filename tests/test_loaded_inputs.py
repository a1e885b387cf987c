"""Every loaded input is checked (docs/RELIABILITY.md, "Damaged or inconsistent inputs"): synthetic sets of every
format, teachers, stored soft labels and resume checkpoints are refused with one line naming the file when a required
key is missing, a tensor has the wrong type, the images do not match their meta (channels, resolution), a label is
out of range or the counts disagree, a value is NaN/Inf, or the value space is unknown. Before, such files trained:
a NaN pixel or teacher weight ended as "the loss became nan ... lower --lr", a label of 10 in a 10-class set as an
index error deep in the loss, an unknown value space as silently wrong normalisation."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import relabel
from networks import get_network
from tests.test_reliability import _one_line_error, data  # noqa: F401  (data is a fixture)
from utils.checkpoint import load_state, save_state
from utils.datasets import get_dataset_spec
from utils.errors import UserError
from utils.softlabels import SoftLabelReader, batch_file
from utils.synset import load_synset, pixel_set, save_synset
from utils.teacher import load_teacher, save_teacher


def _native_set(folder: Path) -> Path:
    """A valid 10-image MNIST pixel set (one per class) with a learned lr."""
    torch.manual_seed(0)
    syn = pixel_set(torch.rand(10, 1, 28, 28), torch.arange(10), get_dataset_spec("MNIST"), method="x")
    syn.lr = torch.tensor(0.01)
    save_synset(syn, folder, grid=False)
    return folder


def _edit_payload(folder: Path, change) -> None:
    payload = torch.load(folder / "synset.pt", weights_only=True)
    change(payload)
    torch.save(payload, folder / "synset.pt")


def _edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def _set_images(p, images):
    p["tensors"]["images"] = images


SYNSET_CASES = {   # case: (what to damage, the message expected)
    "labels missing": (lambda f: _edit_payload(f, lambda p: p.pop("labels")), r"synset\.pt lacks 'labels'"),
    "labels of floats": (lambda f: _edit_payload(f, lambda p: p.update(labels=p["labels"].float())),
                         r"labels must be a non-empty 1-D integer tensor, got torch\.float32"),
    "images not a tensor": (lambda f: _edit_payload(f, lambda p: _set_images(p, [[0.0]])),
                            r"tensors\['images'\] must be a tensor, got list"),
    "channels unlike meta": (lambda f: _edit_payload(f, lambda p: _set_images(p, torch.rand(10, 3, 28, 28))),
                             r"its images are \(3, 28, 28\) but its meta says \(1, 28, 28\)"),
    "resolution unlike meta": (lambda f: _edit_payload(f, lambda p: _set_images(p, torch.rand(10, 1, 16, 16))),
                               r"its images are \(1, 16, 16\) but its meta says \(1, 28, 28\)"),
    "label of 10 for 10 classes": (lambda f: _edit_payload(f, lambda p: p["labels"].__setitem__(0, 10)),
                                   r"label 10 is out of range for its 10 classes"),
    "negative label": (lambda f: _edit_payload(f, lambda p: p["labels"].__setitem__(3, -1)),
                       r"label -1 is out of range for its 10 classes"),
    "fewer labels than images": (lambda f: _edit_payload(f, lambda p: p.update(labels=p["labels"][:9])),
                                 r"10 images but 9 labels"),
    "NaN pixel": (lambda f: _edit_payload(f, lambda p: p["tensors"]["images"].__setitem__((2, 0, 5, 5), float("nan"))),
                  r"synthetic set .* holds 1 NaN/Inf values in tensors\['images'\]"),
    "Inf learned lr": (lambda f: _edit_payload(f, lambda p: p.update(lr=torch.tensor(float("inf")))),
                       r"NaN/Inf values in the learned lr"),
    "negative learned lr": (lambda f: _edit_payload(f, lambda p: p.update(lr=torch.tensor(-0.1))),
                            r"the learned lr must be one positive number"),
    "soft labels of another class count": (
        lambda f: _edit_payload(f, lambda p: p.update(soft_labels=torch.rand(10, 7))),
        r"soft_labels of shape \(10, 7\) do not give 10 class scores"),
    "unknown value space": (lambda f: _edit_meta(f, lambda m: m.update(space="hsv")),
                            r"meta\.json: unknown value space 'hsv' \(known: pixel, normalized, zca\)"),
    "class count unlike class names": (lambda f: _edit_meta(f, lambda m: m.update(num_classes=12)),
                                       r"num_classes 12 does not match its 10 class names"),
    "meta without resolution": (lambda f: _edit_meta(f, lambda m: m.pop("resolution")),
                                r"meta\.json lacks 'resolution'"),
    "resolution of the wrong type": (lambda f: _edit_meta(f, lambda m: m.update(resolution="28")),
                                     r"'resolution' must be a int, got '28'"),
}


@pytest.mark.parametrize("case", SYNSET_CASES)
def test_damaged_or_inconsistent_synthetic_set_is_refused_naming_the_file(case, tmp_path):
    damage, expected = SYNSET_CASES[case]
    folder = _native_set(tmp_path / "set")
    load_synset(folder).decode()                     # the undamaged set loads
    damage(folder)
    with pytest.raises(UserError, match=expected) as err:
        syn = load_synset(folder)
        syn.decode()
    assert str(folder) in str(err.value)


def test_nan_set_is_one_line_naming_the_file_not_the_lr(data, tmp_path):
    folder = _native_set(tmp_path / "set")
    _edit_payload(folder, lambda p: p["tensors"]["images"].__setitem__((0, 0, 0, 0), float("nan")))
    line = _one_line_error("validate", ["--syn", str(folder), "--data-path", "{mnist}", "--epochs", "1",
                                        "--results", "{out}/r.json"], data, tmp_path,
                           r"synthetic set .*set holds 1 NaN/Inf values")
    assert "--lr" not in line


@pytest.mark.parametrize("fmt", ["mtt", "idc"])
def test_legacy_sets_are_checked_too(fmt, tmp_path):
    images, labels = torch.rand(10, 1, 28, 28), torch.arange(10)
    if fmt == "mtt":   # images_best.pt + labels_best.pt, one NaN pixel
        images[4, 0, 1, 1] = float("inf")
        torch.save(images, tmp_path / "images_best.pt")
        torch.save(labels, tmp_path / "labels_best.pt")
        expected = r"holds 1 NaN/Inf values in tensors\['images'\]"
    else:              # IDC data.pt with a negative label
        labels[7] = -3
        torch.save([images, labels], tmp_path / "data.pt")
        expected = r"label -3 is out of range"
    with pytest.raises(UserError, match=expected):
        load_synset(tmp_path, dataset="MNIST")


# ----------------------------------------------------------------------------------------------- teachers

def _teacher(path: Path, **changes) -> Path:
    torch.manual_seed(0)
    net = get_network("ConvNet-1-w8", 3, 4, 16)
    save_teacher(path, net, arch="ConvNet-1-w8", dataset="CIFAR10", num_classes=4, channels=3, resolution=16,
                 mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
    obj = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            obj.pop(key)
        else:
            obj[key] = value
    torch.save(obj, path)
    return path


def _nan_weights(state: dict) -> dict:
    state = dict(state)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    return state


@pytest.mark.parametrize("case,expected", [
    ("NaN weight", r"teacher weights .*t\.pt hold NaN/Inf values in '"),
    ("no mean", r"teacher file .*t\.pt lacks 'mean'"),
    ("zero std", r"teacher file .*t\.pt: mean .* / std .* must hold 3 finite values each, std > 0"),
    ("one mean for three channels", r"must hold 3 finite values each"),
    ("class count of the wrong type", r"'num_classes' must be a int, got '4'"),
])
def test_damaged_teacher_file_is_refused_naming_it(case, expected, tmp_path):
    good = _teacher(tmp_path / "t.pt")
    load_teacher(good)
    state = torch.load(good, weights_only=True)["model"]
    changes = {"NaN weight": {"model": _nan_weights(state)}, "no mean": {"mean": None},
               "zero std": {"std": [0.25, 0.0, 0.3]}, "one mean for three channels": {"mean": [0.5]},
               "class count of the wrong type": {"num_classes": "4"}}[case]
    _teacher(tmp_path / "t.pt", **changes)
    with pytest.raises(UserError, match=expected):
        load_teacher(tmp_path / "t.pt")


def test_foreign_weights_with_nan_are_refused(tmp_path):
    net = get_network("ConvNet-1-w8", 3, 10, 32)
    torch.save({"state_dict": _nan_weights(net.state_dict())}, tmp_path / "ckpt.pth")
    with pytest.raises(UserError, match=r"teacher weights .*ckpt\.pth hold NaN/Inf values"):
        load_teacher(tmp_path / "ckpt.pth", arch="ConvNet-1-w8", dataset="CIFAR10")


def test_nan_teacher_is_one_line_in_a_stage_not_the_lr(data, tmp_path):
    teacher = _teacher(tmp_path / "t.pt", model=_nan_weights(torch.load(_teacher(tmp_path / "t.pt"),
                                                                        weights_only=True)["model"]))
    line = _one_line_error("recover", ["--teacher", str(teacher), "--ipc", "1", "--iterations", "2", "--out", "{out}"],
                           data, tmp_path, r"teacher weights .* hold NaN/Inf values")
    assert "--lr" not in line


# -------------------------------------------------------------------------------------------- soft labels

@pytest.fixture
def soft_labels(tmp_path):
    """A relabel.py folder (1 epoch, 2 batches) for a 2-class 16 px ImageFolder set."""
    syn = tmp_path / "syn"
    rng = np.random.default_rng(0)
    for c in range(2):
        (syn / f"new{c:03d}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(syn / f"new{c:03d}" / f"{i}.png")
    torch.manual_seed(0)
    save_teacher(tmp_path / "t.pt", get_network("ConvNet-1-w8", 3, 2, 16), arch="ConvNet-1-w8",
                 dataset="ImageFolder", num_classes=2, channels=3, resolution=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    r = CliRunner().invoke(relabel.app, ["--syn", str(syn), "--teacher", str(tmp_path / "t.pt"), "--fkd-path",
                                         str(tmp_path / "labels"), "--epochs", "1", "-b", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    return tmp_path / "labels"


@pytest.mark.parametrize("field,value,expected", [
    ("logits", float("nan"), r"'logits' holds NaN/Inf values"),
    ("perm", 9, r"'perm' out of range"),
    ("lam", 1.5, r"'lam' 1\.5 is not in \[0, 1\]"),
])
def test_damaged_soft_label_batch_is_refused_naming_the_file(field, value, expected, soft_labels):
    reader = SoftLabelReader(soft_labels)
    reader.read_record(0, 1)
    f = batch_file(soft_labels, 0, 1)
    rec = torch.load(f, weights_only=True)
    if field == "lam":
        rec["lam"] = value
    else:
        rec[field].view(-1)[0] = value
    torch.save(rec, f)
    with pytest.raises(UserError, match=expected) as err:
        SoftLabelReader(soft_labels).read_record(0, 1)
    assert str(f) in str(err.value)


# ------------------------------------------------------------------------------------------- checkpoints

@dataclass
class _State:
    weights: dict
    step: int


def test_checkpoint_with_nan_values_is_refused_naming_the_file(tmp_path):
    ok = _State({"w": torch.ones(3), "moments": [torch.zeros(2)]}, 4)
    save_state(ok, tmp_path / "ckpt.pt", "fmt", "abc")
    assert load_state(tmp_path / "ckpt.pt", _State, "fmt", "abc", "x.py").step == 4
    bad = _State({"w": torch.ones(3), "moments": [torch.tensor([0.0, float("-inf")])]}, 4)
    save_state(bad, tmp_path / "ckpt.pt", "fmt", "abc")
    with pytest.raises(UserError, match=r"ckpt\.pt holds NaN/Inf values in 'weights\.moments\.0'.*--overwrite"):
        load_state(tmp_path / "ckpt.pt", _State, "fmt", "abc", "x.py")


def test_expert_checkpoint_with_nan_values_is_refused_naming_the_file(tmp_path):
    """buffer.py reads its expert checkpoints itself (stale ones of another expert are dropped, not refused); a
    damaged one is refused like any resume checkpoint."""
    import buffer
    state = {"format": buffer.EXPERT_CKPT_FORMAT, "fingerprint": "k", "expert": 0, "epoch": 1,
             "model": {"w": torch.ones(2)}, "optimizer": {}, "trajectory": [[torch.ones(2)], [torch.ones(2)]],
             "generator": torch.Generator().get_state(), "rng": {}, "rows": [], "seconds": 1.0}
    torch.save(state, tmp_path / "expert_ckpt.pt")
    assert buffer.read_expert_ckpt(tmp_path / "expert_ckpt.pt", "k", 0, 3, print).epoch == 1
    state["trajectory"][1][0][1] = float("nan")
    torch.save(state, tmp_path / "expert_ckpt.pt")
    with pytest.raises(UserError, match=r"expert_ckpt\.pt holds NaN/Inf values in 'trajectory\.1\.0'"):
        buffer.read_expert_ckpt(tmp_path / "expert_ckpt.pt", "k", 0, 3, print)
