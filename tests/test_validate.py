"""validate.py: the harness treats a synthetic set and a baseline identically, writes honest reports."""
import gzip
import json
import struct

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import validate
from utils.datasets import load_split, to_pixels
from utils.misc import RunLog
from utils.synset import pixel_set, save_synset
from utils.train import TrainRecipe


def write_idx(path, arr):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    gzip.open(path, "wb").write(header + arr.astype(np.uint8).tobytes())


def make_mnist_like(root, n_train=20, n_test=10, seed=0):
    """Ten easy classes: class c is a bright 6×6 block at a class-specific place, plus noise."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.repeat(np.arange(10), n)
        images = rng.integers(0, 60, size=(len(labels), 28, 28))
        for i, c in enumerate(labels):
            r, col = 2 + 8 * (c // 3), 2 + 8 * (c % 3)
            images[i, r:r + 6, col:col + 6] = 255
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)


@pytest.fixture
def mnist(tmp_path):
    make_mnist_like(tmp_path)
    return tmp_path


def small_recipe(epochs=3):
    return TrainRecipe(epochs=epochs, lr=0.01, batch_size=32)


@pytest.mark.parametrize("zca", [False, True])
def test_set_equal_to_random_subset_scores_exactly_like_the_random_arm(mnist, zca):
    from utils.zca import ZCA
    tr, spec = load_split("MNIST", mnist, "train")
    te, _ = load_split("MNIST", mnist, "test")
    seed, ipc = 7, 2
    idx = validate._random_subset(tr.labels, 10, ipc, seed)
    syn = pixel_set(to_pixels(tr.images[idx]), tr.labels[idx], spec, method="copy")
    zca_state = ZCA.fit(to_pixels(tr.images)).state_dict() if zca else None
    out = validate.validate(syn, spec, (tr.images, tr.labels), (te.images, te.labels), models=["ConvNet-1"],
                            recipe=small_recipe(), baselines=["random"], runs=1, seed=seed, ipc=ipc,
                            full_recipe=None, device=torch.device("cpu"), log=RunLog(None, quiet=True),
                            space="pixel", zca_state=zca_state)
    res = out["ConvNet-1"]
    assert res["syn"]["seeds"] == res["random"]["seeds"] == [seed]
    assert res["syn"]["runs"] == res["random"]["runs"]


def test_cli_end_to_end_report_and_repeatability(mnist, tmp_path):
    tr, spec = load_split("MNIST", mnist, "train")
    good = pixel_set(to_pixels(tr.images[::4]), tr.labels[::4], spec, method="every-4th")  # 5 per class
    save_synset(good, tmp_path / "set")
    args = ["--syn", str(tmp_path / "set"), "--data-path", str(mnist), "--model", "ConvNet-1", "--epochs", "15",
            "--runs", "2", "--seed", "3", "--batch-size", "32", "--baseline", "random", "--baseline", "full",
            "--full-epochs", "2", "--quiet"]
    r1 = CliRunner().invoke(validate.app, args + ["--results", str(tmp_path / "a.json")])
    assert r1.exit_code == 0, r1.output
    rep = json.loads((tmp_path / "a.json").read_text())
    for arm in ("syn", "random", "full"):
        assert set(rep[arm]) >= {"mean", "std", "runs", "seeds"} and rep[arm]["seeds"] == [3, 4]
        assert 0.0 <= rep[arm]["mean"] <= 1.0 and len(rep[arm]["runs"]) == 2
    assert rep["random"]["ipc"] == 5 and rep["test_images"] == 100
    assert rep["syn"]["mean"] > 0.3  # ten easy classes: well above chance (0.1) after 15 epochs
    rows = (tmp_path / "a.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6 and rows[0].startswith("model,arm,seed")
    # the same command again gives the same numbers (explicit seeds everywhere)
    r2 = CliRunner().invoke(validate.app, args + ["--results", str(tmp_path / "b.json")])
    assert r2.exit_code == 0
    rep2 = json.loads((tmp_path / "b.json").read_text())
    assert rep2["syn"]["runs"] == rep["syn"]["runs"] and rep2["random"]["runs"] == rep["random"]["runs"]


def test_learned_lr_is_used_unless_overridden(mnist, tmp_path):
    tr, spec = load_split("MNIST", mnist, "train")
    syn = pixel_set(to_pixels(tr.images[:20]), tr.labels[:20], spec, method="x")
    syn.lr = torch.tensor(0.0042)
    save_synset(syn, tmp_path / "s")
    r = CliRunner().invoke(validate.app, ["--syn", str(tmp_path / "s"), "--data-path", str(mnist), "--epochs", "1",
                                          "--runs", "1", "--model", "ConvNet-1", "--results", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["config"]["lr"] == pytest.approx(0.0042)


@pytest.mark.parametrize("args,msg", [
    (["--baseline", "random"], "needs --ipc"),
    (["--baseline", "bogus", "--ipc", "1"], "unknown --baseline"),
    ([], "nothing to train"),
    (["--syn", "/no/such/set"], "not found"),
    (["--baseline", "full", "--model", "NoNet-9"], "unknown network"),
])
def test_bad_input_is_one_line_error(mnist, args, msg):
    r = CliRunner().invoke(validate.app, ["--dataset", "MNIST", "--data-path", str(mnist), "--epochs", "1",
                                          "--runs", "1", *args])
    assert r.exit_code == 2
    assert msg in r.output and "Traceback" not in r.output
    assert len([l for l in r.output.splitlines() if l.startswith("error:")]) == 1


def test_set_from_another_dataset_is_refused(mnist, tmp_path):
    tr, spec = load_split("MNIST", mnist, "train")
    save_synset(pixel_set(to_pixels(tr.images[:20]), tr.labels[:20], spec, method="x"), tmp_path / "s")
    r = CliRunner().invoke(validate.app, ["--syn", str(tmp_path / "s"), "--dataset", "FashionMNIST",
                                          "--data-path", str(mnist), "--epochs", "1"])
    assert r.exit_code == 2 and "made for MNIST, not FashionMNIST" in r.output


def test_default_model_depth():
    assert validate.default_model(28) == "ConvNet-3" and validate.default_model(32) == "ConvNet-3"
    assert validate.default_model(64) == "ConvNet-4" and validate.default_model(128) == "ConvNet-5"
    assert validate.default_model(224) == "ResNet-18"


def test_streamed_test_split_matches_in_memory(tmp_path, monkeypatch):
    """Large splits are streamed from files; the accuracy must not depend on how the split was read."""
    import validate as v
    from utils.datasets import FileDataset, open_split
    for split in ("train", "test"):
        for c in range(3):
            for k in range(4):
                arr = np.full((8, 8, 3), 40 * c + 5 * k, dtype=np.uint8)
                d = tmp_path / "tree" / split / f"c{c}"
                d.mkdir(parents=True, exist_ok=True)
                from PIL import Image
                Image.fromarray(arr).save(d / f"{k}.png")
    monkeypatch.setenv("DDT_CACHE", str(tmp_path / "cache"))
    mem, spec = open_split("ImageFolder", tmp_path / "tree", "test")
    streamed, _ = open_split("ImageFolder", tmp_path / "tree", "test", max_memory_gb=0)
    assert isinstance(streamed, FileDataset) and not isinstance(mem, FileDataset)
    train, _ = open_split("ImageFolder", tmp_path / "tree", "train", max_memory_gb=0)
    kw = dict(models=["MLP"], recipe=small_recipe(2), baselines=["random"], runs=1, seed=0, ipc=2,
              full_recipe=None, device=torch.device("cpu"), log=RunLog(None, quiet=True))
    a = v.validate(None, spec, train, mem, **kw)["MLP"]["random"]["runs"]
    b = v.validate(None, spec, train, streamed, **kw)["MLP"]["random"]["runs"]
    assert a == b
    with pytest.raises(Exception, match="--train-subset"):
        v.validate(None, spec, train, mem, **{**kw, "baselines": ["full"]})


def test_cross_architecture_pool(mnist, tmp_path):
    r = CliRunner().invoke(validate.app, ["--dataset", "MNIST", "--data-path", str(mnist), "--baseline", "random",
                                          "--ipc", "1", "--epochs", "1", "--runs", "1", "--eval-mode", "M",
                                          "--test-per-class", "2", "--quiet", "--results", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "m.json").read_text())
    assert list(rep["by_model"]) == ["ConvNet-3", "AlexNet", "VGG-11", "ResNet-18-BN"]
    assert all(len(m["random"]["runs"]) == 1 for m in rep["by_model"].values())


def test_legacy_mtt_zca_set_trains_in_zca_space(tmp_path, monkeypatch):
    """An MTT set distilled with ZCA: --zca refits the ZCA on the train split and maps the test set through it."""
    from PIL import Image
    from utils.zca import ZCA
    monkeypatch.setenv("DDT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(2):
            d = tmp_path / "tree" / split / f"c{c}"
            d.mkdir(parents=True)
            for k in range(6):
                arr = rng.integers(0, 80, (8, 8, 3)).astype(np.uint8)
                arr[:, :4 if c == 0 else 8] += 150
                Image.fromarray(arr).save(d / f"{k}.png")
    tr, spec = load_split("ImageFolder", tmp_path / "tree", "train")
    zca = ZCA.fit(to_pixels(tr.images), eps=0.1)
    mtt = tmp_path / "mtt"
    mtt.mkdir()
    torch.save(zca.transform(to_pixels(tr.images[[0, 6]])), mtt / "images_best.pt")
    torch.save(torch.tensor([0, 1]), mtt / "labels_best.pt")
    args = ["--syn", str(mtt), "--dataset", "ImageFolder", "--data-path", str(tmp_path / "tree"), "--model", "MLP",
            "--epochs", "30", "--runs", "1", "--no-dsa", "--quiet", "--results", str(tmp_path / "z.json")]
    # Legacy files carry no marker of ZCA: without --zca they are read as MTT's normalised space (documented).
    r = CliRunner().invoke(validate.app, args)
    assert r.exit_code == 0 and json.loads((tmp_path / "z.json").read_text())["space"] == "normalized"
    r = CliRunner().invoke(validate.app, args[:-1] + [str(tmp_path / "z2.json"), "--zca"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "z2.json").read_text())
    assert rep["space"] == "zca" and rep["syn"]["mean"] > 0.5  # above chance from one ZCA'd example per class
    real_prep, syn_prep = validate.input_space(spec, "zca", zca.state_dict())
    assert torch.allclose(real_prep(tr.images[:3]), zca.transform(to_pixels(tr.images[:3])), atol=1e-5)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(syn_prep(x), x)  # ZCA sets are already in the training space


def test_input_space_pixel_and_normalized_sets_meet_real_data():
    from utils.datasets import get_dataset_spec, normalize
    spec = get_dataset_spec("CIFAR10")
    real = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    for space in ("pixel", "normalized"):
        real_prep, syn_prep = validate.input_space(spec, space, None)
        pix = to_pixels(real)
        same = syn_prep(pix if space == "pixel" else normalize(pix, spec.mean, spec.std))
        assert torch.allclose(real_prep(real), same, atol=1e-6)
    from utils.errors import UserError
    with pytest.raises(UserError, match="pass --zca"):
        validate.input_space(spec, "zca", None)


def test_zca_flag_with_a_native_set_takes_the_dataset_from_meta(mnist, tmp_path):
    tr, spec = load_split("MNIST", mnist, "train")
    save_synset(pixel_set(to_pixels(tr.images[::10]), tr.labels[::10], spec, method="x"), tmp_path / "s")
    r = CliRunner().invoke(validate.app, ["--syn", str(tmp_path / "s"), "--data-path", str(mnist), "--zca",
                                          "--epochs", "1", "--runs", "1", "--model", "ConvNet-1", "--quiet",
                                          "--results", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["dataset"] == "MNIST" and rep["space"] == "zca"


def test_interrupted_validation_resumes_with_the_next_run(mnist, tmp_path):
    """Finished runs are CSV rows; after an interruption the same command retrains only the missing runs."""
    tr, spec = load_split("MNIST", mnist, "train")
    save_synset(pixel_set(to_pixels(tr.images[::4]), tr.labels[::4], spec, method="x"), tmp_path / "set")
    args = ["--syn", str(tmp_path / "set"), "--data-path", str(mnist), "--model", "ConvNet-1", "--epochs", "3",
            "--runs", "2", "--batch-size", "32", "--baseline", "random", "--results", str(tmp_path / "r.json")]
    r = CliRunner().invoke(validate.app, args)
    assert r.exit_code == 0, r.output
    full = json.loads((tmp_path / "r.json").read_text())
    csv_path = tmp_path / "r.csv"
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 5 and lines[0].endswith(",config")
    csv_path.write_text("\n".join(lines[:3]) + "\n")  # as if killed during the random arm's first run
    (tmp_path / "r.json").unlink()
    r = CliRunner().invoke(validate.app, args)
    assert r.exit_code == 0, r.output
    assert r.output.count("resumed from") == 2  # both syn runs read back, the two random runs retrained
    again = json.loads((tmp_path / "r.json").read_text())
    assert again["syn"]["runs"] == full["syn"]["runs"] and again["random"]["runs"] == full["random"]["runs"]
    assert len(csv_path.read_text().splitlines()) == 5
    # another configuration with the same results path is refused, unless --overwrite
    other = [a if a != "3" else "4" for a in args]
    r = CliRunner().invoke(validate.app, other)
    assert r.exit_code == 2 and "another configuration" in r.output
    r = CliRunner().invoke(validate.app, other + ["--overwrite", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "resumed" not in r.output and len(csv_path.read_text().splitlines()) == 5
