"""rank_select.py: DELT ranking/selection (decoupled.md §5.1) and DWA's real initialisation (§4.4)."""
import gzip
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import rank_select as RS
from networks.registry import get_network
from tests.test_validate import make_mnist_like
from utils.errors import UserError
from utils.teacher import save_teacher

runner = CliRunner()
CLASSES = ("cat", "dog", "eel")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# ------------------------------------------------------------------------------------------------ fixtures

def make_folder(root, per_class=(5, 6, 4), res=16, seed=0):
    """`root/train/<class>/*` with a mix of PNG and JPEG files, created in unsorted name order."""
    rng = np.random.default_rng(seed)
    for c, n in zip(CLASSES, per_class):
        d = root / "train" / c
        d.mkdir(parents=True)
        for i in reversed(range(n)):
            px = rng.integers(0, 256, size=(res, res, 3), dtype=np.uint8)
            ext = "jpg" if i % 2 else "png"
            Image.fromarray(px).save(d / f"img{i:02d}.{ext}")
    return root


def make_teacher(path, channels=3, classes=3, res=16, dataset="ImageFolder", names=CLASSES, seed=0):
    torch.manual_seed(seed)
    net = get_network("ConvNet-1-BN-w8", channels, classes, res)
    with torch.no_grad():  # non-trivial BN statistics so eval-mode outputs differ clearly between images
        bn = net.features[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    save_teacher(path, net, arch="ConvNet-1-BN-w8", dataset=dataset, num_classes=classes, channels=channels,
                 resolution=res, mean=MEAN[:channels], std=STD[:channels], class_names=names)
    return path


@pytest.fixture
def setup(tmp_path):
    data = make_folder(tmp_path / "data")
    teacher = make_teacher(tmp_path / "teacher.pt")
    return data, teacher


def hand_scores(teacher_path, data):
    """Independent statement of §5.1 items 2-3 at R = 16 (⌊16/7⌋·8 = 16: resize and crop are no-ops)."""
    obj = torch.load(teacher_path, weights_only=True)
    net = get_network("ConvNet-1-BN-w8", 3, 3, 16)
    net.load_state_dict(obj["model"])
    net.eval()
    out = {}
    for c, name in enumerate(CLASSES):
        for f in sorted((data / "train" / name).iterdir()):
            px = torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255
            x = (px - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
            with torch.no_grad():
                out[f"{name}/{f.name}"] = torch.softmax(net(x[None]), 1)[0, c].item()
    return out


def cli(*args):
    return runner.invoke(RS.app, [str(a) for a in args])


# ------------------------------------------------------------------------------------------------ selection rules

def test_medium_order_by_hand():
    # n = 7: m = ⌈7/2⌉ = 4; offsets 0, +1, −1, +2, −2 -> 4, 5, 3, 6, 2.
    assert RS.medium_order(7, 3) == [4, 5, 3]
    assert RS.medium_order(7, 5) == [4, 5, 3, 6, 2]
    # n = 8: m = 4 -> 4, 5, 3, 6, 2, 7, 1.
    assert RS.medium_order(8, 7) == [4, 5, 3, 6, 2, 7, 1]
    # Past the top end (7 for n = 7) the walk continues below only: 4 5 3 6 2 (7) 1 (8) 0.
    assert RS.medium_order(7, 7) == [4, 5, 3, 6, 2, 1, 0]
    assert RS.medium_order(1, 1) == [0]  # m = 1 is out of range; the next offset (−1) gives 0
    # The spec's closed form o_k = +(k+1)/2 for odd k, −k/2 for even k, wherever it stays in range.
    for n, ipc in ((100, 50), (1300, 50), (51, 10)):
        m = -(-n // 2)
        assert RS.medium_order(n, ipc) == [m + ((k + 1) // 2 if k % 2 else -(k // 2)) for k in range(ipc)]
    for n in range(1, 12):  # every index exactly once when ipc = n
        assert sorted(RS.medium_order(n, n)) == list(range(n))


def hand_images():
    """Two classes of a hand-made score table (no files needed by `select`)."""
    rel = [f"a/{i}.png" for i in range(5)] + [f"b/{i}.png" for i in range(4)]
    return RS.TrainImages("t", 3, ("a", "b"), ("a", "b"), rel, [0] * 5 + [1] * 4, None, list(range(9)))


def test_top_min_medium_random_on_a_hand_table():
    images = hand_images()
    #                    a: 0    1    2    3    4  |  b: 5    6    7    8
    s = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.6, 0.2, 0.6, 0.8], dtype=torch.float64)
    assert RS.select(images, s, "top", 2) == [[1, 3], [8, 5]]           # b: 0.6 tie -> name order (5 before 7)
    assert RS.select(images, s, "min", 2) == [[0, 4], [6, 5]]
    # a ascending: 0(.1) 4(.3) 2(.5) 3(.7) 1(.9); m = 3 -> sorted idx 3, 4, 2 -> positions 3, 1, 2.
    # b ascending: 6(.2) 5(.6) 7(.6) 8(.8); m = 2 -> sorted idx 2, 3, 1 -> positions 7, 8, 5.
    assert RS.select(images, s, "medium", 3) == [[3, 1, 2], [7, 8, 5]]
    r = RS.select(images, None, "random", 3, seed=1)
    assert r == RS.select(images, None, "random", 3, seed=1)
    assert [len(set(x)) for x in r] == [3, 3] and set(r[0]) <= set(range(5)) and set(r[1]) <= set(range(5, 9))
    assert any(RS.select(images, None, "random", 3, seed=k) != r for k in range(2, 6))
    with pytest.raises(UserError, match="class 'b' has only 4 training images, --ipc 5"):
        RS.select(images, s, "top", 5)
    with pytest.raises(UserError, match="unknown --selection 'best'"):
        RS.select(images, s, "best", 1)


def test_ranking_table_and_csv_checks(tmp_path):
    images = hand_images()
    s = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.6, 0.2, 0.6, 0.8], dtype=torch.float64) / 3
    t = RS.ranking_table(images, s)
    assert list(t.columns) == ["score", "img_path", "class"]
    assert t["class"].tolist() == ["a"] * 5 + ["b"] * 4
    assert t["img_path"].tolist() == ["a/1.png", "a/3.png", "a/2.png", "a/4.png", "a/0.png",
                                      "b/3.png", "b/0.png", "b/2.png", "b/1.png"]
    path = tmp_path / "r.csv"
    RS.write_ranking(t, path)
    assert path.read_text().splitlines()[0] == "score,img_path,class"  # no index column
    assert torch.equal(RS.read_ranking(path, images), s)               # exact float round trip
    t.to_csv(tmp_path / "idx.csv")                                     # written with an index: dropped on read
    assert torch.equal(RS.read_ranking(tmp_path / "idx.csv", images), s)
    t[["img_path", "score", "class"]].to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(UserError, match="has columns"):
        RS.read_ranking(tmp_path / "cols.csv", images)
    t.assign(img_path=t["img_path"].str.replace("a/1.png", "a/x.png")).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(UserError, match="not in the t training set .e.g. a/x.png"):
        RS.read_ranking(tmp_path / "p.csv", images)
    t.iloc[:-1].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(UserError, match="covers 8 of the 9"):
        RS.read_ranking(tmp_path / "short.csv", images)
    t.assign(**{"class": "a"}).to_csv(tmp_path / "cls.csv", index=False)
    with pytest.raises(UserError, match="listed under class 'a'"):
        RS.read_ranking(tmp_path / "cls.csv", images)


def test_delt_resize_rule():
    assert [RS.delt_resize_side(r) for r in (224, 64, 32, 16, 28)] == [256, 72, 32, 16, 32]
    img = Image.fromarray(np.arange(40 * 50 * 3, dtype=np.uint8).reshape(40, 50, 3) % 251)
    assert RS.preprocess(img, 32).shape == (3, 32, 32)           # 40x50 -> shorter side 32 -> centre 32x32
    assert RS.preprocess(img, 32, "square").shape == (3, 32, 32)
    same = Image.fromarray(np.full((32, 32, 3), 7, dtype=np.uint8))
    assert torch.equal(RS.preprocess(same, 32), torch.full((3, 32, 32), 7, dtype=torch.uint8))  # no-op at 32


# ------------------------------------------------------------------------------------------------ end to end

def test_cli_medium_writes_folder_tensors_manifest_and_ranking(setup, tmp_path):
    data, teacher = setup
    out = tmp_path / "out"
    (out / "dog").mkdir(parents=True)
    (out / "dog" / "stale.png").write_bytes(b"old")            # an existing class folder is replaced
    (out / "tensor_7.pt").write_bytes(b"old")                  # and stale tensor files removed
    r = cli("--ranker-path", teacher, "--dataset", "ImageFolder", "--data-path", data, "--output-dir", out,
            "--selection-criteria", "medium", "--ipc", "3", "--tensor-files", "--batch-size", "4", "--workers", "2",
            "--quiet")
    assert r.exit_code == 0, r.output

    # ranking.csv: columns, order, scores = an independent forward of the teacher
    want = hand_scores(teacher, data)
    df = pd.read_csv(out / "ranking.csv", dtype={"class": str})
    assert list(df.columns) == ["score", "img_path", "class"]
    assert sorted(df["img_path"]) == sorted(want)
    for row in df.itertuples():
        assert row.score == pytest.approx(want[row.img_path], abs=1e-6)
        assert row.img_path.split("/")[0] == row._3
    for c in CLASSES:
        block = df[df["class"] == c]["score"].tolist()
        assert block == sorted(block, reverse=True)
    assert df["class"].tolist() == sorted(df["class"].tolist())

    # folders: medium picks by hand from the CSV scores, names k_original, byte-exact copies
    man = json.loads((out / "selection.json").read_text())
    for c in CLASSES:
        asc = sorted(((s, p) for p, s in want.items() if p.startswith(c + "/")), key=lambda t: t[0])
        m = -(-len(asc) // 2)
        expect = [asc[m + o][1] for o in (0, 1, -1)]
        files = sorted(p.name for p in (out / c).iterdir())
        assert files == [f"{k:03d}_{expect[k].split('/')[1]}" for k in range(3)]
        for k, name in enumerate(files):
            assert (out / c / name).read_bytes() == (data / "train" / expect[k]).read_bytes()
        assert [e["img_path"] for e in man["picks"][c]] == expect
        assert [e["score"] for e in man["picks"][c]] == pytest.approx([want[p] for p in expect], abs=1e-6)
    assert not (out / "dog" / "stale.png").exists() and not (out / "tensor_7.pt").exists()
    assert man["format"] == "ddtoolkit-selection" and man["output_format"] == "both"
    assert man["dataset"] == "ImageFolder" and man["resolution"] == 16 and man["class_dirs"] == list(CLASSES)
    assert man["teacher"] == str(teacher.resolve()) and man["selection"] == "medium" and man["ipc"] == 3
    assert man["mean"] == pytest.approx(MEAN) and man["tensor_files"] == ["tensor_0.pt", "tensor_1.pt", "tensor_2.pt"]
    assert json.loads((out / "config.json").read_text())["ipc"] == 3
    assert not list(tmp_path.glob(".out.*"))                   # no temp folders left behind

    # tensor files: [C, 3, R, R], k-th pick of every class, in the teacher's normalised space
    for k in range(3):
        x = torch.load(out / f"tensor_{k}.pt", weights_only=True)
        assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32
        px = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        for c in range(3):
            src = data / "train" / man["picks"][CLASSES[c]][k]["img_path"]
            ref = torch.from_numpy(np.array(Image.open(src).convert("RGB"))).permute(2, 0, 1).float() / 255
            assert torch.allclose(px[c], ref, atol=1e-5)


def test_ranking_file_reuse_versus_store_rank_file(setup, tmp_path):
    data, teacher = setup
    rank = tmp_path / "rank.csv"
    base = ["--teacher", teacher, "--data-path", data, "--ipc", "1", "--selection", "top", "--ranking-file", rank,
            "--quiet"]
    assert cli(*base, "--out", tmp_path / "a").exit_code == 0
    first = pd.read_csv(rank, dtype={"class": str})
    # Edit the ranking so that the alphabetically last image of each class is the most confident,
    # and add an index column as a CSV written with an index has: the edited file must be re-used.
    edited = first.copy()
    edited["score"] = 0.1
    for c in CLASSES:
        last = sorted(edited.loc[edited["class"] == c, "img_path"])[-1]
        edited.loc[edited["img_path"] == last, "score"] = 0.99
    edited.to_csv(rank)                                        # index=True -> "Unnamed: 0" column
    r = cli(*base, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    for c in CLASSES:
        (f,) = (tmp_path / "b" / c).iterdir()
        assert f.name == "000_" + sorted(p.name for p in (data / "train" / c).iterdir())[-1]
    # --store-rank-file recomputes and overwrites: back to the teacher's scores and picks.
    r = cli(*base, "--out", tmp_path / "c", "--store-rank-file")
    assert r.exit_code == 0, r.output
    again = pd.read_csv(rank, dtype={"class": str})
    assert list(again.columns) == ["score", "img_path", "class"]
    pd.testing.assert_frame_equal(again, first)
    for c in CLASSES:
        assert [p.name for p in (tmp_path / "c" / c).iterdir()] == [p.name for p in (tmp_path / "a" / c).iterdir()]
    # a ranking of another dataset is refused with one line
    edited.assign(img_path=edited["img_path"].str.replace("img", "pic")).to_csv(rank, index=False)
    r = cli(*base, "--out", tmp_path / "d")
    assert r.exit_code == 2 and "not in the ImageFolder training set" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_second_ranking_reads_the_decoded_cache_and_decodes_nothing(setup, tmp_path, monkeypatch):
    data, teacher = setup
    monkeypatch.setenv("DDT_CACHE", str(tmp_path / "cache"))
    common = ["--teacher", teacher, "--data-path", data, "--ipc", "2", "--quiet"]
    r = cli(*common, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    (entry,) = (tmp_path / "cache").glob("ImageFolder-rank-delt16-*.pt")
    stored = torch.load(entry, weights_only=True)   # utils.datasets' cache entry: images and their checksum
    px = stored["images"]
    assert stored["format"] == "ddtoolkit-decoded-split" and len(stored["checksum"]) == 40
    assert px.dtype == torch.uint8 and px.shape == (15, 3, 16, 16)

    def no_decoding(*a, **k):
        raise AssertionError("an image was decoded")
    monkeypatch.setattr(RS.TrainImages, "open_image", no_decoding)
    r = cli(*common, "--out", tmp_path / "b", "--selection", "top")
    assert r.exit_code == 0, r.output
    a = pd.read_csv(tmp_path / "a" / "ranking.csv")
    pd.testing.assert_frame_equal(a, pd.read_csv(tmp_path / "b" / "ranking.csv"))
    hand = hand_scores(teacher, data)
    assert np.allclose(a["score"], [hand[p] for p in a["img_path"]], rtol=1e-5, atol=1e-7)
    # --no-cache neither reads nor writes it: here it must decode (and so meets the patched decoder)
    r = cli(*common, "--out", tmp_path / "c", "--no-cache")
    assert r.exit_code != 0 and isinstance(r.exception, AssertionError)


def test_train_subset_ranks_and_selects_the_seeded_subset(setup, tmp_path, monkeypatch):
    from utils.datasets import per_class_indices
    data, teacher = setup
    monkeypatch.setenv("DDT_CACHE", str(tmp_path / "cache"))
    r = cli("--teacher", teacher, "--data-path", data, "--ipc", "2", "--train-subset", "3", "--seed", "1",
            "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.output
    full = RS.list_train_images("ImageFolder", data)
    want = {full.rel_paths[p] for p in per_class_indices(torch.tensor(full.labels), 3, 3, 1).tolist()}
    ranked = pd.read_csv(tmp_path / "o" / "ranking.csv")
    assert set(ranked["img_path"]) == want and len(ranked) == 9
    doc = json.loads((tmp_path / "o" / "selection.json").read_text())
    assert doc["train_subset"] == 3
    assert all(e["img_path"] in want for v in doc["picks"].values() for e in v)
    assert not list((tmp_path / "cache").glob("*-rank-*.pt"))   # a subset does not decode the whole split
    r = cli("--teacher", teacher, "--data-path", data, "--ipc", "2", "--train-subset", "5", "--out", tmp_path / "p")
    assert r.exit_code == 2 and r.output.strip() == "error: class 2 has only 4 images, 5 per class were asked for"
    assert not (tmp_path / "p").exists()


def test_archive_gives_same_ranking_and_byte_exact_copies(setup, tmp_path):
    data, teacher = setup
    arch_root = tmp_path / "packed"
    arch_root.mkdir()
    with tarfile.open(arch_root / "data.tar.gz", "w:gz") as tar:
        tar.add(data / "train", arcname="train")
    common = ["--teacher", teacher, "--ipc", "2", "--selection", "min", "--quiet"]
    assert cli(*common, "--data-path", data, "--out", tmp_path / "plain").exit_code == 0
    r = cli(*common, "--data-path", arch_root, "--out", tmp_path / "tar")
    assert r.exit_code == 0, r.output
    a = pd.read_csv(tmp_path / "plain" / "ranking.csv")
    b = pd.read_csv(tmp_path / "tar" / "ranking.csv")
    pd.testing.assert_frame_equal(a, b)
    for c in CLASSES:
        names = sorted(p.name for p in (tmp_path / "tar" / c).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "plain" / c).iterdir()) and len(names) == 2
        for n in names:
            assert (tmp_path / "tar" / c / n).read_bytes() == (data / "train" / c / n[4:]).read_bytes()


def test_random_init_on_an_in_memory_dataset_and_tensor_only(tmp_path):
    (tmp_path / "mnist").mkdir()
    make_mnist_like(tmp_path / "mnist", n_train=6, n_test=2)
    teacher = make_teacher(tmp_path / "t.pt", channels=1, classes=10, res=28, dataset="MNIST",
                           names=tuple(str(i) for i in range(10)))
    out = tmp_path / "out"
    args = ["--teacher", teacher, "--data-path", tmp_path / "mnist", "--selection", "random", "--ipc", "2",
            "--seed", "3", "--quiet"]
    r = cli(*args, "--out", out)
    assert r.exit_code == 0, r.output
    assert not (out / "ranking.csv").exists()                  # random needs no ranking
    with gzip.open(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    man = json.loads((out / "selection.json").read_text())
    assert man["class_dirs"] == [f"{c:05d}" for c in range(10)] and man["dataset"] == "MNIST"
    for c in range(10):
        files = sorted(p.name for p in (out / f"{c:05d}").iterdir())
        assert [f[:4] for f in files] == ["000_", "001_"]
        for f in files:
            idx = int(f[4:10])
            assert 6 * c <= idx < 6 * c + 6                    # an image of class c (labels are grouped)
            assert np.array_equal(np.asarray(Image.open(out / f"{c:05d}" / f)), raw[idx])
        assert all(0 <= e["score"] <= 1 for e in man["picks"][f"{c:05d}"])
    r2 = cli(*args, "--out", tmp_path / "again", "--format", "tensor")
    assert r2.exit_code == 0, r2.output
    again = tmp_path / "again"
    assert not any(p.is_dir() for p in again.iterdir())         # tensor files only
    assert json.loads((again / "selection.json").read_text())["picks"] == man["picks"]  # same seed, same picks
    x = torch.load(again / "tensor_1.pt", weights_only=True)
    assert x.shape == (10, 1, 28, 28)
    # MNIST at R = 28: the DELT rule resizes to 32 and centre-crops 28 (§5.1 item 2).
    src = Image.fromarray(raw[int(man["picks"]["00004"][1]["file"][4:10])])
    ref = RS.preprocess(src, 28).float() / 255
    assert torch.allclose(x[4] * STD[0] + MEAN[0], ref, atol=1e-5)
    r3 = cli(*[("4" if a == "3" else a) for a in args], "--out", tmp_path / "s4", "--format", "tensor")
    assert r3.exit_code == 0, r3.output
    assert json.loads((tmp_path / "s4" / "selection.json").read_text())["picks"] != man["picks"]
    # Scores of random picks (scored alone) equal those of a full ranking of the same images.
    r4 = cli(*args, "--out", tmp_path / "ranked", "--store-rank-file", "--format", "tensor")
    assert r4.exit_code == 0, r4.output
    df = pd.read_csv(tmp_path / "ranked" / "ranking.csv", dtype={"class": str})
    full = dict(zip(df["img_path"], df["score"]))
    assert len(full) == 60 and df["img_path"][0] == "00000/" + df["img_path"][0].split("/")[1]
    for c, entries in man["picks"].items():
        for e in entries:
            assert e["score"] == pytest.approx(full[e["img_path"]], abs=1e-6)


def test_one_line_errors(setup, tmp_path):
    data, teacher = setup
    out = tmp_path / "out"
    r = cli("--teacher", teacher, "--data-path", data, "--ipc", "5", "--out", out)
    assert r.exit_code == 2
    assert r.output.strip() == "error: class 'eel' has only 4 training images, --ipc 5 asked for"
    assert not out.exists()                                    # refused before anything is written
    r = cli("--teacher", teacher, "--data-path", data, "--ipc", "1", "--out", data / "train")
    assert r.exit_code == 2 and "is inside the input dataset --data-path" in r.output   # utils.io.refuse_overlap
    assert len(list((data / "train" / "cat").iterdir())) == 5  # untouched
    other = make_teacher(tmp_path / "t4.pt", classes=4, names=())
    r = cli("--teacher", other, "--data-path", data, "--ipc", "1", "--out", out)
    assert r.exit_code == 2 and "4 outputs but the ImageFolder training set has 3 class folders" in r.output
    r = cli("--teacher", teacher, "--data-path", data, "--ipc", "1", "--out", out, "--selection", "best")
    assert r.exit_code == 2 and "unknown --selection 'best'" in r.output
    r = cli("--teacher", teacher, "--data-path", data, "--ipc", "1", "--out", out, "--norm", "imagenet")
    assert r.exit_code == 2 and "not --norm imagenet" in r.output
    r = cli("--teacher", tmp_path / "missing.pt", "--data-path", data, "--ipc", "1", "--out", out)
    assert r.exit_code == 2 and "missing.pt" in r.output


def test_help_lists_reference_spellings():
    r = runner.invoke(RS.app, ["--help"], env={"COLUMNS": "240"})
    assert r.exit_code == 0
    for flag in ("--ranker-path", "--ranker-arch", "--store-rank-file", "--ranking-file", "--selection-criteria",
                 "--output-dir", "--tensor-files", "--batch-size", "--workers", "--norm imagenet"):
        assert flag in r.output
