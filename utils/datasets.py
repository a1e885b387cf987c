"""The dataset registry: name -> channels, resolution, classes, normalisation, class order and reader.

Constants follow the specs: idc_dream.md §6, speed.md §1.1 and §8, decoupled.md §1.1.
Readers take the standard raw files offline (`--data-path`):
- MNIST / FashionMNIST: idx files (`train-images-idx3-ubyte[.gz]`, ...), as torchvision or Debian store them;
- CIFAR-10/100: the official python batches (`cifar-10-batches-py/`, `cifar-100-python/`), or an ImageFolder tree
  `train/<class>/*` + `test/<class>/*`, or a `.tar.gz` holding such a tree (e.g. ../shared/data/cifar10);
- SVHN: `train_32x32.mat` / `test_32x32.mat` (needs scipy);
- TinyImageNet: the official `tiny-imagenet-200` layout, including its flat `val/images` + `val_annotations.txt`;
- ImageNet-1K and its subsets: ImageFolder `train/<wnid>/` and `val/<wnid>/`;
- ImageFolder: any `train/<class>/` + `test|val/<class>/` tree.
With `download=True` torchvision's downloader is tried first for the datasets it knows (needs internet).

Images are returned as uint8 tensors [N, C, R, R] in pixel space; `normalize` maps them to the network's input
space with the dataset's mean/std. Whole-split loads of file-based datasets are cached as one tensor file.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from utils.digest import files_digest, tensor_checksum
from utils.errors import UserError
from utils.io import atomic_torch_save
from utils.progress import human_bytes, progress as progress_bar, step

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
DIGIT_CLASSES = tuple(str(i) for i in range(10))
# CIFAR-100 fine labels; the official label order is alphabetical.
CIFAR100_CLASSES = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
wardrobe whale willow_tree wolf woman worm""".split())
assert len(CIFAR100_CLASSES) == 100 and list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)

# speed.md §8: ImageNet subsets as wnids, in label order (position = label).
IMAGENET_SUBSETS = {
    "imagenette": "n01440764 n02102040 n02979186 n03000684 n03028079 n03394916 n03417042 n03425413 n03445777 "
                  "n03888257",
    "imagewoof": "n02096294 n02093754 n02111889 n02088364 n02086240 n02089973 n02087394 n02115641 n02099601 "
                 "n02105641",
    "imagefruit": "n07753275 n07753592 n07745940 n07747607 n07749582 n07768694 n07753113 n07720875 n07718472 "
                  "n07742313",
    "imagemeow": "n02123045 n02123159 n02123394 n02123597 n02124075 n02129165 n02129604 n02128925 n02128757 "
                 "n02127052",
    "imagesquawk": "n01806143 n02007558 n01818515 n02051845 n02056570 n01614925 n01843383 n01518878 n01860187 "
                   "n01819313",
    "imageyellow": "n02206856 n12057211 n07753592 n07749582 n12144580 n04146614 n03530642 n02129165 n01773157 "
                   "n01531178",
}
# idc_dream.md §6: IDC's class100.txt, in file order; ImageNet-10 is its first 10 lines.
IDC_CLASS100 = (
    "n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797 "
    "n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653 "
    "n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531 "
    "n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855 "
    "n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051 "
    "n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 "
    "n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 "
    "n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029 "
    "n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045 "
    "n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622"
).split()


@dataclass
class Split:
    """One split held in memory: uint8 images [N, C, R, R] in pixel space and int64 labels [N]."""
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]


@dataclass
class FileSplit:
    """One split as a list of image files (large datasets): decoded on demand or by `to_memory`."""
    files: list[Path]
    labels: list[int]
    class_names: tuple[str, ...]
    archive: Path | None = None  # files are member names inside this tar archive


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    resolution: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    reader: Callable[["DatasetSpec", Path, str, bool], Split | FileSplit] = field(repr=False)
    class_names: tuple[str, ...] = ()
    wnids: tuple[str, ...] = ()       # ImageNet subsets: folders to take, in label order
    resize: str = "center"            # 'center' (shorter side + centre crop) or 'stretch' (MTT subsets)
    hint: str = ""                    # how to obtain the data, for the missing-data error
    default_paths: tuple[str, ...] = ()
    torchvision_name: str = ""        # torchvision.datasets class used by download=True


# ---------------------------------------------------------------------------------------------- readers

# The stages' --data-path default. Only this path may fall back to a dataset's system-wide copy (`default_paths`): a
# folder the user named is searched alone, so a typo never trains silently on other data.
DEFAULT_DATA_PATH = Path("data")


def _fallbacks(root: Path, spec: DatasetSpec) -> list[Path]:
    return list(map(Path, spec.default_paths)) if root == DEFAULT_DATA_PATH else []


def _candidates(root: Path, spec: DatasetSpec) -> list[Path]:
    """Where flat raw files may sit: the folder itself, torchvision's `raw/` layouts, and, for the default
    `--data-path` only, the system-wide copy."""
    return [root, root / "raw", root / spec.name, root / spec.name / "raw", *_fallbacks(root, spec)]


def _missing(spec: DatasetSpec, what: str, where: list[Path] | Path) -> UserError:
    where = [where] if isinstance(where, Path) else where
    places = ", ".join(str(w) for w in dict.fromkeys(where))
    return UserError(f"{spec.name}: no {what} found in {places}. {spec.hint}".strip())


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("bad magic number")
        dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(dims)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise UserError(f"corrupt idx file {path}: {e}") from None


def _read_idx_dataset(spec: DatasetSpec, root: Path, split: str, download: bool) -> Split:
    prefix = "train" if split == "train" else "t10k"
    found = {}
    for kind, nd in (("images", 3), ("labels", 1)):
        names = [f"{prefix}-{kind}-idx{nd}-ubyte", f"{prefix}-{kind}-idx{nd}-ubyte.gz"]
        hit = next((d / n for d in _candidates(root, spec) for n in names if (d / n).is_file()), None)
        if hit is None:
            raise _missing(spec, f"{names[0]}[.gz]", _candidates(root, spec))
        found[kind] = hit
    images = _read_idx(found["images"])
    labels = _read_idx(found["labels"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{spec.name}: {found['images']} and {found['labels']} do not match")
    return Split(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                 spec.class_names)


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles; allow only what they contain (numpy arrays, builtins)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")


def _load_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise UserError(f"corrupt CIFAR batch file {path}: {e}") from None
    if not isinstance(d, dict) or "data" not in d:
        raise UserError(f"{path} is not a CIFAR python batch (no 'data' entry)")
    return d


def _read_cifar(spec: DatasetSpec, root: Path, split: str, download: bool) -> Split | FileSplit:
    folder = "cifar-10-batches-py" if spec.num_classes == 10 else "cifar-100-python"
    if spec.num_classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key = "labels"
    else:
        names = ["train"] if split == "train" else ["test"]
        label_key = "fine_labels"
    for d in (root / folder, root, root / spec.name / folder):
        if all((d / n).is_file() for n in names):
            batches = [_load_cifar_batch(d / n) for n in names]
            data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
            labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
            images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
            return Split(images, torch.from_numpy(labels), spec.class_names)
    # Otherwise an ImageFolder tree, plain or inside a tar archive (the offline JPEG copy).
    if any((root / s).is_dir() for s in _split_dir_names(split)) or _find_archive(root) is not None:
        return _read_folder_tree(spec, root, split, download)
    raise _missing(spec, f"'{folder}/' python batches or an ImageFolder tree '{split}/<class>/'",
                   [root, root / folder])


def _read_svhn(spec: DatasetSpec, root: Path, split: str, download: bool) -> Split:
    name = "train_32x32.mat" if split == "train" else "test_32x32.mat"
    hit = next((d / name for d in _candidates(root, spec) if (d / name).is_file()), None)
    if hit is None:
        raise _missing(spec, name, _candidates(root, spec))
    try:
        from scipy.io import loadmat
    except ImportError:
        raise UserError("reading SVHN .mat files needs scipy: pip install scipy") from None
    try:
        mat = loadmat(str(hit))
    except Exception as e:  # scipy raises several types for corrupt files
        raise UserError(f"corrupt SVHN file {hit}: {e}") from None
    x = np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8)   # (32,32,3,N) -> (N,3,32,32)
    y = mat["y"].astype(np.int64).reshape(-1) % 10               # SVHN stores digit 0 as label 10
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), spec.class_names)


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _split_dir_names(split: str) -> tuple[str, ...]:
    return ("train",) if split == "train" else ("test", "val", "validation")


def _find_archive(root: Path) -> Path | None:
    if root.is_file() and root.name.endswith((".tar", ".tar.gz", ".tgz")):
        return root
    if root.is_dir():
        archives = sorted(list(root.glob("*.tar.gz")) + list(root.glob("*.tgz")) + list(root.glob("*.tar")))
        return archives[0] if len(archives) == 1 else None
    return None


def _read_folder_tree(spec: DatasetSpec, root: Path, split: str, download: bool) -> FileSplit:
    """`<root>/<split>/<class>/*` (or the same inside a tar archive). Class order: the spec's class names
    when it has them (so CIFAR folders map to the official labels), else sorted folder names."""
    for sub in _split_dir_names(split):
        d = root / sub
        if d.is_dir():
            classes = sorted(p.name for p in d.iterdir() if p.is_dir())
            files_by_class = {c: _list_images(d / c) for c in classes}
            return _file_split(spec, files_by_class, d, None)
    archive = _find_archive(root)
    if archive is not None:
        return _read_tar_tree(spec, archive, split)
    raise _missing(spec, f"ImageFolder tree '{'|'.join(_split_dir_names(split))}/<class>/'", root)


def _read_tar_tree(spec: DatasetSpec, archive: Path, split: str) -> FileSplit:
    try:
        with tarfile.open(archive) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"corrupt archive {archive}: {e}") from None
    for sub in _split_dir_names(split):
        files_by_class: dict[str, list[Path]] = {}
        for n in names:
            parts = Path(n).parts
            if sub in parts[:-2] and Path(n).suffix.lower() in IMAGE_SUFFIXES:
                i = parts.index(sub)
                if len(parts) == i + 3:
                    files_by_class.setdefault(parts[i + 1], []).append(Path(n))
        if files_by_class:
            files_by_class = {c: sorted(v) for c, v in sorted(files_by_class.items())}
            return _file_split(spec, files_by_class, archive, archive)
    raise UserError(f"{spec.name}: archive {archive} holds no '{split}/<class>/<image>' tree")


def _file_split(spec: DatasetSpec, files_by_class: dict[str, list[Path]], where: Path,
                archive: Path | None) -> FileSplit:
    if spec.class_names and spec.name != "ImageFolder":
        unknown = sorted(set(files_by_class) - set(spec.class_names))
        if unknown or len(files_by_class) != spec.num_classes:
            raise UserError(f"{spec.name}: class folders in {where} do not match its {spec.num_classes} classes"
                            f" (unexpected: {unknown[:5]}, found {len(files_by_class)} folders)")
        order = spec.class_names
    else:
        order = tuple(sorted(files_by_class))
    files, labels = [], []
    for label, c in enumerate(order):
        if not files_by_class.get(c):
            raise UserError(f"{spec.name}: class folder '{c}' in {where} holds no images")
        files += files_by_class[c]
        labels += [label] * len(files_by_class[c])
    return FileSplit(files, labels, tuple(order), archive)


def _read_tiny(spec: DatasetSpec, root: Path, split: str, download: bool) -> FileSplit:
    """Official tiny-imagenet-200 layout; class index = sorted wnid order (speed.md §1.1)."""
    base = next((d for d in (root, root / "tiny-imagenet-200") if (d / "train").is_dir()), None)
    if base is None:
        raise _missing(spec, "'train/<wnid>/images/' (tiny-imagenet-200 layout)", [root, root / "tiny-imagenet-200"])
    wnids = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    if len(wnids) != spec.num_classes:
        raise UserError(f"{spec.name}: expected {spec.num_classes} class folders in {base / 'train'}, found "
                        f"{len(wnids)}; for another tree use --dataset ImageFolder")
    if (base / "wnids.txt").is_file():
        listed = sorted((base / "wnids.txt").read_text().split())
        if listed != wnids:
            raise UserError(f"{spec.name}: wnids.txt in {base} does not match the train/ class folders")
    if split == "train":
        files_by_class = {w: _list_images(base / "train" / w) for w in wnids}
    else:
        val = base / "val"
        ann = val / "val_annotations.txt"
        if ann.is_file():  # official flat layout: val/images/*.JPEG + annotation file
            files_by_class = {w: [] for w in wnids}
            for line in ann.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) < 2:
                    continue
                if parts[1] not in files_by_class:
                    raise UserError(f"{spec.name}: {ann} names unknown class {parts[1]}")
                files_by_class[parts[1]].append(val / "images" / parts[0])
            files_by_class = {w: sorted(v) for w, v in files_by_class.items()}
        elif val.is_dir() and all((val / w).is_dir() for w in wnids):  # re-sorted into class folders
            files_by_class = {w: _list_images(val / w) for w in wnids}
        else:
            raise _missing(spec, "val/val_annotations.txt or val/<wnid>/ folders", val)
    return _file_split(replace(spec, class_names=tuple(wnids), num_classes=len(wnids)), files_by_class, base, None)


def _read_imagenet(spec: DatasetSpec, root: Path, split: str, download: bool) -> FileSplit:
    """ImageFolder with wnid folders. Subsets take `spec.wnids` in label order; the full set sorted wnids."""
    d = next((root / s for s in (("train",) if split == "train" else ("val", "test")) if (root / s).is_dir()), None)
    if d is None:
        raise _missing(spec, f"'{'train' if split == 'train' else 'val'}/<wnid>/' folders", root)
    wnids = spec.wnids or tuple(sorted(p.name for p in d.iterdir() if p.is_dir()))
    missing = [w for w in wnids if not (d / w).is_dir()]
    if missing:
        raise UserError(f"{spec.name}: {len(missing)} class folders missing in {d} (e.g. {missing[0]})")
    if not spec.wnids and len(wnids) != spec.num_classes:
        raise UserError(f"{spec.name}: expected {spec.num_classes} class folders in {d}, found {len(wnids)}; "
                        "for another tree use --dataset ImageFolder")
    files_by_class = {w: _list_images(d / w) for w in wnids}
    return _file_split(replace(spec, class_names=tuple(wnids), num_classes=len(wnids)), files_by_class, d, None)


# --------------------------------------------------------------------------------------------- registry

def _spec(name, channels, res, classes, mean, std, reader, class_names=(), **kw) -> DatasetSpec:
    return DatasetSpec(name, channels, res, classes, tuple(mean), tuple(std), reader, tuple(class_names), **kw)


_TV_HINT = "Point --data-path at the raw files, or pass --download on a machine with internet."
DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    _spec("MNIST", 1, 28, 10, (0.1307,), (0.3081,), _read_idx_dataset, DIGIT_CLASSES,
          hint=_TV_HINT, torchvision_name="MNIST"),
    _spec("FashionMNIST", 1, 28, 10, (0.2861,), (0.3530,), _read_idx_dataset, FASHION_CLASSES,
          hint="Offline: apt-get install dataset-fashion-mnist (idx files in /usr/share/datasets/fashion-mnist). "
               + _TV_HINT, default_paths=("/usr/share/datasets/fashion-mnist",), torchvision_name="FashionMNIST"),
    _spec("SVHN", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), _read_svhn, DIGIT_CLASSES,
          hint=_TV_HINT, torchvision_name="SVHN"),
    _spec("CIFAR10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), _read_cifar, CIFAR10_CLASSES,
          hint="Offline JPEG copy: --data-path ../shared/data/cifar10. " + _TV_HINT, torchvision_name="CIFAR10"),
    _spec("CIFAR100", 3, 32, 100, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), _read_cifar,
          CIFAR100_CLASSES, hint=_TV_HINT, torchvision_name="CIFAR100"),
    _spec("TinyImageNet", 3, 64, 200, IMAGENET_MEAN, IMAGENET_STD, _read_tiny,
          hint="Unpack tiny-imagenet-200.zip and point --data-path at it."),
    _spec("ImageNet", 3, 224, 1000, IMAGENET_MEAN, IMAGENET_STD, _read_imagenet,
          hint="Point --data-path at an ImageNet-1K folder holding train/<wnid>/ and val/<wnid>/."),
    _spec("ImageNet10", 3, 224, 10, IMAGENET_MEAN, IMAGENET_STD, _read_imagenet, wnids=tuple(IDC_CLASS100[:10]),
          hint="Point --data-path at an ImageNet-1K folder holding train/<wnid>/ and val/<wnid>/."),
    _spec("ImageNet100", 3, 224, 100, IMAGENET_MEAN, IMAGENET_STD, _read_imagenet, wnids=tuple(IDC_CLASS100),
          hint="Point --data-path at an ImageNet-1K folder holding train/<wnid>/ and val/<wnid>/."),
    *[_spec(k, 3, 128, 10, IMAGENET_MEAN, IMAGENET_STD, _read_imagenet, wnids=tuple(v.split()), resize="stretch",
            hint="Point --data-path at an ImageNet-1K folder holding train/<wnid>/ and val/<wnid>/.")
      for k, v in IMAGENET_SUBSETS.items()],
    _spec("ImageFolder", 3, 0, 0, IMAGENET_MEAN, IMAGENET_STD, _read_folder_tree,
          hint="Expected <data-path>/train/<class>/<image> and <data-path>/test/<class>/<image>."),
]}
_ALIASES = {"fashion": "FashionMNIST", "fmnist": "FashionMNIST", "fashion-mnist": "FashionMNIST",
            "tiny": "TinyImageNet", "tinyimagenet": "TinyImageNet", "tiny-imagenet": "TinyImageNet",
            "imagenet-1k": "ImageNet", "imagenet1k": "ImageNet", "imagenet-10": "ImageNet10",
            "imagenet-100": "ImageNet100", "cifar-10": "CIFAR10", "cifar-100": "CIFAR100",
            "imagefolder": "ImageFolder", "folder": "ImageFolder"}
for _s in list(DATASETS.values()):
    _ALIASES[_s.name.lower()] = _s.name


def get_dataset_spec(name: str) -> DatasetSpec:
    key = _ALIASES.get(name.lower())
    if key is None:
        raise UserError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
    return DATASETS[key]


def list_datasets() -> list[str]:
    return list(DATASETS)


# --------------------------------------------------------------------------------------------- decoding

def to_8bit(im: Image.Image) -> Image.Image:
    """16-bit grayscale images (PIL modes I;16*, and I, which older Pillow gives 16-bit PNGs) scaled to 8 bits,
    v / 257 rounded. PIL's own convert("L"/"RGB") clips them at 255, which saturates all but the darkest pixels.
    Other modes are returned as they are (PIL already reduces 16-bit colour PNGs to 8 bits per channel)."""
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    arr = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8))


def _decode_image(data: bytes | Path, channels: int, resolution: int, resize: str, name: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.load()
            im = to_8bit(im).convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"corrupt or unreadable image {name}: {str(e).splitlines()[0] if str(e) else e}") from None
    w, h = im.size
    if resolution and (w, h) != (resolution, resolution):
        if resize == "stretch":
            im = im.resize((resolution, resolution), Image.BILINEAR)
        else:  # shorter side to `resolution`, then centre crop (idc_dream.md §6)
            s = resolution / min(w, h)
            nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - resolution) // 2, (nh - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(im, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def iter_file_bytes(fs: FileSplit, indices: list[int]) -> Iterator[tuple[int, bytes | Path, str]]:
    if fs.archive is None:
        for i in indices:
            yield i, fs.files[i], str(fs.files[i])
        return
    wanted = {str(fs.files[i]): i for i in indices}
    try:
        with tarfile.open(fs.archive) as tar:
            for m in tar:
                i = wanted.get(m.name)
                if i is not None:
                    f = tar.extractfile(m)
                    yield i, f.read(), f"{fs.archive}:{m.name}"
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"corrupt archive {fs.archive}: {e}") from None


def decode_files(fs: FileSplit, indices: list[int], channels: int, resolution: int, resize: str,
                 progress: bool = False) -> torch.Tensor:
    """Decode the chosen files into one uint8 tensor [len(indices), C, R, R] (in `indices` order)."""
    if not resolution:  # ImageFolder without --res: take the first image's size
        _, data, name = next(iter_file_bytes(fs, indices[:1]))
        resolution = _decode_image(data, channels, 0, resize, name).shape[-1]
    out = torch.empty(len(indices), channels, resolution, resolution, dtype=torch.uint8)
    pos = {i: k for k, i in enumerate(indices)}
    it = iter_file_bytes(fs, indices)
    if progress:
        it = progress_bar(it, total=len(indices), desc=f"decoding {len(indices)} images")
    for i, data, name in it:
        img = _decode_image(data, channels, resolution, resize, name)
        if img.shape[-2:] != out.shape[-2:]:
            raise UserError(f"image {name} is {tuple(img.shape[-2:])}, others are {tuple(out.shape[-2:])}; pass --res")
        out[pos[i]] = img
    return out


# --------------------------------------------------------------------------------------------- loading

def per_class_indices(labels: torch.Tensor, num_classes: int, per_class: int, seed: int) -> torch.Tensor:
    """`per_class` random indices of each class (seeded), class-major, for `--train-subset` and baselines."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < per_class:
            raise UserError(f"class {c} has only {len(idx)} images, {per_class} per class were asked for")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:per_class]].sort().values)
    return torch.cat(picked)


def source_digest(raw: FileSplit) -> str:
    """Every source file of a file split by name, size and modification time (the archive's, for a tar tree):
    what a cache of its decoded images is keyed on. An image edited in place or swapped for another file moves it;
    the root folder's own mtime, the previous key, saw neither."""
    return files_digest([raw.archive] if raw.archive is not None else raw.files, by_bytes=False)


def _cache_key(spec: DatasetSpec, raw: FileSplit, root: Path, split: str, resolution: int) -> str:
    raw_key = (f"{spec.name}|{root.resolve()}|{split}|{resolution}|{spec.channels}|{spec.resize}|"
               f"{'/'.join(raw.class_names)}|{source_digest(raw)}|v2")
    return hashlib.sha1(raw_key.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("DDT_CACHE", Path.home() / ".cache" / "ddtoolkit"))


def _maybe_download(spec: DatasetSpec, root: Path, split: str) -> None:
    if not spec.torchvision_name:
        raise UserError(f"{spec.name} has no downloader; {spec.hint}")
    import torchvision
    cls = getattr(torchvision.datasets, spec.torchvision_name)
    kwargs = {"split": split} if spec.name == "SVHN" else {"train": split == "train"}
    try:
        cls(str(root), download=True, **kwargs)
    except Exception as e:  # network errors come in many types
        raise UserError(f"{spec.name}: download failed ({str(e).splitlines()[0][:120]}); {spec.hint}") from None


def read_split(name: str, data_path: str | Path, split: str, download: bool = False
               ) -> tuple[DatasetSpec, Path, Split | FileSplit]:
    """Find and index a split: small formats come back decoded (`Split`), image trees as a `FileSplit`."""
    spec = get_dataset_spec(name)
    if split not in ("train", "test"):
        raise UserError(f"unknown split '{split}' (train or test)")
    root = Path(data_path).expanduser()
    if not root.exists() and not _fallbacks(root, spec):
        raise UserError(f"{spec.name}: data path {root} does not exist. {spec.hint}")
    try:
        raw = spec.reader(spec, root, split, download)
    except UserError:
        if not download:
            raise
        _maybe_download(spec, root, split)
        raw = spec.reader(spec, root, split, download)
    return spec, root, raw


class FileDataset(torch.utils.data.Dataset):
    """A file split decoded on demand: item i -> (uint8 [C, R, R], label). For splits too large for memory."""

    def __init__(self, fs: FileSplit, channels: int, resolution: int, resize: str):
        self.files, self.labels = fs.files, torch.tensor(fs.labels, dtype=torch.int64)
        self.channels, self.resolution, self.resize = channels, resolution, resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = _decode_image(self.files[i], self.channels, self.resolution, self.resize, str(self.files[i]))
        return img, int(self.labels[i])


def open_split(name: str, data_path: str | Path, split: str = "train", resolution: int | None = None,
               download: bool = False, max_memory_gb: float = 4.0, progress: bool = True
               ) -> tuple[torch.utils.data.Dataset, DatasetSpec]:
    """A split as a torch Dataset of (uint8 image, label): held in memory (a TensorDataset, via `load_split`)
    when its decoded size is under `max_memory_gb`, else streamed from its files (`FileDataset`)."""
    spec, root, raw = read_split(name, data_path, split, download)
    res = resolution or spec.resolution
    if isinstance(raw, FileSplit) and raw.archive is None:
        if not res:
            res = _decode_image(raw.files[0], spec.channels, 0, spec.resize, str(raw.files[0])).shape[-1]
        if len(raw.files) * spec.channels * res * res > max_memory_gb * 2**30:
            spec = replace(spec, class_names=raw.class_names, num_classes=len(raw.class_names), resolution=res)
            return FileDataset(raw, spec.channels, res, spec.resize), spec
    data, spec = load_split(name, data_path, split, resolution=resolution, download=download, progress=progress)
    return torch.utils.data.TensorDataset(data.images, data.labels), spec


def dataset_labels(ds: torch.utils.data.Dataset) -> torch.Tensor:
    """All labels of an `open_split` dataset, without decoding images."""
    return ds.labels if isinstance(ds, FileDataset) else ds.tensors[1]


def take(ds: torch.utils.data.Dataset, idx: torch.Tensor) -> torch.Tensor:
    """The uint8 images at `idx` of an `open_split` dataset, stacked."""
    if isinstance(ds, FileDataset):
        return torch.stack([ds[int(i)][0] for i in idx])
    return ds.tensors[0][idx]


def load_split(name: str, data_path: str | Path, split: str = "train", per_class: int | None = None,
               seed: int = 0, resolution: int | None = None, download: bool = False,
               cache_dir: Path | None = None, progress: bool = True) -> tuple[Split, DatasetSpec]:
    """Load a whole split (or `per_class` seeded random images per class) into one uint8 tensor.

    Returns the split and the resolved spec (for ImageFolder: classes/resolution filled in from the data).
    File-based splits are decoded once and cached in `cache_dir` (default ~/.cache/ddtoolkit) as a tensor file.
    """
    spec, root, raw = read_split(name, data_path, split, download)
    res = resolution or spec.resolution
    if isinstance(raw, FileSplit):
        labels = torch.tensor(raw.labels, dtype=torch.int64)
        num_classes = len(raw.class_names)
        if per_class is not None:
            idx = per_class_indices(labels, num_classes, per_class, seed).tolist()
            images = decode_files(raw, idx, spec.channels, res, spec.resize, progress)
            labels = labels[idx]
        else:
            images = _cached_decode(spec, raw, root, split, res, cache_dir, progress)
        data = Split(images, labels, raw.class_names)
    else:
        data = raw
        if res and data.images.shape[-1] != res:
            data = Split(_resize_uint8(data.images, res), data.labels, data.class_names)
        if per_class is not None:
            idx = per_class_indices(data.labels, len(data.class_names), per_class, seed)
            data = Split(data.images[idx], data.labels[idx], data.class_names)
    spec = replace(spec, class_names=data.class_names, num_classes=len(data.class_names),
                   resolution=int(data.images.shape[-1]))
    return data, spec


CACHE_FORMAT = "ddtoolkit-decoded-split"


def read_cache_entry(path: Path, n: int, channels: int, res: int) -> torch.Tensor | None:
    """The uint8 images [n, channels, res, res] of a cache entry (res 0: any square size), or None. An entry is
    used only when it is whole: our format, the expected dtype and shape, and the checksum written with it (a
    tampered or bit-rotten entry of the right length is rebuilt, never trusted)."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a stale or broken cache entry is rebuilt, never trusted
        return None
    if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT:
        return None
    images = entry.get("images")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        return None
    if images.shape[:2] != (n, channels) or images.shape[2] != images.shape[3] or (res and images.shape[2] != res):
        return None
    return images if entry.get("checksum") == tensor_checksum(images) else None


def write_cache_entry(images: torch.Tensor, path: Path, announce: bool = False) -> bool:
    """Store decoded images with their checksum (atomically); False when that failed, since a read-only cache
    folder is no reason to fail the run. With `announce`, say where the entry went and its size (or that every run
    will decode again)."""
    try:
        atomic_torch_save({"format": CACHE_FORMAT, "images": images, "checksum": tensor_checksum(images)}, path)
    except OSError as e:
        if announce:
            print(f"could not cache the decoded images in {path.parent} ({e.strerror or e}); every run will decode "
                  "them again (set DDT_CACHE to a writable folder)", file=sys.stderr, flush=True)
        return False
    if announce:
        print(f"cached {path} ({human_bytes(path.stat().st_size)})", file=sys.stderr, flush=True)
    return True


def _cached_decode(spec: DatasetSpec, raw: FileSplit, root: Path, split: str, res: int, cache_dir: Path | None,
                   progress: bool) -> torch.Tensor:
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"{spec.name}-{split}-{_cache_key(spec, raw, root, split, res)}.pt"
    images = read_cache_entry(path, len(raw.files), spec.channels, res)
    if images is None:
        with step(f"{spec.name} {split}: decoding {len(raw.files)} images once, to be cached in {cache} "
                  "(set DDT_CACHE to move it)", quiet=not progress):
            images = decode_files(raw, list(range(len(raw.files))), spec.channels, res, spec.resize, progress)
        write_cache_entry(images, path, announce=progress)
    return images


def _resize_uint8(images: torch.Tensor, res: int) -> torch.Tensor:
    x = F.interpolate(images.float(), size=(res, res), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------- value spaces

def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def _channel_stats(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    as_view = lambda v: torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)  # noqa: E731
    return as_view(mean), as_view(std)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Pixel space [0, 1] -> the network's input space, per channel."""
    m, s = _channel_stats(x, mean, std)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m, s = _channel_stats(x, mean, std)
    return x * s + m
