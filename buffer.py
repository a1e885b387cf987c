"""buffer.py: train expert ConvNets on real data and save their parameter trajectories (speed.md §1.5, §1.6).

    python buffer.py --dataset CIFAR10 --zca --num-experts 100 --train-epochs 50      # buffers/CIFAR10/ConvNet
    python buffer.py --dataset CIFAR100 --num-experts 100                                 # buffers/CIFAR100_NO_ZCA/ConvNet
    python buffer.py --dataset Tiny --data-path data/tiny-imagenet-200                   # buffers/Tiny/ConvNetD4
    python buffer.py --dataset ImageNet --subset imagenette --data-path /data/imagenet   # .../imagenette/128/ConvNetD5

Each expert is a freshly initialised network trained with plain SGD (constant lr, cross-entropy, shuffled batches,
DSA on every batch, and by default SPEED's per-batch standardisation); its parameters are recorded before training
and after every epoch. Every --save-interval experts the trajectories go into `replay_buffer_<n>.pt` in MTT's format
(utils/trajectory.py), so MTT/SPEED's distill.py reads them and this toolkit reads theirs.

Beside the buffer files the expert folder holds `buffer_meta.json` (dataset, network, value space, training
settings, which experts each file holds), `config.json` (every resolved flag), `zca.pt` (with --zca: the ZCA fitted
on the training images, so distillation works in the same space) and `log.csv` (one row per expert and epoch).

Expert i is seeded from (--seed, i) alone, never the clock (the reference reseeds from wall time): its network
initialisation from one derived seed, its batch order and augmentation from a torch.Generator seeded with another.
So a run can be stopped at any time and the same command continues it: finished files are kept, finished experts
of the unfinished file wait in `partial.pt` (rewritten after each expert), and the expert in training is checkpointed
every --ckpt-every epochs into `expert_ckpt.pt` (network, optimiser, trajectory so far, epoch, its generator and the
global RNG states, its log rows; deleted once the expert is saved). A re-run continues that expert from its last
checkpointed epoch, and the buffer files are bitwise those of an uninterrupted run (on CPU, same thread count).
SIGTERM/SIGUSR1 write that checkpoint after the epoch in flight and end the run with exit status 143. A folder that
already holds --num-experts experts of these settings is reported complete at once, without reading the dataset.
Re-running with a larger --num-experts adds experts to the same folder.

A NaN/inf training loss (an absurd --lr-teacher) stops the run with one line naming --lr-teacher; the last expert
checkpoint and every finished expert stay on disk.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import typer

from networks import get_network
from networks.registry import canonical_name
from utils.amp import AMP_HELP, OFF, Amp, as_amp, fp32, resolve_amp
from utils.checkpoint import capture_rng, check_finite, first_nonfinite, restore_rng, save_state
from utils.datasets import IMAGENET_SUBSETS, DatasetSpec, get_dataset_spec, load_split, normalize, to_pixels
from utils.dsa import DSA
from utils.errors import UserError
from utils.io import atomic_torch_save, atomic_write_json, check_writable, refuse_overlap, run_lock, safe_torch_load
from utils.misc import require_at_least, RunLog, cli_errors, progress, resolve_device, step
from utils.signals import StopRequest
from utils.train import evaluate, standardize_batch
from utils.trajectory import (buffer_files, buffer_index, check_trajectories, expert_dir_for, load_buffer_file,
                              mtt_layout, save_buffer_file)

META_FORMAT = "ddtoolkit-buffer-1"
PARTIAL_FORMAT = "ddtoolkit-buffer-partial-1"
EXPERT_CKPT_FORMAT = "ddtoolkit-buffer-expert-ckpt-1"
EXPERT_CKPT = "expert_ckpt.pt"
ZCA_EPS = 0.1          # speed.md §1.2
EVAL_BATCH = 128       # speed.md §1.5: the test set is evaluated in batches of 128
OUR_FILES = ("buffer_meta.json", "config.json", "zca.pt", "log.csv", "partial.pt", EXPERT_CKPT)


def default_model(resolution: int) -> str:
    """MTT/SPEED's network per resolution (speed.md §1.5): ConvNet up to 32 px, ConvNetD4 at 64, ConvNetD5 at 128
    (in general the depth that brings the map down to 4x4)."""
    if resolution <= 32:
        return "ConvNet"
    return f"ConvNetD{max(3, int(round(math.log2(resolution / 4))))}"


def derived_seed(seed: int, expert: int, purpose: str) -> int:
    """A 63-bit seed for one use ('init' or 'train') of expert `expert` of a run with base `seed`."""
    digest = hashlib.sha256(f"ddtoolkit-buffer|{seed}|{expert}|{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def expert_generator(seed: int, expert: int) -> torch.Generator:
    """The generator behind expert `expert`'s batch order and augmentation."""
    return torch.Generator().manual_seed(derived_seed(seed, expert, "train"))


def build_expert_network(model: str, spec: DatasetSpec, seed: int, expert: int) -> torch.nn.Module:
    """Expert `expert`'s freshly initialised network: the global RNG is seeded from (seed, expert) first."""
    torch.manual_seed(derived_seed(seed, expert, "init"))
    return get_network(model, spec.channels, spec.num_classes, spec.resolution)


def snapshot(net: torch.nn.Module) -> list[torch.Tensor]:
    """The network's parameters, in `parameters()` order, as detached CPU fp32 copies."""
    return [p.detach().to("cpu", torch.float32).clone() for p in net.parameters()]


def map_to_training_space(spec: DatasetSpec, train_images: torch.Tensor, test_images: torch.Tensor, zca: bool,
                          device: torch.device = torch.device("cpu")
                          ) -> tuple[torch.Tensor, torch.Tensor, dict | None]:
    """uint8 train/test images -> the experts' input space on `device`: ZCA fitted on these train images (eps 0.1,
    speed.md §1.2) when `zca`, else per-channel mean/std normalisation. Returns (train, test, ZCA state or None)."""
    train = to_pixels(train_images.to(device))
    test = to_pixels(test_images.to(device))
    if zca:
        from utils.zca import ZCA
        with step(f"fitting ZCA on {len(train)} train images"):
            z = ZCA.fit(train, eps=ZCA_EPS)
        return z.transform(train), z.transform(test), z.state_dict()
    return normalize(train, spec.mean, spec.std), normalize(test, spec.mean, spec.std), None


def _to_cpu(obj):
    """`obj` (nested dicts/lists of tensors, as in an optimiser's state_dict) with every tensor as a CPU copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def train_expert(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, *,
                 generator: torch.Generator, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
                 batch_size: int = 256, dsa: DSA | None = None, batch_standardize: bool = True,
                 device: torch.device = torch.device("cpu"), test: tuple[torch.Tensor, torch.Tensor] | None = None,
                 eval_every: int = 1, on_epoch: Callable[[dict], None] | None = None, desc: str = "expert",
                 resume: dict | None = None,
                 after_epoch: Callable[[int, Callable[[], dict]], None] | None = None,
                 last_good: Path | None = None, amp: Amp | str = OFF) -> list[list[torch.Tensor]]:
    """Train `net` in place as one expert (speed.md §1.5) and return its trajectory: `epochs + 1` snapshots, the
    first taken before training. `images` are already in the input space; batch order and DSA draw from
    `generator`. With `batch_standardize` every batch is standardised (one scalar mean/std) before augmentation,
    as SPEED does, test batches too. `test` (images, labels) is evaluated every `eval_every` epochs and after the
    last one, for the log only; `on_epoch` receives {epoch, train_loss, train_acc, test_acc (None if not run)}.

    Resume: after every epoch (and after `on_epoch`), `after_epoch(epoch, state)` is called, where `state()` returns
    the training state as plain data ({epoch, model, optimizer, trajectory, generator, rng}); the caller decides
    whether to write it (and may stop there). Passing such a dict as `resume` continues after its epoch exactly as
    the uninterrupted run would: `net` must be freshly built for the same expert, `generator` seeded the same.
    A NaN/inf loss raises utils.checkpoint.Diverged naming --lr-teacher; `last_good` is the checkpoint it keeps.
    `amp` runs the forward under autocast (loss on fp32 logits, fp16 with a GradScaler); snapshots stay fp32."""
    if not (math.isfinite(lr) and lr > 0):
        raise UserError(f"--lr-teacher must be a positive number, got {lr}")
    amp = as_amp(amp, device)
    scaler = amp.scaler()
    net.to(device)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = len(labels)
    bs = max(1, min(batch_size, n))
    trajectory = [snapshot(net)]
    first = 1
    if resume is not None:
        net.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        trajectory = list(resume["trajectory"])
        generator.set_state(resume["generator"])
        # the global RNG as it was after that epoch (nothing here draws from it today; a network with dropout would)
        restore_rng(resume["rng"])
        first = int(resume["epoch"]) + 1

    def state() -> dict:
        return {"epoch": len(trajectory) - 1, "model": _to_cpu(net.state_dict()),
                "optimizer": _to_cpu(opt.state_dict()), "trajectory": list(trajectory),
                "generator": generator.get_state(), "rng": capture_rng()}

    for epoch in progress(range(first, epochs + 1), total=epochs + 1 - first, desc=desc):
        net.train()
        order = torch.randperm(n, generator=generator).to(images.device)
        loss_sum, correct = 0.0, 0
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            x = images[idx].to(device, non_blocking=True)
            y = labels[idx.to(labels.device)].to(device, non_blocking=True)
            if batch_standardize:
                x = standardize_batch(x)
            if dsa is not None:
                x = dsa(x, generator=generator)
            with amp.autocast():
                out = fp32(net(x))
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.item() * len(idx)
            correct += (out.argmax(1) == y).sum().item()
        train_loss = loss_sum / n
        check_finite(train_loss, f"{desc}, epoch {epoch}", f"--lr-teacher (now {lr:g})", last_good)
        trajectory.append(snapshot(net))
        test_acc = None
        if test is not None and eval_every > 0 and (epoch % eval_every == 0 or epoch == epochs):
            test_acc = evaluate(net, test, device, batch_size=EVAL_BATCH, batch_standardize=batch_standardize)
        if on_epoch is not None:
            on_epoch({"epoch": epoch, "train_loss": train_loss, "train_acc": correct / n, "test_acc": test_acc})
        if after_epoch is not None:
            after_epoch(epoch, state)
    return trajectory


@dataclass
class ExpertState:
    """The resume checkpoint of the expert in training (`expert_ckpt.pt`): `train_expert`'s state after `epoch`
    epochs plus the expert's index, its log rows so far and the seconds spent on it."""
    expert: int
    epoch: int
    model: dict
    optimizer: dict
    trajectory: list
    generator: torch.Tensor
    rng: dict
    rows: list
    seconds: float

    def training(self) -> dict:
        """What `train_expert(resume=...)` takes."""
        return {k: getattr(self, k) for k in ("epoch", "model", "optimizer", "trajectory", "generator", "rng")}


def read_expert_ckpt(path: Path, key: str, expert: int, epochs: int, log: Callable[[str], None]
                     ) -> ExpertState | None:
    """The checkpoint of expert `expert` of these settings in `path`, or None. A checkpoint of another expert (the
    run was killed after saving that expert but before deleting its checkpoint) or of an impossible epoch is stale:
    it is deleted with a message. A file of another tool or of other settings is refused (one line)."""
    if not path.is_file():
        return None
    try:
        d = safe_torch_load(path, "expert checkpoint")
    except UserError as e:
        raise UserError(f"{e}; delete it to train expert {expert} from its start") from None
    names = [f.name for f in fields(ExpertState)]
    if not isinstance(d, dict) or d.get("format") != EXPERT_CKPT_FORMAT or any(k not in d for k in names):
        raise UserError(f"{path} is not a buffer.py expert checkpoint; move it away, or pass --overwrite to start "
                        "this folder afresh")
    if d.get("fingerprint") != key:
        raise UserError(f"{path} was written with other settings than this folder's experts; delete it, or pass "
                        "--overwrite to start this folder afresh")
    bad = first_nonfinite(d)
    if bad is not None:   # resuming would record a trajectory of garbage
        raise UserError(f"{path} holds NaN/Inf values in '{bad}': the checkpoint is damaged; delete it to train "
                        f"expert {expert} from its start")
    problem = None
    if d["expert"] != expert:
        problem = f"it is of expert {d['expert']}, and the next expert is {expert}"
    elif not (1 <= d["epoch"] < epochs and len(d["trajectory"]) == d["epoch"] + 1):
        problem = f"it holds epoch {d['epoch']} of an expert with {epochs} epochs"
    if problem:
        log(f"ignoring {path}: {problem}")
        path.unlink()
        return None
    return ExpertState(**{k: d[k] for k in names})


# ------------------------------------------------------------------------------------- folder state

def settings_key(settings: dict) -> str:
    """Fingerprint of everything that decides the experts' parameters (not logging, device or paths)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def read_meta(out: Path) -> dict | None:
    path = out / "buffer_meta.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); pass --overwrite to start this folder afresh") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise UserError(f"{path} was not written by buffer.py; pass --overwrite to start this folder afresh")
    return meta


def check_folder(out: Path, settings: dict, overwrite: bool, log: Callable[[str], None]) -> dict | None:
    """The folder's existing meta when it holds experts of these settings; refuses other settings (or buffer
    files of unknown origin) unless `overwrite`, which deletes them and returns None."""
    if not out.is_dir():
        return None
    if overwrite:
        removed = buffer_files(out, required=False) + [out / f for f in OUR_FILES if (out / f).exists()]
        for p in removed:
            p.unlink()
        if removed:
            log(f"--overwrite: removed {len(removed)} files from {out}")
        return None
    meta = read_meta(out)
    if meta is None:
        if buffer_files(out, required=False) or (out / "partial.pt").exists():
            raise UserError(f"{out} holds replay_buffer files without buffer_meta.json (made by another tool?); "
                            "pass --overwrite to delete them or choose another --buffer-path")
        return None
    if meta.get("settings_key") != settings_key(settings):
        old = meta.get("settings", {})
        diff = [f"{k} {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
        raise UserError(f"{out} holds experts made with other settings ({'; '.join(diff[:3]) or 'unknown'}); "
                        "pass --overwrite to delete them or choose another --buffer-path")
    return meta


def completed_files(out: Path, meta: dict | None) -> list[dict]:
    """The finished buffer files as [{name, first_expert, experts}], from the meta (files it does not list, e.g.
    written just before a kill, are opened and counted). The files must be replay_buffer_0..k-1 with no gap."""
    listed = {f["name"]: int(f["experts"]) for f in (meta or {}).get("files", [])}
    files, first = [], 0
    for n, path in enumerate(buffer_files(out, required=False)):
        if buffer_index(path) != n:
            raise UserError(f"{out / f'replay_buffer_{n}.pt'} is missing but later buffer files exist; restore it, "
                            "or pass --overwrite to start afresh")
        count = listed.get(path.name)
        if count is None:
            count = len(load_buffer_file(path))
        files.append({"name": path.name, "first_expert": first, "experts": count})
        first += count
    return files


def read_partial(out: Path, key: str, first_expert: int, log: Callable[[str], None]) -> list:
    """Finished experts of the unfinished file, if `partial.pt` continues exactly where the files stop."""
    path = out / "partial.pt"
    if not path.is_file():
        return []
    d = safe_torch_load(path, "partial expert file")
    if (not isinstance(d, dict) or d.get("format") != PARTIAL_FORMAT or d.get("settings_key") != key
            or d.get("first_expert") != first_expert):
        log(f"ignoring {path}: it does not continue the finished files (next expert is {first_expert})")
        path.unlink()
        return []
    return check_trajectories(d.get("trajectories"), str(path))


def finished_files(out: Path, settings: dict, num_experts: int) -> list[dict] | None:
    """The buffer files of `out` when it already holds at least `num_experts` experts of `settings` and nothing
    unfinished (no partial.pt), else None. Never raises and never deletes: any doubt (no folder, other settings, an
    unreadable meta) means None, and the normal path, which reads the data first, decides and explains."""
    try:
        meta = read_meta(out) if out.is_dir() else None
        if meta is None or meta.get("settings_key") != settings_key(settings) or (out / "partial.pt").exists():
            return None
        files = completed_files(out, meta)
    except UserError:
        return None
    if sum(f["experts"] for f in files) < num_experts:
        return None
    if files != meta.get("files"):   # a file written just before a kill, not yet in the meta
        write_meta(out, meta, files)
    return files


def write_meta(out: Path, meta: dict, files: list[dict]) -> None:
    meta["files"] = files
    meta["num_experts"] = sum(f["experts"] for f in files)
    atomic_write_json(meta, out / "buffer_meta.json")


# ------------------------------------------------------------------------------------------------ CLI

app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})
_O = typer.Option


@app.command()
@cli_errors
def main(
    dataset: str = _O("CIFAR10", "--dataset", "-d", help="Dataset registry name or alias: CIFAR10, CIFAR100, Tiny "
                      "(TinyImageNet), FashionMNIST, MNIST, SVHN, ImageNet (with --subset) or a subset name such "
                      "as imagenette."),
    subset: Optional[str] = _O(None, "--subset", help="With --dataset ImageNet: the 10-class subset (imagenette, "
                               "imagewoof, imagefruit, imagemeow, imagesquawk, imageyellow)."),
    data_path: Path = _O(Path("data"), "--data-path", "--data_path", help="Folder with the raw dataset files "
                         "(idx .gz, CIFAR batches or JPEG tree, tiny-imagenet-200 layout, ImageNet train/ + val/)."),
    res: Optional[int] = _O(None, "--res", help="Image side to resize to (default: the dataset's, 128 for the "
                            "ImageNet subsets); part of the ImageNet folder name."),
    model: Optional[str] = _O(None, "--model", help="Expert network (default ConvNet up to 32 px, ConvNetD4 at 64, "
                              "ConvNetD5 at 128). Used as written in the folder name; any networks registry name "
                              "works, e.g. ConvNet-3-w64."),
    num_experts: int = _O(100, "--num-experts", "--num_experts", help="Experts to train in this folder (a later "
                          "run with a larger number adds experts)."),
    train_epochs: int = _O(50, "--train-epochs", "--train_epochs", help="Epochs per expert; each trajectory holds "
                           "epochs + 1 snapshots."),
    lr_teacher: float = _O(0.01, "--lr-teacher", "--lr_teacher", help="Expert SGD learning rate (constant)."),
    mom: float = _O(0.0, "--mom", help="Expert SGD momentum."),
    l2: float = _O(0.0, "--l2", help="Expert SGD weight decay."),
    batch_train: int = _O(256, "--batch-train", "--batch_train", help="Expert training batch size."),
    batch_real: int = _O(256, "--batch-real", "--batch_real", help="Accepted for MTT command lines; unused (as in "
                         "MTT's buffer.py)."),
    save_interval: int = _O(10, "--save-interval", "--save_interval", help="Experts per replay_buffer_<n>.pt file "
                            "(the last file holds the remainder)."),
    zca: bool = _O(False, "--zca", help="Train in ZCA space (fitted on the training images used, eps 0.1; saved as "
                   "zca.pt). MTT/SPEED use it for CIFAR; without it CIFAR folders get the _NO_ZCA suffix."),
    dsa: bool = _O(True, "--dsa/--no-dsa", help="Differentiable siamese augmentation on every training batch."),
    dsa_strategy: str = _O("color_crop_cutout_flip_scale_rotate", "--dsa-strategy", "--dsa_strategy",
                           help="DSA families joined by '_'; one family per batch (MTT mode 'S')."),
    batch_standardize: bool = _O(True, "--batch-standardize/--no-batch-standardize", help="Standardise every "
                                 "training and test batch by its scalar mean/std before augmentation. SPEED's "
                                 "buffer.py does (speed.md §1.3), MTT's does not: use --no-batch-standardize for "
                                 "MTT experts."),
    train_subset: Optional[int] = _O(None, "--train-subset", help="Train on this many random images per class "
                                     "(CPU-scale runs; default all)."),
    test_per_class: Optional[int] = _O(None, "--test-per-class", help="Evaluate on this many random test images "
                                       "per class (default all); logging only."),
    eval_every: int = _O(1, "--eval-every", help="Epochs between test evaluations (and after the last; 0: never). "
                         "Logging only, never used for selection."),
    ckpt_every: int = _O(10, "--ckpt-every", help="Epochs between resume checkpoints of the expert in training "
                         "(expert_ckpt.pt in the expert folder: network, optimiser, trajectory so far, RNG states; "
                         "deleted once the expert is saved). 0: no periodic checkpoints, only finished experts are "
                         "kept. A stop request (SIGTERM/SIGUSR1) always checkpoints after the epoch in flight."),
    seed: int = _O(0, "--seed", help="Base seed: expert i's initialisation, batch order and augmentation come from "
                   "(seed, i); also picks --train-subset/--test-per-class images."),
    device: str = _O("auto", "--device", help="auto, cpu or cuda."),
    amp: str = _O("off", "--amp", help=AMP_HELP),
    buffer_path: Path = _O(Path("buffers"), "--buffer-path", "--buffer_path", help="Root of the expert folders; "
                           "experts go into <buffer-path>/<dataset>(/<subset>/<res>)(_NO_ZCA)/<model>."),
    overwrite: bool = _O(False, "--overwrite", help="Delete the folder's existing buffer files and logs and start "
                         "afresh (needed when its settings differ)."),
    quiet: bool = _O(False, "--quiet", help="Only errors and the final line."),
):
    """Train expert networks and save their trajectories in MTT's replay_buffer_<n>.pt format."""
    refuse_overlap(buffer_path, "--buffer-path", {"--data-path": data_path})
    require_at_least({"--num-experts": num_experts, "--train-epochs": train_epochs, "--save-interval": save_interval,
                      "--batch-train": batch_train, "--train-subset": train_subset, "--test-per-class": test_per_class,
                      "--res": res})
    require_at_least({"--eval-every": eval_every, "--ckpt-every": ckpt_every}, least=0)
    check_writable(buffer_path, "--buffer-path")
    if not (math.isfinite(lr_teacher) and lr_teacher > 0):
        raise UserError(f"--lr-teacher must be a positive number, got {lr_teacher}")
    if subset is not None:
        if dataset.lower() != "imagenet":
            raise UserError(f"--subset is for --dataset ImageNet, not {dataset}")
        key = subset.lower()
        if key not in IMAGENET_SUBSETS:
            raise UserError(f"unknown ImageNet subset '{subset}' ({', '.join(IMAGENET_SUBSETS)})")
        name = key
    else:
        name = get_dataset_spec(dataset).name
    if name == "ImageFolder":
        raise UserError("buffer.py needs a named dataset (its folder name comes from it), not ImageFolder")
    if name == "ImageNet" and train_subset is None:
        raise UserError("the full ImageNet-1K does not fit in memory as one tensor: pass --subset (e.g. imagenette)"
                        " or --train-subset N")
    dev = resolve_device(device)
    amp_mode = resolve_amp(amp, dev)
    aug = DSA(dsa_strategy, mode="single") if dsa else None
    info = RunLog(None, quiet=quiet).info

    def settings_for(spec: DatasetSpec, net_name: str) -> dict:
        return dict(dataset=spec.name, net=net_name, channels=spec.channels, resolution=spec.resolution,
                    num_classes=spec.num_classes, zca=zca, zca_eps=ZCA_EPS if zca else None,
                    train_subset=train_subset, seed=seed, lr_teacher=lr_teacher, mom=mom, l2=l2,
                    batch_train=batch_train, train_epochs=train_epochs, dsa=dsa,
                    dsa_strategy=dsa_strategy if dsa else None, batch_standardize=batch_standardize,
                    # fp32 folders written before --amp existed keep their settings key
                    **({"amp": amp_mode.mode} if amp_mode.enabled else {}))

    # A finished folder needs no data: requeued or repeated jobs return at once, even where --data-path is absent.
    if not overwrite:
        expected = replace(get_dataset_spec(name), resolution=res or get_dataset_spec(name).resolution)
        expected_model = model or default_model(expected.resolution)
        expected_out = expert_dir_for(buffer_path, name, expected_model, zca, res=expected.resolution)
        finished = finished_files(expected_out, settings_for(expected, canonical_name(expected_model)), num_experts)
        if finished is not None:
            print(f"{expected_out} is complete: {sum(f['experts'] for f in finished)} experts in {len(finished)} "
                  f"files (--num-experts {num_experts}); nothing to train")
            return

    # everything that can fail on input does so before the folder is created
    train, spec = load_split(name, data_path, "train", per_class=train_subset, seed=seed, resolution=res)
    test, _ = load_split(name, data_path, "test", per_class=test_per_class, seed=seed, resolution=res)
    model = model or default_model(spec.resolution)
    net_name = canonical_name(model)
    get_network(model, spec.channels, spec.num_classes, spec.resolution)
    out = expert_dir_for(buffer_path, name, model, zca, res=spec.resolution)
    _, layout_subset, _ = mtt_layout(name, spec.resolution)

    settings = settings_for(spec, net_name)
    key = settings_key(settings)
    with run_lock(out, "buffer.py"):   # one writer per expert folder
        old_meta = check_folder(out, settings, overwrite, info)
        files = completed_files(out, old_meta)
        done = sum(f["experts"] for f in files)
        pending = read_partial(out, key, done, info) if out.is_dir() else []

        train_x, test_x, zca_state = map_to_training_space(spec, train.images, test.images, zca, dev)
        train_y, test_y = train.labels.to(dev), test.labels  # evaluate() compares predictions on the CPU
        out.mkdir(parents=True, exist_ok=True)
        if zca_state is not None:
            atomic_torch_save(zca_state, out / "zca.pt")
        config = dict(dataset=dataset, subset=subset, resolved_dataset=spec.name, data_path=str(data_path), res=res,
                      model=model, net=net_name, num_experts=num_experts, train_epochs=train_epochs,
                      lr_teacher=lr_teacher, mom=mom, l2=l2, batch_train=batch_train, batch_real=batch_real,
                      save_interval=save_interval, zca=zca, dsa=dsa, dsa_strategy=dsa_strategy,
                      batch_standardize=batch_standardize, train_subset=train_subset, test_per_class=test_per_class,
                      eval_every=eval_every, ckpt_every=ckpt_every, seed=seed, device=str(dev),
                      buffer_path=str(buffer_path), expert_dir=str(out))
        atomic_write_json(config, out / "config.json")
        meta = dict(format=META_FORMAT, dataset=spec.name, subset=layout_subset, model=model, net=net_name,
                    channels=spec.channels, resolution=spec.resolution, num_classes=spec.num_classes,
                    zca=zca, zca_eps=ZCA_EPS if zca else None, zca_file="zca.pt" if zca else None,
                    space="zca" if zca else "normalized", mean=list(spec.mean), std=list(spec.std),
                    batch_standardize=batch_standardize, train_subset=train_subset, train_images=len(train_y),
                    seed=seed, lr_teacher=lr_teacher, mom=mom, l2=l2, batch_train=batch_train,
                    train_epochs=train_epochs, num_snapshots=train_epochs + 1, dsa=dsa,
                    dsa_strategy=dsa_strategy if dsa else None, dsa_mode="single", save_interval=save_interval,
                    seeding="expert i: init seed derived_seed(seed, i, 'init'), "
                            "generator derived_seed(seed, i, 'train')",
                    settings=settings, settings_key=key)
        write_meta(out, meta, files)

        log = RunLog(out / "log.csv", quiet=quiet, resume=True)
        kept = done + len(pending)
        log.rows = [r for r in log.rows if str(r.get("expert", "")).isdigit() and int(r["expert"]) < kept]
        todo = list(range(kept, num_experts))
        log.info(f"buffer: {spec.name} ({len(train_y)} train / {len(test_y)} test images, {spec.resolution}px), "
                 f"{model} ({net_name}), space {meta['space']}, batch standardisation "
                 f"{'on' if batch_standardize else 'off'}, {train_epochs} epochs, lr {lr_teacher:g}, device {dev} "
                 f"-> {out}")
        if kept:
            log.info(f"resuming: {done} experts in {len(files)} files, {len(pending)} in partial.pt; "
                     f"{len(todo)} to train")
        ckpt_path = out / EXPERT_CKPT
        # A checkpoint of expert `kept` beyond a lowered --num-experts is left for a later, larger run.
        resume = read_expert_ckpt(ckpt_path, key, kept, train_epochs, log.info) if todo else None

        def flush() -> None:
            path = out / f"replay_buffer_{len(files)}.pt"
            save_buffer_file(pending, path)
            files.append({"name": path.name, "first_expert": sum(f["experts"] for f in files), "experts": len(pending)})
            write_meta(out, meta, files)
            (out / "partial.pt").unlink(missing_ok=True)
            log.info(f"wrote {path.name} ({len(pending)} experts)")
            pending.clear()

        t_start = time.time()
        with StopRequest() as stop:   # SIGTERM/SIGUSR1: checkpoint after the epoch in flight (utils/signals.py)
            for i in progress(todo, total=len(todo), desc="experts"):
                t0 = time.time()
                net = build_expert_network(model, spec, seed, i)
                state, resume = (resume if resume is not None and resume.expert == i else None), None
                rows: list[dict] = list(state.rows) if state is not None else []
                spent = state.seconds if state is not None else 0.0
                if state is not None:
                    log.info(f"continuing expert {i} after epoch {state.epoch} from {ckpt_path}")

                def after_epoch(epoch: int, training_state: Callable[[], dict]) -> None:
                    # The last epoch needs no checkpoint: the finished expert is saved right after.
                    due = ckpt_every > 0 and epoch % ckpt_every == 0
                    if epoch == train_epochs or not (due or stop.requested):
                        return
                    save_state(ExpertState(expert=i, rows=list(rows), seconds=spent + time.time() - t0,
                                           **training_state()), ckpt_path, EXPERT_CKPT_FORMAT, key)
                    stop.check(f"expert {i} is checkpointed after epoch {epoch} in {ckpt_path}; the finished experts "
                               "are on disk")

                traj = train_expert(net, train_x, train_y, train_epochs, generator=expert_generator(seed, i),
                                    lr=lr_teacher, momentum=mom, weight_decay=l2, batch_size=batch_train, dsa=aug,
                                    batch_standardize=batch_standardize, device=dev, test=(test_x, test_y),
                                    eval_every=eval_every, desc=f"expert {i}", on_epoch=rows.append,
                                    resume=state.training() if state is not None else None, after_epoch=after_epoch,
                                    last_good=ckpt_path, amp=amp_mode)
                seconds = spent + time.time() - t0
                csv_rows = [dict(expert=i, epoch=r["epoch"], train_loss=round(r["train_loss"], 5),
                                 train_acc=round(r["train_acc"], 5),
                                 test_acc="" if r["test_acc"] is None else round(r["test_acc"], 5), seconds="")
                            for r in rows]
                csv_rows[-1]["seconds"] = round(seconds, 1)
                log.rows.extend(csv_rows[:-1])  # the CSV is rewritten once per expert, not once per epoch
                log.row(**csv_rows[-1])
                last = rows[-1]
                acc = f", test acc {last['test_acc']:.4f}" if last["test_acc"] is not None else ""
                log.info(f"expert {i + 1}/{num_experts}: train loss {last['train_loss']:.4f}, train acc "
                         f"{last['train_acc']:.4f}{acc} ({seconds:.1f}s)")
                pending.append(traj)
                if len(pending) == save_interval or i == num_experts - 1:
                    flush()
                else:
                    atomic_torch_save({"format": PARTIAL_FORMAT, "settings_key": key, "first_expert": sum(
                        f["experts"] for f in files), "trajectories": pending}, out / "partial.pt")
                # Only now, with the expert on disk: a kill before this line leaves a stale checkpoint, which the
                # re-run recognises by its expert index and deletes.
                ckpt_path.unlink(missing_ok=True)
                if i != todo[-1]:
                    stop.check(f"expert {i} is saved with the finished experts")
        if pending:  # partial.pt experts beyond a lowered --num-experts: kept, as the last file
            flush()
        total = sum(f["experts"] for f in files)
        print(f"{total} experts in {len(files)} files in {out} ({len(todo)} trained now, {time.time() - t_start:.0f}s)")


if __name__ == "__main__":
    app()
