"""validate.py: train fresh networks on a distilled set and report honest test accuracy.

    python validate.py --syn DIR --dataset FashionMNIST --model ConvNet-3 --epochs 300 --runs 5 \
        --baseline random --results results/fmnist.json

Every arm ("syn", and the baselines "random", "herding" and "full") is trained with the same recipe and the same
explicit seeds (run i uses seed + i), and is measured once on the real test set after its last epoch: no epoch or
checkpoint is ever chosen on the test set. Accuracies are fractions; std is the population std over runs.
Finished runs are recorded one CSV row each, so the same command after an interruption resumes with the next run.

`--preset idc` (or `dream`) sets the recipe of IDC/DREAM's test.py (idc_dream.md §5, `idc_protocol`); `--preset speed`
(or `mtt`) that of MTT/SPEED's evaluate_synset (speed.md §5.2, `trajectory_protocol`). Flags given explicitly on
the command line still win over the preset's values.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import typer

from networks import EVAL_POOLS, get_network
from networks.registry import eval_pool
from utils.coreset import herding_indices
from utils.datasets import (IMAGENET_SUBSETS, DatasetSpec, FileDataset, dataset_labels, load_split, normalize,
                            open_split, per_class_indices, take, to_pixels)
from utils.dsa import DSA, DSAParams
from utils.errors import UserError
from utils.io import atomic_write_json
from utils.misc import RunLog, cli_errors, resolve_device
from utils.synset import SyntheticSet, check_compatible, load_synset
from utils.train import TrainRecipe, evaluate, train_network

def default_model(resolution: int) -> str:
    """ConvNet deep enough to reach a 4×4 map (speed.md §2): 28/32 px -> ConvNet-3, 64 -> 4, 128 -> 5."""
    if resolution <= 32:
        return "ConvNet-3"
    if resolution <= 128:
        return f"ConvNet-{int(round(math.log2(resolution / 4)))}"
    return "ResNet-18"  # ImageNet resolution: torchvision ResNet-18 (decoupled.md §1.2)


def input_space(spec: DatasetSpec, space: str, zca_state: dict | None) -> tuple[Callable, Callable]:
    """Maps into the network's input space, for real uint8 images and for synthetic images of value `space`.

    Without a ZCA state, training happens in the dataset's normalised space (pixel sets are normalised). With one
    (a ZCA set, or `--zca`), training happens in ZCA space: the real images (test set, baselines) and pixel-space
    sets go through the same train-fitted ZCA (speed.md §1.2).
    """
    if zca_state is not None:
        from utils.zca import ZCA
        zca = ZCA.from_state_dict(zca_state)
        if space == "normalized":
            raise UserError("this set lives in normalised space; it cannot be trained in ZCA space (drop --zca)")

        def real(x):
            return zca.transform(to_pixels(x))
        return real, (zca.transform if space == "pixel" else (lambda x: x))
    if space == "zca":
        raise UserError("this set lives in ZCA space but no ZCA state was given (pass --zca)")

    def real(x):
        return normalize(to_pixels(x), spec.mean, spec.std)

    def syn(x):
        return normalize(x, spec.mean, spec.std) if space == "pixel" else x
    return real, syn


# ------------------------------------------------------------------------------------------- recipes

# The recipe when neither a flag nor a preset sets a value (the DC/DSA/MTT protocol; `lr` is added at run time:
# the set's learned lr if it has one, else 0.01).
RECIPE_DEFAULTS = dict(epochs=300, momentum=0.9, weight_decay=5e-4, batch_size=256, schedule="step", dsa=True,
                       dsa_strategy="color_crop_cutout_flip_scale_rotate", dsa_mode="single", dsa_align_corners=True,
                       mix_p=0.0, beta=1.0)
PRESETS = ("idc", "dream", "speed", "mtt")  # DREAM evaluates with IDC's test.py unchanged (idc_dream.md §7)
# idc_dream.md §5 items 3 and 7: the datasets test.py treats as ImageNet (224-px IDC subsets, and MTT's 128-px
# subsets, which IDC never used but which share ImageNet's statistics and augmentation needs).
IMAGENET_FAMILY = frozenset({"ImageNet", "ImageNet10", "ImageNet100", *IMAGENET_SUBSETS})


def idc_imagenet_epochs(decoded_ipc: int, num_classes: int) -> int:
    """IDC test.py's ImageNet epochs from the decoded images per class m = ipc * f^2 (idc_dream.md §5 item 7):
    1 -> 3000, <= 10 -> 2000, <= 50 -> 1500, <= 200 -> 1000, <= 500 -> 500, else 300; with 100 or more classes,
    floor(2E/3) rounded down to a multiple of 100."""
    m = decoded_ipc
    e = 3000 if m <= 1 else 2000 if m <= 10 else 1500 if m <= 50 else 1000 if m <= 200 else 500 if m <= 500 else 300
    if num_classes >= 100:
        e = (2 * e // 3) // 100 * 100
    return e


def idc_protocol(spec: DatasetSpec, ipc: int | None, factor: int | None) -> dict:
    """The recipe fields of IDC/DREAM's evaluation (idc_dream.md §5), as plain data keyed like RECIPE_DEFAULTS.

    `ipc` is the stored images per class and `factor` the multi-formation factor (1 for IDC-I and real subsets).
    """
    f = factor or 1
    imagenet = spec.name in IMAGENET_FAMILY
    if imagenet:
        if not ipc:
            raise UserError(f"--preset idc on {spec.name} needs the IPC (from the set, or --ipc) for its epoch count")
        epochs = idc_imagenet_epochs(ipc * f * f, spec.num_classes)
    else:
        epochs = 1000  # §5 item 7 (DenseNet's 400 is not applied: the toolkit has no DenseNet)
    big = imagenet and spec.num_classes >= 100  # §5 item 6: ImageNet with N >= 100 uses lr 0.1, wd 1e-4, batch 128
    # §5 item 4: evaluation DSA is IDC's default strategy minus cutout (CutMix is on); SVHN and MNIST drop flip.
    # ImageNet: test.py uses CPU torchvision transforms (random-resized crop, flip, jitter, lighting) instead of
    # DSA; the toolkit uses the same DSA idc mode there, an approximation the --preset help states.
    strategy = "color_crop_scale_rotate" if spec.name in ("SVHN", "MNIST") else "color_crop_flip_scale_rotate"
    mix_p = 1.0 if imagenet else 0.5  # §5 item 5 (CIFAR/SVHN/MNIST/FashionMNIST 0.5 via argument.py; ImageNet 1.0)
    if spec.name == "SVHN" and f == 1 and ipc == 1:  # §3 table: vanilla mixup and cutout back for SVHN IDC-I ipc 1
        strategy, mix_p = "color_crop_cutout_scale_rotate", 0.0
    if spec.name == "MNIST" and f > 1:  # §3 table: MNIST multi-formation evaluates without CutMix
        mix_p = 0.0
    return dict(epochs=epochs, lr=0.1 if big else 0.01, momentum=0.9, weight_decay=1e-4 if big else 5e-4,
                batch_size=128 if big else 64, schedule="multistep", dsa=True, dsa_strategy=strategy,
                dsa_mode="idc", dsa_align_corners=False, mix_p=mix_p, beta=1.0)


def trajectory_protocol(preset: str) -> dict:
    """MTT/SPEED evaluate_synset (speed.md §5.2): 1000 epochs (1001 run), x0.1 with a fresh optimiser after epoch
    501, SGD momentum 0.9 wd 5e-4 batch 256, DSA mode single with every family; the lr is the set's learned lr
    (added by the caller). SPEED also standardises every train and test batch (§1.3), and tests in batches of 128."""
    return dict(epochs=1001, momentum=0.9, weight_decay=5e-4, batch_size=256, schedule="mtt", dsa=True,
                dsa_strategy="color_crop_cutout_flip_scale_rotate", dsa_mode="single", dsa_align_corners=True,
                mix_p=0.0, beta=1.0, batch_standardize=preset == "speed")


def resolve_options(explicit: dict, preset: dict | None, defaults: dict) -> dict:
    """Each recipe field: the value given on the command line (not None), else the preset's, else the default."""
    preset = preset or {}
    return {k: explicit[k] if explicit.get(k) is not None else preset.get(k, d) for k, d in defaults.items()}


# Config keys added after CSVs were first written, with the value that trains exactly as before they existed. At
# that value they stay out of the fingerprint, so a CSV written before them still resumes.
_NEUTRAL_CONFIG = {"preset": None, "mix_p": 0.0, "beta": 1.0, "dsa_align_corners": True, "herding_model": None,
                   "herding_epochs": None}


def config_key(config: dict) -> str:
    """The fingerprint of a configuration that tags every CSV row (resume only ever mixes equal keys)."""
    keyed = {k: v for k, v in config.items() if not (k in _NEUTRAL_CONFIG and v == _NEUTRAL_CONFIG[k])}
    return hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]


def summarize(accs: list[float], seeds: list[int]) -> dict:
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "runs": [float(a) for a in accs],
            "seeds": seeds}


def train_arm(arm: str, model: str, inputs: torch.Tensor, labels: torch.Tensor, prepare: Callable,
              spec: DatasetSpec, recipe: TrainRecipe, seeds: list[int], score: Callable[[torch.nn.Module], float],
              device: torch.device, log: RunLog, pick: Callable[[int], tuple] | None = None) -> dict:
    """Train one fresh `model` per seed on the arm's data and `score` it once, after the last epoch;
    `pick(seed)` may draw the data per run."""
    accs = []
    for seed in seeds:
        done = log.find(model=model, arm=arm, seed=seed)
        if done is not None:  # finished by an earlier, interrupted invocation of the same configuration
            accs.append(float(done["test_acc"]))
            log.info(f"  {model} {arm:6s} seed {seed}: test acc {accs[-1]:.4f} (resumed from {log.csv_path})")
            continue
        torch.manual_seed(seed)  # network init comes from the global RNG; the generator drives data order + DSA
        gen = torch.Generator().manual_seed(seed)
        if pick is not None:
            inputs, labels = pick(seed)
        net = get_network(model, spec.channels, spec.num_classes, spec.resolution)
        t0 = time.time()
        losses = train_network(net, inputs, labels, recipe, gen, device, prepare, desc=f"{arm} seed {seed}")
        acc = score(net)
        accs.append(acc)
        log.row(model=model, arm=arm, seed=seed, n_train=len(labels), epochs=recipe.epochs, lr=recipe.lr,
                final_train_loss=round(losses[-1], 5), test_acc=acc, seconds=round(time.time() - t0, 1))
        log.info(f"  {model} {arm:6s} seed {seed}: test acc {acc:.4f} ({time.time() - t0:.0f}s)")
    return summarize(accs, seeds)


def validate(syn: SyntheticSet | None, spec: DatasetSpec, train, test, *,
             models: list[str], recipe: TrainRecipe, baselines: list[str], runs: int, seed: int, ipc: int | None,
             full_recipe: TrainRecipe | None, device: torch.device, log: RunLog,
             space: str = "normalized", zca_state: dict | None = None, workers: int = 0,
             herding_model: str | None = None, herding_epochs: int = 5) -> dict:
    """Run every arm for every model. `train` (for the baselines) and `test` are real splits as `open_split`
    datasets of uint8 images, or (images, labels) pairs. Returns {model: {arm: summary}}.

    The herding subset (`ipc` per class) is selected once, from features of a `herding_model` (default: the first
    of `models`) trained for `herding_epochs` with `seed`, and shared by every model and run; it is computed only
    if some herding run is not already recorded in the log."""
    real_prep, syn_prep = input_space(spec, space, zca_state)
    seeds = [seed + i for i in range(runs)]

    def score(net):  # the real test set, mapped like the baselines' real images
        # standardised test batches depend on the batch size: SPEED tests in batches of 128 (speed.md §5.2)
        return evaluate(net, test, device, real_prep, batch_size=128 if recipe.batch_standardize else 500,
                        batch_standardize=recipe.batch_standardize, workers=workers)
    if isinstance(train, tuple):
        train = torch.utils.data.TensorDataset(*train)
    for b in ("full", "herding"):
        if b in baselines and isinstance(train, FileDataset):
            raise UserError(f"--baseline {b} needs the train split in memory, and this one is too large; "
                            "pass --train-subset N (images per class)")
    herd_model = herding_model or models[0]
    herd: dict[str, torch.Tensor] = {}

    def pick_herding(_seed):  # one subset for all runs: only the network init and batch order change per seed
        if "idx" not in herd:
            log.info(f"herding: {ipc} per class from {herd_model} features ({herding_epochs} epochs, seed {seed})")
            herd["idx"] = herding_indices(*train.tensors, spec, ipc, model=herd_model, epochs=herding_epochs,
                                          seed=seed, device=device, prepare=real_prep)
        return train.tensors[0][herd["idx"]], train.tensors[1][herd["idx"]]
    out: dict[str, dict] = {}
    for model in models:
        res: dict[str, dict] = {}
        if syn is not None:
            images, labels = syn.decode()
            res["syn"] = train_arm("syn", model, images, labels, syn_prep, spec, recipe, seeds, score, device, log)
        if "random" in baselines:
            train_labels = dataset_labels(train)

            def pick(s, _ipc=ipc):
                idx = _random_subset(train_labels, spec.num_classes, _ipc, s)
                return take(train, idx), train_labels[idx]
            res["random"] = train_arm("random", model, None, None, real_prep, spec, recipe, seeds, score, device,
                                      log, pick=pick)
            res["random"]["ipc"] = ipc
        if "herding" in baselines:
            res["herding"] = train_arm("herding", model, None, None, real_prep, spec, recipe, seeds, score, device,
                                       log, pick=pick_herding)
            res["herding"].update(ipc=ipc, herding_model=herd_model, herding_epochs=herding_epochs)
        if "full" in baselines:
            res["full"] = train_arm("full", model, *train.tensors, real_prep, spec, full_recipe, seeds, score,
                                    device, log)
        out[model] = res
    return out


def _random_subset(labels: torch.Tensor, num_classes: int, ipc: int, seed: int) -> torch.Tensor:
    """The random baseline's images for run `seed`; offset so the draw never shares a stream with network init."""
    return per_class_indices(labels, num_classes, ipc, 10_000 + seed)


# ------------------------------------------------------------------------------------------------ CLI

app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})


@app.command()
@cli_errors
def main(
    syn: Optional[Path] = typer.Option(None, "--syn", "--syn-path", help="Synthetic set: a ddtoolkit directory, or "
                                       "a legacy MTT images_*.pt folder, IDC data.pt or SRe2L-style ImageFolder."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset name (default: the set's "
                                          "meta.json). E.g. FashionMNIST, CIFAR10, TinyImageNet, imagenette."),
    data_path: Path = typer.Option(Path("data"), "--data-path", "--data_path", help="Folder with the raw dataset "
                                   "files (idx .gz, CIFAR batches or JPEG tree/tarball, Tiny layout, ImageFolder)."),
    model: Optional[str] = typer.Option(None, "--model", help="Network to train (default: ConvNet of the depth "
                                        "that fits the resolution, e.g. ConvNet-3 at 28/32 px)."),
    eval_mode: str = typer.Option("S", "--eval-mode", "--eval_mode", help="S: only --model; M: the "
                                  "cross-architecture pool as well (see networks.EVAL_POOLS)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Evaluation protocol of a method's paper, under "
                                         "any flag given explicitly. idc (= dream): IDC test.py (idc_dream.md §5): "
                                         "1000 epochs (ImageNet family: by decoded IPC), multistep, SGD lr 0.01 "
                                         "wd 5e-4 batch 64 (ImageNet >= 100 classes: 0.1, 1e-4, 128), DSA idc mode "
                                         "per dataset, CutMix p 0.5 (ImageNet 1.0). On ImageNet-family data DSA "
                                         "stands in for IDC's CPU torchvision augmentation. speed / mtt: "
                                         "MTT's evaluate_synset (speed.md §5.2): 1001 epochs, lr = the set's "
                                         "learned lr, x0.1 with a fresh optimiser after epoch 501, batch 256, DSA "
                                         "single; speed also standardises every batch (§1.3)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", "--epoch_eval_train", help="Training epochs per run "
                                         "(default 300; the papers use 1000; lr drops ×0.1 after half with the "
                                         "default step schedule)."),
    runs: int = typer.Option(5, "--runs", "--num_eval", help="Fresh networks per arm; run i uses seed + i."),
    seed: int = typer.Option(0, "--seed", help="Base seed: network init, batch order, DSA, random subsets."),
    lr: Optional[float] = typer.Option(None, "--lr", "--lr_net", help="SGD lr (default: the set's learned lr "
                                       "if it has one, else 0.01)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "--batch_train", help="Training batch size "
                                             "(default 256)."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum (default 0.9)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", "--wd", help="SGD weight decay (default "
                                                 "5e-4)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="lr schedule: step (default; ×0.1 at E/2), "
                                           "multistep (×0.2 at 2E/3 and 5E/6), cosine, none."),
    dsa: Optional[bool] = typer.Option(None, "--dsa/--no-dsa", help="Differentiable siamese augmentation on every "
                                       "batch (default on)."),
    dsa_strategy: Optional[str] = typer.Option(None, "--dsa-strategy", "--dsa_strategy", help="DSA families, "
                                               "joined by '_' (default color_crop_cutout_flip_scale_rotate)."),
    dsa_mode: Optional[str] = typer.Option(None, "--dsa-mode", help="single (default): one family per batch "
                                           "(MTT); all: every family; idc: flip, color, one geometric op, cutout."),
    mix_p: Optional[float] = typer.Option(None, "--mix-p", "--mix_p", help="CutMix probability per batch, applied "
                                          "after DSA (default 0: off; idc_dream.md §2.5)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="CutMix λ ~ Beta(beta, beta) (default 1)."),
    batch_standardize: Optional[bool] = typer.Option(None, "--batch-standardize/--no-batch-standardize",
                                                     help="SPEED's per-batch scalar standardisation of train and "
                                                     "test inputs (speed.md §1.3; default off, on with --preset "
                                                     "speed)."),
    baseline: list[str] = typer.Option([], "--baseline", help="Also train on: 'random' (a random real subset of "
                                       "the set's storage IPC, same recipe and seeds), 'herding' (a herding subset "
                                       "of that IPC, selected once; see --herding-model) and/or 'full' (all real "
                                       "training data). Repeat the flag for several."),
    ipc: Optional[int] = typer.Option(None, "--ipc", help="IPC of the random and herding baselines (default: the "
                                      "set's storage IPC); required when no --syn is given."),
    herding_model: Optional[str] = typer.Option(None, "--herding-model", "--herding_model", help="Herding "
                                                "baseline: network whose embed() features are herded, trained "
                                                "on the train split (or --train-subset pool) with --seed (default: "
                                                "--model)."),
    herding_epochs: int = typer.Option(5, "--herding-epochs", "--herding_epochs", help="Herding baseline: epochs "
                                       "of that feature network (SGD lr 0.01, batch 256, no augmentation)."),
    full_epochs: int = typer.Option(20, "--full-epochs", help="Epochs of the 'full' baseline."),
    full_lr: float = typer.Option(0.01, "--full-lr", help="lr of the 'full' baseline."),
    zca: bool = typer.Option(False, "--zca", help="Train in ZCA space (fit on the train split, eps 0.1): legacy "
                             "MTT sets distilled with ZCA, pixel sets and baselines under MTT's CIFAR protocol. "
                             "Sets saved in ZCA space carry their own ZCA and need no flag."),
    factor: Optional[int] = typer.Option(None, "--factor", "-f", help="Legacy IDC data.pt: multi-formation "
                                         "factor (not stored in those files)."),
    res: Optional[int] = typer.Option(None, "--res", help="Override the dataset resolution (ImageFolder, "
                                      "ImageNet subsets)."),
    train_subset: Optional[int] = typer.Option(None, "--train-subset", help="Baselines draw from this many random "
                                               "train images per class (CPU runs; recorded in results)."),
    workers: int = typer.Option(0, "--workers", help="Data-loading workers when a split is streamed from files."),
    test_per_class: Optional[int] = typer.Option(None, "--test-per-class", help="Evaluate on this many random "
                                                 "test images per class (quick CPU checks; recorded in results)."),
    results: Optional[Path] = typer.Option(None, "--results", help="Results JSON (default: <syn>/results.json, "
                                           "or results/validate.json); a CSV with one row per run goes beside."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    download: bool = typer.Option(False, "--download", help="Try torchvision's downloader when files are missing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard the runs recorded in an existing results "
                                   "CSV instead of resuming from them (needed when its configuration differs)."),
    quiet: bool = typer.Option(False, "--quiet", help="Only the final summary."),
):
    """Train fresh networks on a distilled set (and baselines) and report last-epoch test accuracy."""
    for b in baseline:
        if b not in ("random", "herding", "full"):
            raise UserError(f"unknown --baseline '{b}' (random, herding, full)")
    if preset is not None and preset.lower() not in PRESETS:
        raise UserError(f"unknown --preset '{preset}' ({', '.join(PRESETS)})")
    preset = preset.lower() if preset else None
    if syn is None and not baseline:
        raise UserError("nothing to train: give --syn and/or --baseline")
    if eval_mode not in EVAL_POOLS:
        raise UserError(f"unknown --eval-mode '{eval_mode}' ({', '.join(EVAL_POOLS)})")
    dev = resolve_device(device)

    synset = None
    if dataset is None and syn is not None:  # our sets name their dataset; legacy files need --dataset
        synset = load_synset(syn)
        dataset = synset.meta["dataset"]
    if dataset is None:
        raise UserError("--dataset is required when no --syn set names it")
    zca_state = None
    if zca:
        from utils.zca import ZCA
        tr, _ = load_split(dataset, data_path, "train", resolution=res, download=download)
        zca_state = ZCA.fit(to_pixels(tr.images), eps=0.1).state_dict()

    if syn is not None and synset is None:
        synset = load_synset(syn, dataset=dataset, factor=factor, zca_state=zca_state)
    if synset is not None and synset.space == "zca" and synset.zca_state is not None:
        zca_state = synset.zca_state  # a set saved in ZCA space carries the ZCA its images live in
    space = synset.space if synset is not None else "pixel"  # baselines alone: real pixels, mapped like a pixel set

    train = None
    if baseline and train_subset:
        tr, spec = load_split(dataset, data_path, "train", per_class=train_subset, seed=seed, resolution=res,
                              download=download)
        train = (tr.images, tr.labels)
    elif baseline:
        train, spec = open_split(dataset, data_path, "train", resolution=res, download=download)
    if test_per_class:
        te, spec = load_split(dataset, data_path, "test", resolution=res, download=download,
                              per_class=test_per_class, seed=seed)
        test = (te.images, te.labels)
    else:
        test, spec = open_split(dataset, data_path, "test", resolution=res, download=download)
    if synset is not None:
        check_compatible(synset, spec)
    ipc = ipc or (synset.meta["ipc"] if synset is not None else None)
    for b in ("random", "herding"):
        if b in baseline and not ipc:
            raise UserError(f"--baseline {b} needs --ipc when no --syn is given")

    # Recipe: each field from its flag if given, else the preset, else RECIPE_DEFAULTS (lr: the learned one).
    protocol = None
    if preset in ("speed", "mtt"):
        protocol = trajectory_protocol(preset)
    elif preset is not None:  # IDC/DREAM (idc_dream.md §5): epochs depend on the set's stored IPC and its factor
        meta = synset.meta if synset is not None else {}
        set_factor = (meta.get("decoder_args") or {}).get("factor") if meta.get("decoder") == "multiformation" else None
        protocol = idc_protocol(spec, meta.get("ipc", ipc), int(set_factor or factor or 1))
    defaults = dict(RECIPE_DEFAULTS, lr=float(synset.lr) if synset is not None and synset.lr is not None else 0.01,
                    batch_standardize=False)
    opt = resolve_options(dict(epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               batch_size=batch_size, schedule=schedule, dsa=dsa, dsa_strategy=dsa_strategy,
                               dsa_mode=dsa_mode, mix_p=mix_p, beta=beta, batch_standardize=batch_standardize),
                          protocol, defaults)
    batch_standardize = opt["batch_standardize"]
    aug = DSA(opt["dsa_strategy"], mode=opt["dsa_mode"], params=DSAParams(align_corners=opt["dsa_align_corners"])) \
        if opt["dsa"] else None
    recipe = TrainRecipe(epochs=opt["epochs"], lr=opt["lr"], momentum=opt["momentum"],
                         weight_decay=opt["weight_decay"], batch_size=opt["batch_size"], schedule=opt["schedule"],
                         dsa=aug, batch_standardize=batch_standardize, mix_p=opt["mix_p"], beta=opt["beta"])
    full_recipe = replace(recipe, epochs=full_epochs, lr=full_lr)
    base_model = model or default_model(spec.resolution)
    models = list(dict.fromkeys([base_model, *eval_pool(eval_mode, base_model)]))
    herding = "herding" in baseline

    config = dict(dataset=spec.name, data_path=str(data_path), syn=str(syn) if syn else None, models=models,
                  epochs=opt["epochs"], runs=runs, seed=seed, lr=opt["lr"], batch_size=opt["batch_size"],
                  momentum=opt["momentum"], weight_decay=opt["weight_decay"], schedule=opt["schedule"],
                  dsa=opt["dsa"], dsa_strategy=opt["dsa_strategy"], dsa_mode=opt["dsa_mode"],
                  batch_standardize=batch_standardize, baseline=baseline, ipc=ipc, full_epochs=full_epochs,
                  full_lr=full_lr, zca=zca, factor=factor, res=res, train_subset=train_subset,
                  test_per_class=test_per_class, eval_mode=eval_mode, preset=preset,
                  dsa_align_corners=opt["dsa_align_corners"], mix_p=opt["mix_p"], beta=opt["beta"],
                  herding_model=(herding_model or base_model) if herding else None,
                  herding_epochs=herding_epochs if herding else None)
    if results is None:
        results = (syn / "results.json") if (syn is not None and syn.is_dir()) else Path("results/validate.json")
    # Per-run resume: every finished run is a CSV row tagged with a fingerprint of this configuration; the same
    # command again skips those runs. A CSV of another configuration is never mixed in.
    key = config_key(config)
    log = RunLog(results.with_suffix(".csv"), quiet=quiet, constant={"config": key}, resume=not overwrite)
    if any(r.get("config") != key for r in log.rows):
        raise UserError(f"{results.with_suffix('.csv')} holds runs of another configuration; "
                        "pass --overwrite or choose another --results")
    arms = (["syn"] if synset is not None else []) + list(baseline)
    log.info(f"validate: {spec.name} ({spec.num_classes} classes, {spec.resolution}px), arms {arms}, models "
             f"{models}, {runs} runs, {recipe.epochs} epochs (full: {full_epochs}), lr {recipe.lr:g}, batch "
             f"{recipe.batch_size}, CutMix p {recipe.mix_p:g}, preset {preset or 'none'}, device {dev}")
    t0 = time.time()
    by_model = validate(synset, spec, train, test, models=models, recipe=recipe, baselines=baseline, runs=runs,
                        seed=seed, ipc=ipc, full_recipe=full_recipe, device=dev, log=log, space=space,
                        zca_state=zca_state, workers=workers, herding_model=config["herding_model"],
                        herding_epochs=herding_epochs)
    report = {"dataset": spec.name, "model": base_model, "syn_path": str(syn) if syn else None,
              "space": "zca" if zca_state is not None else "normalized",
              "test_images": len(test[1]) if isinstance(test, tuple) else len(test), "seconds": round(time.time() - t0, 1),
              **by_model[base_model], "by_model": by_model, "config": config,
              "note": "test accuracy after the last epoch (fractions); std = population std over runs"}
    atomic_write_json(report, results)
    for m, arms in by_model.items():
        for arm, s in arms.items():
            print(f"{m:14s} {arm:7s} {100 * s['mean']:6.2f} ± {100 * s['std']:.2f} %  ({len(s['runs'])} runs)")
    print(f"results: {results}")


if __name__ == "__main__":
    app()
