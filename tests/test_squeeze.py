"""squeeze.py: teacher training (decoupled.md §2), its resume, weight wrapping, the pre-flight check and DDP."""
import csv
import json
import math
import os
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import squeeze
from networks.registry import get_network
from utils.errors import UserError
from utils.io import atomic_torch_save, safe_torch_load
from utils.teacher import NORMALIZATIONS, load_teacher

ROOT = Path(__file__).resolve().parent.parent
NET = "ConvNet-2-BN-w16"
runner = CliRunner()


def make_folder(root: Path, n_train: int = 20, n_test: int = 10, res: int = 16, seed: int = 0) -> Path:
    """An ImageFolder tree of ten learnable classes: class k is a noisy patch of its own colour (PNG, lossless)."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(20, 236, size=(10, 3))
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(10):
            d = root / split / f"c{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = palette[k] + rng.normal(0, 18, size=(res, res, 3))
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Decoded-split caches of these tiny trees go to the test's own folder, not ~/.cache/ddtoolkit."""
    monkeypatch.setenv("DDT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


def small(**kw):
    base = dict(arch=NET, epochs=4, lr=0.05, batch_size=32, weight_decay=5e-4, eval_every=2, seed=3)
    base.update(kw)
    return base


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------- training

def test_training_learns_and_writes_a_loadable_teacher(folder, tmp_path):
    out = tmp_path / "t" / "toy.pt"
    meta = squeeze.squeeze("ImageFolder", folder, out, None, small(epochs=6, norm="cifar10"), quiet=True)
    log = rows(tmp_path / "t" / "toy_log.csv")
    assert [int(r["epoch"]) for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["test_acc"] != "" for r in log] == [False, True, False, True, False, True]   # every 2 and the last
    assert float(log[-1]["train_loss"]) < 0.6 * float(log[0]["train_loss"])
    assert meta["test_acc"] == pytest.approx(float(log[-1]["test_acc"])) and meta["test_acc"] > 0.5  # chance 0.1
    assert meta["epochs"] == 6 and meta["train_images"] == 200 and meta["recipe"] == "default"
    assert not (tmp_path / "t" / "toy.pt.ckpt").exists()
    cfg = json.loads((tmp_path / "t" / "toy_config.json").read_text())
    assert cfg["arch"] == NET and cfg["lr"] == 0.05 and cfg["norm"] == "cifar10" and cfg["resolution"] == 16

    teacher = load_teacher(out, norm="cifar10")   # the chosen normalisation travels with the weights
    assert (teacher.mean, teacher.std) == NORMALIZATIONS["cifar10"]
    assert teacher.class_names == tuple(f"c{k}" for k in range(10)) and teacher.resolution == 16
    with pytest.raises(UserError, match="not --norm imagenet"):
        load_teacher(out, norm="imagenet")
    # the pre-flight check recomputes exactly the accuracy the training logged for its last epoch
    report = squeeze.eval_only(out, folder, quiet=True, results=tmp_path / "eval.json")
    assert report["top1"] == pytest.approx(meta["test_acc"]) and report["class_order"] == "matched"
    assert json.loads((tmp_path / "eval.json").read_text())["test_images"] == 100

    # the same teacher with its outputs and class names permuted: the check maps classes by name, same top-1
    payload = safe_torch_load(out)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    head = [k for k in payload["model"] if k.startswith("classifier")]
    for k in head:
        payload["model"][k] = payload["model"][k][perm]
    payload["class_names"] = [payload["class_names"][i] for i in perm]
    atomic_torch_save(payload, tmp_path / "perm.pt")
    again = squeeze.eval_only(tmp_path / "perm.pt", folder, quiet=True)
    assert again["class_order"] == "remapped by class name" and again["top1"] == pytest.approx(report["top1"])


def test_resume_equals_uninterrupted_and_refuses_other_settings(folder, tmp_path):
    whole = tmp_path / "whole.pt"
    squeeze.squeeze("ImageFolder", folder, whole, None, small(), quiet=True)
    part = tmp_path / "part.pt"
    assert squeeze.squeeze("ImageFolder", folder, part, None, small(), quiet=True, stop_after=2) is None
    assert (tmp_path / "part.pt.ckpt").is_file() and not part.exists()
    with pytest.raises(UserError, match="other settings"):
        squeeze.squeeze("ImageFolder", folder, part, None, small(lr=0.02), quiet=True)
    squeeze.squeeze("ImageFolder", folder, part, None, small(), quiet=True)   # resumes at epoch 3
    a, b = safe_torch_load(whole), safe_torch_load(part)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["meta"]["test_acc"] == b["meta"]["test_acc"]
    assert [r["train_loss"] for r in rows(tmp_path / "whole_log.csv")] == \
        [r["train_loss"] for r in rows(tmp_path / "part_log.csv")]
    assert not (tmp_path / "part.pt.ckpt").exists()
    # the same command again (e.g. after a kill between writing the teacher and removing the checkpoint): nothing
    # to do and nothing rewritten; other settings never replace a finished teacher silently
    files = {p.name: p.read_bytes() for p in tmp_path.glob("part*")}
    again = squeeze.squeeze("ImageFolder", folder, part, None, small(), quiet=True)
    assert again["fingerprint"] == a["meta"]["fingerprint"] and again["test_acc"] == a["meta"]["test_acc"]
    assert {p.name: p.read_bytes() for p in tmp_path.glob("part*")} == files
    with pytest.raises(UserError, match="other settings.*--overwrite"):
        squeeze.squeeze("ImageFolder", folder, part, None, small(lr=0.02), quiet=True)
    other = squeeze.squeeze("ImageFolder", folder, part, None, small(seed=4), quiet=True, overwrite=True)
    assert other["settings"]["seed"] == 4
    # --no-resume starts afresh even over a checkpoint of other settings (which a resume would refuse)
    fresh = tmp_path / "fresh.pt"
    squeeze.squeeze("ImageFolder", folder, fresh, None, small(), quiet=True, stop_after=1)
    meta = squeeze.squeeze("ImageFolder", folder, fresh, None, small(lr=0.02), quiet=True, resume=False)
    assert meta["settings"]["lr"] == 0.02
    assert [int(r["epoch"]) for r in rows(tmp_path / "fresh_log.csv")] == [1, 2, 3, 4]


def test_streamed_split_trains_exactly_like_the_in_memory_one(folder, tmp_path):
    """ImageNet-size splits are streamed from their files by DataLoader workers; same images, same order, same
    augmentation draws: the weights must be identical to the in-memory run."""
    mem = squeeze.squeeze("ImageFolder", folder, tmp_path / "mem.pt", None, small(epochs=2), quiet=True)
    streamed = squeeze.squeeze("ImageFolder", folder, tmp_path / "str.pt", None, small(epochs=2), quiet=True,
                               max_memory_gb=1e-6, workers=1)
    a, b = safe_torch_load(tmp_path / "mem.pt"), safe_torch_load(tmp_path / "str.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert mem["test_acc"] == streamed["test_acc"]
    data, _ = squeeze.load_data("ImageFolder", folder, "train", max_memory_gb=1e-6)
    assert data.images is None and len(data.dataset) == 200                       # really streamed
    sub, _ = squeeze.load_data("ImageFolder", folder, "train", per_class=3, seed=1, max_memory_gb=1e-3)
    assert sub.images.shape == (30, 3, 16, 16) and sub.labels.bincount().tolist() == [3] * 10


# ---------------------------------------------------------------------------------- recipes and schedule

def test_recipes_resolve_to_the_published_settings():
    c = squeeze.resolve_config("CIFAR100", "sre2l-cifar100", {}, 32, 3, 100)
    assert (c.arch, c.lr, c.momentum, c.weight_decay, c.batch_size, c.epochs) == \
        ("ResNet-18-modified", 0.1, 0.9, 5e-4, 128, 200)
    assert (c.aug, c.crop_padding, c.eval_every) == ("crop-flip", 4, 10)
    assert (c.mean, c.std) == NORMALIZATIONS["cifar10"]      # SRe2L's CIFAR-10 statistics for CIFAR-100 (§1.1)
    assert squeeze.resolve_config("CIFAR100", "dwa-cifar100", {}, 32, 3, 100).std == NORMALIZATIONS["cifar100"][1]
    assert squeeze.resolve_config("CIFAR10", "dwa-cifar10", {}, 32, 3, 10).std == NORMALIZATIONS["cifar10-true"][1]
    t = squeeze.resolve_config("TinyImageNet", "sre2l-tiny", {"lr": 0.1}, 64, 3, 200)
    assert (t.lr, t.weight_decay, t.batch_size, t.epochs, t.warmup_epochs, t.aug, t.norm) == \
        (0.1, 1e-4, 256, 50, 5, "rrc-flip", "tiny")
    assert squeeze.resolve_config("CIFAR10", "rded", {}, 32, 3, 10).arch == "ConvNet-3-BN"
    assert squeeze.resolve_config("TinyImageNet", "rded", {}, 64, 3, 200).mean == NORMALIZATIONS["imagenet"][0]
    d = squeeze.resolve_config("ImageNette", None, {}, 128, 3, 10)
    assert (d.arch, d.aug, d.norm) == ("ResNet-18", "rrc-flip", None)
    with pytest.raises(UserError, match="unknown recipe"):
        squeeze.get_recipe("sre2l-cifar1000")


def test_lr_schedule_matches_torch_schedulers():
    cfg = squeeze.resolve_config("TinyImageNet", "sre2l-tiny", {"epochs": 12}, 64, 3, 200)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=5),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12 - 5)], milestones=[5])
    ref = []
    for _ in range(12):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [squeeze.lr_at(cfg, e) for e in range(12)] == pytest.approx(ref, rel=1e-12, abs=1e-15)
    c = squeeze.resolve_config("CIFAR100", "sre2l-cifar100", {"schedule": "CosineAnnealingLR"}, 32, 3, 100)
    assert c.schedule == "cosine" and squeeze.lr_at(c, 0) == 0.1 and squeeze.lr_at(c, 100) == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------- augmentation

def test_pad_crop_and_flip_are_per_sample_shifts():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    p = {"top": torch.tensor([0, 2]), "left": torch.tensor([1, 2]), "flip": torch.tensor([True, False])}
    y = squeeze.apply_augmentation("crop-flip", x, p, pad=1)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    assert torch.equal(y[0], padded[0, :, 0:4, 1:5].flip(-1))   # zero row on top, then mirrored
    assert torch.equal(y[1], padded[1, :, 2:6, 2:6])
    assert y[0, 0, 0].abs().sum() == 0                          # the padding is black
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    xs = torch.rand(6, 3, 8, 8)
    assert torch.equal(squeeze.augment("crop-flip", xs, 1, g1), squeeze.augment("crop-flip", xs, 1, g2))
    # a rank applying its slice of the global batch's draws gets exactly the rows of the whole-batch result
    params = squeeze.draw_augmentation("rrc-flip", 6, 8, 1, torch.Generator().manual_seed(2))
    whole = squeeze.apply_augmentation("rrc-flip", xs, params, 1)
    pos = torch.tensor([3, 4, 5])
    assert torch.equal(squeeze.apply_augmentation("rrc-flip", xs[pos], squeeze.slice_params(params, pos), 1),
                       whole[pos])


def test_random_resized_crop_boxes_are_valid_and_follow_the_scale_range():
    p = squeeze.draw_rrc(4000, 32, 0, torch.Generator().manual_seed(0))
    h, w, top, left = p["h"], p["w"], p["top"], p["left"]
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    frac = (h * w).double() / 32 ** 2
    assert frac.min() >= 0.06 and frac.max() <= 1.0 and 0.45 < frac.mean() < 0.6   # U(0.08, 1) with rejections
    ratio = (w.double() / h.double())
    assert ratio.min() > 0.6 and ratio.max() < 1.6
    full = {"top": torch.tensor([0]), "left": torch.tensor([0]), "h": torch.tensor([8]), "w": torch.tensor([8])}
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(squeeze.apply_rrc(x, full, 0), x)


# ------------------------------------------------------------------------------------ wrapping weights

def test_weights_with_module_prefixes_are_wrapped_exactly(folder, tmp_path):
    net = get_network(NET, 3, 10, 16)
    for m in net.modules():   # non-trivial running statistics, so buffers are compared too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 3},
               tmp_path / "ckpt.pth")
    out = tmp_path / "wrapped.pt"
    r = runner.invoke(squeeze.app, ["--weights", str(tmp_path / "ckpt.pth"), "--dataset", "ImageFolder",
                                    "--data-path", str(folder), "--arch", NET, "--norm", "tiny", "--out", str(out),
                                    "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    t = load_teacher(out)
    ref = net.state_dict()
    assert t.net.state_dict().keys() == ref.keys()
    assert all(torch.equal(t.net.state_dict()[k], ref[k]) for k in ref)
    assert (t.mean, t.std) == NORMALIZATIONS["tiny"] and t.num_classes == 10 and t.arch == NET
    assert 0 <= t.meta["test_acc"] <= 1 and t.meta["source"].endswith("ckpt.pth")
    # the pre-flight check reads the foreign checkpoint directly, given its arch, dataset and normalisation
    r = runner.invoke(squeeze.app, ["--eval-only", str(tmp_path / "ckpt.pth"), "--arch", NET, "--dataset",
                                    "ImageFolder", "--norm", "tiny", "--data-path", str(folder), "--results",
                                    str(tmp_path / "pre.json"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "pre.json").read_text())["top1"] == pytest.approx(t.meta["test_acc"])
    r = runner.invoke(squeeze.app, ["--weights", str(tmp_path / "ckpt.pth"), "--dataset", "ImageFolder",
                                    "--data-path", str(folder), "--arch", "ConvNet-3-BN-w16", "--out",
                                    str(tmp_path / "bad.pt"), "--device", "cpu", "--no-eval"])
    assert r.exit_code == 2 and "do not fit" in r.output and not (tmp_path / "bad.pt").exists()


def test_pretrained_offline_fails_with_one_line(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    r = runner.invoke(squeeze.app, ["--pretrained", "--dataset", "ImageNet", "--data-path", str(tmp_path / "none"),
                                    "--out", str(tmp_path / "in1k.pt")])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--weights" in lines[0]
    assert "resnet18-f37072fd.pth" in lines[0]


# ------------------------------------------------------------------------------------------------ CLI

@pytest.mark.parametrize("extra,expected", [
    (["--data-path", "{tmp}/missing"], "does not exist"),
    (["--arch", "ResNet-7"], "unknown network 'ResNet-7'"),
    (["--recipe", "sre2l-mnist"], "unknown recipe 'sre2l-mnist'"),
    (["--norm", "cifar11"], "unknown normalisation 'cifar11'"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA GPU"),
])
def test_cli_bad_input_gives_one_line(folder, tmp_path, extra, expected):
    args = ["--dataset", "ImageFolder", "--data-path", str(folder), "--arch", NET, "--epochs", "1",
            "--out", str(tmp_path / "x.pt"), "--device", "cpu"]
    r = runner.invoke(squeeze.app, args + [a.replace("{tmp}", str(tmp_path)) for a in extra])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], r.output
    assert not (tmp_path / "x.pt").exists()


def test_help_lists_every_flag():
    r = runner.invoke(squeeze.app, ["--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert r.exit_code == 0
    for flag in ("--dataset", "--data-path", "--arch", "--recipe", "--epochs", "--lr", "--batch-size", "--momentum",
                 "--weight-decay", "--warmup-epochs", "--norm", "--train-per-class", "--test-per-class", "--out",
                 "--seed", "--device", "--workers", "--eval-every", "--resume", "--overwrite", "--quiet",
                 "--weights", "--pretrained", "--eval-only", "--amp"):
        assert flag in r.output, flag


# ------------------------------------------------------------------------------------------- torchrun

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_trains_one_teacher(folder, tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(ROOT / "squeeze.py"), "--dataset", "ImageFolder", "--data-path", str(folder),
           "--arch", NET, "--epochs", "6", "--lr", "0.05", "--batch-size", "32", "--eval-every", "3",
           "--device", "cpu", "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    t = load_teacher(out)
    assert t.meta["world_size"] == 2 and t.meta["ranks_agree"] is True   # every rank ended with rank 0's weights
    assert t.meta["test_acc"] > 0.4
    log = rows(tmp_path / "ddp_log.csv")
    assert [int(r["epoch"]) for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["test_acc"] != "" for r in log] == [False, False, True, False, False, True]
    assert math.isclose(float(log[-1]["test_acc"]), t.meta["test_acc"])
    assert r.stdout.count("wrote ") == 1   # only rank 0 writes
