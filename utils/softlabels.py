"""Stored FKD-style soft labels (decoupled.md §6.1, §6.2, §9.1 item 16, §9.3): the format `relabel.py` writes and
the reader that a knowledge-distillation trainer replays.

Layout of a relabel folder `<out>`:
  relabel.json                  the manifest (written first, `complete` set once every batch file exists)
  images_stats.pt               per-image channel means of the set (fingerprint for sets that are not uint8-exact)
  config.json                   the resolved command line
  epoch_{e:03d}/batch_{b:05d}.pt one record per stored batch: a plain dict (weights_only-loadable) of
      epoch, batch (ints); indices [n] long (into the set's order); coords [n, 4] float32 = (top/H, left/W,
      height/H, width/W) of the RandomResizedCrop in the source image; flip [n] bool; mix (0 none, 1 cutmix,
      2 mixup); perm [n] long (the mix partner of each position; identity when mix is 0); lam (float, the sampled
      λ; for cutmix not corrected for the clipped box, §6.1); box [4] long = (a1, b1, a2, b2), rows a1:a2 and
      columns b1:b2 of the view (cutmix only); and either
        logits [n, C] (float16, or float32 with --fp32): the teacher's raw logits on the mixed view (no temperature),
      or, with top-k,
        topk_values [n, k], topk_indices [n, k] (int16, int32 above 32767 classes), and
        tail_lse [n, m] float32: logsumexp over the NON-kept classes of logits / T, for each T of the manifest's
        `topk_temperatures` (what the reader needs to make the kept probabilities exact, see below).

Replay is one function, `replay`, which relabel.py itself calls to build the teacher's input: per image, crop the
recorded box from the source image and resize it to R x R (bilinear, antialiased, `F.interpolate` on one image at a
time, so a view never depends on the rest of its batch), flip if recorded, then mix the batch with the recorded
partner permutation, λ and box. Given the same normalised images on the same device type (`manifest["view_device"]`),
the views a trainer gets are bit-identical to what the teacher saw. Unlike the reference (§6.1 [compat]: a patched
PyTorch fetcher, equal batch sizes, a trailing slash on --fkd-path), the reader is a plain loop over batch records
(the "batch-level dataset" of §6.1): batch b of epoch e is one record, whatever the trainer's own batch size.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import weakref
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from utils.augment import RRC_ATTEMPTS, RRC_RATIO, apply_flip, crop_resize, rrc_boxes
from utils.errors import UserError
from utils.io import atomic_write_bytes, safe_torch_load

FORMAT = "ddtoolkit-softlabels"
VERSION = 1
MANIFEST = "relabel.json"
STATS_FILE = "images_stats.pt"
MIX_CODES = {"none": 0, "cutmix": 1, "mixup": 2}
MIX_NAMES = {v: k for k, v in MIX_CODES.items()}
CROP_RATIO = RRC_RATIO       # torchvision RandomResizedCrop's default aspect-ratio range (§6.1)
CROP_TRIES = RRC_ATTEMPTS    # torchvision's number of tries before the centre-crop fallback
DTYPES = {"float16": torch.float16, "float32": torch.float32}


# ------------------------------------------------------------------------------------------------ layout

def epoch_dir(root: str | Path, epoch: int) -> Path:
    return Path(root) / f"epoch_{epoch:03d}"


def batch_file(root: str | Path, epoch: int, batch: int) -> Path:
    return epoch_dir(root, epoch) / f"batch_{batch:05d}.pt"


def save_record(record: dict, path: str | Path) -> None:
    """Write a batch record atomically with reproducible bytes. `torch.save` names the zip archive after the file
    it writes, and an atomic write goes through a randomly named temp file, so `atomic_torch_save` would make the
    same record differ byte-wise between runs; serialising to memory first fixes the archive name."""
    buf = io.BytesIO()
    torch.save(record, buf)
    data = buf.getvalue()
    atomic_write_bytes(data, path)


def num_batches(num_images: int, batch_size: int) -> int:
    """Batches per epoch; the last one is short when batch_size does not divide N (the reference keeps it)."""
    return -(-num_images // batch_size)


def missing_batches(root: str | Path, epochs: int, batches: int) -> list[tuple[int, int]]:
    """(epoch, batch) units whose record file is absent (one directory listing per epoch)."""
    missing = []
    for e in range(epochs):
        d = epoch_dir(root, e)
        present = set(os.listdir(d)) if d.is_dir() else set()
        missing += [(e, b) for b in range(batches) if f"batch_{b:05d}.pt" not in present]
    return missing


def stored_bytes(root: str | Path, epochs: int, batches: int) -> int:
    total = 0
    for e in range(epochs):
        for b in range(batches):
            f = batch_file(root, e, b)
            if f.is_file():
                total += f.stat().st_size
    return total


# ------------------------------------------------------------------------------------------------ randomness

def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed from the run seed and a work-unit id (§8.2: seeds derived from the unit, so a unit can be
    regenerated alone and the result does not depend on how the work is split)."""
    text = "/".join(str(p) for p in ("ddtoolkit-relabel", seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def epoch_order(num_images: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded permutation of the N images that epoch `epoch` walks through in batches (§6.1's RandomSampler,
    but from a generator seeded per epoch, so an epoch can be regenerated without replaying the ones before it)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    return torch.randperm(num_images, generator=g)


def sample_crops(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float] = CROP_RATIO,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop parameters for n images of height x width, torchvision's rule (§6.1), drawn by the shared
    `utils.augment.rrc_boxes`: up to 10 tries of area = HW * U(scale) and aspect = exp(U(log ratio)),
    w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)); the first try that fits is placed uniformly on
    the integer grid; if none fits, the centre crop of the largest box with the aspect clamped to `ratio`.

    Drawn per image, vectorised: all 10 tries and both position draws are taken for every image (a fixed number
    of draws per image, so the result is the same distribution as torchvision's loop, but not its stream).
    Returns [n, 4] float32 fractions (top/H, left/W, height/H, width/W)."""
    boxes = rrc_boxes(n, height, width, scale, generator, ratio, CROP_TRIES)
    sizes = torch.tensor([height, width, height, width], dtype=torch.float64)
    return (boxes.to(torch.float64) / sizes).float()


def crop_pixels(coords: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Recorded fractions back to integer (top, left, height, width) boxes [n, 4] long."""
    sizes = torch.tensor([height, width, height, width], dtype=torch.float64)
    return torch.round(coords.to(torch.float64).cpu() * sizes).long()


# ------------------------------------------------------------------------------------------------ replay

def make_views(src: torch.Tensor, coords: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image's recorded box and resize it to size x size (bilinear, align_corners False, antialiased as
    PIL's resize is), then flip the flagged views horizontally. One image at a time (`utils.augment.crop_resize`):
    a view depends only on its own image and record, never on the batch it travels with (so replay is
    bit-identical)."""
    boxes = crop_pixels(coords, src.shape[-2], src.shape[-1])
    return apply_flip(crop_resize(src, boxes, size, antialias=True), flip)


def _mix_none(views: torch.Tensor, perm: torch.Tensor, lam: float, box: torch.Tensor | None) -> torch.Tensor:
    return views


def _mix_cutmix(views: torch.Tensor, perm: torch.Tensor, lam: float, box: torch.Tensor | None) -> torch.Tensor:
    a1, b1, a2, b2 = (int(v) for v in box.tolist())
    out = views.clone()
    out[:, :, a1:a2, b1:b2] = views[perm, :, a1:a2, b1:b2]
    return out


def _mix_mixup(views: torch.Tensor, perm: torch.Tensor, lam: float, box: torch.Tensor | None) -> torch.Tensor:
    return views * lam + views[perm] * (1.0 - lam)


MIXERS = {0: _mix_none, 1: _mix_cutmix, 2: _mix_mixup}


def apply_mix(views: torch.Tensor, mix: int, perm: torch.Tensor, lam: float,
              box: torch.Tensor | None = None) -> torch.Tensor:
    """The batch-level mix of §6.1: cutmix pastes rows a1:a2, columns b1:b2 of the partner view; mixup blends
    λ·x + (1 − λ)·x[perm]; none leaves the views as they are."""
    return MIXERS[int(mix)](views, perm.to(views.device), float(lam), box)


def replay(src: torch.Tensor, record: dict, size: int) -> torch.Tensor:
    """The exact teacher input of a record, from the record's source images `src` = images[record["indices"]]
    (normalised space, any device): crops, flips, then the mix. relabel.py builds the teacher input with this very
    function, so the views a trainer replays are the views the teacher labelled."""
    views = make_views(src, record["coords"], record["flip"], size)
    return apply_mix(views, record["mix"], record["perm"], record["lam"], record.get("box"))


# ------------------------------------------------------------------------------------------------ top-k

def keep_top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    """FKD's keep_top_k on probabilities (§6.1): keep the k largest, spread the remaining mass uniformly over the
    other C − k classes."""
    c = probs.shape[1]
    vals, idx = probs.topk(k, dim=1)
    rest = (1.0 - vals.sum(dim=1, keepdim=True)).clamp(min=0) / (c - k)
    return rest.expand_as(probs).clone().scatter_(1, idx, vals)


def tail_logsumexp(logits: torch.Tensor, topk_indices: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    """[n, m] float32: logsumexp over the non-kept classes of logits / T, for each T."""
    z = logits.float()
    kept = torch.zeros_like(z, dtype=torch.bool).scatter_(1, topk_indices.long(), True)
    z = z.masked_fill(kept, float("-inf"))
    return torch.stack([torch.logsumexp(z / float(t), dim=1) for t in temperatures], dim=1)


def topk_logits(values: torch.Tensor, indices: torch.Tensor, tail_lse: torch.Tensor, num_classes: int,
                temperature: float) -> torch.Tensor:
    """Full [n, C] float32 logits from stored top-k, such that softmax(logits / T) == keep_top_k(softmax(z / T), k)
    for the teacher's true logits z at this T: the kept entries are the stored logits, every other entry is
    f = T · (tail_lse − log(C − k)), so that the C − k filled entries together carry exp(tail_lse) =
    Σ_tail exp(z_j / T), the true tail mass. Hence the kept probabilities are exact (up to the storage rounding
    of the kept logits) and the remaining mass is spread uniformly. The caller still divides by T."""
    n, k = values.shape
    t = float(temperature)
    fill = t * (tail_lse.float() - math.log(num_classes - k))
    out = fill[:, None].expand(n, num_classes).clone()
    return out.scatter_(1, indices.long(), values.float())


# ------------------------------------------------------------------------------------------------ images

def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], chunk: int = 256) -> torch.Tensor:
    """[0, 1] pixels -> the teacher's space, (x − mean) / std per channel (as `Teacher.normalize`), in chunks so that
    a large set needs no second full-size temporary. Element-wise, so chunking does not change a single bit."""
    m = torch.tensor(list(mean), dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    out = torch.empty_like(pixels)
    for i in range(0, len(pixels), chunk):
        out[i:i + chunk] = (pixels[i:i + chunk] - m) / s
    return out


def load_set_pixels(path: str | Path, dataset: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic set (ours, or an SRe2L/DWA/DELT ImageFolder) as float32 pixels in [0, 1] and labels, in the
    set's order (class folders sorted, files sorted): the order relabel.py's `indices` refer to."""
    from utils.synset import load_synset
    syn = load_synset(path, dataset=dataset)
    images, labels = syn.decode()
    return syn.to_pixels(images).float().contiguous(), labels.long()


def images_fingerprint(pixels: torch.Tensor, chunk: int = 256) -> tuple[str, bool, torch.Tensor]:
    """(sha1 of the images quantised to uint8 in set order, whether they are uint8-exact, per-image channel means
    [N, C] float64). The sha identifies sets read from 8-bit files exactly; the means serve float sets, whose
    quantisation could flip at a rounding boundary after a normalise/denormalise round trip."""
    sha = hashlib.sha1()
    exact = True
    means = []
    for i in range(0, len(pixels), chunk):
        p = pixels[i:i + chunk].detach().to("cpu", torch.float64)
        q = (p * 255).round().clamp(0, 255)
        exact = exact and bool(((p * 255 - q).abs() <= 1e-3).all())
        sha.update(q.to(torch.uint8).contiguous().numpy().tobytes())
        means.append(p.mean(dim=(2, 3)))
    return sha.hexdigest(), exact, torch.cat(means) if means else torch.zeros(0)


def file_sha1(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ reader

_REQUIRED = {"format": str, "version": int, "num_images": int, "num_classes": int, "channels": int,
             "source_size": list, "resolution": int, "epochs": int, "batch_size": int, "mix": str, "topk": int,
             "dtype": str, "seed": int, "mean": list, "std": list, "images_sha1": str, "uint8_exact": bool,
             "complete": bool}


def read_manifest(path: str | Path) -> dict:
    """Parse and check `<path>/relabel.json`; every problem is a one-line UserError."""
    root = Path(path)
    f = root / MANIFEST
    if not root.exists():
        raise UserError(f"soft-label folder not found: {root}")
    if not f.is_file():
        raise UserError(f"{root} holds no {MANIFEST}; it is not a relabel.py output folder")
    try:
        m = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is corrupt ({e}); re-run relabel.py to rewrite it") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        fmt = m.get("format") if isinstance(m, dict) else None
        raise UserError(f"{f} is not a ddtoolkit soft-label manifest (format {fmt!r})")
    for key, typ in _REQUIRED.items():
        if key not in m:
            raise UserError(f"{f} lacks '{key}'; re-run relabel.py to rewrite it")
        if not isinstance(m[key], typ) or (typ is int and isinstance(m[key], bool)):
            raise UserError(f"{f}: '{key}' should be a {typ.__name__}, got {m[key]!r}")
    if m["version"] > VERSION:
        raise UserError(f"{f} has format version {m['version']}; this toolkit reads up to {VERSION}")
    if m["mix"] not in MIX_CODES:
        raise UserError(f"{f}: unknown mix '{m['mix']}' (known: {', '.join(MIX_CODES)})")
    if m["dtype"] not in DTYPES:
        raise UserError(f"{f}: unknown dtype '{m['dtype']}' (known: {', '.join(DTYPES)})")
    for key in ("num_images", "num_classes", "channels", "resolution", "epochs", "batch_size"):
        if m[key] < 1:
            raise UserError(f"{f}: '{key}' must be at least 1, got {m[key]}")
    if not 0 <= m["topk"] < m["num_classes"]:
        raise UserError(f"{f}: topk {m['topk']} is not in [0, {m['num_classes']})")
    if m["topk"] and not m.get("topk_temperatures"):
        raise UserError(f"{f}: top-k labels without 'topk_temperatures'")
    if len(m["mean"]) != m["channels"] or len(m["std"]) != m["channels"] or len(m["source_size"]) != 2:
        raise UserError(f"{f}: mean/std/source_size do not match {m['channels']} channels")
    return m


class SoftLabelReader:
    """Replays a relabel.py folder: per epoch, per stored batch, the views and the teacher's logits.

    `images` passed to `epoch_batches` are the synthetic set's images in the TEACHER's normalised space, in the set's
    order: `reader.load_images()` reads them from the manifest's set exactly as relabel.py did (or normalise pixels
    with `reader.normalize`). They are checked against the manifest's fingerprint once per tensor.

    Temperature: the stored logits are raw (relabel applies no temperature); the caller divides by T. With full
    logits any T is exact. With top-k, the non-kept entries are filled (see `topk_logits`) so that
    softmax(logits / T) equals FKD's keep_top_k of the teacher's softmax(z / T) — kept probabilities exact, the rest
    uniform — for T among `manifest["topk_temperatures"]` (the tail mass depends on T, so relabel stores it per T).
    `temperature=None` uses the first of them; a T that was not stored is refused."""

    def __init__(self, path: str | Path, *, allow_incomplete: bool = False):
        self.path = Path(path)
        self.manifest: dict = read_manifest(self.path)
        m = self.manifest
        self._batches = num_batches(m["num_images"], m["batch_size"])
        if not m["complete"] and not allow_incomplete:
            missing = missing_batches(self.path, m["epochs"], self._batches)
            if missing:
                e, b = missing[0]
                raise UserError(f"{self.path} is incomplete: {len(missing)} of {m['epochs'] * self._batches} batch "
                                f"files are missing (first {batch_file(self.path, e, b).name} of epoch {e}); re-run "
                                "relabel.py with the same flags to finish it")
        self._checked: list = []

    # -- facts
    def num_epochs(self) -> int:
        return int(self.manifest["epochs"])

    def num_batches(self) -> int:
        """Stored batches per epoch."""
        return self._batches

    @property
    def num_images(self) -> int:
        return int(self.manifest["num_images"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    @property
    def temperatures(self) -> list[float]:
        return [float(t) for t in self.manifest.get("topk_temperatures") or []]

    # -- images
    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the teacher's space, with the manifest's mean/std (the operation relabel.py used)."""
        return normalize(pixels, self.manifest["mean"], self.manifest["std"])

    def load_images(self, syn: str | Path | None = None, device: torch.device | str = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised images, labels) of the set relabel.py labelled (or of `syn`, e.g. after moving it)."""
        pixels, labels = load_set_pixels(syn or self.manifest["syn"], self.manifest.get("dataset"))
        return self.normalize(pixels).to(device), labels

    def check_images(self, images: torch.Tensor) -> None:
        """Refuse images that are not the set relabel.py labelled (count, shape, then the fingerprint)."""
        m = self.manifest
        shape = (m["num_images"], m["channels"], *m["source_size"])
        if images.ndim != 4 or images.shape[0] != m["num_images"]:
            raise UserError(f"the soft labels in {self.path} were made for {m['num_images']} images, got a tensor of "
                            f"shape {tuple(images.shape)}")
        if tuple(images.shape) != tuple(shape):
            raise UserError(f"the soft labels in {self.path} were made for images of shape {shape[1:]}, got "
                            f"{tuple(images.shape[1:])}")
        # once per tensor: a weak reference (not the data pointer, which a new tensor may reuse) plus its version
        # counter (an in-place change means a new check)
        self._checked = [(r, v) for r, v in self._checked if r() is not None]
        if any(r() is images and v == images._version for r, v in self._checked):
            return
        mean = torch.tensor(m["mean"], dtype=torch.float64).view(1, -1, 1, 1)
        std = torch.tensor(m["std"], dtype=torch.float64).view(1, -1, 1, 1)
        pixels = _LazyDenorm(images, mean, std)
        sha, _, means = images_fingerprint(pixels)
        if m["uint8_exact"]:
            same = sha == m["images_sha1"]
        else:
            stats = safe_torch_load(self.path / STATS_FILE, "image statistics")
            ref = stats.get("channel_means") if isinstance(stats, dict) else None
            same = isinstance(ref, torch.Tensor) and ref.shape == means.shape and \
                bool(torch.allclose(ref.double(), means, atol=1e-5, rtol=0))
        if not same:
            raise UserError(f"these images are not the set the soft labels in {self.path} were made for (fingerprint "
                            f"mismatch with {m.get('syn')}); pass that set, in its original order, normalised with "
                            "the manifest's mean/std")
        self._checked.append((weakref.ref(images), images._version))

    # -- records
    def read_record(self, epoch: int, batch: int) -> dict:
        """Load and check one batch record (one-line errors for missing, corrupt or malformed files)."""
        f = batch_file(self.path, epoch, batch)
        if not f.is_file():
            raise UserError(f"soft-label batch {f} is missing; re-run relabel.py with the same flags to write it")
        try:
            rec = safe_torch_load(f, "soft-label batch")
        except UserError as e:   # garbage reads as a refused pickle or a truncated zip: say what to do either way
            raise UserError(f"soft-label batch {f} is corrupt or not a relabel record ({str(e)[:120]}...); delete it "
                            "and re-run relabel.py with the same flags to regenerate it") from None
        check_record(rec, f, self.manifest, epoch, batch)
        return rec

    def logits(self, record: dict, temperature: float | None = None) -> torch.Tensor:
        """[n, C] float32 raw logits of a record (top-k filled as described in the class docstring)."""
        if "logits" in record:
            return record["logits"].float()
        temps = self.temperatures
        t = temps[0] if temperature is None else float(temperature)
        match = [i for i, s in enumerate(temps) if math.isclose(s, t, rel_tol=1e-9, abs_tol=1e-12)]
        if not match:
            raise UserError(f"the top-{self.manifest['topk']} soft labels in {self.path} carry tail masses for "
                            f"T in {temps}, not T = {t}; re-run relabel.py with --topk-temperatures including {t}, "
                            "or with --topk 0 (full logits, any T)")
        return topk_logits(record["topk_values"], record["topk_indices"], record["tail_lse"][:, match[0]],
                           self.num_classes, t)

    def epoch_records(self, epoch: int, batches: Iterable[int] | None = None) -> Iterator[dict]:
        self._check_epoch(epoch)
        for b in (range(self._batches) if batches is None else batches):
            if not 0 <= int(b) < self._batches:
                raise UserError(f"batch {b} is not in [0, {self._batches}) for {self.path}")
            yield self.read_record(epoch, int(b))

    def epoch_batches(self, images: torch.Tensor, epoch: int, *, temperature: float | None = None,
                      device: torch.device | str | None = None, batches: Iterable[int] | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (views [n, C, R, R], teacher_logits [n, num_classes] float32) per stored batch of `epoch`.

        images: the set in the teacher's normalised space, in relabel's order ([N, C, H, W]; checked against the
        manifest). Views are computed on `device` (default: images.device); they are bit-identical to the teacher's
        input when that is the device type relabel used (`manifest["view_device"]`). `batches` restricts the epoch to
        some batch ids (e.g. `range(rank, num_batches, world)` under DDP: shard by batch, §8.2). T is applied by the
        caller; `temperature` only selects the stored tail mass of top-k labels (see the class docstring)."""
        self._check_epoch(epoch)
        self.check_images(images)
        dev = torch.device(device) if device is not None else images.device
        for rec in self.epoch_records(epoch, batches):
            src = images[rec["indices"].to(images.device)].to(dev)
            yield replay(src, rec, self.resolution), self.logits(rec, temperature).to(dev)

    def _check_epoch(self, epoch: int) -> None:
        if not 0 <= int(epoch) < self.num_epochs():
            raise UserError(f"{self.path} holds soft labels for {self.num_epochs()} epochs (0.."
                            f"{self.num_epochs() - 1}), not epoch {epoch}; train for at most as many epochs as "
                            "relabel.py stored")


class _LazyDenorm:
    """images -> pixels chunk by chunk (so fingerprinting a large normalised set needs no full-size copy)."""

    def __init__(self, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        self.images, self.mean, self.std = images, mean, std

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, sl: slice) -> torch.Tensor:
        return self.images[sl].detach().to("cpu", torch.float64) * self.std + self.mean


def check_record(rec, f: Path, manifest: dict, epoch: int, batch: int) -> None:
    """A record must have every key with the right shape and dtype; the message names the file and the fix."""
    def bad(what: str) -> UserError:
        return UserError(f"{f} is not a valid soft-label batch ({what}); delete it and re-run relabel.py with the "
                         "same flags to regenerate it")

    if not isinstance(rec, dict):
        raise bad(f"a {type(rec).__name__}, not a dict")
    for key in ("indices", "coords", "flip", "mix", "perm", "lam"):
        if key not in rec:
            raise bad(f"no '{key}'")
    if rec.get("epoch", epoch) != epoch or rec.get("batch", batch) != batch:
        raise bad(f"it records epoch {rec.get('epoch')} batch {rec.get('batch')}")
    idx = rec["indices"]
    if not isinstance(idx, torch.Tensor) or idx.ndim != 1 or idx.dtype != torch.long or len(idx) == 0:
        raise bad("'indices' is not a 1-d long tensor")
    n = len(idx)
    if n > manifest["batch_size"] or int(idx.min()) < 0 or int(idx.max()) >= manifest["num_images"]:
        raise bad("'indices' out of range")
    for key, shape, dtypes in (("coords", (n, 4), (torch.float32,)), ("flip", (n,), (torch.bool,)),
                               ("perm", (n,), (torch.long,))):
        t = rec[key]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype not in dtypes:
            raise bad(f"'{key}' should be {list(shape)} {dtypes[0]}")
    if not (isinstance(rec["mix"], int) and rec["mix"] in MIXERS):
        raise bad(f"unknown mix code {rec['mix']!r}")
    if rec["mix"] == 1:
        box = rec.get("box")
        if not isinstance(box, torch.Tensor) or tuple(box.shape) != (4,):
            raise bad("cutmix without a [4] 'box'")
    c = manifest["num_classes"]
    if manifest["topk"]:
        k, m = manifest["topk"], len(manifest["topk_temperatures"])
        for key, shape in (("topk_values", (n, k)), ("topk_indices", (n, k)), ("tail_lse", (n, m))):
            t = rec.get(key)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                raise bad(f"'{key}' should be {list(shape)}")
    else:
        t = rec.get("logits")
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, c):
            raise bad(f"'logits' should be [{n}, {c}]")
    # a NaN/Inf teacher logit would surface as a NaN loss blamed on the student's lr; a perm outside the batch as an
    # index error; crop fractions outside [0, 1] as views of another image
    for key in ("logits", "topk_values", "coords"):
        t = rec.get(key)
        if isinstance(t, torch.Tensor) and not bool(torch.isfinite(t.float()).all()):
            raise bad(f"'{key}' holds NaN/Inf values")
    if int(rec["perm"].min()) < 0 or int(rec["perm"].max()) >= n:
        raise bad("'perm' out of range")
    if not (isinstance(rec["lam"], (int, float)) and math.isfinite(rec["lam"]) and 0 <= rec["lam"] <= 1):
        raise bad(f"'lam' {rec['lam']!r} is not in [0, 1]")
