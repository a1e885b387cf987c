"""buffer.py: expert training, MTT's buffer files, repeatability and resume."""
import json

import pytest
import torch
from typer.testing import CliRunner

import buffer as B
from tests.test_validate import make_mnist_like
from utils.datasets import load_split
from utils.dsa import DSA
from utils.trajectory import buffer_files, load_buffer_file

MODEL = "ConvNet-1-w8"
runner = CliRunner()


@pytest.fixture
def mnist(tmp_path):
    (tmp_path / "data").mkdir()
    make_mnist_like(tmp_path / "data", n_train=12, n_test=5)
    return tmp_path / "data"


def _data(mnist):
    tr, spec = load_split("MNIST", mnist, "train")
    te, _ = load_split("MNIST", mnist, "test")
    train_x, test_x, _ = B.map_to_training_space(spec, tr.images, te.images, zca=False)
    return spec, train_x, tr.labels, test_x, te.labels


def _args(mnist, out, *extra):
    return ["--dataset", "MNIST", "--data-path", str(mnist), "--model", MODEL, "--train-epochs", "2",
            "--batch-train", "32", "--buffer-path", str(out), "--quiet", *extra]


def _same_buffers(a, b):
    fa, fb = buffer_files(a), buffer_files(b)
    assert [p.name for p in fa] == [p.name for p in fb]
    for x, y in zip(fa, fb):
        tx, ty = load_buffer_file(x), load_buffer_file(y)
        assert len(tx) == len(ty)
        for t1, t2 in zip(tx, ty):
            assert all(torch.equal(p, q) for s1, s2 in zip(t1, t2) for p, q in zip(s1, s2))


def test_default_model_per_resolution():
    assert [B.default_model(r) for r in (28, 32, 64, 128)] == ["ConvNet", "ConvNet", "ConvNetD4", "ConvNetD5"]


def test_trajectory_has_a_snapshot_per_epoch_starting_at_the_fresh_network(mnist):
    spec, x, y, tx, ty = _data(mnist)
    net = B.build_expert_network(MODEL, spec, seed=0, expert=0)
    fresh = [p.detach().clone() for p in net.parameters()]
    rows = []
    traj = B.train_expert(net, x, y, 3, generator=B.expert_generator(0, 0), batch_size=32, dsa=DSA(),
                          test=(tx, ty), eval_every=2, on_epoch=rows.append)
    assert len(traj) == 3 + 1
    shapes = [p.shape for p in net.parameters()]
    for snap in traj:
        assert [p.shape for p in snap] == shapes and all(p.dtype == torch.float32 and p.device.type == "cpu"
                                                         for p in snap)
    assert all(torch.equal(a, b) for a, b in zip(traj[0], fresh))
    assert all(torch.equal(a, b.detach()) for a, b in zip(traj[-1], net.parameters()))
    for before, after in zip(traj, traj[1:]):
        assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["test_acc"] is None and rows[1]["test_acc"] is not None and rows[2]["test_acc"] is not None
    # the same expert index gives the same network and trajectory, independent of anything run before
    again = B.train_expert(B.build_expert_network(MODEL, spec, 0, 0), x, y, 3, generator=B.expert_generator(0, 0),
                           batch_size=32, dsa=DSA())
    assert all(torch.equal(a, b) for s1, s2 in zip(traj, again) for a, b in zip(s1, s2))
    other = B.build_expert_network(MODEL, spec, 0, 1)
    assert not torch.equal(next(other.parameters()), fresh[0])


def test_training_lowers_the_loss(mnist):
    spec, x, y, _, _ = _data(mnist)
    rows = []
    B.train_expert(B.build_expert_network(MODEL, spec, 0, 0), x, y, 6, generator=B.expert_generator(0, 0),
                   lr=0.05, batch_size=32, dsa=None, on_epoch=rows.append)
    losses = [r["train_loss"] for r in rows]
    assert losses[-1] < 0.7 * losses[0], losses


def test_cli_writes_mtt_buffer_files_and_meta(mnist, tmp_path):
    r = runner.invoke(B.app, _args(mnist, tmp_path / "b", "--num-experts", "3", "--save-interval", "2"))
    assert r.exit_code == 0, r.output
    out = tmp_path / "b" / "MNIST" / MODEL
    files = buffer_files(out)
    assert [p.name for p in files] == ["replay_buffer_0.pt", "replay_buffer_1.pt"]
    assert [len(load_buffer_file(p)) for p in files] == [2, 1]
    traj = load_buffer_file(files[1])[0]
    assert len(traj) == 3 and len(traj[0]) == 6  # conv w/b, norm w/b, classifier w/b
    assert not (out / "partial.pt").exists() and not (out / "zca.pt").exists()
    meta = json.loads((out / "buffer_meta.json").read_text())
    assert meta["num_experts"] == 3 and meta["space"] == "normalized" and meta["net"] == "ConvNet-1-w8"
    assert meta["batch_standardize"] is True and meta["num_snapshots"] == 3
    assert [f["experts"] for f in meta["files"]] == [2, 1] and meta["files"][1]["first_expert"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 3 and config["save_interval"] == 2
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("expert,epoch,train_loss,train_acc,test_acc") and len(rows) == 1 + 3 * 2

    # the same folder with other settings is refused; --overwrite starts afresh
    r = runner.invoke(B.app, _args(mnist, tmp_path / "b", "--num-experts", "3", "--lr-teacher", "0.02"))
    assert r.exit_code == 2 and "other settings" in r.output and "lr_teacher" in r.output
    # a larger --num-experts adds experts to the folder
    r = runner.invoke(B.app, _args(mnist, tmp_path / "b", "--num-experts", "4", "--save-interval", "2"))
    assert r.exit_code == 0, r.output
    assert [len(load_buffer_file(p)) for p in buffer_files(out)] == [2, 1, 1]
    assert json.loads((out / "buffer_meta.json").read_text())["num_experts"] == 4
    r = runner.invoke(B.app, _args(mnist, tmp_path / "b", "--num-experts", "1", "--mom", "0.5", "--overwrite"))
    assert r.exit_code == 0, r.output
    assert [len(load_buffer_file(p)) for p in buffer_files(out)] == [1]
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + 2


def test_interrupted_run_resumes_to_identical_files(mnist, tmp_path, monkeypatch):
    args = ["--num-experts", "5", "--save-interval", "3", "--seed", "4"]
    r = runner.invoke(B.app, _args(mnist, tmp_path / "full", *args))
    assert r.exit_code == 0, r.output

    calls = []
    real = B.train_expert

    def interrupted(*a, **k):  # killed while training the fifth expert (index 4)
        calls.append(k["desc"])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(B, "train_expert", interrupted)
    r = runner.invoke(B.app, _args(mnist, tmp_path / "cut", *args))
    assert r.exit_code == 130
    cut = tmp_path / "cut" / "MNIST" / MODEL
    assert [p.name for p in buffer_files(cut)] == ["replay_buffer_0.pt"] and (cut / "partial.pt").is_file()

    calls.clear()
    r = runner.invoke(B.app, _args(mnist, tmp_path / "cut", *args))
    assert r.exit_code == 0, r.output
    assert calls == ["expert 4"]  # experts 0-2 (file) and 3 (partial.pt) were kept
    assert not (cut / "partial.pt").exists()
    _same_buffers(tmp_path / "full" / "MNIST" / MODEL, cut)
    log = (cut / "log.csv").read_text().strip().splitlines()
    assert len(log) == 1 + 5 * 2 and [line.split(",")[0] for line in log[1::2]] == ["0", "1", "2", "3", "4"]

    # another seed gives other experts
    r = runner.invoke(B.app, _args(mnist, tmp_path / "seed5", "--num-experts", "1", "--seed", "5"))
    assert r.exit_code == 0, r.output
    a = load_buffer_file(tmp_path / "seed5" / "MNIST" / MODEL / "replay_buffer_0.pt")[0]
    b = load_buffer_file(cut / "replay_buffer_0.pt")[0]
    assert not torch.equal(a[0][0], b[0][0])


def test_zca_experts_save_their_whitening(mnist, tmp_path):
    r = runner.invoke(B.app, _args(mnist, tmp_path / "b", "--num-experts", "1", "--zca", "--no-dsa",
                                   "--no-batch-standardize", "--train-epochs", "1"))
    assert r.exit_code == 0, r.output
    out = tmp_path / "b" / "MNIST" / MODEL  # only CIFAR folders carry _NO_ZCA
    meta = json.loads((out / "buffer_meta.json").read_text())
    assert meta["space"] == "zca" and meta["zca_eps"] == 0.1 and meta["batch_standardize"] is False
    from utils.zca import ZCA
    ZCA.from_state_dict(torch.load(out / "zca.pt", weights_only=True))


@pytest.mark.parametrize("extra,msg", [
    (["--dataset", "Nope"], "unknown dataset 'Nope'"),
    (["--model", "ConvNet-99"], "unknown network"),
    (["--data-path", "/nonexistent/x"], "does not exist"),
    (["--num-experts", "0"], "--num-experts must be at least 1"),
    (["--dsa-strategy", "color_spin"], "unknown DSA augmentation"),
    (["--dataset", "CIFAR10", "--subset", "imagenette"], "--subset is for --dataset ImageNet"),
])
def test_bad_input_is_a_one_line_error_before_any_folder(mnist, tmp_path, extra, msg):
    r = runner.invoke(B.app, _args(mnist, tmp_path / "b", "--num-experts", "1") + extra)
    assert r.exit_code == 2, r.output
    assert msg in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "b").exists()


def test_foreign_buffer_files_are_not_touched(mnist, tmp_path):
    out = tmp_path / "b" / "MNIST" / MODEL
    out.mkdir(parents=True)
    torch.save([[[torch.zeros(1)]]], out / "replay_buffer_0.pt")
    r = runner.invoke(B.app, _args(mnist, tmp_path / "b", "--num-experts", "1"))
    assert r.exit_code == 2 and "without buffer_meta.json" in r.output
    assert (out / "replay_buffer_0.pt").is_file()


def test_imagenet_subset_goes_into_mtt_subset_folder(tmp_path, monkeypatch):
    from PIL import Image
    from utils.datasets import IMAGENET_SUBSETS
    monkeypatch.setenv("DDT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "imagenet"
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for wnid in IMAGENET_SUBSETS["imagenette"].split():
            (root / split / wnid).mkdir(parents=True)
            for k in range(2):
                px = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(root / split / wnid / f"{k}.png")
    r = runner.invoke(B.app, ["--dataset", "ImageNet", "--subset", "imagenette", "--data-path", str(root), "--res",
                              "16", "--model", "ConvNet-2-w4", "--num-experts", "1", "--train-epochs", "1",
                              "--buffer-path", str(tmp_path / "b"), "--quiet"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "b" / "ImageNet" / "imagenette" / "16" / "ConvNet-2-w4"
    assert [p.name for p in buffer_files(out)] == ["replay_buffer_0.pt"]
    meta = json.loads((out / "buffer_meta.json").read_text())
    assert meta["dataset"] == "imagenette" and meta["subset"] == "imagenette" and meta["resolution"] == 16


def test_help_lists_new_and_original_flag_spellings():
    r = runner.invoke(B.app, ["--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for flag in ("--num-experts", "--num_experts", "--train_epochs", "--lr_teacher", "--batch_train", "--buffer_path",
                 "--save_interval", "--dsa_strategy", "--no-batch-standardize", "--mom", "--l2"):
        assert flag in r.output
