"""The synthetic-set format: round trip, legacy artefacts, safety, compatibility checks."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from utils.datasets import get_dataset_spec, normalize
from utils.errors import UserError
from utils.synset import (DECODERS, SyntheticSet, check_compatible, export_imagefolder, load_synset, make_meta,
                          pixel_set, register_decoder, save_synset)

CIFAR = replace(get_dataset_spec("CIFAR10"))


def tiny_set(ipc=2, space="pixel", lr=None):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(ipc)
    images = torch.rand(10 * ipc, 3, 32, 32, generator=g)
    meta = make_meta(CIFAR, space=space, ipc=ipc, method="test", args={"x": 1}, seed=3)
    return SyntheticSet({"images": images}, labels, meta, lr=lr)


def test_native_roundtrip_with_lr_and_soft_labels(tmp_path):
    syn = tiny_set(lr=torch.tensor(0.0123))
    syn.soft_labels = torch.randn(20, 10)
    out = save_synset(syn, tmp_path / "set")
    assert {p.name for p in out.iterdir()} == {"synset.pt", "meta.json", "grid.png"}
    # plain dict, readable with weights_only=True
    payload = torch.load(out / "synset.pt", weights_only=True)
    assert payload["format"] == "ddtoolkit-synset" and isinstance(payload, dict)
    back = load_synset(out)
    assert torch.equal(back.tensors["images"], syn.tensors["images"])
    assert torch.equal(back.labels, syn.labels) and torch.equal(back.soft_labels, syn.soft_labels)
    assert back.lr.item() == pytest.approx(0.0123)
    meta = json.loads((out / "meta.json").read_text())
    for key in ("dataset", "class_names", "resolution", "mean", "std", "space", "method", "args", "decoder",
                "git_commit", "seed", "ipc"):
        assert key in meta
    assert meta["ipc"] == 2 and meta["class_names"][3] == "cat" and meta["seed"] == 3
    # grid: one row per class (10 rows of 32 px + padding), upscaled ×2 for 32-px images
    w, h = Image.open(out / "grid.png").size
    assert h == (10 * 34 + 2) * 2 and w == (2 * 34 + 2) * 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_overwrite_refused_unless_asked(tmp_path):
    save_synset(tiny_set(), tmp_path / "s")
    with pytest.raises(UserError, match="--overwrite"):
        save_synset(tiny_set(), tmp_path / "s", overwrite=False)
    save_synset(tiny_set(ipc=1), tmp_path / "s")
    assert load_synset(tmp_path / "s").meta["ipc"] == 1


def test_normalized_set_grid_is_denormalized(tmp_path):
    syn = tiny_set(space="normalized")
    pix = torch.full((20, 3, 32, 32), 0.5)
    syn.tensors["images"] = normalize(pix, CIFAR.mean, CIFAR.std)
    save_synset(syn, tmp_path / "n")
    arr = np.asarray(Image.open(tmp_path / "n" / "grid.png"))
    assert abs(int(arr[10, 10, 0]) - 128) <= 1  # 0.5 grey back in pixel space


def test_zca_set_roundtrip_and_grid_uses_inverse(tmp_path):
    from utils.zca import ZCA
    real = torch.rand(400, 3, 8, 8)  # small images: a 3072-dim ZCA fit takes most of a minute on 2 cores
    zca = ZCA.fit(real, eps=0.1)
    syn = tiny_set(space="zca")
    syn.meta["resolution"] = 8
    pix = real[:20]
    syn.tensors["images"] = zca.transform(pix)
    syn.meta["zca"] = {"eps": 0.1, "file": "zca.pt"}
    syn.zca_state = zca.state_dict()
    save_synset(syn, tmp_path / "z")
    back = load_synset(tmp_path / "z")
    assert back.space == "zca" and back.zca_state is not None
    assert torch.allclose(back.to_pixels(back.tensors["images"]), pix.clamp(0, 1), atol=1e-3)


def test_mtt_style_files(tmp_path):
    images = torch.randn(20, 3, 32, 32)
    labels = torch.arange(10).repeat_interleave(2)
    torch.save(images, tmp_path / "images_best.pt")
    torch.save(labels, tmp_path / "labels_best.pt")
    torch.save(torch.tensor(0.03), tmp_path / "lr_best.pt")
    torch.save(torch.randn(20, 3, 32, 32), tmp_path / "images_5000.pt")
    syn = load_synset(tmp_path, dataset="CIFAR10")
    x, y = syn.decode()
    assert torch.equal(x, images) and torch.equal(y, labels)
    assert syn.space == "normalized" and syn.lr.item() == pytest.approx(0.03) and syn.meta["ipc"] == 2
    with pytest.raises(UserError, match="--zca"):
        load_synset(tmp_path, dataset="CIFAR10", space="zca")
    with pytest.raises(UserError, match="pass --dataset"):
        load_synset(tmp_path)


def test_idc_style_data_pt(tmp_path):
    data = torch.rand(20, 3, 32, 32)
    targets = torch.arange(10).repeat_interleave(2)
    torch.save([data, targets], tmp_path / "data.pt")
    syn = load_synset(tmp_path, dataset="cifar10")
    x, y = syn.decode()
    assert syn.space == "pixel" and torch.equal(x, data) and torch.equal(y, targets)
    syn2 = load_synset(tmp_path / "data.pt", dataset="cifar10", factor=2)
    assert syn2.meta["decoder"] == "multiformation" and syn2.meta["decoder_args"] == {"factor": 2}
    if "multiformation" in DECODERS:  # registered by the IDC stage: f² decoded images per stored image
        assert len(syn2.decode()[0]) == 4 * len(data)
    else:
        with pytest.raises(UserError, match="decoder 'multiformation'"):
            syn2.decode()


def test_sre2l_imagefolder(tmp_path):
    for c in range(10):
        d = tmp_path / f"new{c:03d}"
        d.mkdir()
        for k in range(2):
            Image.fromarray(np.full((32, 32, 3), 10 * c + k, dtype=np.uint8)).save(d / f"class{c:03d}_id{k:03d}.png")
    syn = load_synset(tmp_path, dataset="CIFAR10")
    x, y = syn.decode()
    assert x.shape == (20, 3, 32, 32) and y.tolist() == sorted(list(range(10)) * 2)
    assert x[5, 0, 0, 0].item() == pytest.approx(21 / 255)


def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))
    torch.save({"format": "ddtoolkit-synset", "tensors": {}, "payload": Evil()}, tmp_path / "synset.pt")
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(UserError, match="refusing to load"):
        load_synset(tmp_path)


def test_truncated_file_is_a_clear_error(tmp_path):
    save_synset(tiny_set(), tmp_path / "s")
    f = tmp_path / "s" / "synset.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_synset(tmp_path / "s")


def test_compatibility_checks():
    syn = tiny_set()
    check_compatible(syn, CIFAR)
    with pytest.raises(UserError, match="made for CIFAR10, not SVHN"):
        check_compatible(syn, get_dataset_spec("SVHN"))
    with pytest.raises(UserError, match="classes"):
        check_compatible(syn, replace(CIFAR, num_classes=100))
    with pytest.raises(UserError, match="--res"):
        check_compatible(syn, replace(CIFAR, resolution=64))


def test_registered_decoder_is_used_and_export(tmp_path):
    @register_decoder("halves")
    def _halves(tensors, labels, meta):
        return tensors["images"] * 0.5, labels
    syn = tiny_set()
    syn.meta["decoder"] = "halves"
    x, _ = syn.decode()
    assert torch.allclose(x, syn.tensors["images"] * 0.5)
    out = export_imagefolder(syn, tmp_path / "png")
    assert sorted(p.name for p in out.iterdir())[:2] == ["000_airplane", "001_automobile"]
    assert len(list((out / "003_cat").glob("*.png"))) == 2
    del DECODERS["halves"]


def test_pixel_set_ipc():
    spec = get_dataset_spec("CIFAR10")
    syn = pixel_set(torch.rand(30, 3, 32, 32), torch.arange(10).repeat_interleave(3), spec, method="x")
    assert syn.meta["ipc"] == 3 and syn.space == "pixel"
