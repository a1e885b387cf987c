"""relabel.py: FKD-style stored soft labels for a synthetic set (SRe2L's relabel step).

    python relabel.py --syn runs/recover/sre2l_in1k_ipc50 --teacher runs/squeeze/in1k_r18/teacher.pt \\
        --epochs 300 --batch-size 1024 --mix-type cutmix --out runs/relabel/sre2l_in1k_ipc50
    torchrun --nproc_per_node 4 relabel.py ...      # same files, batches shared out by id
    python relabel.py ... --topk 100                 # ~10x less storage than full IN-1K logits

Spec: docs/methods/decoupled.md (section numbers below refer to it): §6.1 (procedure and record content), §6.2
(how the labels are consumed), §8.1/§8.2 (sharding by batch id), §9.1 item 16 (storage), §9.3 (top-k).

For every epoch e and every batch b of a seeded permutation of the N images, relabel draws per image a
RandomResizedCrop box (torchvision's rule) and a flip, per batch a mix (cutmix: λ ~ Beta(1, 1), one box; mixup:
λ ~ Beta(0.8, 0.8); partner = a random permutation), builds the views with `utils.softlabels.replay` (the function
the trainer replays them with, so the student later sees bit-identical views), and stores the teacher's raw logits on
them (fp16 by default; optionally only the top k). Record format and the reader: utils/softlabels.py.

Differences from the reference (§6.1, §8.1): all randomness comes from torch Generators seeded from (seed, epoch) for
the batch order and (seed, epoch, batch) for the crops/flips/mix, so any batch can be regenerated alone: re-running
skips the files already written (every write is atomic) and a torchrun/array job writes exactly the files one
process would. No PyTorch patch, no trailing slash, and the trainer's batch size is free.

Resume: every batch file is a checkpoint, so there is no --ckpt-every. A batch file is the whole state of its unit
(nothing carries over between batches: each one's randomness is re-derived from (seed, epoch, batch) and the teacher
is fixed), it is written atomically, and a re-run skips the files present. A run killed at any point (even SIGKILL)
and re-run therefore writes byte-identical files to an uninterrupted one; SIGTERM/SIGUSR1 stop after the batch file
in flight with exit status 143. At most one batch of teacher forwards is lost, and a killed write leaves only a
hidden `.batch_*.tmp` file, which no reader looks at.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import typer

from utils.distributed import (DistInfo, barrier, broadcast_object, cleanup, device_for, init_distributed,
                               resolve_shard, shard)
from utils.errors import UserError
from utils.io import check_writable, atomic_torch_save, atomic_write_json
from utils.misc import require_at_least, RunLog, cli_errors, progress, resolve_device
from utils.signals import StopRequest
from utils.softlabels import (CROP_RATIO, FORMAT, MANIFEST, MIX_CODES, STATS_FILE, VERSION, batch_file,
                              derive_seed, epoch_order, file_sha1, images_fingerprint, load_set_pixels,
                              missing_batches, normalize, num_batches, replay, sample_crops, save_record, stored_bytes,
                              tail_logsumexp)
from utils.teacher import Teacher, load_teacher
from utils.amp import AMP_HELP, OFF, Amp, fp32, resolve_amp
from utils.train import cutmix_box, sample_beta

# --------------------------------------------------------------------------------------------- settings


@dataclass
class RelabelConfig:
    """Every setting that decides the stored labels. Defaults: SRe2L's relabel script (§6.1)."""
    epochs: int = 300
    batch_size: int = 1024
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    mix: str = "cutmix"                  # cutmix | mixup | none
    cutmix_beta: float = 1.0             # λ ~ Beta(1, 1) (§6.1)
    mixup_beta: float = 0.8              # λ ~ Beta(0.8, 0.8) (§6.1)
    topk: int = 0                        # 0: store all logits (the reference); k: the k largest + tail masses
    topk_temperatures: tuple[float, ...] = (20.0,)   # T at which the top-k tail mass is stored (§6.2 uses T = 20)
    fp16: bool = True                    # --use-fp16
    seed: int = 42                       # --fkd-seed
    resolution: Optional[int] = None     # view size R (--input-size); None: the teacher's resolution


def parse_crop_scale(text: str) -> tuple[float, float]:
    parts = [p for p in str(text).replace(" ", "").split(",") if p]
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise UserError(f"--crop-scale must be two numbers 'min,max' in (0, 1], got '{text}'") from None
    return lo, hi


def parse_floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(p) for p in str(text).split(",") if p.strip())
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got '{text}'") from None
    if not vals:
        raise UserError(f"{flag} needs at least one value")
    return vals


def check_config(cfg: RelabelConfig, num_classes: int) -> RelabelConfig:
    """Impossible settings are one-line errors; top-k of all classes means full logits (the reference's
    --keep-topk 1000 on ImageNet-1K)."""
    if cfg.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    lo, hi = cfg.crop_scale
    if not (0 < lo <= hi <= 1):
        raise UserError(f"--crop-scale must satisfy 0 < min <= max <= 1, got {lo},{hi}")
    if cfg.mix not in MIX_CODES:
        raise UserError(f"unknown --mix-type '{cfg.mix}'; known: {', '.join(MIX_CODES)}")
    for name, beta in (("--cutmix-beta", cfg.cutmix_beta), ("--mixup-beta", cfg.mixup_beta)):
        if not (beta > 0 and math.isfinite(beta)):
            raise UserError(f"{name} must be a positive number, got {beta}")
    if cfg.topk < 0:
        raise UserError(f"--topk must be 0 (all logits) or a positive count, got {cfg.topk}")
    if cfg.topk >= num_classes:
        cfg.topk = 0
    if cfg.topk and any(not (t > 0 and math.isfinite(t)) for t in cfg.topk_temperatures):
        raise UserError(f"--topk-temperatures must be positive, got {list(cfg.topk_temperatures)}")
    if cfg.resolution is not None and cfg.resolution < 1:
        raise UserError(f"--input-size must be positive, got {cfg.resolution}")
    return cfg


# --------------------------------------------------------------------------------------------- one batch

def make_record(order: torch.Tensor, epoch: int, batch: int, cfg: RelabelConfig, height: int, width: int,
                size: int) -> dict:
    """The augmentation record of batch `batch` of epoch `epoch` (everything but the labels), from a generator seeded
    from (seed, epoch, batch): crops (§6.1: RandomResizedCrop, scale cfg.crop_scale, ratio (3/4, 4/3)), flips (p 0.5),
    then the mix — λ, the partner permutation and, for cutmix, the box on the size x size view (§6.1 rule: side
    ⌊R·√(1−λ)⌋, centre uniform on the integer grid, centre ± ⌊side/2⌋ clipped; `utils.train.cutmix_box` is that
    rule, and `utils.train.sample_beta` draws λ)."""
    idx = order[batch * cfg.batch_size:(batch + 1) * cfg.batch_size].clone()
    n = len(idx)
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, "batch", epoch, batch))
    coords = sample_crops(n, height, width, cfg.crop_scale, CROP_RATIO, g)
    flip = torch.rand(n, generator=g) < 0.5 if cfg.flip else torch.zeros(n, dtype=torch.bool)
    rec = {"epoch": epoch, "batch": batch, "indices": idx, "coords": coords, "flip": flip,
           "mix": MIX_CODES[cfg.mix]}
    if cfg.mix == "none":
        rec.update(perm=torch.arange(n), lam=1.0)
    elif cfg.mix == "cutmix":
        lam = sample_beta(cfg.cutmix_beta, g)
        perm = torch.randperm(n, generator=g)
        top, bottom, left, right = cutmix_box(size, size, lam, g)
        rec.update(perm=perm, lam=float(lam), box=torch.tensor([top, left, bottom, right], dtype=torch.long))
    else:
        lam = sample_beta(cfg.mixup_beta, g)
        rec.update(perm=torch.randperm(n, generator=g), lam=float(lam))
    return rec


@torch.no_grad()
def teacher_logits(net: torch.nn.Module, views: torch.Tensor, amp: Amp = OFF) -> torch.Tensor:
    """Raw logits (no temperature, §6.1) in float32; the teacher forward under `--amp` (§9.3)."""
    with amp.autocast():
        logits = net(views)
    return fp32(logits)


def label_entries(logits: torch.Tensor, cfg: RelabelConfig) -> dict:
    """What the record stores of the logits: all of them, or the top k plus the tail mass per temperature."""
    dtype = torch.float16 if cfg.fp16 else torch.float32
    logits = logits.float().cpu()
    if not cfg.topk:
        return {"logits": logits.to(dtype)}
    vals, inds = logits.topk(cfg.topk, dim=1)
    index_dtype = torch.int16 if logits.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
    return {"topk_values": vals.to(dtype), "topk_indices": inds.to(index_dtype),
            "tail_lse": tail_logsumexp(logits, inds, cfg.topk_temperatures).float()}


def bytes_per_sample(cfg: RelabelConfig, num_classes: int) -> int:
    b = 2 if cfg.fp16 else 4
    if not cfg.topk:
        return num_classes * b
    return cfg.topk * (b + (2 if num_classes <= 32767 else 4)) + 4 * len(cfg.topk_temperatures)


# --------------------------------------------------------------------------------------------- the output folder

# Manifest entries that may differ between runs writing into the same folder (anything else must match).
_FREE_KEYS = ("complete", "syn", "epochs", "stored_mb", "estimated_mb", "view_device", "created")


def build_manifest(cfg: RelabelConfig, *, syn: str | Path, dataset: str | None, teacher: Teacher,
                   teacher_path: str | Path | None, pixels: torch.Tensor, fingerprint: tuple[str, bool],
                   view_device: str) -> dict:
    n, c, h, w = pixels.shape
    nb = num_batches(n, cfg.batch_size)
    est = cfg.epochs * (n * (bytes_per_sample(cfg, teacher.num_classes) + 33) + nb * 3000) / 2**20
    return {
        "format": FORMAT, "version": VERSION, "complete": False,
        "syn": str(Path(syn).resolve()) if str(syn) else "", "dataset": dataset, "num_images": n,
        "num_classes": teacher.num_classes, "channels": c,
        "source_size": [h, w], "resolution": cfg.resolution or teacher.resolution,
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "batches_per_epoch": nb,
        "crop_scale": list(cfg.crop_scale), "crop_ratio": list(CROP_RATIO), "interpolation": "bilinear-antialias",
        "flip": cfg.flip, "mix": cfg.mix, "cutmix_beta": cfg.cutmix_beta, "mixup_beta": cfg.mixup_beta,
        "topk": cfg.topk, "topk_temperatures": list(cfg.topk_temperatures) if cfg.topk else [],
        "dtype": "float16" if cfg.fp16 else "float32", "temperature": None,   # raw logits: T is the trainer's
        "seed": cfg.seed, "mean": list(teacher.mean), "std": list(teacher.std),
        "teacher": {"path": str(Path(teacher_path).resolve()) if teacher_path else None, "arch": teacher.arch,
                    "dataset": teacher.dataset, "num_classes": teacher.num_classes,
                    "resolution": teacher.resolution, "mean": list(teacher.mean), "std": list(teacher.std),
                    "sha1": file_sha1(teacher_path) if teacher_path and Path(teacher_path).is_file() else None},
        "images_sha1": fingerprint[0], "uint8_exact": fingerprint[1], "view_device": view_device,
        "estimated_mb": round(est, 3), "stored_mb": None,
    }


def settings_diff(old: dict, new: dict) -> list[str]:
    """Keys whose values differ, outside the free ones (teacher path included: a moved teacher is fine)."""
    new = json.loads(json.dumps(new))
    out = []
    for key in sorted(set(old) | set(new)):
        if key in _FREE_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if key == "teacher" and isinstance(a, dict) and isinstance(b, dict):
            a = {k: v for k, v in a.items() if k != "path"}
            b = {k: v for k, v in b.items() if k != "path"}
        if a != b:
            out.append(f"{key}: {a!r} there, {b!r} now")
    return out


def clear_out(out: Path) -> None:
    """--overwrite: remove this stage's own files only (epoch folders, manifest, stats, config)."""
    for d in out.glob("epoch_*"):
        if d.is_dir() and d.name[len("epoch_"):].isdigit():
            shutil.rmtree(d)
    for name in (MANIFEST, STATS_FILE, "config.json"):
        (out / name).unlink(missing_ok=True)


def prepare_out(out: Path, manifest: dict, means: torch.Tensor, config: dict, overwrite: bool) -> dict:
    """Write the manifest (first, with complete = False), the image statistics and config.json; or, for a folder
    relabel already wrote with the same settings, keep it (resume). Returns the manifest in force."""
    out = Path(out)
    if overwrite and out.exists():
        clear_out(out)
    mf = out / MANIFEST
    if out.exists() and any(out.iterdir()) and not mf.is_file():
        raise UserError(f"--out {out} exists and is not a relabel.py folder (no {MANIFEST}); choose another --out or "
                        "empty it")
    if mf.is_file():
        try:
            old = json.loads(mf.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{mf} is corrupt; pass --overwrite to start afresh") from None
        diff = settings_diff(old, manifest) if isinstance(old, dict) and old.get("format") == FORMAT else ["format"]
        if diff:
            raise UserError(f"--out {out} holds soft labels made with other settings ({diff[0]}); pass --overwrite "
                            "to replace them or choose another --out")
        if old.get("epochs") == manifest["epochs"]:
            return old
        manifest = {**old, "epochs": manifest["epochs"], "complete": False, "stored_mb": None,
                    "estimated_mb": manifest["estimated_mb"]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, mf)
    atomic_torch_save({"channel_means": means.float()}, out / STATS_FILE)
    atomic_write_json(config, out / "config.json")
    return manifest


def finalize(out: Path) -> tuple[bool, int, float | None]:
    """Set `complete` once every batch file of every epoch exists; returns (complete, missing, stored MB)."""
    m = json.loads((out / MANIFEST).read_text())
    nb = num_batches(m["num_images"], m["batch_size"])
    missing = missing_batches(out, m["epochs"], nb)
    if missing:
        return False, len(missing), None
    mb = stored_bytes(out, m["epochs"], nb) / 2**20
    if not m.get("complete") or m.get("stored_mb") != round(mb, 3):
        m.update(complete=True, stored_mb=round(mb, 3))
        atomic_write_json(m, out / MANIFEST)
    return True, 0, mb


# --------------------------------------------------------------------------------------------- the run

def check_teacher_input(teacher: Teacher, channels: int, size: int, device: torch.device) -> None:
    if channels != teacher.channels:
        raise UserError(f"the set has {channels}-channel images but the teacher ({teacher.arch}) takes "
                        f"{teacher.channels} channels")
    try:
        with torch.no_grad():
            teacher.net(torch.zeros(1, channels, size, size, device=device))
    except RuntimeError as e:
        raise UserError(f"the teacher {teacher.arch} does not accept {size}x{size} inputs ("
                        f"{' '.join(str(e).split())[:160]}); pass --input-size {teacher.resolution}") from None


def relabel(pixels: torch.Tensor, teacher: Teacher, out: str | Path, cfg: RelabelConfig, *,
            syn: str | Path = "", dataset: str | None = None, teacher_path: str | Path | None = None,
            device: torch.device | str = "cpu", shard_spec: tuple[int, int] = (0, 1),
            info: DistInfo = DistInfo(), overwrite: bool = False, amp: Amp | str | bool = OFF, quiet: bool = True,
            config: dict | None = None) -> dict:
    """Write this shard's batch records of `pixels` ([N, C, H, W] in [0, 1], set order) labelled by `teacher` into
    `out`; returns the final manifest. Under torchrun (`info.enabled`) rank 0 writes the manifest and, after all
    ranks finished, the `complete` flag; otherwise (one process, or an array task) each call does both."""
    out = Path(out)
    device = torch.device(device)
    amp = amp if isinstance(amp, Amp) else resolve_amp(amp, device)
    log = RunLog(None, quiet=quiet or not info.is_main)
    cfg = check_config(cfg, teacher.num_classes)
    n, c, h, w = pixels.shape
    size = cfg.resolution or teacher.resolution
    teacher.to(device)
    check_teacher_input(teacher, c, size, device)
    if n < 1:
        raise UserError(f"the synthetic set {syn} is empty")
    sha, exact, means = images_fingerprint(pixels)
    manifest = build_manifest(cfg, syn=syn, dataset=dataset, teacher=teacher, teacher_path=teacher_path,
                              pixels=pixels, fingerprint=(sha, exact), view_device=device.type)
    index, count = shard_spec
    if overwrite and count > 1 and not info.enabled:
        raise UserError("--overwrite with --num-shards/array tasks would let each task delete the others' files; "
                        "clear --out once before launching the shards")
    problem = None
    if info.is_main or not info.enabled:
        try:
            manifest = prepare_out(out, manifest, means, {**(config or {}), **asdict(cfg)}, overwrite)
        except UserError as e:
            problem = str(e)
    problem = broadcast_object(problem, info)     # every rank stops on rank 0's refusal instead of hanging
    if problem:
        raise UserError(problem)
    if info.enabled and not info.is_main:
        manifest = json.loads((out / MANIFEST).read_text())

    images = normalize(pixels, teacher.mean, teacher.std)     # the teacher's space (§1.1), as the reader does it
    nb = num_batches(n, cfg.batch_size)
    units = [(e, b) for e in range(cfg.epochs) for b in range(nb)]
    mine = shard(units, index, count)        # by batch id, never by sample (§8.2)
    todo = [u for u in mine if not batch_file(out, *u).is_file()]   # atomic writes: a present file is whole
    log.info(f"relabel: {n} images x {cfg.epochs} epochs ({nb} batches of {cfg.batch_size}), {cfg.mix}, "
             f"{'top-' + str(cfg.topk) if cfg.topk else 'all'} {manifest['dtype']} logits of {teacher.arch}, "
             f"view {size}px; shard {index}/{count}: {len(todo)} of {len(mine)} batches to write; "
             f"~{manifest['estimated_mb']:.1f} MB in all")
    order_epoch, order = -1, None
    with StopRequest() as stop:   # SIGTERM/SIGUSR1: stop after the batch file in flight (utils/signals.py)
        for e, b in progress(todo, total=len(todo), desc="relabel", disable=True if quiet else None):
            if e != order_epoch:
                order_epoch, order = e, epoch_order(n, cfg.seed, e)
            rec = make_record(order, e, b, cfg, h, w, size)
            views = replay(images[rec["indices"]].to(device), rec, size)
            rec.update(label_entries(teacher_logits(teacher.net, views, amp), cfg))
            save_record(rec, batch_file(out, e, b))
            stop.check(f"every batch file written so far is whole (last: epoch {e}, batch {b})")

    barrier(info)
    if info.is_main or not info.enabled:
        finalize(out)
        manifest = json.loads((out / MANIFEST).read_text())
    return manifest


# --------------------------------------------------------------------------------------------- CLI

app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})
_O = typer.Option


@app.command()
@cli_errors
def main(
    syn: Path = _O(..., "--syn", "--data", "--syn-data-path", "--syn_data_path", help="Synthetic set: an "
                   "SRe2L/DWA/DELT ImageFolder (new000/class000_id000.jpg ...) or a ddtoolkit set; read in pixel "
                   "space and mapped to the teacher's normalisation. Its order (sorted class folders, sorted files) "
                   "is what the records' indices refer to."),
    teacher_path: Path = _O(..., "--teacher", "--ckpt-path", "--ckpt_path", help="Teacher checkpoint "
                            "(utils/teacher.py format; a foreign one needs --arch and --dataset)."),
    out: Optional[Path] = _O(None, "--out", "--fkd-path", "--fkd_path", help="Output folder (default "
                             "runs/relabel/<set name>). Re-running the same command resumes it."),
    dataset: Optional[str] = _O(None, "--dataset", "-d", help="Dataset of a legacy set / foreign teacher "
                                "(default: the teacher's)."),
    arch: Optional[str] = _O(None, "--arch", "-a", help="Teacher architecture (only needed for a foreign "
                             "checkpoint; checked against ours)."),
    norm: Optional[str] = _O(None, "--norm", help="Normalisation of a foreign teacher (imagenet, cifar10, "
                             "cifar100, tiny, ...); ours carry their own."),
    epochs: int = _O(300, "--epochs", help="Epochs of stored labels (300); a trainer may use at most this many."),
    batch_size: int = _O(1024, "--batch-size", "--batch_size", "-b", help="Images per stored batch (1024); one "
                         "record per batch, and the unit of resume and of sharding: every batch file is a checkpoint "
                         "(written atomically, skipped on re-run), so relabel has no --ckpt-every."),
    input_size: Optional[int] = _O(None, "--input-size", "--input_size", help="View size R (default: the "
                                   "teacher's resolution, 224 for ImageNet)."),
    crop_scale: str = _O("0.08,1", "--crop-scale", help="RandomResizedCrop area range 'min,max' (0.08,1)."),
    min_scale: Optional[float] = _O(None, "--min-scale-crops", "--min_scale_crops", help="Overrides the min of "
                                    "--crop-scale (the reference's spelling)."),
    max_scale: Optional[float] = _O(None, "--max-scale-crops", "--max_scale_crops", help="Overrides the max of "
                                    "--crop-scale."),
    flip: bool = _O(True, "--flip/--no-flip", help="Horizontal flip with p 0.5 per image, recorded (on)."),
    mix_type: str = _O("cutmix", "--mix-type", "--mix_type", help="cutmix (λ ~ Beta(1,1), one box per batch), "
                       "mixup (λ ~ Beta(0.8,0.8)) or none; the partner is a random permutation of the batch."),
    cutmix_beta: float = _O(1.0, "--cutmix-beta", "--cutmix", help="Beta parameter of the cutmix λ (1.0)."),
    mixup_beta: float = _O(0.8, "--mixup-beta", "--mixup", help="Beta parameter of the mixup λ (0.8)."),
    topk: int = _O(0, "--topk", "--keep-topk", "--keep_topk", help="Store only the k largest logits per view "
                   "(plus one tail mass per --topk-temperatures value); 0 or >= the class count stores all. Top-k cuts "
                   "storage: full fp16 logits for ImageNet-1K IPC 50 x 300 epochs are ~30 GB (decoupled.md §9.1 item "
                   "16); k = 100 is ~10x less."),
    topk_temperatures: str = _O("20", "--topk-temperatures", help="With --topk: the temperatures T (comma-"
                                "separated) at which the trainer may soften the labels; for each, the mass of the "
                                "dropped classes is stored so that softmax(logits/T) keeps the kept probabilities "
                                "exact (FKD keep_top_k). 20 = SRe2L's T."),
    fp16: bool = _O(True, "--fp16/--fp32", help="Store logits as float16 (default, as --use-fp16) or float32."),
    use_fp16: bool = _O(False, "--use-fp16", "--use_fp16", help="The reference's spelling of --fp16 (the default)."),
    seed: int = _O(42, "--seed", "--fkd-seed", "--fkd_seed", help="Seed of the batch order, crops, flips and mix; "
                   "each batch draws from a generator seeded by (seed, epoch, batch)."),
    device: str = _O("auto", "--device", help="auto, cpu or cuda (teacher forward and views)."),
    amp: str = _O("off", "--amp", help=AMP_HELP + " relabel: the teacher forward (inference, no scaler)."),
    shard_index: Optional[int] = _O(None, "--shard-index", help="This task's shard (with --num-shards; e.g. "
                                    "$SLURM_ARRAY_TASK_ID). Under torchrun the rank is used."),
    num_shards: Optional[int] = _O(None, "--num-shards", help="Number of shards; batch unit u = epoch*batches + b "
                                   "goes to shard u mod num-shards."),
    workers: int = _O(0, "--workers", "-j", help="Accepted for the reference's command lines; unused (views are "
                      "made in-process)."),
    mode: str = _O("fkd_save", "--mode", help="Accepted for the reference's command lines; only fkd_save."),
    overwrite: bool = _O(False, "--overwrite", help="Delete this stage's files in --out and start afresh "
                         "(needed when --out holds labels made with other settings)."),
    quiet: bool = _O(False, "--quiet", help="Only errors and the final line."),
):
    """Store FKD-style soft labels (teacher logits on recorded crops/flips/mixes) for a synthetic set."""
    require_at_least({"--epochs": epochs, "--batch-size": batch_size, "--num-shards": num_shards,
                      "--input-size": input_size})
    if mode != "fkd_save":
        raise UserError(f"--mode {mode} is not supported; relabel.py only saves labels (fkd_save)")
    lo, hi = parse_crop_scale(crop_scale)
    cfg = RelabelConfig(epochs=epochs, batch_size=batch_size,
                        crop_scale=(min_scale if min_scale is not None else lo,
                                    max_scale if max_scale is not None else hi),
                        flip=flip, mix=mix_type.lower(), cutmix_beta=cutmix_beta, mixup_beta=mixup_beta, topk=topk,
                        topk_temperatures=parse_floats(topk_temperatures, "--topk-temperatures"),
                        fp16=fp16 or use_fp16, seed=seed, resolution=input_size)
    dev = resolve_device(device)
    amp_mode = resolve_amp(amp, dev)
    info = init_distributed(dev)
    try:
        if info.enabled and shard_index is not None:
            raise UserError("--shard-index/--num-shards are for separate tasks; under torchrun the rank is the shard")
        spec = resolve_shard(shard_index, num_shards, info)
        dev = device_for(info, dev)
        out = out or Path("runs") / "relabel" / Path(syn).name
        check_writable(out, "--fkd-path")
        teacher = load_teacher(teacher_path, arch=arch, dataset=dataset, norm=norm, device=dev)
        data_name = dataset or teacher.dataset
        pixels, _ = load_set_pixels(syn, data_name)
        config = {"syn": str(syn), "teacher": str(teacher_path), "out": str(out), "dataset": data_name,
                  "device": str(dev), "amp": amp_mode.mode, "shard": list(spec), "world_size": info.world_size}
        t0 = time.time()
        m = relabel(pixels, teacher, out, cfg, syn=syn, dataset=data_name, teacher_path=teacher_path, device=dev,
                    shard_spec=spec, info=info, overwrite=overwrite, amp=amp_mode, quiet=quiet, config=config)
        if info.is_main:
            if m.get("complete"):
                print(f"wrote soft labels for {m['num_images']} images x {m['epochs']} epochs "
                      f"({m['batches_per_epoch']} batches/epoch) to {out}: {m['stored_mb']:.2f} MB stored "
                      f"({time.time() - t0:.1f}s)")
            else:
                missing = len(missing_batches(out, m["epochs"], m["batches_per_epoch"]))
                print(f"shard {spec[0]}/{spec[1]} done: {missing} batch files of {out} still missing "
                      "(other shards); the last shard to finish marks the folder complete")
    finally:
        cleanup(info)


if __name__ == "__main__":
    app()
