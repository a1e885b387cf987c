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
    # DD-Ranking's scores are its formulas applied to these runs, paired by seed (the set arm is hard-label here)
    dd = rep["dd_ranking"]["ConvNet-1"]
    syn, rnd, full = rep["syn"]["runs"], rep["random"]["runs"], rep["full"]["runs"]
    assert dd["IOR"]["runs"] == pytest.approx([s - r for s, r in zip(syn, rnd)])
    assert dd["HLR"]["runs"] == pytest.approx([f - s for f, s in zip(full, syn)])
    squash = lambda x: (np.exp(x) - np.exp(-1)) / (np.e - np.exp(-1))  # noqa: E731
    assert dd["LRS"]["runs"] == pytest.approx([squash(0.5 * (s - r) - 0.5 * (f - s))
                                               for s, r, f in zip(syn, rnd, full)])
    assert dd["IOR"]["mean"] == pytest.approx(np.mean(dd["IOR"]["runs"])) and "ARS" not in dd
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


# ------------------------------------------------------------------- IDC/DREAM protocol (idc_dream.md §5)

def _spec(name):
    from utils.datasets import get_dataset_spec
    return get_dataset_spec(name)


@pytest.mark.parametrize("name,factor,ipc,epochs", [
    ("ImageNet10", 1, 10, 2000), ("ImageNet10", 1, 20, 1500), ("ImageNet10", 3, 10, 1000), ("ImageNet10", 3, 20, 1000),
    ("ImageNet10", 2, 10, 1500), ("ImageNet10", 2, 20, 1000), ("ImageNet100", 1, 10, 1300),
    ("ImageNet100", 1, 20, 1000), ("ImageNet100", 3, 10, 600), ("ImageNet100", 3, 20, 600),
    ("ImageNet100", 2, 10, 1000), ("ImageNet100", 2, 20, 600), ("ImageNet10", 1, 1, 3000),
    ("imagenette", 1, 50, 1500), ("ImageNet10", 1, 51, 1000), ("ImageNet10", 1, 200, 1000),
    ("ImageNet10", 1, 201, 500), ("ImageNet10", 1, 500, 500), ("ImageNet10", 1, 501, 300), ("ImageNet", 1, 1, 2000),
    ("CIFAR10", 2, 10, 1000), ("CIFAR100", 1, 50, 1000), ("MNIST", 2, 1, 1000),
])
def test_idc_protocol_epochs(name, factor, ipc, epochs):
    assert validate.idc_protocol(_spec(name), ipc, factor)["epochs"] == epochs


def test_idc_protocol_optimiser_augmentation_and_cutmix():
    p = validate.idc_protocol(_spec("CIFAR10"), 10, 2)
    assert p == dict(epochs=1000, lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=64, schedule="multistep",
                     dsa=True, dsa_strategy="color_crop_flip_scale_rotate", dsa_mode="idc", dsa_align_corners=False,
                     mix_p=0.5, beta=1.0)
    assert set(p) == set(validate.RECIPE_DEFAULTS) | {"lr"}  # the same fields the CLI resolves
    big = validate.idc_protocol(_spec("ImageNet100"), 10, 3)
    assert (big["lr"], big["weight_decay"], big["batch_size"], big["mix_p"]) == (0.1, 1e-4, 128, 1.0)
    small_in = validate.idc_protocol(_spec("ImageNet10"), 10, 3)
    assert (small_in["lr"], small_in["weight_decay"], small_in["batch_size"]) == (0.01, 5e-4, 64)
    assert small_in["mix_p"] == 1.0
    c100 = validate.idc_protocol(_spec("CIFAR100"), 10, 2)  # 100 classes but not ImageNet: the small recipe
    assert (c100["lr"], c100["batch_size"], c100["mix_p"]) == (0.01, 64, 0.5)
    fm = validate.idc_protocol(_spec("FashionMNIST"), 1, 2)
    assert fm["dsa_strategy"] == "color_crop_flip_scale_rotate" and fm["mix_p"] == 0.5  # keeps flip and CutMix
    for name in ("SVHN", "MNIST"):  # no flip for digits
        assert validate.idc_protocol(_spec(name), 10, 1)["dsa_strategy"] == "color_crop_scale_rotate"
        assert validate.idc_protocol(_spec(name), 10, 1)["mix_p"] == 0.5
    svhn = validate.idc_protocol(_spec("SVHN"), 1, 1)  # SVHN IDC-I ipc 1: cutout back, no CutMix
    assert (svhn["dsa_strategy"], svhn["mix_p"]) == ("color_crop_cutout_scale_rotate", 0.0)
    assert validate.idc_protocol(_spec("SVHN"), 1, 2)["mix_p"] == 0.5
    mn = validate.idc_protocol(_spec("MNIST"), 10, 2)  # MNIST multi-formation: no CutMix
    assert (mn["dsa_strategy"], mn["mix_p"]) == ("color_crop_scale_rotate", 0.0)
    from utils.errors import UserError
    with pytest.raises(UserError, match="needs the IPC"):
        validate.idc_protocol(_spec("ImageNet10"), None, 3)


def test_explicit_flags_beat_the_preset_which_beats_the_defaults():
    defaults = dict(validate.RECIPE_DEFAULTS, lr=0.02)
    assert validate.resolve_options({}, None, defaults) == defaults
    assert validate.resolve_options({"epochs": None, "lr": None}, None, defaults) == defaults
    preset = validate.idc_protocol(_spec("CIFAR10"), 10, 1)
    assert validate.resolve_options({"epochs": None}, preset, defaults) == preset
    got = validate.resolve_options({"epochs": 7, "mix_p": 0.0, "dsa": False, "dsa_mode": None}, preset, defaults)
    assert got == {**preset, "epochs": 7, "mix_p": 0.0, "dsa": False}


def _cli_config(mnist, tmp_path, extra, name="r.json", syn=None):
    args = (["--syn", str(syn)] if syn else ["--dataset", "MNIST", "--baseline", "random", "--ipc", "1"])
    r = CliRunner().invoke(validate.app, [*args, "--data-path", str(mnist), "--runs", "1", "--model", "ConvNet-1",
                                          "--test-per-class", "2", "--quiet", "--results", str(tmp_path / name),
                                          *extra])
    assert r.exit_code == 0, r.output
    return json.loads((tmp_path / name).read_text())["config"]


def test_cli_preset_fills_the_recipe_and_explicit_flags_override_it(mnist, tmp_path):
    tr, spec = load_split("MNIST", mnist, "train")
    syn = pixel_set(to_pixels(tr.images[::10]), tr.labels[::10], spec, method="x")  # 2 per class, f = 1
    syn.lr = torch.tensor(0.0042)
    save_synset(syn, tmp_path / "s")
    c = _cli_config(mnist, tmp_path, ["--preset", "idc", "--epochs", "1"], syn=tmp_path / "s")
    assert (c["epochs"], c["lr"], c["batch_size"], c["weight_decay"], c["schedule"]) == (1, 0.01, 64, 5e-4,
                                                                                         "multistep")
    assert (c["dsa_mode"], c["dsa_strategy"], c["dsa_align_corners"]) == ("idc", "color_crop_scale_rotate", False)
    assert (c["mix_p"], c["beta"], c["preset"]) == (0.5, 1.0, "idc")
    c = _cli_config(mnist, tmp_path, ["--preset", "DREAM", "--epochs", "1", "--lr", "0.003", "--batch-size", "16",
                                      "--mix_p", "0.25", "--beta", "2", "--no-dsa"], "d.json", syn=tmp_path / "s")
    assert (c["lr"], c["batch_size"], c["mix_p"], c["beta"], c["dsa"], c["preset"]) == (0.003, 16, 0.25, 2.0, False,
                                                                                       "dream")
    assert c["schedule"] == "multistep"  # not given: still the preset's
    # no preset: today's defaults, the learned lr, no CutMix
    c = _cli_config(mnist, tmp_path, ["--epochs", "1"], "n.json", syn=tmp_path / "s")
    assert (c["batch_size"], c["schedule"], c["dsa"], c["dsa_mode"], c["mix_p"], c["dsa_align_corners"]) == (
        256, "step", True, "single", 0.0, True)
    assert c["dsa_strategy"] == "color_crop_cutout_flip_scale_rotate" and c["lr"] == pytest.approx(0.0042)
    r = CliRunner().invoke(validate.app, ["--syn", str(tmp_path / "s"), "--data-path", str(mnist), "--preset", "x"])
    assert r.exit_code == 2 and "unknown --preset 'x'" in r.output


def test_new_options_at_their_neutral_values_keep_old_fingerprints():
    """CSVs written before preset/CutMix/herding existed must still resume: neutral values do not change the key."""
    import hashlib
    old = dict(dataset="MNIST", epochs=3, lr=0.01, baseline=["random"], dsa=True)
    old_key = hashlib.sha1(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:12]
    new = dict(old, preset=None, mix_p=0.0, beta=1.0, dsa_align_corners=True, herding_model=None, herding_epochs=None)
    assert validate.config_key(new) == old_key
    for change in (dict(mix_p=0.5), dict(preset="idc"), dict(herding_epochs=5), dict(dsa_align_corners=False)):
        assert validate.config_key({**new, **change}) != old_key


def test_multiformation_set_trains_on_decoded_images(mnist, tmp_path):
    """A set with decoder multiformation, factor 2, 1 stored image per class trains on 4 images per class."""
    import csv
    from utils.synset import SyntheticSet, make_meta
    tr, spec = load_split("MNIST", mnist, "train")
    idx = validate._random_subset(tr.labels, 10, 1, 0)
    meta = make_meta(spec, space="pixel", ipc=1, method="idc", decoder="multiformation",
                     decoder_args={"factor": 2})
    save_synset(SyntheticSet({"images": to_pixels(tr.images[idx])}, tr.labels[idx], meta), tmp_path / "mf")
    c = _cli_config(mnist, tmp_path, ["--epochs", "1", "--preset", "idc"], syn=tmp_path / "mf")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [r["arm"] for r in rows] == ["syn"] and int(rows[0]["n_train"]) == 4 * 10
    assert c["mix_p"] == 0.0  # the preset read factor 2 from the set: MNIST multi-formation has no CutMix


# ------------------------------------------------------------------------------ herding baseline (§5 item 10)

def test_herding_arm_trains_on_the_herding_subset_selected_once(mnist, monkeypatch):
    from utils.coreset import herding_indices
    tr, spec = load_split("MNIST", mnist, "train")
    te, _ = load_split("MNIST", mnist, "test")
    seed, ipc = 5, 2
    real_prep, _ = validate.input_space(spec, "pixel", None)
    idx = herding_indices(tr.images, tr.labels, spec, ipc, model="ConvNet-1", epochs=1, seed=seed, prepare=real_prep)
    syn = pixel_set(to_pixels(tr.images[idx]), tr.labels[idx], spec, method="herding-copy")
    calls = []

    def counted(*a, **k):
        calls.append(k["model"])
        return herding_indices(*a, **k)
    monkeypatch.setattr(validate, "herding_indices", counted)
    out = validate.validate(syn, spec, (tr.images, tr.labels), (te.images, te.labels),
                            models=["ConvNet-1", "MLP"], recipe=small_recipe(2), baselines=["herding"], runs=2,
                            seed=seed, ipc=ipc, full_recipe=None, device=torch.device("cpu"),
                            log=RunLog(None, quiet=True), space="pixel", herding_epochs=1)
    assert calls == ["ConvNet-1"]  # one selection for both models and both runs, from the first model by default
    for m in ("ConvNet-1", "MLP"):
        assert out[m]["herding"]["runs"] == out[m]["syn"]["runs"]  # the same images, seeds and recipe
        assert out[m]["herding"]["ipc"] == ipc and out[m]["herding"]["herding_model"] == "ConvNet-1"


def test_cli_herding_baseline_records_its_options_and_resumes(mnist, tmp_path, monkeypatch):
    import csv
    args = ["--dataset", "MNIST", "--data-path", str(mnist), "--baseline", "herding", "--ipc", "1", "--epochs", "1",
            "--runs", "2", "--model", "ConvNet-1", "--herding-epochs", "1", "--herding-model", "MLP",
            "--test-per-class", "2", "--quiet", "--results", str(tmp_path / "h.json")]
    r = CliRunner().invoke(validate.app, args)
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "h.json").read_text())
    assert rep["config"]["herding_model"] == "MLP" and rep["config"]["herding_epochs"] == 1
    assert rep["herding"]["seeds"] == [0, 1] and rep["herding"]["herding_model"] == "MLP"
    rows = list(csv.DictReader(open(tmp_path / "h.csv")))
    assert [r["arm"] for r in rows] == ["herding", "herding"] and {r["n_train"] for r in rows} == {"10"}
    # everything recorded: the same command neither retrains nor re-selects
    monkeypatch.setattr(validate, "herding_indices", lambda *a, **k: pytest.fail("selected again"))
    r = CliRunner().invoke(validate.app, args)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "h.json").read_text())["herding"]["runs"] == rep["herding"]["runs"]
    # a different feature-network setting is another configuration
    r = CliRunner().invoke(validate.app, [a if a != "MLP" else "ConvNet-1" for a in args])
    assert r.exit_code == 2 and "another configuration" in r.output
    r = CliRunner().invoke(validate.app, ["--dataset", "MNIST", "--data-path", str(mnist), "--baseline", "herding"])
    assert r.exit_code == 2 and "needs --ipc" in r.output


def test_zca_set_validates_without_dataset_flag(mnist, tmp_path):
    """A set saved in ZCA space names its dataset and carries its ZCA: `--syn DIR` alone is enough."""
    from utils.synset import SyntheticSet, make_meta
    from utils.zca import ZCA
    tr, spec = load_split("MNIST", mnist, "train")
    zca = ZCA.fit(to_pixels(tr.images))
    idx = validate._random_subset(tr.labels, 10, 1, 0)
    syn = SyntheticSet({"images": zca.transform(to_pixels(tr.images[idx]))}, tr.labels[idx],
                       make_meta(spec, space="zca", ipc=1, method="copy", zca_eps=0.1), zca_state=zca.state_dict())
    save_synset(syn, tmp_path / "set")
    r = CliRunner().invoke(validate.app, ["--syn", str(tmp_path / "set"), "--data-path", str(mnist), "--model",
                                          "ConvNet-1", "--epochs", "2", "--runs", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "set" / "results.json").read_text())["space"] == "zca"


def test_noaug_baseline_trains_ars_arms_without_augmentation(mnist, tmp_path, monkeypatch):
    """--baseline noaug: the set and random arms again with the same recipe minus DSA and CutMix, and DD-Ranking's
    ARS from the two pairs (same seeds); without --baseline random it is a one-line error."""
    tr, spec = load_split("MNIST", mnist, "train")
    save_synset(pixel_set(to_pixels(tr.images[::4]), tr.labels[::4], spec, method="every-4th"), tmp_path / "set")
    recipes = []
    real = validate.train_arm

    def spy(arm, model, inputs, labels, prepare, spec, recipe, *a, **k):
        recipes.append((arm, recipe.dsa is not None, recipe.mix_p))
        return real(arm, model, inputs, labels, prepare, spec, recipe, *a, **k)
    monkeypatch.setattr(validate, "train_arm", spy)
    args = ["--syn", str(tmp_path / "set"), "--data-path", str(mnist), "--model", "ConvNet-1", "--epochs", "2",
            "--runs", "2", "--batch-size", "32", "--dsa", "--mix-p", "0.5", "--quiet", "--results",
            str(tmp_path / "r.json")]
    r = CliRunner().invoke(validate.app, [*args, "--baseline", "random", "--baseline", "noaug"])
    assert r.exit_code == 0, r.output
    assert recipes == [("syn", True, 0.5), ("random", True, 0.5), ("syn_noaug", False, 0.0),
                       ("random_noaug", False, 0.0)]
    rep = json.loads((tmp_path / "r.json").read_text())
    dd = rep["dd_ranking"]["ConvNet-1"]
    squash = lambda x: (np.exp(x) - np.exp(-1)) / (np.e - np.exp(-1))  # noqa: E731
    want = [squash(0.5 * (s - r) + 0.5 * (sn - rn)) for s, r, sn, rn in
            zip(rep["syn"]["runs"], rep["random"]["runs"], rep["syn_noaug"]["runs"], rep["random_noaug"]["runs"])]
    assert dd["ARS"]["runs"] == pytest.approx(want) and rep["random_noaug"]["seeds"] == rep["syn"]["seeds"]
    r = CliRunner().invoke(validate.app, [*args, "--baseline", "noaug"])
    assert r.exit_code == 2 and "--baseline noaug trains the set and the random subset without augmentation" \
        in r.output
