"""Each dataset reader on tiny files written in the real on-disk formats."""
import gzip
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from utils.datasets import (CIFAR10_CLASSES, IMAGENET_SUBSETS, get_dataset_spec, list_datasets, load_split,
                            normalize, denormalize, to_pixels)
from utils.errors import UserError


def write_idx(path, arr, gz=True):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def rand_images(n, c, r, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, r, r), dtype=np.uint8)


def save_png(path, arr_chw):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = arr_chw[0] if arr_chw.shape[0] == 1 else arr_chw.transpose(1, 2, 0)
    Image.fromarray(arr).save(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("name,gz", [("FashionMNIST", True), ("MNIST", False)])
def test_idx_reader_roundtrip(tmp_path, name, gz):
    x = rand_images(20, 1, 28)[:, 0]
    y = np.arange(20) % 10
    raw = tmp_path / name / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    sfx = ".gz" if gz else ""
    write_idx(raw / f"t10k-images-idx3-ubyte{sfx}", x, gz)
    write_idx(raw / f"t10k-labels-idx1-ubyte{sfx}", y, gz)
    split, spec = load_split(name, tmp_path, "test", progress=False)
    assert split.images.shape == (20, 1, 28, 28) and split.images.dtype == torch.uint8
    assert torch.equal(split.images[:, 0], torch.from_numpy(x))
    assert split.labels.tolist() == y.tolist()
    assert spec.resolution == 28 and spec.num_classes == 10


def test_idx_per_class_subset_is_seeded(tmp_path):
    x = rand_images(100, 1, 28)[:, 0]
    y = np.arange(100) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", x)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y)
    a, _ = load_split("MNIST", tmp_path, "train", per_class=3, seed=1)
    b, _ = load_split("MNIST", tmp_path, "train", per_class=3, seed=1)
    c, _ = load_split("MNIST", tmp_path, "train", per_class=3, seed=2)
    assert a.labels.tolist() == sorted(list(range(10)) * 3)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    with pytest.raises(UserError, match="only 10 images"):
        load_split("MNIST", tmp_path, "train", per_class=11)


def test_cifar10_python_batches(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        pickle.dump({"data": data, "labels": [i % 10, 1, 2, 3]}, open(d / f"data_batch_{i}", "wb"))
    first = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    pickle.dump({"data": first, "labels": [7, 8, 9]}, open(d / "test_batch", "wb"))
    tr, spec = load_split("CIFAR10", tmp_path, "train")
    te, _ = load_split("CIFAR10", tmp_path, "test")
    assert tr.images.shape == (20, 3, 32, 32) and te.labels.tolist() == [7, 8, 9]
    # CIFAR rows are channel-major: R plane, then G, then B.
    assert torch.equal(te.images[0, 1].flatten(), torch.from_numpy(first[0, 1024:2048]))
    assert spec.class_names[0] == "airplane"


def test_cifar100_fine_labels_and_pickle_guard(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    pickle.dump({"data": rand_images(2, 3, 32).reshape(2, -1), "fine_labels": [5, 99], "coarse_labels": [0, 1]},
                open(d / "test", "wb"))
    te, spec = load_split("CIFAR100", tmp_path, "test")
    assert te.labels.tolist() == [5, 99] and spec.num_classes == 100

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    pickle.dump({"data": Evil()}, open(d / "test", "wb"))
    with pytest.raises(UserError, match="corrupt CIFAR batch"):
        load_split("CIFAR100", tmp_path, "test")


def _cifar_tree(root, per_class=2, classes=None):
    classes = classes or get_dataset_spec("CIFAR10").class_names
    imgs = {}
    for split in ("train", "test"):
        for ci, c in enumerate(classes):
            for k in range(per_class):
                arr = np.full((3, 32, 32), 20 * ci + k, dtype=np.uint8)
                save_png(root / split / c / f"{k:04d}.png", arr)
                imgs[(split, ci, k)] = arr
    return imgs


def test_cifar10_imagefolder_tree_maps_official_labels(tmp_path, cache):
    _cifar_tree(tmp_path)
    te, spec = load_split("CIFAR10", tmp_path, "test", progress=False)
    assert te.images.shape == (20, 3, 32, 32)
    assert te.labels.tolist() == sorted([c for c in range(10)] * 2)
    assert int(te.images[te.labels == 3][0, 0, 0, 0]) == 60  # class 'cat' is label 3
    # the second load comes from the cache, with identical content
    assert any(cache.iterdir())
    te2, _ = load_split("CIFAR10", tmp_path, "test", progress=False)
    assert torch.equal(te.images, te2.images)


def test_cifar10_from_tarball_like_shared_copy(tmp_path, cache):
    tree = tmp_path / "tree"
    _cifar_tree(tree)
    ship = tmp_path / "ship"
    ship.mkdir()
    with tarfile.open(ship / "cifar10_jpg_train_test.tar.gz", "w:gz") as tar:
        tar.add(tree / "train", arcname="train")
        tar.add(tree / "test", arcname="test")
    tr, _ = load_split("CIFAR10", ship, "train", progress=False)
    assert tr.images.shape == (20, 3, 32, 32) and tr.labels.bincount().tolist() == [2] * 10
    sub, _ = load_split("CIFAR10", ship, "train", per_class=1, seed=0, progress=False)
    assert sub.labels.tolist() == list(range(10))


def test_wrong_layout_and_corrupt_image_are_one_line_errors(tmp_path, cache):
    _cifar_tree(tmp_path, classes=[f"c{i}" for i in range(10)])
    with pytest.raises(UserError, match="do not match"):
        load_split("CIFAR10", tmp_path, "train")
    good = tmp_path / "good"
    _cifar_tree(good)
    bad = good / "test" / "dog" / "0001.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match="0001.png") as e:
        load_split("CIFAR10", good, "test", progress=False)
    assert "\n" not in str(e.value)


def test_svhn_mat(tmp_path):
    import scipy.io as scipy_io  # requirements-dev.txt
    x = rand_images(3, 3, 32)
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": np.array([[10], [1], [9]])})
    te, _ = load_split("SVHN", tmp_path, "test")
    assert torch.equal(te.images, torch.from_numpy(x)) and te.labels.tolist() == [0, 1, 9]


def _tiny_tree(base, wnids, val_wnids):
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids))
    for w in wnids:
        save_png(base / "train" / w / "images" / f"{w}_0.JPEG", rand_images(1, 3, 8, seed=len(w))[0])
    lines = []
    for i, w in enumerate(val_wnids):
        save_png(base / "val" / "images" / f"val_{i}.JPEG", np.full((3, 64, 64), i, dtype=np.uint8))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines))


def test_tiny_imagenet_official_flat_val(tmp_path, cache):
    wnids = [f"n{k:03d}" for k in range(200)][::-1]  # written in reverse: labels follow sorted wnids
    val = ["n003", "n001", "n002", "n003"] + wnids  # every class needs val images
    _tiny_tree(tmp_path / "tiny-imagenet-200", wnids, val)
    tr, spec = load_split("tiny", tmp_path, "train", progress=False)
    te, _ = load_split("TinyImageNet", tmp_path, "test", progress=False)
    assert spec.class_names == tuple(sorted(wnids))
    assert tr.images.shape == (200, 3, 64, 64) and tr.labels.tolist() == list(range(200))
    assert te.labels.tolist() == sorted([3, 1, 2, 3] + list(range(200)))  # class-major
    # within a class, files sort by name: class 3 holds val_0 (value 0), val_3 (value 3), val_200 (value 200)
    assert [int(v) for v in te.images[te.labels == 3, 0, 0, 0]] == [0, 200, 3]


def test_named_datasets_check_their_class_count(tmp_path, cache):
    """A 202-class tree is not TinyImageNet, a 3-class tree not ImageNet: one line pointing at ImageFolder."""
    _tiny_tree(tmp_path / "tiny-imagenet-200", [f"n{k:03d}" for k in range(202)], ["n000"])
    with pytest.raises(UserError, match=r"TinyImageNet: expected 200 class folders in .*train, found 202; "
                                        r"for another tree use --dataset ImageFolder"):
        load_split("TinyImageNet", tmp_path, "train", progress=False)
    for w in ("n01", "n02", "n03"):
        save_png(tmp_path / "inet" / "train" / w / "a.JPEG", rand_images(1, 3, 8)[0])
    with pytest.raises(UserError, match=r"ImageNet: expected 1000 class folders in .*train, found 3"):
        load_split("ImageNet", tmp_path / "inet", "train", progress=False)
    for c in CIFAR10_CLASSES[:9]:
        save_png(tmp_path / "c10" / "train" / c / "a.png", rand_images(1, 3, 32)[0])
    with pytest.raises(UserError, match=r"CIFAR10: class folders in .* do not match its 10 classes .*found 9"):
        load_split("CIFAR10", tmp_path / "c10", "train", progress=False)


def test_imagenet_subset_picks_listed_wnids_in_order(tmp_path, cache):
    wnids = IMAGENET_SUBSETS["imagenette"].split()
    for split in ("train", "val"):
        for w in wnids[::-1] + ["n09999999"]:  # an extra class not in the subset
            save_png(tmp_path / split / w / "a.JPEG", rand_images(1, 3, 40)[0])
    te, spec = load_split("imagenette", tmp_path, "test", progress=False)
    assert spec.class_names == tuple(wnids) and te.labels.tolist() == list(range(10))
    assert te.images.shape == (10, 3, 128, 128)  # MTT resolution for the subsets


def test_generic_imagefolder_and_resize(tmp_path, cache):
    for split in ("train", "val"):
        for c in ("zebra", "apple"):
            save_png(tmp_path / split / c / "x.png", rand_images(1, 3, 48)[0])
    tr, spec = load_split("ImageFolder", tmp_path, "train", progress=False)
    assert spec.class_names == ("apple", "zebra") and spec.resolution == 48
    te, spec = load_split("ImageFolder", tmp_path, "test", resolution=16, progress=False)
    assert te.images.shape == (2, 3, 16, 16)


def test_missing_data_and_unknown_name_messages(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'CIFAR11'"):
        load_split("CIFAR11", tmp_path)
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte\[\.gz\]") as e:
        load_split("MNIST", tmp_path, "train")
    assert str(tmp_path) in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        load_split("CIFAR10", tmp_path / "nope")


def test_registry_constants():
    assert {"MNIST", "FashionMNIST", "SVHN", "CIFAR10", "CIFAR100", "TinyImageNet", "ImageNet", "ImageNet10",
            "ImageNet100", "imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk", "imageyellow",
            "ImageFolder"} <= set(list_datasets())
    assert get_dataset_spec("cifar10").std == (0.2023, 0.1994, 0.2010)
    assert get_dataset_spec("fashion").mean == (0.2861,)
    assert get_dataset_spec("ImageNet10").wnids[0] == "n02869837" and len(get_dataset_spec("ImageNet100").wnids) == 100
    x = torch.rand(2, 3, 4, 4)
    m, s = get_dataset_spec("SVHN").mean, get_dataset_spec("SVHN").std
    assert torch.allclose(denormalize(normalize(x, m, s), m, s), x, atol=1e-6)
    assert to_pixels(torch.tensor([255], dtype=torch.uint8)).item() == 1.0


def _gradient16(res=16):
    """A 16-bit grayscale ramp over the whole range (0 .. 65535), as scanners and medical images store them."""
    return (np.arange(res * res).reshape(res, res) * (65535 / (res * res - 1))).round().astype(np.uint16)


def test_sixteen_bit_pngs_are_scaled_to_8_bits_not_clipped(tmp_path, cache):
    """PIL's convert() clips 16-bit values at 255, so all but the darkest pixels saturate; they must be scaled
    (v / 257, rounded), in a dataset ImageFolder and in a synthetic ImageFolder set alike."""
    from utils.synset import load_synset
    ramp = _gradient16()
    want = torch.from_numpy(np.rint(ramp / 257.0).astype(np.uint8))
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            Image.fromarray(ramp).save(tmp_path / "data" / split / c / "x.png")
    assert Image.open(tmp_path / "data" / "train" / "a" / "x.png").mode.startswith("I")   # really 16-bit on disk
    split, _ = load_split("ImageFolder", tmp_path / "data", "train", progress=False)
    assert split.images.shape == (2, 3, 16, 16)
    assert torch.equal(split.images[0], want.expand(3, 16, 16))
    assert (split.images == 255).float().mean() < 0.01
    syn = load_synset(tmp_path / "data" / "train", dataset="ImageFolder")
    images, _ = syn.decode()
    assert torch.allclose(images[0], want.float().div(255).expand(3, 16, 16), atol=1e-6)
