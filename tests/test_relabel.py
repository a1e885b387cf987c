"""relabel.py + utils/softlabels.py: stored FKD-style soft labels (decoupled.md §6.1, §6.2, §8.2, §9.1 item 16)."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import relabel as rl
from networks.registry import get_network
from utils.errors import UserError
from utils.softlabels import (SoftLabelReader, batch_file, crop_pixels, epoch_order, keep_top_k,
                              load_set_pixels, make_views, normalize, sample_crops)
from utils.teacher import load_teacher, save_teacher
from utils.train import cutmix_box

ROOT = Path(__file__).resolve().parent.parent
N_CLASSES = 6
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """10 random 16x16 PNGs in an SRe2L-style ImageFolder (2 classes) and a ConvNet-1-BN-w8 teacher with 6 classes
    whose logits are spread out (scaled classifier, non-trivial BN statistics)."""
    root = tmp_path_factory.mktemp("relabel")
    syn = root / "syn"
    g = torch.Generator().manual_seed(0)
    for c in range(2):
        d = syn / f"new{c:03d}"
        d.mkdir(parents=True)
        for i in range(5):
            arr = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(d / f"class{c:03d}_id{i:03d}.png")
    torch.manual_seed(0)
    net = get_network("ConvNet-1-BN-w8", 3, N_CLASSES, 16)
    with torch.no_grad():
        net.classifier.weight.mul_(40)
        bn = net.features[1]
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    teacher = root / "teacher.pt"
    save_teacher(teacher, net, arch="ConvNet-1-BN-w8", dataset="ImageFolder", num_classes=N_CLASSES, channels=3,
                 resolution=16, mean=MEAN, std=STD)
    pixels, _ = load_set_pixels(syn, "ImageFolder")
    return {"root": root, "syn": syn, "teacher": teacher, "pixels": pixels}


def run(setup, out, teacher=None, pixels=None, **kw):
    opts = dict(epochs=2, batch_size=4)
    run_kw = {k: kw.pop(k) for k in ("shard_spec", "overwrite") if k in kw}
    opts.update(kw)
    teacher = teacher or load_teacher(setup["teacher"])
    return rl.relabel(setup["pixels"] if pixels is None else pixels, teacher, out, rl.RelabelConfig(**opts),
                      syn=str(setup["syn"]), dataset="ImageFolder", teacher_path=str(setup["teacher"]), **run_kw)


def batch_bytes(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(Path(out).glob("epoch_*/batch_*.pt"))}


# ------------------------------------------------------------------------------------------------ round trip

@pytest.mark.parametrize("mix", ["cutmix", "mixup", "none"])
def test_round_trip_views_are_what_the_teacher_saw(setup, tmp_path, mix):
    teacher = load_teacher(setup["teacher"])
    seen = []
    teacher.net.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    m = run(setup, tmp_path / "out", teacher=teacher, mix=mix)
    seen = seen[1:]                      # the first forward is relabel's one-image input-size check
    assert m["complete"] and m["num_images"] == 10 and m["batches_per_epoch"] == 3 and len(seen) == 6

    reader = SoftLabelReader(tmp_path / "out")
    images, _ = reader.load_images()
    assert torch.equal(images, normalize(setup["pixels"], MEAN, STD))
    fresh = load_teacher(setup["teacher"])
    got = [(v, z) for e in range(reader.num_epochs()) for v, z in reader.epoch_batches(images, e)]
    assert [len(v) for v, _ in got] == [4, 4, 2, 4, 4, 2]          # short last batch kept, as the reference does
    for (views, logits), teacher_input in zip(got, seen):
        assert torch.equal(views, teacher_input)                     # bit-identical replay
        assert logits.dtype == torch.float32 and logits.shape == (len(views), N_CLASSES)
        with torch.no_grad():
            ref = fresh.net(views)
        assert ref.abs().max() > 1                                    # the teacher's logits are not all ~0
        assert torch.allclose(logits, ref, rtol=2 ** -10, atol=1e-4)  # fp16 storage rounding only
    # the mix really happened as recorded
    rec = reader.read_record(0, 0)
    plain = make_views(images[rec["indices"]], rec["coords"], rec["flip"], 16)
    views0 = got[0][0]
    if mix == "none":
        assert torch.equal(views0, plain) and torch.equal(rec["perm"], torch.arange(4)) and "box" not in rec
    elif mix == "mixup":
        assert torch.allclose(views0, rec["lam"] * plain + (1 - rec["lam"]) * plain[rec["perm"]], atol=1e-6)
        assert 0 < rec["lam"] < 1 and "box" not in rec
    else:
        a1, b1, a2, b2 = rec["box"].tolist()
        assert torch.equal(views0[:, :, a1:a2, b1:b2], plain[rec["perm"]][:, :, a1:a2, b1:b2])
        outside = torch.ones(16, 16, dtype=torch.bool)
        outside[a1:a2, b1:b2] = False
        assert torch.equal(views0[:, :, outside], plain[:, :, outside])
    # one batch alone, by id (the DDP path: shard by batch)
    only = list(reader.epoch_batches(images, 1, batches=[1]))
    assert len(only) == 1 and torch.equal(only[0][0], got[4][0])


# ------------------------------------------------------------------------------------------------ the draws

def test_crop_fractions_stay_inside_and_follow_torchvision_rule():
    g = torch.Generator().manual_seed(1)
    h, w = 37, 23
    coords = sample_crops(3000, h, w, (0.08, 1.0), generator=g)
    assert coords.dtype == torch.float32 and coords.shape == (3000, 4)
    assert coords.min() >= 0 and coords.max() <= 1
    box = crop_pixels(coords, h, w)
    top, left, ch, cw = box.unbind(1)
    assert (ch >= 1).all() and (cw >= 1).all()
    assert (top + ch <= h).all() and (left + cw <= w).all()
    assert torch.allclose(coords.double() * torch.tensor([h, w, h, w]), box.double(), atol=1e-4)
    area = (ch * cw).double() / (h * w)
    # rounding w, h to integers moves the area/aspect a little off the drawn values
    assert area.min() >= 0.08 * 0.6 and area.max() <= 1.0
    aspect = cw.double() / ch.double()
    assert aspect.min() >= 0.75 * 0.7 and aspect.max() <= (4 / 3) / 0.7
    assert top.unique().numel() > 10 and left.unique().numel() > 10      # positions spread over the grid
    # hand case: scale (1, 1) on a 10x30 image never fits (h = sqrt(300/a) > 10), so torchvision's fallback:
    # the aspect 3 is clamped to 4/3 -> h = 10, w = round(13.33) = 13, centred: left = (30 - 13) // 2 = 8
    fb = crop_pixels(sample_crops(5, 10, 30, (1.0, 1.0), generator=g), 10, 30)
    assert fb.tolist() == [[0, 8, 10, 13]] * 5


def test_cutmix_box_follows_the_spec_rule():
    # hand case (§6.1): λ = 0.75 on 16x16 -> c = ⌊16·√0.25⌋ = 8, half 4; centre uniform on the integer grid
    g, twin = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    cy = int(torch.randint(0, 16, (1,), generator=twin))
    cx = int(torch.randint(0, 16, (1,), generator=twin))
    assert cutmix_box(16, 16, 0.75, g) == (max(cy - 4, 0), min(cy + 4, 16), max(cx - 4, 0), min(cx + 4, 16))
    # odd cut side: √(1−λ)·16 = 7.5 -> c = 7, half 3, so an unclipped box is 6 wide (one less than c)
    lam = 1 - (7.5 / 16) ** 2
    sides = {(b - t, r - l) for t, b, l, r in (cutmix_box(16, 16, lam, torch.Generator().manual_seed(s))
                                               for s in range(40)) if 0 < t and b < 16 and 0 < l and r < 16}
    assert sides == {(6, 6)}
    # every recorded box of relabel is centre ± ⌊c/2⌋ clipped, for some integer centre, with c from the stored λ
    cfg = rl.RelabelConfig(batch_size=2, mix="cutmix")
    order = epoch_order(120, cfg.seed, 0)
    for b in range(60):
        rec = rl.make_record(order, 0, b, cfg, 20, 20, 16)
        half = int(16 * math.sqrt(1 - rec["lam"])) // 2
        a1, b1, a2, b2 = rec["box"].tolist()
        spans = {(max(c - half, 0), min(c + half, 16)) for c in range(16)}
        assert (a1, a2) in spans and (b1, b2) in spans
        assert rec["coords"].shape == (2, 4) and rec["perm"].sort().values.tolist() == [0, 1]


def test_topk_reconstruction_is_fkd_keep_top_k(setup, tmp_path):
    run(setup, tmp_path / "full", fp16=False)
    run(setup, tmp_path / "top2", fp16=False, topk=2, topk_temperatures=(20.0, 3.0))
    full, top = SoftLabelReader(tmp_path / "full"), SoftLabelReader(tmp_path / "top2")
    images, _ = full.load_images()
    assert top.manifest["topk"] == 2 and top.temperatures == [20.0, 3.0]
    for t in (20.0, 3.0):
        for (v1, z), (v2, zk) in zip(full.epoch_batches(images, 1), top.epoch_batches(images, 1, temperature=t)):
            assert torch.equal(v1, v2)                            # same seed: same views whatever is stored
            p_true = torch.softmax(z / t, dim=1)
            p = torch.softmax(zk / t, dim=1)
            kept = z.topk(2, dim=1).indices
            assert torch.allclose(p.gather(1, kept), p_true.gather(1, kept), atol=1e-6)   # kept: exact
            assert torch.allclose(p.sum(1), torch.ones(len(p)), atol=1e-6)
            assert torch.allclose(p, keep_top_k(p_true, 2), atol=1e-6)
            rest = p.scatter(1, kept, float("nan"))
            rest = rest[~rest.isnan()].view(len(p), N_CLASSES - 2)
            assert torch.allclose(rest, rest[:, :1].expand_as(rest), atol=1e-7)           # uniform tail
            assert (p_true.gather(1, kept).sum(1) < 1 - 1e-3).any()   # the tail mass is not trivially 0
    with pytest.raises(UserError, match="T = 5.0"):
        next(top.epoch_batches(images, 0, temperature=5.0))
    # default storage: fp16 values, int16 class indices, fp32 tail masses
    run(setup, tmp_path / "top2h", topk=2, epochs=1)
    rec = torch.load(batch_file(tmp_path / "top2h", 0, 0), weights_only=True)
    assert rec["topk_values"].dtype == torch.float16 and rec["topk_indices"].dtype == torch.int16
    assert rec["tail_lse"].shape == (4, 1) and "logits" not in rec


def test_same_seed_same_files_other_epochs_other_crops(setup, tmp_path):
    run(setup, tmp_path / "a")
    run(setup, tmp_path / "b")
    a, b = batch_bytes(tmp_path / "a"), batch_bytes(tmp_path / "b")
    assert len(a) == 6 and a == b
    assert (tmp_path / "a" / "relabel.json").read_text() == (tmp_path / "b" / "relabel.json").read_text()
    reader = SoftLabelReader(tmp_path / "a")
    e0, e1 = reader.read_record(0, 0), reader.read_record(1, 0)
    assert not torch.equal(e0["coords"], e1["coords"]) and not torch.equal(e0["indices"], e1["indices"])
    run(setup, tmp_path / "c", seed=7)
    assert not torch.equal(SoftLabelReader(tmp_path / "c").read_record(0, 0)["coords"], e0["coords"])


# ------------------------------------------------------------------------------------------------ resume, shards

def test_resume_shards_and_settings_guard(setup, tmp_path):
    ref = tmp_path / "ref"
    run(setup, ref)
    want = batch_bytes(ref)
    # resume: delete some records, re-run -> the same bytes again
    for name in ("epoch_000/batch_00001.pt", "epoch_001/batch_00002.pt"):
        (ref / name).unlink()
    run(setup, ref)
    assert batch_bytes(ref) == want
    # two array-style shards: the first alone leaves the folder incomplete, and the reader says so
    out = tmp_path / "sharded"
    m = run(setup, out, shard_spec=(0, 2))
    assert not m["complete"] and len(batch_bytes(out)) == 3
    with pytest.raises(UserError, match="incomplete"):
        SoftLabelReader(out)
    m = run(setup, out, shard_spec=(1, 2))
    assert m["complete"] and m["stored_mb"] > 0 and batch_bytes(out) == want
    # other settings in the same folder are refused unless --overwrite
    with pytest.raises(UserError, match="other settings.*mix"):
        run(setup, out, mix="mixup")
    m = run(setup, out, mix="mixup", overwrite=True)
    assert m["mix"] == "mixup" and SoftLabelReader(out).read_record(0, 0)["mix"] == 2
    # more epochs extend the folder, earlier files untouched
    m = run(setup, ref, epochs=3)
    assert m["complete"] and m["epochs"] == 3 and {k: v for k, v in batch_bytes(ref).items() if
                                                   not k.startswith("epoch_002")} == want


# ------------------------------------------------------------------------------------------------ the reader's guards

def test_reader_refuses_other_sets_and_bad_files(setup, tmp_path):
    out = tmp_path / "out"
    run(setup, out, epochs=1)
    reader = SoftLabelReader(out)
    images, _ = reader.load_images()
    other = images.clone()
    other[3, 0, 5, 5] += 1 / 255 / STD[0]            # one pixel one grey level off
    with pytest.raises(UserError, match="not the set"):
        next(reader.epoch_batches(other, 0))
    with pytest.raises(UserError, match="10 images"):
        next(reader.epoch_batches(images[:9], 0))
    with pytest.raises(UserError, match="1 epochs"):
        next(reader.epoch_batches(images, 1))
    bad = batch_file(out, 0, 1)
    bad.write_bytes(b"not a torch file")
    with pytest.raises(UserError) as err:
        list(reader.epoch_batches(images, 0))
    assert "corrupt" in str(err.value) and str(bad) in str(err.value) and "\n" not in str(err.value)
    torch.save({"indices": torch.arange(4)}, bad)
    with pytest.raises(UserError, match="no 'coords'"):
        reader.read_record(0, 1)
    (out / "relabel.json").write_text("{ broken")
    with pytest.raises(UserError, match="corrupt"):
        SoftLabelReader(out)
    # a float set (not 8-bit exact) is fingerprinted by per-image means instead of the uint8 sha
    pix = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    m = run(setup, tmp_path / "float", pixels=pix, epochs=1)
    assert m["uint8_exact"] is False
    r = SoftLabelReader(tmp_path / "float")
    assert len(list(r.epoch_batches(r.normalize(pix), 0))) == 2
    pix[2] = pix[2] * 0.9
    with pytest.raises(UserError, match="not the set"):
        next(r.epoch_batches(r.normalize(pix), 0))


def test_cli_help_run_and_errors(setup, tmp_path):
    runner = CliRunner()
    res = runner.invoke(rl.app, ["--help"], env={"COLUMNS": "240", "TERM": "dumb"})
    assert res.exit_code == 0
    text = " ".join(res.output.replace("│", " ").split())
    for flag in ("--fkd-path", "--batch_size", "--fkd-seed", "--topk", "--mix-type", "--crop-scale",
                 "--min-scale-crops", "--shard-index", "--no-flip", "~30 GB"):
        assert flag in text, flag
    out = tmp_path / "cli"
    args = ["--syn", str(setup["syn"]), "--teacher", str(setup["teacher"]), "--fkd-path", str(out), "--epochs", "1",
            "-b", "8", "--mix-type", "mixup", "--fp32", "--quiet"]
    res = runner.invoke(rl.app, args)
    assert res.exit_code == 0, res.output
    assert "MB stored" in res.output
    m = json.loads((out / "relabel.json").read_text())
    assert m["complete"] and m["mix"] == "mixup" and m["dtype"] == "float32" and m["batches_per_epoch"] == 2
    assert json.loads((out / "config.json").read_text())["batch_size"] == 8
    res = runner.invoke(rl.app, args[:-1] + ["--mix-type", "cutmix"])
    assert res.exit_code == 2 and "other settings" in res.output
    res = runner.invoke(rl.app, ["--syn", str(tmp_path / "nope"), "--teacher", str(setup["teacher"])])
    assert res.exit_code == 2 and "error:" in res.output and "not found" in res.output
    res = runner.invoke(rl.app, args[:4] + ["--out", str(tmp_path / "x"), "--crop-scale", "0.5,0.1"])
    assert res.exit_code == 2 and "--crop-scale" in res.output


# ------------------------------------------------------------------------------------------------ torchrun

def test_torchrun_two_processes_write_what_one_process_writes(setup, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(setup, one, epochs=2, batch_size=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_ARRAY_TASK_ID"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "relabel.py"), "--syn", str(setup["syn"]), "--teacher", str(setup["teacher"]),
           "--out", str(two), "--epochs", "2", "--batch-size", "3", "--device", "cpu", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MB stored" in proc.stdout
    a, b = batch_bytes(one), batch_bytes(two)
    assert len(a) == 8 and a == b
    ma, mb = (json.loads((d / "relabel.json").read_text()) for d in (one, two))
    assert ma == mb and mb["complete"]


def test_sigterm_stops_after_a_whole_batch_file_and_resume_matches(setup, tmp_path):
    """SIGTERM (utils/signals.py): relabel stops after the batch file in flight with exit status 143; every file on
    disk is whole, and re-running the same command gives the files of an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(out):
        return [sys.executable, str(ROOT / "relabel.py"), "--syn", str(setup["syn"]), "--teacher",
                str(setup["teacher"]), "--out", str(out), "--epochs", "60", "--batch-size", "2", "--device", "cpu",
                "--quiet"]
    out = tmp_path / "stopped"
    proc = subprocess.Popen(cmd(out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(out.glob("epoch_*/batch_*.pt")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    written = batch_bytes(out)
    assert 1 <= len(written) < 300
    assert not json.loads((out / "relabel.json").read_text())["complete"]
    assert subprocess.run(cmd(out), cwd=ROOT, env=env, capture_output=True, timeout=240).returncode == 0
    straight = tmp_path / "straight"
    assert subprocess.run(cmd(straight), cwd=ROOT, env=env, capture_output=True, timeout=240).returncode == 0
    assert batch_bytes(out) == batch_bytes(straight) and len(batch_bytes(out)) == 300
