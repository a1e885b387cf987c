"""The on-disk synthetic-set format: the only module that knows it.

A synthetic set is one directory:
- `synset.pt`  a plain dict, loadable with `torch.load(weights_only=True)`:
  {"format": "ddtoolkit-synset", "version": 1, "tensors": {name: Tensor}, "labels": int64 Tensor,
   "lr": 0-dim Tensor or None, "soft_labels": Tensor or None}
  `tensors` holds whatever the method learns: "images" for pixel sets, the stored images of a multi-formation
  set, or SPEED's tokens/codes/decoder weights. `labels` are the labels of the STORED rows.
- `meta.json`  dataset, class names, resolution, channels, value space ("pixel" [0,1], "normalized" with the
  dataset mean/std, or "zca" = ZCA of pixels), normalisation, the decoder and its arguments, the storage IPC,
  method and its arguments, seed, git commit, creation time.
- `zca.pt`     the ZCA state (utils/zca.py) when space == "zca", so the set is usable on its own.
- `grid.png`   the images shown back in pixel space, one row per class.
- `images/`    optional ImageFolder export (`export_imagefolder`).
Writes go to a temp directory that is renamed into place: a killed job leaves no half-written set.

Decoders turn the stored tensors into training images: `register_decoder("name")(fn)`, where
`fn(tensors, labels, meta) -> (images, labels)` returns images in the set's value space. `validate.py` never
asks which method made a set. Legacy artefacts are read too: MTT/SPEED `images_*.pt` (+ labels, lr), IDC
`data.pt` and SRe2L/DWA/DELT ImageFolders.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from utils.datasets import DatasetSpec, IMAGE_SUFFIXES, denormalize, get_dataset_spec, to_8bit
from utils.digest import files_digest
from utils.errors import UserError
from utils.io import make_temp_dir, safe_torch_load, torch_save_file, write_fault

FORMAT = "ddtoolkit-synset"
VERSION = 1
SPACES = ("pixel", "normalized", "zca")

Decoder = Callable[[dict, torch.Tensor, dict], "tuple[torch.Tensor, torch.Tensor]"]
DECODERS: dict[str, Decoder] = {}


def register_decoder(name: str) -> Callable[[Decoder], Decoder]:
    """Register a decoder under `name` (the value of meta["decoder"])."""
    def wrap(fn: Decoder) -> Decoder:
        DECODERS[name] = fn
        return fn
    return wrap


@register_decoder("pixels")
def decode_pixels(tensors: dict, labels: torch.Tensor, meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel sets store their training images directly."""
    return tensors["images"], labels


@dataclass
class SyntheticSet:
    tensors: dict[str, torch.Tensor]
    labels: torch.Tensor
    meta: dict
    lr: torch.Tensor | None = None
    soft_labels: torch.Tensor | None = None
    zca_state: dict | None = field(default=None, repr=False)
    files: tuple[Path, ...] = field(default=(), repr=False)   # what load_synset read, for `content_digest`
    source: str | None = None   # where it was read from, for messages

    def _where(self) -> str:
        return f"synthetic set {self.source}" if self.source else "synthetic set"

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def space(self) -> str:
        return self.meta["space"]

    def content_digest(self) -> str | None:
        """A fingerprint of the files this set was read from (None for a set built in memory): the bytes of
        synset.pt, meta.json, zca.pt and legacy tensor files, the size and modification time of image files
        (utils/digest.py). A set replaced at the same path gets another digest."""
        if not self.files:
            return None
        return files_digest(self.files, by_bytes=lambda p: p.suffix.lower() not in IMAGE_SUFFIXES)

    def decode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Training images (in the set's value space) and their labels."""
        name = self.meta.get("decoder", "pixels")
        if name not in DECODERS:
            raise UserError(f"synthetic set uses decoder '{name}', which this toolkit version does not have "
                            f"(known: {', '.join(sorted(DECODERS))})")
        images, labels = DECODERS[name](self.tensors, self.labels, self.meta)
        images, labels = images.detach().float(), labels.detach().long()
        check_decoded(images, labels, self.meta, self._where())
        return images, labels

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images of this set's value space back to pixel space [0, 1] (for grids and exports)."""
        if self.space == "pixel":
            x = images
        elif self.space == "normalized":
            x = denormalize(images, tuple(self.meta["mean"]), tuple(self.meta["std"]))
        else:
            from utils.zca import ZCA
            if self.zca_state is None:
                raise UserError("this ZCA set has no zca.pt beside it; cannot show it in pixel space")
            x = ZCA.from_state_dict(self.zca_state).inverse(images)
        return x.clamp(0, 1)


def make_meta(spec: DatasetSpec, *, space: str, ipc: int, method: str, decoder: str = "pixels",
              decoder_args: dict | None = None, args: dict | None = None, seed: int | None = None,
              zca_eps: float | None = None) -> dict:
    """The meta.json every stage writes; `spec` is the resolved dataset spec (class names filled in)."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}")
    return {
        "format": FORMAT, "version": VERSION,
        "dataset": spec.name, "class_names": list(spec.class_names), "num_classes": spec.num_classes,
        "channels": spec.channels, "resolution": spec.resolution,
        "mean": list(spec.mean), "std": list(spec.std), "space": space,
        "zca": None if zca_eps is None else {"eps": zca_eps, "file": "zca.pt"},
        "ipc": ipc, "decoder": decoder, "decoder_args": decoder_args or {},
        "method": method, "args": args or {}, "seed": seed,
        "git_commit": git_commit(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------- writing

def save_synset(syn: SyntheticSet, out_dir: str | Path, grid: bool = True, overwrite: bool = True,
                in_place: bool = False) -> Path:
    """Write the set directory atomically (temp dir + rename); returns its path.

    `in_place=True` writes the set's files into an existing run directory instead (a stage's output folder that
    also holds its checkpoint and logs): each file is replaced atomically, synset.pt last.
    """
    out = Path(out_dir)
    if in_place:
        out.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out, ".synset.")
        try:
            save_synset(syn, tmp / "set", grid=grid)
            for name in ("meta.json", "zca.pt", "grid.png", "synset.pt"):
                if (tmp / "set" / name).exists():
                    os.replace(tmp / "set" / name, out / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.")
    try:
        payload = {"format": FORMAT, "version": VERSION,
                   "tensors": {k: v.detach().cpu() for k, v in syn.tensors.items()},
                   "labels": syn.labels.detach().cpu().long(),
                   "lr": None if syn.lr is None else syn.lr.detach().cpu().reshape(()),
                   "soft_labels": None if syn.soft_labels is None else syn.soft_labels.detach().cpu()}
        torch_save_file(payload, tmp / "synset.pt")
        (tmp / "meta.json").write_text(json.dumps(syn.meta, indent=2) + "\n")
        if syn.zca_state is not None:
            torch_save_file(syn.zca_state, tmp / "zca.pt")
        if grid:
            images, labels = syn.decode()
            save_grid(syn.to_pixels(images), labels, tmp / "grid.png")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)   # the previous set goes back under its name
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        fault = write_fault(e, out) if isinstance(e, OSError) else None
        if fault is not None:
            raise fault from None
        raise
    return out


def save_grid(pixels: torch.Tensor, labels: torch.Tensor, path: str | Path, max_per_class: int = 20,
              upscale: int | None = None) -> None:
    """PNG grid, one row per class (up to `max_per_class` images), pixel-space input in [0, 1]."""
    pixels = pixels.detach().cpu().float().clamp(0, 1)
    classes = sorted(set(labels.tolist()))
    rows = [pixels[labels == c][:max_per_class] for c in classes]
    n_cols = max(len(r) for r in rows)
    c, h, w = pixels.shape[1:]
    pad = 2
    canvas = torch.ones(c, len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, y:y + h, x:x + w] = img
    arr = (canvas.mul(255).round().byte().permute(1, 2, 0).numpy())
    im = Image.fromarray(arr[..., 0] if c == 1 else arr)
    scale = upscale or (max(1, 64 // h))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    im.save(tmp)
    os.replace(tmp, path)


def export_imagefolder(syn: SyntheticSet, out_dir: str | Path) -> Path:
    """Decoded images as PNG files `<out>/<class index:03d>_<name>/<k:04d>.png` (lossless, pixel space)."""
    images, labels = syn.decode()
    pixels = syn.to_pixels(images)
    out = Path(out_dir)
    tmp = make_temp_dir(out.parent if out.parent.exists() else None, f".{out.name}.")
    counters: dict[int, int] = {}
    for img, y in zip(pixels, labels.tolist()):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(syn.meta["class_names"][y]))
        d = tmp / f"{y:03d}_{name}"
        d.mkdir(exist_ok=True)
        k = counters.get(y, 0)
        counters[y] = k + 1
        arr = img.mul(255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(d / f"{k:04d}.png")
    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(tmp), out)
    return out


# ------------------------------------------------------------------------------------------- reading

def load_synset(path: str | Path, dataset: str | None = None, space: str | None = None,
                factor: int | None = None, zca_state: dict | None = None) -> SyntheticSet:
    """Read a synthetic set: our directory format, or a legacy artefact, and check it (`check_set`): a damaged or
    inconsistent set is one line naming the file, before any training on it.

    Legacy formats carry no metadata, so `dataset` is required for them, and:
    - MTT/SPEED `images_*.pt`: stored in the dataset's normalised space, or ZCA space (pass space="zca" and
      the ZCA state, e.g. refitted with `--zca`);
    - IDC `data.pt` ([images, labels], pixel space); `factor` > 1 selects the multi-formation decoder;
    - SRe2L/DWA/DELT ImageFolder (`new000/class000_id000.jpg`): pixel space.
    """
    syn = _read_synset(Path(path), dataset, space, factor, zca_state)
    syn.source = str(path)
    check_set(syn)
    return syn


def _read_synset(p: Path, dataset: str | None, space: str | None, factor: int | None,
                 zca_state: dict | None) -> SyntheticSet:
    if not p.exists():
        raise UserError(f"synthetic set not found: {p}")
    if (p / "meta.json").is_file() and not (p / "synset.pt").is_file():
        meta = _read_meta(p)
        if meta.get("layout") == "imagefolder":  # recover.py / rank_select.py output: images + a manifest
            return _from_recorded_imagefolder(p, meta, dataset)
    if (p / "synset.pt").is_file() or (p / "meta.json").is_file():
        return _load_native(p)
    if dataset is None:
        raise UserError(f"{p} is not a ddtoolkit synthetic set (no synset.pt/meta.json); "
                        "pass --dataset so it can be read as a legacy MTT/IDC/ImageFolder set")
    spec = get_dataset_spec(dataset)
    if p.is_file() and p.suffix in (".pt", ".pth"):
        obj = safe_torch_load(p, "synthetic set")
        if isinstance(obj, (list, tuple)) and len(obj) == 2:
            return _from_idc(obj, spec, p, factor)
        if isinstance(obj, torch.Tensor):
            return _from_mtt_dir(p.parent, spec, space, zca_state, images_file=p)
        raise UserError(f"{p}: not an IDC [data, targets] list nor an image tensor")
    if p.is_dir():
        if (p / "data.pt").is_file():
            return _from_idc(safe_torch_load(p / "data.pt", "IDC data.pt"), spec, p / "data.pt", factor)
        if list(p.glob("images_*.pt")):
            return _from_mtt_dir(p, spec, space, zca_state)
        if any(d.is_dir() for d in p.iterdir()):
            return _from_imagefolder(p, spec)
    raise UserError(f"{p}: no synthetic set found (expected synset.pt, images_best.pt, data.pt or class folders)")


def _load_native(p: Path) -> SyntheticSet:
    for name in ("synset.pt", "meta.json"):
        if not (p / name).is_file():
            raise UserError(f"synthetic set {p} is incomplete: {name} is missing")
    payload = safe_torch_load(p / "synset.pt", "synthetic set")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{p / 'synset.pt'} is not a ddtoolkit synthetic set")
    _check_payload(payload, p / "synset.pt")
    meta = _read_meta(p)
    _check_meta(meta, p / "meta.json")
    zca_state = safe_torch_load(p / "zca.pt", "ZCA state") if meta.get("space") == "zca" else None
    files = [p / "synset.pt", p / "meta.json"] + ([p / "zca.pt"] if zca_state is not None else [])
    return SyntheticSet(payload["tensors"], payload["labels"], meta, payload.get("lr"),
                        payload.get("soft_labels"), zca_state, files=tuple(f.absolute() for f in files))


def _read_meta(p: Path) -> dict:
    try:
        meta = json.loads((p / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{p / 'meta.json'} is corrupt: {e}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{p / 'meta.json'} is not a JSON object")
    return meta


def _from_recorded_imagefolder(p: Path, meta: dict, dataset: str | None) -> SyntheticSet:
    """An ImageFolder whose meta.json (layout "imagefolder") names its dataset, classes and the teacher's
    normalisation: the images are read in pixel space and the recorded meta is kept (decoupled.md §1.6)."""
    name = meta.get("dataset")
    if dataset is not None and name is not None and get_dataset_spec(dataset).name != get_dataset_spec(name).name:
        raise UserError(f"{p} was made for {name}, not {dataset}")
    spec = get_dataset_spec(dataset or name or "ImageFolder")
    if meta.get("resolution") and meta.get("num_classes"):
        spec = replace(spec, resolution=int(meta["resolution"]), num_classes=int(meta["num_classes"]))
    syn = _from_imagefolder(p, spec)
    counts = torch.bincount(syn.labels, minlength=syn.num_classes)
    recorded = {**syn.meta, **meta, "space": "pixel", "decoder": "pixels", "decoder_args": {},
                "ipc": int(counts.max()), "ipc_min": int(counts.min())}
    return SyntheticSet(syn.tensors, syn.labels, recorded, files=((p / "meta.json").absolute(), *syn.files))


def _legacy_meta(spec: DatasetSpec, labels: torch.Tensor, space: str, method: str, images: torch.Tensor,
                 source: Path, **kw) -> dict:
    n_classes = spec.num_classes or int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=n_classes)
    names = list(spec.class_names) or [str(i) for i in range(n_classes)]
    meta = make_meta(spec, space=space, ipc=int(counts.max()), method=method, **kw)
    meta.update(class_names=names, num_classes=n_classes, channels=int(images.shape[1]),
                resolution=int(images.shape[-1]), source=str(source))
    return meta


def _from_mtt_dir(d: Path, spec: DatasetSpec, space: str | None, zca_state: dict | None,
                  images_file: Path | None = None) -> SyntheticSet:
    """MTT/SPEED: images_<tag>.pt, labels_<tag>.pt, lr_<tag>.pt (tag 'best' preferred, else the highest it)."""
    if images_file is None:
        tags = [f.stem[len("images_"):] for f in d.glob("images_*.pt")]
        tag = "best" if "best" in tags else max(tags, key=lambda t: int(t) if t.isdigit() else -1)
        images_file = d / f"images_{tag}.pt"
    tag = images_file.stem[len("images_"):]
    images = safe_torch_load(images_file, "MTT images")
    labels_file = d / f"labels_{tag}.pt"
    if labels_file.is_file():
        labels = safe_torch_load(labels_file, "MTT labels").long()
    else:  # MTT stores class-major sets; without a labels file, infer them
        n = spec.num_classes
        if not n or len(images) % n:
            raise UserError(f"{images_file}: no labels file and {len(images)} images do not split into {n} classes")
        labels = torch.arange(n).repeat_interleave(len(images) // n)
    lr_file = d / f"lr_{tag}.pt"
    lr = safe_torch_load(lr_file, "MTT lr") if lr_file.is_file() else None
    if isinstance(lr, (float, int)):
        lr = torch.tensor(float(lr))
    space = space or ("zca" if zca_state is not None else "normalized")
    if space == "zca" and zca_state is None:
        raise UserError("this MTT set lives in ZCA space: pass --zca so the ZCA is refitted on the train split")
    _check_shapes(images, labels, spec, images_file)
    meta = _legacy_meta(spec, labels, space, "mtt-legacy", images, images_file,
                        zca_eps=0.1 if space == "zca" else None)
    files = [f.absolute() for f in (images_file, labels_file, lr_file) if f.is_file()]
    return SyntheticSet({"images": images.float()}, labels, meta,
                        None if lr is None else torch.as_tensor(lr).float().reshape(()), None, zca_state,
                        files=tuple(files))


def _from_idc(obj, spec: DatasetSpec, source: Path, factor: int | None) -> SyntheticSet:
    """IDC data.pt: [data, targets], stored images in pixel space; the factor comes from the user."""
    if not (isinstance(obj, (list, tuple)) and len(obj) == 2 and all(isinstance(t, torch.Tensor) for t in obj)):
        raise UserError(f"{source}: an IDC data.pt must hold [data, targets] tensors")
    images, labels = obj[0].float(), obj[1].long()
    _check_shapes(images, labels, spec, source)
    factor = factor or 1
    decoder = "pixels" if factor == 1 else "multiformation"
    meta = _legacy_meta(spec, labels, "pixel", "idc-legacy", images, source, decoder=decoder,
                        decoder_args={"factor": factor} if factor > 1 else {})
    return SyntheticSet({"images": images}, labels, meta, files=(Path(source).absolute(),))


def _from_imagefolder(d: Path, spec: DatasetSpec) -> SyntheticSet:
    """SRe2L/DWA/DELT output: one folder per class in label order (new000, new001, ...)."""
    classes = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))  # .units/, temp dirs
    if spec.num_classes and len(classes) != spec.num_classes:
        raise UserError(f"{d} has {len(classes)} class folders but {spec.name} has {spec.num_classes} classes")
    res = spec.resolution
    images, labels, read = [], [], []
    for y, c in enumerate(classes):
        files = sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"class folder {c} holds no images")
        for f in files:
            try:
                with Image.open(f) as im:
                    im = to_8bit(im).convert("L" if spec.channels == 1 else "RGB")
                    if res and im.size != (res, res):
                        im = im.resize((res, res), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
            except OSError as e:
                raise UserError(f"corrupt or unreadable image {f}: {e}") from None
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            images.append(torch.from_numpy(arr.copy()))
            labels.append(y)
            read.append(f.absolute())
    x = torch.stack(images).float() / 255
    lab = torch.tensor(labels)
    meta = _legacy_meta(spec, lab, "pixel", "imagefolder", x, d)
    return SyntheticSet({"images": x}, lab, meta, files=tuple(read))


def _check_shapes(images: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec, source: Path) -> None:
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{source}: expected images [N,C,H,W] and N labels, got {tuple(images.shape)} and "
                        f"{tuple(labels.shape)}")
    if spec.channels and images.shape[1] != spec.channels:
        raise UserError(f"{source}: images have {images.shape[1]} channels but {spec.name} has {spec.channels}")
    if len(labels) and int(labels.min()) < 0:
        raise UserError(f"{source}: label {int(labels.min())} is out of range for {spec.name}")
    if spec.num_classes and int(labels.max()) >= spec.num_classes:
        raise UserError(f"{source}: label {int(labels.max())} out of range for {spec.name} "
                        f"({spec.num_classes} classes)")


# ------------------------------------------------------------------------------------------- checks
# A set is checked when it is read and when it is decoded, so a damaged or inconsistent file is one line naming it,
# never a NaN loss blamed on the lr, a shape error deep in a network, or a silently wrong label.

_META_TYPES = {"dataset": str, "class_names": list, "num_classes": int, "channels": int, "resolution": int,
               "space": str}


def _check_meta(meta: dict, where: Path | str) -> None:
    for key, kind in _META_TYPES.items():
        if key not in meta:
            raise UserError(f"{where} lacks '{key}'; it is not a complete synthetic-set meta.json")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise UserError(f"{where}: '{key}' must be a {kind.__name__}, got {str(meta[key])[:60]!r}")
    if meta["space"] not in SPACES:
        raise UserError(f"{where}: unknown value space '{meta['space']}' (known: {', '.join(SPACES)})")
    if meta["num_classes"] < 1 or len(meta["class_names"]) != meta["num_classes"]:
        raise UserError(f"{where}: num_classes {meta['num_classes']} does not match its {len(meta['class_names'])} "
                        "class names")
    if meta["channels"] < 1 or meta["resolution"] < 1:
        raise UserError(f"{where}: channels and resolution must be positive, got {meta['channels']} and "
                        f"{meta['resolution']}")
    if meta["space"] == "normalized":
        mean, std = meta.get("mean"), meta.get("std")
        if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == meta["channels"]
                and all(isinstance(s, (int, float)) and s > 0 for s in std)):
            raise UserError(f"{where}: a normalized set needs mean and std lists of {meta['channels']} values "
                            "(std > 0)")


def _nonfinite(name: str, t: torch.Tensor, where: Path | str, chunk: int = 1 << 24) -> None:
    if not t.is_floating_point():
        return
    flat = t.reshape(-1)   # in chunks: an ImageNet-size set must not need a second full-size (boolean) copy
    bad = sum(int((~torch.isfinite(flat[i:i + chunk])).sum()) for i in range(0, flat.numel(), chunk))
    if bad:
        raise UserError(f"{where} holds {bad} NaN/Inf values in {name}: the file is damaged or the run that made "
                        "it diverged; it cannot be trained on")


def _check_payload(payload: dict, where: Path) -> None:
    tensors, labels = payload.get("tensors"), payload.get("labels")
    if not isinstance(tensors, dict) or not tensors:
        raise UserError(f"{where} lacks 'tensors' (a dict of tensors)")
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise UserError(f"{where}: tensors['{name}'] must be a tensor, got {type(t).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise UserError(f"{where} lacks 'labels' (an integer tensor)")
    for name in ("lr", "soft_labels"):
        if payload.get(name) is not None and not isinstance(payload[name], torch.Tensor):
            raise UserError(f"{where}: '{name}' must be a tensor or None, got {type(payload[name]).__name__}")


def check_set(syn: SyntheticSet) -> None:
    """What can be checked without decoding: meta, label type/range/count, stored rows against meta, finite values,
    the learned lr and soft labels. Every loader runs it (`load_synset`); `decode` checks the decoded images."""
    where, meta, labels = syn._where(), syn.meta, syn.labels
    _check_meta(meta, f"{where} (meta)")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.ndim != 1 or not len(labels):
        raise UserError(f"{where}: labels must be a non-empty 1-D integer tensor, got {labels.dtype} of shape "
                        f"{tuple(labels.shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= meta["num_classes"]:
        raise UserError(f"{where}: label {lo if lo < 0 else hi} is out of range for its {meta['num_classes']} "
                        "classes")
    for name, t in syn.tensors.items():
        _nonfinite(f"tensors['{name}']", t, where)
    stored, decoder = syn.tensors.get("images"), meta.get("decoder", "pixels")
    if decoder == "pixels" and stored is not None:   # the stored images are the training images
        check_decoded(stored, labels, meta, where)
    elif decoder == "multiformation" and stored is not None:   # stored at full size, one label per stored image
        if stored.ndim != 4 or stored.shape[1] != meta["channels"]:
            raise UserError(f"{where}: its stored images are {tuple(stored.shape)}, not [N, {meta['channels']}, H, W] "
                            "as its meta says")
        if len(stored) != len(labels):
            raise UserError(f"{where}: {len(stored)} images but {len(labels)} labels")
    if syn.lr is not None:
        _nonfinite("the learned lr", syn.lr, where)
        if syn.lr.numel() != 1 or float(syn.lr) <= 0:
            raise UserError(f"{where}: the learned lr must be one positive number, got {syn.lr.flatten()[:3].tolist()}")
    if syn.soft_labels is not None:
        _nonfinite("soft_labels", syn.soft_labels, where)
        if syn.soft_labels.ndim != 2 or syn.soft_labels.shape[1] != meta["num_classes"]:
            raise UserError(f"{where}: soft_labels of shape {tuple(syn.soft_labels.shape)} do not give "
                            f"{meta['num_classes']} class scores per image")


def check_decoded(images: torch.Tensor, labels: torch.Tensor, meta: dict, where: str) -> None:
    """Decoded training images against the set's meta: [N, channels, resolution, resolution], one label each, in
    range, finite."""
    expected = (meta["channels"], meta["resolution"], meta["resolution"])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise UserError(f"{where}: its images are {tuple(images.shape[1:])} but its meta says {expected}")
    if len(images) != len(labels):
        raise UserError(f"{where}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= meta["num_classes"]):
        raise UserError(f"{where}: a label is out of range for its {meta['num_classes']} classes")
    _nonfinite("its images", images, where)


def check_compatible(syn: SyntheticSet, spec: DatasetSpec) -> None:
    """A set made for another dataset, class count or resolution is refused before any training."""
    m = syn.meta
    if m["dataset"] != spec.name:
        raise UserError(f"synthetic set was made for {m['dataset']}, not {spec.name}")
    if m["num_classes"] != spec.num_classes:
        raise UserError(f"synthetic set has {m['num_classes']} classes, {spec.name} has {spec.num_classes}")
    images, _ = syn.decode()
    if images.shape[-1] != spec.resolution or images.shape[1] != spec.channels:
        raise UserError(f"synthetic images are {tuple(images.shape[1:])}, {spec.name} data is "
                        f"({spec.channels}, {spec.resolution}, {spec.resolution}); pass --res to match")


def pixel_set(images_pixels: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec, method: str, **meta_kw
              ) -> SyntheticSet:
    """Convenience: a pixel-space set (e.g. a coreset) in our format."""
    ipc = int(torch.bincount(labels, minlength=spec.num_classes).max())
    meta = make_meta(spec, space="pixel", ipc=ipc, method=method, **meta_kw)
    return SyntheticSet({"images": images_pixels.float()}, labels.long(), meta)


# Decoders defined in their own modules register themselves on import; import them here so that loading any set
# finds them (utils.formation imports register_decoder from this module, which is already defined above).
import utils.formation  # noqa: E402,F401  (registers "multiformation")
import utils.speed  # noqa: E402,F401  (registers the "speed" decoder)
