"""Results, checkpoints and the dataset cache are keyed on what their inputs contain, not only where they are: a
synthetic set, an expert folder or a dataset image replaced at the same path never inherits the old numbers."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import buffer
import coreset
import distill
import validate
from tests.test_kd import _kd_args, kd_files  # noqa: F401  (kd_files is a fixture)
from tests.test_validate import make_mnist_like
from utils.datasets import load_split

runner = CliRunner()


def _error(r) -> str:
    lines = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    make_mnist_like(root, n_train=8, n_test=4)
    return root


def _coreset(mnist, out, seed):
    r = runner.invoke(coreset.app, ["-d", "MNIST", "--data-path", str(mnist), "--ipc", "2", "--seed", str(seed),
                                    "--out", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output


def _validate_args(mnist, syn, results, *extra):
    return ["--syn", str(syn), "--data-path", str(mnist), "--model", "ConvNet-1-w8", "--epochs", "2", "--runs", "2",
            "--batch-size", "8", "--results", str(results), *extra]


def test_validate_refuses_results_of_a_set_replaced_at_the_same_path(mnist, tmp_path):
    """condense/coreset --overwrite with another seed (or an all-zero set) at the same path: the re-run must not
    re-report the old set's accuracy; an unchanged set still resumes."""
    syn, results = tmp_path / "set", tmp_path / "r.json"
    _coreset(mnist, syn, seed=0)
    args = _validate_args(mnist, syn, results)
    r = runner.invoke(validate.app, args)
    assert r.exit_code == 0, r.output
    r = runner.invoke(validate.app, args)                           # unchanged set: both runs read back
    assert r.exit_code == 0 and r.output.count("resumed from") == 2, r.output
    first = results.read_text()
    _coreset(mnist, syn, seed=1)                                    # replaced at the same path
    line = _error(runner.invoke(validate.app, args))
    assert f"the synthetic set {syn}" in line and "changed" in line and "--overwrite" in line
    assert results.read_text() == first                             # the old report is left as it was
    zero = torch.load(syn / "synset.pt", weights_only=True)         # an all-zero set "scored" the old 34 %
    zero["tensors"]["images"].zero_()
    torch.save(zero, syn / "synset.pt")
    assert "--overwrite" in _error(runner.invoke(validate.app, args))
    r = runner.invoke(validate.app, args + ["--overwrite"])
    assert r.exit_code == 0 and "resumed from" not in r.output, r.output


def test_validate_refuses_a_run_checkpoint_of_a_replaced_set(mnist, tmp_path, monkeypatch):
    """Killed inside the first run (a checkpoint, no CSV row yet), then the set is replaced: no resume."""
    syn, results = tmp_path / "set", tmp_path / "r.json"
    _coreset(mnist, syn, seed=0)
    args = _validate_args(mnist, syn, results, "--ckpt-every", "1")

    def killed(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(validate, "_record_run", killed)
    assert runner.invoke(validate.app, args).exit_code == 130
    assert validate.ckpt_path_for(results).is_file()
    monkeypatch.undo()
    _coreset(mnist, syn, seed=1)
    line = _error(runner.invoke(validate.app, args))
    assert f"the synthetic set {syn}" in line and "--overwrite" in line


def test_validate_kd_refuses_results_of_an_edited_imagefolder_set_or_a_replaced_teacher(kd_files, tmp_path,
                                                                                        monkeypatch):
    """KD mode: an image of an SRe2L-style ImageFolder set edited in place, or the teacher file rewritten."""
    import shutil
    root = tmp_path / "kd"
    shutil.copytree(kd_files, root, ignore=shutil.ignore_patterns("cache", "*.json", "*.csv", "*.ckpt.pt"))
    monkeypatch.setenv("DDT_CACHE", str(tmp_path / "cache"))
    args = _kd_args(root, "--epochs", "2", "--batch-size", "8")
    r = runner.invoke(validate.app, args)
    assert r.exit_code == 0, r.output
    image = root / "set" / "new001" / "class001_id000.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    _later(image)
    line = _error(runner.invoke(validate.app, args))
    assert f"the synthetic set {root / 'set'}" in line and "--overwrite" in line
    assert runner.invoke(validate.app, args + ["--overwrite"]).exit_code == 0
    assert runner.invoke(validate.app, args).exit_code == 0           # recorded on the edited set: resumes
    t = torch.load(root / "teacher.pt", weights_only=True)
    t["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in t["model"].items()}
    torch.save(t, root / "teacher.pt")
    line = _error(runner.invoke(validate.app, args))
    assert f"the teacher {root / 'teacher.pt'}" in line and "--overwrite" in line


def _buffer(mnist, root, seed, *extra):
    r = runner.invoke(buffer.app, ["--dataset", "MNIST", "--data-path", str(mnist), "--model", "ConvNet-1-w8",
                                   "--train-epochs", "2", "--num-experts", "2", "--batch-train", "32", "--seed",
                                   str(seed), "--buffer-path", str(root), "--quiet", *extra])
    assert r.exit_code == 0, r.output


def test_distill_refuses_to_resume_against_regenerated_experts(mnist, tmp_path):
    """buffer.py --overwrite with another seed in the same folder, then the same distill command (more
    iterations): it must not continue the run made against the old experts."""
    buffers, out = tmp_path / "buffers", tmp_path / "run"
    _buffer(mnist, buffers, seed=0)
    args = ["--dataset", "MNIST", "--ipc", "1", "--method", "mtt", "--model", "ConvNet-1-w8", "--data-path",
            str(mnist), "--buffer-path", str(buffers), "--iterations", "2", "--syn-steps", "2",
            "--max-start-epoch", "1", "--batch-syn", "10", "--out", str(out), "--quiet"]
    assert runner.invoke(distill.app, args).exit_code == 0
    more = list(args)
    more[more.index("--iterations") + 1] = "3"
    r = runner.invoke(distill.app, more)                            # same experts: continues the finished run
    assert r.exit_code == 0 and torch.load(out / "ckpt.pt", weights_only=True)["it"] == 3, r.output
    before = (out / "synset.pt").read_bytes()
    _buffer(mnist, buffers, 1, "--overwrite")
    more[more.index("--iterations") + 1] = "4"
    line = _error(runner.invoke(distill.app, more))
    assert "expert trajectories" in line and "changed" in line and "--overwrite" in line
    assert (out / "synset.pt").read_bytes() == before and torch.load(out / "ckpt.pt", weights_only=True)["it"] == 3
    r = runner.invoke(distill.app, more + ["--overwrite"])
    assert r.exit_code == 0 and torch.load(out / "ckpt.pt", weights_only=True)["it"] == 4, r.output


# --------------------------------------------------------------------------------------------- dataset cache

def _bmp_tree(root, seed=0):
    """An ImageFolder of BMPs (fixed file size: an edit keeps the size), 2 classes x 3 images of 8 px."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for k in range(3):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{k}.bmp")


def _later(path, seconds=5):
    """Move a file's modification time forward, as an edit a little later would (file systems keep times in
    coarse ticks; the test must not depend on the edit landing in another tick)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_cache_sees_an_image_edited_in_place_and_a_file_swapped_for_another(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    _bmp_tree(data)
    root_mtime = os.stat(data).st_mtime_ns
    first, _ = load_split("ImageFolder", data, "train", cache_dir=cache, progress=False)
    edited = data / "train" / "b" / "1.bmp"
    size = edited.stat().st_size
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(edited)
    _later(edited)
    assert edited.stat().st_size == size and os.stat(data).st_mtime_ns == root_mtime
    again, _ = load_split("ImageFolder", data, "train", cache_dir=cache, progress=False)
    assert torch.equal(again.images[4], torch.full((3, 8, 8), 7, dtype=torch.uint8))
    assert torch.equal(again.images[:4], first.images[:4]) and torch.equal(again.images[5], first.images[5])
    # same count, same sizes: a file replaced by another name
    os.replace(data / "train" / "a" / "0.bmp", data / "train" / "a" / "9.bmp")
    swapped, _ = load_split("ImageFolder", data, "train", cache_dir=cache, progress=False)
    assert torch.equal(swapped.images[2], first.images[0]) and torch.equal(swapped.images[0], first.images[1])


def test_a_tampered_cache_entry_of_the_right_length_is_rebuilt_not_used(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    _bmp_tree(data)
    first, _ = load_split("ImageFolder", data, "train", cache_dir=cache, progress=False)
    (entry,) = list(cache.glob("*.pt"))
    stored = torch.load(entry, weights_only=True)
    if isinstance(stored, torch.Tensor):
        torch.save(torch.zeros_like(stored), entry)
    else:                                   # whatever else it holds, the images are now zeros of the same shape
        stored["images"] = torch.zeros_like(stored["images"])
        torch.save(stored, entry)
    again, _ = load_split("ImageFolder", data, "train", cache_dir=cache, progress=False)
    assert torch.equal(again.images, first.images)
    wrong_shape = torch.load(entry, weights_only=True)       # rebuilt: a good entry again
    if isinstance(wrong_shape, torch.Tensor):
        torch.save(wrong_shape[:, :1], entry)
    else:
        wrong_shape["images"] = wrong_shape["images"][:, :1]
        torch.save(wrong_shape, entry)
    assert torch.equal(load_split("ImageFolder", data, "train", cache_dir=cache, progress=False)[0].images,
                       first.images)


def test_rank_select_pixel_cache_sees_an_edited_image_and_rebuilds_a_tampered_entry(tmp_path):
    """rank_select.py's cache of preprocessed pixels follows the same rules as the dataset cache."""
    import rank_select
    data, cache = tmp_path / "data", tmp_path / "cache"
    _bmp_tree(data)
    images = rank_select.list_train_images("ImageFolder", data)
    first = rank_select.cached_pixels(images, 8, "square", cache_dir=cache)
    edited = data / "train" / "b" / "1.bmp"
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(edited)
    _later(edited)
    again = rank_select.cached_pixels(images, 8, "square", cache_dir=cache)
    assert torch.equal(again[4], torch.full((3, 8, 8), 7, dtype=torch.uint8))
    assert torch.equal(again[:4], first[:4])
    for entry in cache.glob("*.pt"):                      # every entry: same shape, zeros
        stored = torch.load(entry, weights_only=True)
        if isinstance(stored, torch.Tensor):
            torch.save(torch.zeros_like(stored), entry)
        else:
            stored["images"] = torch.zeros_like(stored["images"])
            torch.save(stored, entry)
    assert torch.equal(rank_select.cached_pixels(images, 8, "square", cache_dir=cache), again)
