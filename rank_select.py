"""rank_select.py: rank real training images by teacher confidence and select per class (DELT, DWA init).

    python rank_select.py --teacher runs/teacher.pt --data-path /work/shared/data/cifar10 --dataset CIFAR10 \
        --selection medium --ipc 50 --out runs/cifar10_medium

DELT (decoupled.md §5.1): every training image gets a score, the softmax probability of its true class from one
deterministic forward of the teacher (eval mode, no augmentation). Per class, `--selection` picks `--ipc` images:
the highest scores (`top`), the lowest (`min`), the ones closest in rank to the median (`medium`, DELT's default), or
a seeded random subset (`random`, DWA's real-image initialisation, §4.4, which needs no ranking).

Output (`--out DIR`):
- `DIR/<class_dir>/{k:03d}_{original file name}`: byte-exact copies of the picked files; k is the pick order (with
  `medium`, `000_` is the median image; DELT's recovery reads the files sorted by name, §5.1 item 6). In-memory
  datasets (MNIST idx, CIFAR python batches, ...) have no files: their images get the names
  `<class index:05d>/<dataset index:06d>.png` and are written as PNG.
- `DIR/tensor_{k}.pt` (with `--format tensor|both` or `--tensor-files`): DWA's CIFAR init layout (§4.4), a float
  tensor [C, channels, R, R] with the k-th pick of every class in class order, already in the teacher's normalised
  space.
- `DIR/selection.json`: the manifest recover.py reads (teacher path, dataset, resolution, normalisation, class
  folders in label order, per-class picks with their scores); `DIR/config.json`: the resolved arguments.
- the ranking CSV (`--ranking-file`, default `DIR/ranking.csv`): columns `score`, `img_path`
  (`<class_dir>/<path inside the class folder>`), `class`; rows by class, then score descending (§5.1 item 4).

Determinism (§9.1 item 9): classes are taken in the teacher's label order (the dataset registry's order: sorted
folder names for every ImageFolder-like dataset) and files inside a class sorted by name before anything is ranked,
tied or drawn; ties in score keep that name order.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.functional as TF
import typer
from PIL import Image, UnidentifiedImageError

from utils.datasets import (FileSplit, Split, default_cache_dir, iter_file_bytes, per_class_indices, read_cache_entry,
                            read_split, source_digest, to_8bit, write_cache_entry)
from utils.errors import UserError
from utils.io import check_writable, atomic_torch_save, atomic_write_json, atomic_write_text, refuse_overlap, run_lock
from utils.misc import require_at_least, RunLog, cli_errors, progress, resolve_device, step
from utils.teacher import NORMALIZATIONS, Teacher, load_teacher

RANKING_COLUMNS = ("score", "img_path", "class")
MANIFEST_FORMAT = "ddtoolkit-selection"
MANIFEST_VERSION = 1
FORMATS = {"folder": (True, False), "tensor": (False, True), "both": (True, True)}  # -> (folder, tensor files)


# ------------------------------------------------------------------------------------------ the images

@dataclass
class TrainImages:
    """Every training image of a dataset, class-major in label order, sorted by name inside a class.

    Position p (0..N-1) indexes `rel_paths` / `labels` / `raw_index`. Files keep their original bytes (read through
    `read`); in-memory splits yield uint8 tensors and are written out as PNG."""

    dataset: str
    channels: int
    class_dirs: tuple[str, ...]       # folder name of each label
    class_names: tuple[str, ...]
    rel_paths: list[str]              # "<class_dir>/<path inside the class folder>"
    labels: list[int]
    raw: Split | FileSplit
    raw_index: list[int]              # position -> index into `raw`
    root: Path | None = None          # the --data-path the split was read from (keys the decoded cache)

    def __len__(self) -> int:
        return len(self.rel_paths)

    def subset(self, positions: list[int]) -> "TrainImages":
        """The same dataset restricted to `positions` (kept in position order: class-major, name-sorted)."""
        keep = sorted(positions)
        return TrainImages(self.dataset, self.channels, self.class_dirs, self.class_names,
                           [self.rel_paths[p] for p in keep], [self.labels[p] for p in keep], self.raw,
                           [self.raw_index[p] for p in keep], self.root)

    def class_positions(self) -> list[list[int]]:
        """Positions of each class (label order), in name order."""
        out: list[list[int]] = [[] for _ in self.class_dirs]
        for p, y in enumerate(self.labels):
            out[y].append(p)
        return out

    def file_name(self, p: int) -> str:
        return self.rel_paths[p].rsplit("/", 1)[-1]

    def read(self, positions: list[int]) -> Iterator[tuple[int, bytes | Path | torch.Tensor]]:
        """(position, data) for each wanted position; data is a file path, the bytes of a tar member, or a uint8
        tensor. Archives are read in member order, so the order of the pairs may differ from `positions`."""
        if isinstance(self.raw, Split):
            for p in positions:
                yield p, self.raw.images[self.raw_index[p]]
            return
        back = {self.raw_index[p]: p for p in positions}
        for i, data, _name in iter_file_bytes(self.raw, list(back)):
            yield back[i], data

    def open_image(self, p: int, data: bytes | Path | torch.Tensor) -> Image.Image:
        """The image at its native size, converted to the dataset's channel count."""
        mode = "L" if self.channels == 1 else "RGB"
        if isinstance(data, torch.Tensor):
            arr = data.numpy()
            return Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)).convert(mode)
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                im.load()
                return to_8bit(im).convert(mode)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"corrupt or unreadable image {self.rel_paths[p]}: {why}") from None

    def write_copy(self, p: int, data: bytes | Path | torch.Tensor, dest: Path) -> None:
        """A byte-exact copy of the original file (a PNG for in-memory images)."""
        if isinstance(data, torch.Tensor):
            self.open_image(p, data).save(dest, format="PNG")
        elif isinstance(data, bytes):
            dest.write_bytes(data)
        else:
            shutil.copyfile(data, dest)


def _relative_name(path: Path, class_dir: str) -> str:
    """`<class_dir>/<rest>` from a file path: everything from the last folder named like the class."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == class_dir:
            return "/".join(parts[i:])
    return f"{class_dir}/{Path(path).name}"


def list_train_images(dataset: str, data_path: str | Path, download: bool = False) -> TrainImages:
    """Index the training split (nothing is decoded): file datasets keep their file names, in-memory ones get
    `<class:05d>/<index:06d>.png`. Sorted by label, then by name (§9.1 item 9)."""
    spec, _root, raw = read_split(dataset, data_path, "train", download)
    if isinstance(raw, FileSplit):
        # A FileSplit's class names are its folder names (registry class order = teacher output order).
        class_dirs = tuple(raw.class_names)
        names = [_relative_name(f, class_dirs[y]) for f, y in zip(raw.files, raw.labels)]
        labels = list(raw.labels)
    else:
        class_dirs = tuple(f"{c:05d}" for c in range(len(raw.class_names)))
        labels = raw.labels.tolist()
        names = [f"{class_dirs[y]}/{i:06d}.png" for i, y in enumerate(labels)]
    order = sorted(range(len(names)), key=lambda i: (labels[i], names[i]))
    if len(set(names)) != len(names):
        raise UserError(f"{spec.name}: two training files map to the same name under {data_path}")
    return TrainImages(spec.name, spec.channels, class_dirs, tuple(raw.class_names), [names[i] for i in order],
                       [labels[i] for i in order], raw, order, Path(data_path).expanduser())


def train_subset_of(images: TrainImages, per_class: int, seed: int) -> TrainImages:
    """`--train-subset N`: N seeded random images per class (utils.datasets.per_class_indices, the draw every stage
    uses for --train-subset), ranked and selected from instead of the whole split."""
    labels = torch.tensor(images.labels, dtype=torch.int64)
    return images.subset(per_class_indices(labels, len(images.class_dirs), per_class, seed).tolist())


# ------------------------------------------------------------------------------------- preprocessing

def delt_resize_side(resolution: int) -> int:
    """DELT's resize target ⌊R/7⌋·8 (§5.1 item 2: 224 -> 256, 64 -> 72, 32 -> 32); never below R, so small R
    (e.g. 13) is not padded by the centre crop."""
    return max(resolution, resolution // 7 * 8)


def _resize_delt(img: Image.Image, resolution: int) -> Image.Image:
    # Shorter side to ⌊R/7⌋·8 (bilinear, PIL), then centre crop R (§5.1 item 2).
    img = TF.resize(img, delt_resize_side(resolution), interpolation=TF.InterpolationMode.BILINEAR)
    return TF.center_crop(img, [resolution, resolution])


def _resize_square(img: Image.Image, resolution: int) -> Image.Image:
    # DWA's Tiny/ImageNet init (§4.4): stretch to R×R, aspect ratio not kept.
    return img if img.size == (resolution, resolution) else img.resize((resolution, resolution), Image.BILINEAR)


RESIZERS: dict[str, Callable[[Image.Image, int], Image.Image]] = {"delt": _resize_delt, "square": _resize_square}


def preprocess(img: Image.Image, resolution: int, resize: str = "delt") -> torch.Tensor:
    """PIL image -> uint8 [C, R, R] in pixel space (normalisation happens on the batch, in the teacher's space)."""
    return TF.pil_to_tensor(RESIZERS[resize](img, resolution))


def _chunks(it: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in it:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _decode_chunk(images: TrainImages, chunk: list, resolution: int, resize: str,
                  pool: ThreadPoolExecutor | None) -> torch.Tensor:
    def one(item):
        p, data = item
        return preprocess(images.open_image(p, data), resolution, resize)
    return torch.stack(list(pool.map(one, chunk)) if pool is not None else [one(c) for c in chunk])


def _pixel_cache_path(images: TrainImages, resolution: int, resize: str, cache_dir: Path | None) -> Path | None:
    """Where the preprocessed uint8 pixels of a file dataset's whole training split are kept: keyed by dataset,
    data folder, every source file (name, size, mtime: utils.datasets.source_digest, as the decoded cache), image
    count, R and the resize rule. None for in-memory datasets, which have nothing to decode."""
    if not isinstance(images.raw, FileSplit) or images.root is None:
        return None
    root = images.root
    key = (f"{images.dataset}|{root.resolve()}|train|{len(images.raw.files)}|{resolution}|{resize}|"
           f"{source_digest(images.raw)}|rank-v2")
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    return folder / f"{images.dataset}-rank-{resize}{resolution}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"


def load_pixel_cache(images: TrainImages, resolution: int, resize: str,
                     cache_dir: Path | None = None) -> torch.Tensor | None:
    """The cached pixels [len(raw), C, R, R] (in the split's raw order) when a valid entry exists, else None."""
    path = _pixel_cache_path(images, resolution, resize, cache_dir)
    if path is None:
        return None
    return read_cache_entry(path, len(images.raw.files), images.channels, resolution)


def decode_all(images: TrainImages, resolution: int, resize: str, workers: int = 0, batch_size: int = 256,
               show_progress: bool = False) -> torch.Tensor:
    """Every image of the split preprocessed for the teacher, uint8 [len(raw), C, R, R] in raw order."""
    n = len(images.raw.files) if isinstance(images.raw, FileSplit) else len(images.raw.images)
    out = torch.empty(n, images.channels, resolution, resolution, dtype=torch.uint8)
    names, labels = [""] * n, [0] * n
    for p, i in enumerate(images.raw_index):
        names[i], labels[i] = images.rel_paths[p], images.labels[p]
    full = TrainImages(images.dataset, images.channels, images.class_dirs, images.class_names, names, labels,
                       images.raw, list(range(n)), images.root)   # position = raw index
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    try:
        it = progress(full.read(list(range(n))), total=n, desc="decoding", disable=None if show_progress else True)
        for chunk in _chunks(it, batch_size):
            out[[p for p, _ in chunk]] = _decode_chunk(full, chunk, resolution, resize, pool)
    finally:
        if pool is not None:
            pool.shutdown()
    return out


def cached_pixels(images: TrainImages, resolution: int, resize: str, *, workers: int = 0, batch_size: int = 256,
                  cache_dir: Path | None = None, max_gb: float = 4.0, build: bool = True,
                  show_progress: bool = False) -> torch.Tensor | None:
    """The preprocessed pixels of the whole split in raw order, from the decoded cache; decoded once and stored
    there when `build` and they fit in `max_gb`. None when there is no cache (in-memory datasets, too large, or
    not built): the caller then decodes what it needs as it goes."""
    px = load_pixel_cache(images, resolution, resize, cache_dir)
    path = _pixel_cache_path(images, resolution, resize, cache_dir)
    if px is not None or path is None or not build:
        return px
    if len(images.raw.files) * images.channels * resolution ** 2 > max_gb * 2 ** 30:
        return None
    with step(f"decoding {len(images.raw.files)} training images once, to be cached in {path.parent} "
              "(set DDT_CACHE to move it)", quiet=not show_progress):
        px = decode_all(images, resolution, resize, workers, batch_size, show_progress)
    write_cache_entry(px, path, announce=show_progress)
    return px


@torch.no_grad()
def true_class_scores(teacher: Teacher, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the true class (§5.1 item 3) for uint8 pixels [N, C, R, R], normalised with the
    teacher's stored normalisation. Returned as float64 (exactly the float32 values)."""
    dev = next(teacher.net.parameters()).device
    x = teacher.normalize(pixels.to(dev).float() / 255.0)
    prob = torch.softmax(teacher.net(x).float(), dim=1)
    return prob.gather(1, labels.to(dev).view(-1, 1)).squeeze(1).double().cpu()


def score_images(teacher: Teacher, images: TrainImages, positions: list[int] | None = None, batch_size: int = 256,
                 workers: int = 0, resize: str = "delt", show_progress: bool = False,
                 pixels: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of the images at `positions` (default: all), aligned with `positions`; batched, deterministic.
    With `pixels` (the split's preprocessed pixels in raw order, `cached_pixels`) no image file is read."""
    positions = list(range(len(images))) if positions is None else list(positions)
    slot = {p: k for k, p in enumerate(positions)}
    out = torch.full((len(positions),), float("nan"), dtype=torch.float64)
    if pixels is not None:
        for chunk in _chunks(progress(positions, total=len(positions), desc="ranking",
                                      disable=None if show_progress else True), batch_size):
            px = pixels[[images.raw_index[p] for p in chunk]]
            labels = torch.tensor([images.labels[p] for p in chunk])
            out[[slot[p] for p in chunk]] = true_class_scores(teacher, px, labels)
        return out
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    try:
        it = progress(images.read(positions), total=len(positions), desc="ranking",
                      disable=None if show_progress else True)
        for chunk in _chunks(it, batch_size):
            pixels = _decode_chunk(images, chunk, teacher.resolution, resize, pool)
            labels = torch.tensor([images.labels[p] for p, _ in chunk])
            out[[slot[p] for p, _ in chunk]] = true_class_scores(teacher, pixels, labels)
    finally:
        if pool is not None:
            pool.shutdown()
    if torch.isnan(out).any():
        raise UserError("some images could not be read back from the dataset (archive changed while reading?)")
    return out


# ---------------------------------------------------------------------------------------------- ranking CSV

def ranking_table(images: TrainImages, scores: torch.Tensor) -> pd.DataFrame:
    """The ranking as DELT writes it (§5.1 item 4): score, img_path, class; class in label order, then score
    descending (ties keep file-name order)."""
    s = scores.tolist()
    order = sorted(range(len(images)), key=lambda p: (images.labels[p], -s[p]))  # positions are name-sorted
    return pd.DataFrame({"score": [s[p] for p in order],
                         "img_path": [images.rel_paths[p] for p in order],
                         "class": [images.class_dirs[images.labels[p]] for p in order]},
                        columns=list(RANKING_COLUMNS))


def write_ranking(table: pd.DataFrame, path: str | Path) -> None:
    atomic_write_text(table.to_csv(index=False), path)


def read_ranking(path: str | Path, images: TrainImages) -> torch.Tensor:
    """Scores (aligned with the image positions) from an existing ranking CSV, which must cover exactly the
    dataset's training images. A stray `Unnamed: 0` index column (CSV written with an index) is dropped."""
    path = Path(path)
    try:
        # Scores are read as text and parsed by Python's float(): an exact round trip of what we wrote.
        df = pd.read_csv(path, dtype={"score": str, "img_path": str, "class": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read ranking file {path}: {str(e).splitlines()[0][:160]}") from None
    df = df.drop(columns=[c for c in df.columns if str(c) == "Unnamed: 0"])
    if tuple(df.columns) != RANKING_COLUMNS:
        raise UserError(f"ranking file {path} has columns {list(df.columns)}, expected {list(RANKING_COLUMNS)}; "
                        "pass --store-rank-file to recompute it")
    fix = "pass --store-rank-file to recompute it for this dataset"
    try:
        scores = np.array([float(v) for v in df["score"].tolist()], dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"ranking file {path}: the score column is not numeric; {fix}") from None
    if not np.isfinite(scores).all() or (scores < 0).any() or (scores > 1).any():
        raise UserError(f"ranking file {path}: scores must be probabilities in [0, 1]; {fix}")
    where = {r: p for p, r in enumerate(images.rel_paths)}
    paths, classes = df["img_path"].tolist(), df["class"].tolist()
    unknown = [r for r in paths if r not in where]
    if unknown:
        raise UserError(f"ranking file {path} names {len(unknown)} images not in the {images.dataset} training "
                        f"set (e.g. {unknown[0]}); {fix}")
    if len(set(paths)) != len(paths):
        raise UserError(f"ranking file {path} lists some images twice; {fix}")
    bad = [(r, c) for r, c in zip(paths, classes) if c != images.class_dirs[images.labels[where[r]]]]
    if bad:
        raise UserError(f"ranking file {path}: {bad[0][0]} is listed under class '{bad[0][1]}'; {fix}")
    if len(paths) != len(images):
        raise UserError(f"ranking file {path} covers {len(paths)} of the {len(images)} training images; {fix}")
    out = torch.empty(len(images), dtype=torch.float64)
    out[[where[r] for r in paths]] = torch.from_numpy(scores.astype(np.float64))
    return out


# ---------------------------------------------------------------------------------------------- selection

def medium_order(n: int, ipc: int) -> list[int]:
    """Indices into a class sorted by ascending score, in pick order (§5.1 item 5): m = ⌈n/2⌉, the k-th pick is
    m + o_k with o_k = 0, +1, −1, +2, −2, … When the walk leaves [0, n) on one side (IPC close to n, or n = 1,
    where the reference would index past the end), it continues on the other side only."""
    if ipc > n:
        raise ValueError(f"ipc {ipc} > n {n}")
    m, picks, k = math.ceil(n / 2), [], 0
    while len(picks) < ipc:
        idx = m + ((k + 1) // 2 if k % 2 else -(k // 2))
        if 0 <= idx < n:
            picks.append(idx)
        k += 1
    return picks


def _ascending(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: scores[i])  # stable: ties keep name order


def _select_top(scores, ipc, gen):
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:ipc]


def _select_min(scores, ipc, gen):
    return _ascending(scores)[:ipc]


def _select_medium(scores, ipc, gen):
    asc = _ascending(scores)
    return [asc[i] for i in medium_order(len(scores), ipc)]


def _select_random(n, ipc, gen):
    return torch.randperm(n, generator=gen)[:ipc].tolist()


# name -> (needs scores, picker(scores | n, ipc, generator) -> indices into the class's name-sorted list)
SELECTORS: dict[str, tuple[bool, Callable]] = {
    "top": (True, _select_top), "min": (True, _select_min), "medium": (True, _select_medium),
    "random": (False, _select_random),
}


def select(images: TrainImages, scores: torch.Tensor | None, criterion: str, ipc: int,
           seed: int = 0) -> list[list[int]]:
    """Per class (label order), the positions of the picked images in pick order."""
    if criterion not in SELECTORS:
        raise UserError(f"unknown --selection '{criterion}' ({', '.join(SELECTORS)})")
    if ipc < 1:
        raise UserError(f"--ipc must be at least 1, got {ipc}")
    needs_scores, pick = SELECTORS[criterion]
    if needs_scores and scores is None:
        raise UserError(f"--selection {criterion} needs scores")
    gen = torch.Generator().manual_seed(seed)   # one stream, classes drawn in label order
    out = []
    for c, pos in enumerate(images.class_positions()):
        if ipc > len(pos):
            raise UserError(f"class '{images.class_dirs[c]}' has only {len(pos)} training images, "
                            f"--ipc {ipc} asked for")
        arg = [float(scores[p]) for p in pos] if needs_scores else len(pos)
        out.append([pos[i] for i in pick(arg, ipc, gen)])
    return out


# ---------------------------------------------------------------------------------------------- output

def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_selection(out: Path, images: TrainImages, teacher: Teacher, picks: list[list[int]],
                    scores: torch.Tensor | None, *, folder: bool = True, tensors: bool = False,
                    resize: str = "delt", batch_size: int = 256, workers: int = 0, manifest: dict | None = None,
                    show_progress: bool = False) -> dict:
    """Write the picked images (class folders and/or tensor files) and `selection.json`; returns the manifest.

    Class folders are built in a temporary folder next to `out` and renamed into place one by one (an existing
    class folder is replaced); the manifest is removed first and written last, so an interrupted run never
    leaves a manifest that describes half-written files."""
    out.mkdir(parents=True, exist_ok=True)
    _remove(out / "selection.json")
    ipc, R = len(picks[0]), teacher.resolution
    slot = {p: (c, k) for c, ps in enumerate(picks) for k, p in enumerate(ps)}
    positions = [p for ps in picks for p in ps]
    pick_scores = {p: float(scores[p]) for p in positions} if scores is not None else {}
    need_pixels = tensors or scores is None
    # uint8 until saved; only kept whole for tensor files (random picks without them are scored chunk by chunk)
    pixels = torch.empty(ipc, len(picks), images.channels, R, R, dtype=torch.uint8) if tensors else None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    pool = ThreadPoolExecutor(workers) if workers > 0 and need_pixels else None
    try:
        if folder:
            for d in images.class_dirs:
                (tmp / d).mkdir()
        it = progress(images.read(positions), total=len(positions), desc="writing",
                      disable=None if show_progress else True)
        for chunk in _chunks(it, batch_size):
            if folder:
                for p, data in chunk:
                    c, k = slot[p]
                    images.write_copy(p, data, tmp / images.class_dirs[c] / f"{k:03d}_{images.file_name(p)}")
            if need_pixels:
                px = _decode_chunk(images, chunk, R, resize, pool)
                if pixels is not None:
                    for (p, _), img in zip(chunk, px):
                        c, k = slot[p]
                        pixels[k, c] = img
                if scores is None:  # random picks: score just these images, for the manifest
                    labels = torch.tensor([images.labels[p] for p, _ in chunk])
                    for (p, _), s in zip(chunk, true_class_scores(teacher, px, labels).tolist()):
                        pick_scores[p] = s
        if folder:  # swap the class folders in; old ones go to a trash folder next to `out`
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            try:
                for d in images.class_dirs:
                    if (out / d).exists() or (out / d).is_symlink():
                        os.replace(out / d, trash / d)
                    os.replace(tmp / d, out / d)
            finally:
                shutil.rmtree(trash, ignore_errors=True)
    finally:
        if pool is not None:
            pool.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    written = []
    if tensors:  # DWA's CIFAR init layout (§4.4): ipc index k -> one image per class, class order, normalised
        for k in range(ipc):
            atomic_torch_save(teacher.normalize(pixels[k].float() / 255.0).contiguous(), out / f"tensor_{k}.pt")
            written.append(f"tensor_{k}.pt")
    for stale in out.glob("tensor_*.pt"):  # files of an earlier run with a larger IPC or another format
        if stale.name not in written:
            stale.unlink()

    doc = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
        **{k: v for k, v in (manifest or {}).items() if k not in ("format", "version")},
        "arch": teacher.arch, "dataset": images.dataset, "resolution": R, "channels": images.channels,
        "num_classes": len(images.class_dirs), "mean": list(teacher.mean), "std": list(teacher.std),
        # label order = teacher output order; equal to the sorted folder names for every dataset whose registry
        # order is sorted (all but the fixed-wnid ImageNet subsets).
        "class_dirs": list(images.class_dirs), "class_names": list(images.class_names),
        "ipc": ipc, "folder": folder, "tensor_files": written, "resize": resize,
        "picks": {images.class_dirs[c]: [{"file": f"{k:03d}_{images.file_name(p)}", "img_path": images.rel_paths[p],
                                          "score": pick_scores.get(p)} for k, p in enumerate(ps)]
                  for c, ps in enumerate(picks)},
    }
    atomic_write_json(doc, out / "selection.json")
    return doc


# ------------------------------------------------------------------------------------------------ checks

def check_teacher_fits(teacher: Teacher, images: TrainImages, log: RunLog) -> None:
    """The teacher's outputs must line up with the dataset's classes (§9.1 item 19)."""
    if teacher.channels != images.channels:
        raise UserError(f"the teacher takes {teacher.channels}-channel input, {images.dataset} has "
                        f"{images.channels} channels")
    if teacher.num_classes != len(images.class_dirs):
        raise UserError(f"the teacher has {teacher.num_classes} outputs but the {images.dataset} training set has "
                        f"{len(images.class_dirs)} class folders; check --dataset/--data-path")
    if teacher.class_names and images.class_names and tuple(teacher.class_names) != tuple(images.class_names):
        log.info("warning: the teacher's recorded class names differ from the dataset's; make sure the class "
                 "order matches (decoupled.md §9.1 item 19)")


def check_output_dir(out: Path, images: TrainImages) -> None:
    """Refuse an output folder whose class folders would be the dataset's own (they are replaced)."""
    raw = images.raw
    if not isinstance(raw, FileSplit) or raw.archive is not None:
        return
    o = out.expanduser().resolve()
    firsts: dict[int, Path] = {}
    for f, y in zip(raw.files, raw.labels):
        firsts.setdefault(y, Path(f))
    for y, f in firsts.items():
        if (o / images.class_dirs[y]) in f.resolve().parents:
            raise UserError(f"--out {out} holds the dataset's own class folder {f.parent}; choose another folder")


# --------------------------------------------------------------------------------------------------- run

def rank_and_select(teacher_path: Path, data_path: Path, out: Path, *, ipc: int, selection: str = "medium",
                    dataset: str | None = None, arch: str | None = None, norm: str | None = None,
                    res: int | None = None, seed: int = 0, ranking_file: Path | None = None,
                    store_rank_file: bool = False, fmt: str = "folder", resize: str = "delt", batch_size: int = 256,
                    workers: int = 0, device: str = "auto", download: bool = False, quiet: bool = True,
                    train_subset: int | None = None, cache: bool = True, cache_dir: Path | None = None,
                    max_memory_gb: float = 4.0) -> dict:
    """The whole stage; returns the manifest written to `out/selection.json`.

    The ranking pass reads the split's preprocessed pixels from the decoded cache (`cached_pixels`; built on the
    first full ranking of a file dataset, `cache=False` to neither read nor write it); `train_subset` ranks and
    selects among that many seeded random images per class."""
    log = RunLog(None, quiet=quiet)
    if selection not in SELECTORS:
        raise UserError(f"unknown --selection '{selection}' ({', '.join(SELECTORS)})")
    if fmt not in FORMATS:
        raise UserError(f"unknown --format '{fmt}' ({', '.join(FORMATS)})")
    if resize not in RESIZERS:
        raise UserError(f"unknown --resize '{resize}' ({', '.join(RESIZERS)})")
    if ipc < 1:
        raise UserError(f"--ipc must be at least 1, got {ipc}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise UserError(f"--workers must be >= 0, got {workers}")
    dev = resolve_device(device)
    teacher_path, out = Path(teacher_path), Path(out)

    images = None
    if dataset is not None:  # index first, so a foreign checkpoint of an ImageFolder dataset learns its class count
        images = list_train_images(dataset, data_path, download)
    teacher = load_teacher(teacher_path, arch=arch, dataset=dataset, norm=norm,
                           num_classes=len(images.class_dirs) if images else None, resolution=res, device=dev)
    if images is None:
        images = list_train_images(teacher.dataset, data_path, download)
    check_teacher_fits(teacher, images, log)
    check_output_dir(out, images)
    if train_subset is not None:
        images = train_subset_of(images, train_subset, seed)
    for c, pos in enumerate(images.class_positions()):  # before the (long) ranking pass
        if ipc > len(pos):
            raise UserError(f"class '{images.class_dirs[c]}' has only {len(pos)} training images, "
                            f"--ipc {ipc} asked for")
    log.info(f"{images.dataset}: {len(images)} training images in {len(images.class_dirs)} classes; teacher "
             f"{teacher.arch} at {teacher.resolution}px, mean {list(teacher.mean)} std {list(teacher.std)}")

    rank_path = Path(ranking_file) if ranking_file is not None else out / "ranking.csv"
    reuse = ranking_file is not None and not store_rank_file and rank_path.is_file()  # §5.1 item 4
    needs_scores = SELECTORS[selection][0] or ranking_file is not None or store_rank_file
    scores = None
    if reuse:
        scores = read_ranking(rank_path, images)
        log.info(f"re-using the ranking in {rank_path} (pass --store-rank-file to recompute it)")
    elif needs_scores:
        # a subset reads the cache when it exists but does not decode the whole split to build it
        pixels = cached_pixels(images, teacher.resolution, resize, workers=workers, batch_size=batch_size,
                               cache_dir=cache_dir, max_gb=max_memory_gb, build=train_subset is None,
                               show_progress=not quiet) if cache else None
        with step(f"ranking {len(images)} training images with the teacher", quiet=quiet):
            scores = score_images(teacher, images, batch_size=batch_size, workers=workers, resize=resize,
                                  show_progress=not quiet, pixels=pixels)
        write_ranking(ranking_table(images, scores), rank_path)
        log.info(f"ranking written to {rank_path}")

    picks = select(images, scores, selection, ipc, seed)
    folder, tensors = FORMATS[fmt]
    config = dict(teacher=str(teacher_path.resolve()), data_path=str(Path(data_path).resolve()),
                  selection=selection, seed=seed, ranking_file=str(rank_path) if scores is not None else None,
                  norm=norm, output_format=fmt, **({"train_subset": train_subset} if train_subset else {}))
    doc = write_selection(out, images, teacher, picks, scores, folder=folder, tensors=tensors, resize=resize,
                          batch_size=batch_size, workers=workers, manifest=config, show_progress=not quiet)
    atomic_write_json(dict(config, dataset=images.dataset, arch=teacher.arch, ipc=ipc, resize=resize,
                           batch_size=batch_size, workers=workers, device=str(dev), res=res,
                           store_rank_file=store_rank_file, out=str(out)), out / "config.json")
    mean_score = np.mean([e["score"] for v in doc["picks"].values() for e in v])
    log.info(f"{selection}: {ipc} per class, mean true-class probability of the picks {mean_score:.4f} -> {out}")
    return doc


# ------------------------------------------------------------------------------------------------ CLI

app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})


@app.command()
@cli_errors
def main(
    teacher: Path = typer.Option(..., "--teacher", "--ranker-path", "--ranker_path", help="Teacher checkpoint "
                                 "(ranker): a ddtoolkit teacher file, or a foreign one (SRe2L/DWA ckpt.pth, RDED "
                                 "{dataset}_{arch}.pth) together with --arch and --dataset."),
    arch: Optional[str] = typer.Option(None, "--arch", "--ranker-arch", "--ranker_arch", help="Network of a foreign "
                                       "checkpoint (e.g. resnet18_modified, conv3); checked against ours."),
    norm: Optional[str] = typer.Option(None, "--norm", help="Normalisation of a foreign checkpoint: "
                                       f"{', '.join(NORMALIZATIONS)} (default: the dataset's). DELT ranks with "
                                       "ImageNet stats for every dataset, so load RDED teachers with --norm imagenet "
                                       "to reproduce it (decoupled.md §9.1 item 14). Ours carry their own."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset name (default: the teacher's), "
                                          "e.g. CIFAR10, TinyImageNet, ImageNet, ImageFolder."),
    data_path: Path = typer.Option(..., "--data-path", "--data_path", help="Dataset root (holding train/<class>/, "
                                   "the raw files, or a tar archive such as /work/shared/data/cifar10); the "
                                   "training split is ranked."),
    out: Path = typer.Option(..., "--out", "--output-dir", "--output-path", "--output_dir", "--output_path",
                             help="Output folder: <class_dir>/{k:03d}_<file>, tensor_{k}.pt, selection.json, "
                                  "config.json, ranking.csv. Existing class folders there are replaced."),
    selection: str = typer.Option("medium", "--selection", "--selection-criteria", "--selection_criteria",
                                  help="Per-class rule: medium (DELT: closest in rank to the median, alternating "
                                       "above/below), top (most confident first), min (least confident first), "
                                       "random (seeded; DWA's real init, needs no ranking)."),
    ipc: int = typer.Option(..., "--ipc", help="Images per class to select; more than a class holds is an error."),
    seed: int = typer.Option(0, "--seed", help="Seed of --selection random."),
    ranking_file: Optional[Path] = typer.Option(None, "--ranking-file", "--ranking_file", help="Ranking CSV (score, "
                                                "img_path, class). Re-used when it exists (unless --store-rank-file); "
                                                "else computed and written there. Default: <out>/ranking.csv, "
                                                "always recomputed."),
    store_rank_file: bool = typer.Option(False, "--store-rank-file", "--store_rank_file", help="Recompute the "
                                         "ranking and overwrite --ranking-file even if it exists."),
    fmt: str = typer.Option("folder", "--format", help="folder: class folders of file copies; tensor: only DWA's "
                            "tensor_{k}.pt files; both."),
    tensor_files: bool = typer.Option(False, "--tensor-files", "--tensor_files", help="Also write tensor_{k}.pt "
                                      "(DWA CIFAR init: [C, channels, R, R], k-th pick of every class, in the "
                                      "teacher's normalised space); same as --format both."),
    resize: str = typer.Option("delt", "--resize", help="Preprocessing for scores and tensor files: delt (shorter "
                               "side to ⌊R/7⌋·8, centre crop R; a no-op at 32 px) or square (DWA: stretch to R×R)."),
    res: Optional[int] = typer.Option(None, "--res", help="Input size of a foreign checkpoint when the dataset does "
                                      "not fix one (ImageFolder)."),
    batch_size: int = typer.Option(256, "--batch-size", "--batch_size", help="Images per teacher forward."),
    workers: int = typer.Option(0, "--workers", "-j", help="Threads decoding images (0: decode in the main thread)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    download: bool = typer.Option(False, "--download", help="Try torchvision's downloader when files are missing."),
    train_subset: Optional[int] = typer.Option(None, "--train-subset", help="Rank and select among this many seeded "
                                               "(--seed) random training images per class instead of all of them."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Keep the preprocessed training pixels of a file "
                               "dataset in the decoded-image cache ($DDT_CACHE, default ~/.cache/ddtoolkit) after "
                               "the first full ranking, so later rankings (another teacher, selection or IPC) "
                               "decode no image."),
    max_memory_gb: float = typer.Option(4.0, "--max-memory-gb", help="Splits larger than this (decoded) are not "
                                        "cached: they are decoded batch by batch as before."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress messages."),
):
    """Rank real training images by the teacher's true-class probability and copy a per-class selection
    (DELT medium/top/min, or DWA's seeded random real init)."""
    require_at_least({"--ipc": ipc, "--batch-size": batch_size, "--res": res, "--train-subset": train_subset})
    check_writable(out, "--out")
    if tensor_files and fmt == "folder":
        fmt = "both"
    refuse_overlap(out, "--out", {"--data-path": data_path})
    with run_lock(out.parent, "rank_select.py", f".{out.name}.lock"):   # one writer per output folder
        rank_and_select(teacher, data_path, out, ipc=ipc, selection=selection, dataset=dataset, arch=arch, norm=norm,
                        res=res, seed=seed, ranking_file=ranking_file, store_rank_file=store_rank_file, fmt=fmt,
                        resize=resize, batch_size=batch_size, workers=workers, device=device, download=download,
                        quiet=quiet, train_subset=train_subset, cache=cache, max_memory_gb=max_memory_gb)


if __name__ == "__main__":
    app()
