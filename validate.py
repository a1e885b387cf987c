"""validate.py: train fresh networks on a distilled set and report honest test accuracy.

    python validate.py --syn DIR --dataset FashionMNIST --model ConvNet-3 --epochs 300 --runs 5 \
        --baseline random --results results/fmnist.json

Every arm ("syn", and the baselines "random", "herding" and "full") is trained with the same recipe and the same
explicit seeds (run i uses seed + i), and is measured once on the real test set after its last epoch: no epoch or
checkpoint is ever chosen on the test set. Accuracies are fractions; std is the population std over runs.
Finished runs are recorded one CSV row each, so the same command after an interruption resumes with the next run.
The run in flight is checkpointed every `--ckpt-every` epochs, and when SIGTERM/SIGUSR1 asks it to stop, to
`<results stem>.ckpt.pt` (weights, optimiser, epoch, the run's generator, the global RNGs): the same command continues
it mid-training and records exactly the numbers of an uninterrupted run. A NaN/inf loss stops with one line naming
the lr flag to lower; the last good checkpoint is kept and the diverged run gets no row.

`--preset idc` (or `dream`) sets the recipe of IDC/DREAM's test.py (idc_dream.md §5, `idc_protocol`); `--preset speed`
(or `mtt`) that of MTT/SPEED's evaluate_synset (speed.md §5.2, `trajectory_protocol`). Flags given explicitly on
the command line still win over the preset's values.

`--teacher PATH` (or `--soft-labels DIR`) switches to the knowledge-distillation protocol of SRe2L / DWA / DELT
(decoupled.md §6, §10; `utils.kd`): the student (by default a fresh copy of the teacher's architecture) learns
KL(softmax(teacher/T) ‖ softmax(student/T)) on every augmented, mixed view, in the teacher's normalisation. KD presets
(`--preset sre2l-cifar|sre2l-tiny|sre2l-in1k|dwa-cifar|dwa-tiny|dwa-in1k|delt`, table KD_PRESETS) set the references'
recipes; `--baseline random` is then a random real subset of the same IPC trained with the same teacher, recipe and
seeds, `--hard-labels` adds the same student trained with cross-entropy, and results.json records the teacher's
intra-class feature diversity of each set (`diversity_cosine`). Accuracy is again measured once after the last epoch
(`reported: last`), where the references report the best of their periodic evaluations (§6.6, §9.1 item 18).
Under torchrun the KD student trains with DDP: every rank draws the same views and keeps rows rank::world of each
batch; test counts are summed over ranks and only rank 0 writes.

    torchrun --nproc_per_node 4 validate.py --syn recover_out --dataset CIFAR100 --teacher squeeze/teacher.pt \
        --preset dwa-cifar --baseline random --runs 3
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import typer

from networks import EVAL_POOLS, get_network
from networks.registry import eval_pool
from utils import ddranking
from utils.checkpoint import capture_rng, load_state, restore_rng, save_state
from utils.coreset import herding_indices
from utils.datasets import (IMAGENET_SUBSETS, DatasetSpec, FileDataset, dataset_labels, load_split, normalize,
                            open_split, per_class_indices, take, to_pixels)
from utils.dsa import DSA, DSAParams
from utils.errors import UserError
from utils.digest import changed_inputs, files_digest
from utils.distributed import DistInfo, all_reduce_sum, cleanup, device_for, env_info, init_distributed
from utils.io import atomic_write_json, check_writable
from utils.kd import (EVAL_TRANSFORMS, KDRecipe, Shard, check_recipe, count_correct, teacher_soft_targets,
                      train_network_kd)
from utils.misc import require_at_least, RunLog, cli_errors, resolve_device, step
from utils.signals import StopRequest, Stopped
from utils.synset import SyntheticSet, check_compatible, load_synset
from utils.teacher import Teacher, intra_class_cosine, load_teacher, teacher_features
from utils.amp import AMP_HELP, resolve_amp
from utils.train import EpochHook, StepHook, TrainRecipe, TrainResume, evaluate, train_network

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
                   "herding_epochs": None, "amp": "off"}


def config_key(config: dict) -> str:
    """The fingerprint of a configuration that tags every CSV row (resume only ever mixes equal keys)."""
    keyed = {k: v for k, v in config.items() if not (k in _NEUTRAL_CONFIG and v == _NEUTRAL_CONFIG[k])}
    return hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:12]


def input_digests(syn: Path | None, synset: SyntheticSet | None, teacher: Path | None = None) -> dict[str, str]:
    """Content fingerprints of what the runs train on, by description: the synthetic set's files (bytes of
    synset.pt / meta.json / zca.pt, size and mtime of ImageFolder images) and the KD teacher file's bytes. They are
    kept apart from the configuration key so that a refusal can say which input changed."""
    inputs = {}
    digest = synset.content_digest() if synset is not None else None
    if digest is not None:
        inputs[f"the synthetic set {syn}"] = digest
    if teacher is not None:
        inputs[f"the teacher {teacher}"] = files_digest([teacher])
    return inputs


def open_results_log(csv_path: Path, key: str, inputs: dict[str, str], quiet: bool, overwrite: bool) -> RunLog:
    """The results CSV, its finished runs read back unless `overwrite`: every row carries the configuration key
    and the input fingerprints, and rows of another configuration or recorded on other input contents (a set
    replaced at the same path) are refused, never mixed in or re-reported."""
    log = RunLog(csv_path, quiet=quiet, constant={"inputs": json.dumps(inputs, sort_keys=True), "config": key},
                 resume=not overwrite)
    if any(r.get("config") != key for r in log.rows):
        raise UserError(f"{csv_path} holds runs of another configuration; pass --overwrite or choose another "
                        "--results")
    for r in log.rows:
        changed = changed_inputs(json.loads(r["inputs"]) if r.get("inputs") else None, inputs,
                                 "its runs were recorded")
        if changed:
            raise UserError(f"{csv_path}: {changed}; pass --overwrite to discard those runs or choose another "
                            "--results")
    return log


def summarize(accs: list[float], seeds: list[int]) -> dict:
    return {"mean": float(np.mean(accs)), "std": float(np.std(accs)), "runs": [float(a) for a in accs],
            "seeds": seeds}


def _train_dataset(train, baselines) -> torch.utils.data.Dataset:
    """The train split as a Dataset; the full and herding baselines need it in memory, not streamed."""
    if isinstance(train, tuple):
        train = torch.utils.data.TensorDataset(*train)
    for b in ("full", "herding"):
        if b in baselines and isinstance(train, FileDataset):
            raise UserError(f"--baseline {b} needs the train split in memory, and this one is too large; "
                            "pass --train-subset N (images per class)")
    return train


def _record_run(log: RunLog, model: str, arm: str, seed: int, n_train: int, recipe, losses: list[float],
                acc: float, t0: float) -> float:
    """One finished training run: a results-CSV row (a re-run skips it) and a console line; returns acc."""
    log.row(model=model, arm=arm, seed=seed, n_train=n_train, epochs=recipe.epochs, lr=recipe.lr,
            final_train_loss=round(losses[-1], 5), test_acc=acc, seconds=round(time.time() - t0, 1))
    log.info(f"  {model} {arm:10s} seed {seed}: test acc {acc:.4f} ({time.time() - t0:.0f}s)")
    return acc


# ------------------------------------------------------------------------------------- run checkpoints

CKPT_FORMAT = "ddtoolkit-validate-ckpt-1"


@dataclass
class RunState:
    """The resume checkpoint of the one training run in flight, identified by (model, arm, seed)."""
    model: str
    arm: str
    seed: int
    epoch: int                 # epochs finished
    losses: list               # their mean training losses
    net: dict                  # the network's state_dict after them
    opt: dict                  # the optimiser's state_dict
    generator: torch.Tensor    # the run's torch.Generator (batch order, DSA / views, CutMix / mix)
    rng: dict                  # utils.checkpoint.capture_rng(): global torch / numpy / python states
    seconds: float             # training time so far, so the CSV's seconds column counts the whole run
    # a stop inside epoch index `epoch` (step > 0): its batch order, batches done and running loss sums
    step: int = 0
    order: Optional[torch.Tensor] = None
    total: float = 0.0
    count: int = 0


def ckpt_path_for(results: Path) -> Path:
    return results.with_suffix(".ckpt.pt")


def check_results_writable(results: Path) -> None:
    """Before any training: the results JSON, its CSV and the run checkpoint beside it can be written."""
    for path in (results, results.with_suffix(".csv"), ckpt_path_for(results)):
        check_writable(path, "--results", folder=False)


class RunCheckpoints:
    """Checkpoints of the training run in flight, one file beside the results, tagged with the configuration key.

    `open` reads a checkpoint left by an interrupted invocation (refusing one of another configuration); a run
    whose (model, arm, seed) it names continues from it (`resume`). `hook` gives the run's on_epoch_end, which
    writes every `every` epochs (0: never) and, when a stop was requested, writes and raises Stopped. Under torchrun
    every rank resumes from the same file, only rank 0 writes it, and the ranks agree on stopping (a signal may
    reach them at different epochs)."""

    def __init__(self, path: Path, fingerprint: str, every: int, stop: StopRequest | None = None,
                 log: RunLog | None = None, dist_info: DistInfo = DistInfo(),
                 device: torch.device = torch.device("cpu"), inputs: dict[str, str] | None = None):
        self.path, self.fingerprint, self.every, self.stop = Path(path), fingerprint, every, stop
        self.inputs = dict(inputs or {})   # content fingerprints of what the runs train on (input_digests)
        self.log = log or RunLog(None, quiet=True)
        self.dist_info, self.device = dist_info, device
        self.pending: RunState | None = None

    def open(self, overwrite: bool) -> None:
        if overwrite:
            if self.dist_info.is_main:
                self.path.unlink(missing_ok=True)
            return
        if not self.path.is_file():
            return
        self.pending = load_state(self.path, RunState, CKPT_FORMAT, self.fingerprint, "validate.py", "--results",
                                  inputs=self.inputs)

    def resume(self, model: str, arm: str, seed: int, net: torch.nn.Module, gen: torch.Generator
               ) -> tuple[TrainResume | None, float]:
        """(TrainResume, seconds so far) for the run (model, arm, seed) if the checkpoint holds it, after putting
        back its weights, its generator and the global RNGs; (None, 0) for a fresh run."""
        st = self.pending
        if st is None or (st.model, st.arm, int(st.seed)) != (model, arm, seed):
            return None, 0.0
        self.pending = None
        net.load_state_dict(st.net)
        gen.set_state(st.generator)
        restore_rng(st.rng)
        where = f"at batch {st.step} of epoch {st.epoch + 1}" if st.step else f"after epoch {st.epoch}"
        self.log.info(f"  {model} {arm} seed {seed}: resuming {where} from {self.path}")
        return TrainResume(int(st.epoch), st.opt, list(st.losses), int(st.step), st.order, float(st.total),
                           int(st.count)), float(st.seconds)

    def _stop_requested(self) -> bool:
        mine = self.stop is not None and self.stop.requested
        if not self.dist_info.enabled:
            return mine
        flag = torch.tensor([float(mine)], device=_collective_device(self.device))
        return bool(all_reduce_sum(flag, self.dist_info).item() > 0)

    def _stopped(self, what: str) -> Stopped:
        by = self.stop.name if self.stop is not None and self.stop.requested else "a signal to another rank"
        return Stopped(f"stopped by {by}; {what}; re-run the same command to continue")

    def between_runs(self) -> None:
        """A safe point before a run starts: every finished run is a CSV row."""
        if self._stop_requested():
            raise self._stopped(f"every finished run is recorded in {self.log.csv_path or 'the results CSV'}")

    def _save(self, model: str, arm: str, seed: int, gen: torch.Generator, t0: float, net: torch.nn.Module,
              opt: torch.optim.Optimizer, position: TrainResume) -> None:
        if self.dist_info.is_main:
            state = RunState(model=model, arm=arm, seed=seed, epoch=position.epoch, losses=list(position.losses),
                             net={k: v.detach().cpu() for k, v in net.state_dict().items()},
                             opt=opt.state_dict(), generator=gen.get_state(), rng=capture_rng(),
                             seconds=time.time() - t0, step=position.step, order=position.order,
                             total=position.total, count=position.count)
            save_state(state, self.path, CKPT_FORMAT, self.fingerprint, self.inputs)

    def hook(self, model: str, arm: str, seed: int, epochs: int, gen: torch.Generator, t0: float) -> EpochHook:
        def on_epoch_end(done: int, net: torch.nn.Module, opt: torch.optim.Optimizer, losses: list) -> None:
            stop = self._stop_requested()
            # the last epoch is not written periodically: the run's row follows at once
            if stop or (self.every > 0 and done % self.every == 0 and done < epochs):
                self._save(model, arm, seed, gen, t0, net, opt, TrainResume(done, {}, losses))
            if stop:
                raise self._stopped(f"checkpoint written after epoch {done}/{epochs} of {model} {arm} seed {seed} "
                                    f"({self.path})")
        return on_epoch_end

    def step_hook(self, model: str, arm: str, seed: int, epochs: int, gen: torch.Generator, t0: float) -> StepHook:
        """on_step: a stop request is honoured after the batch in flight, not at the end of a long epoch (Slurm
        kills after its grace period); the checkpoint holds the position inside the epoch, so the re-run continues
        bit for bit. A running loss that is already NaN/inf is not saved: the epoch's end reports the divergence."""
        def on_step(position: TrainResume, net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
            if not self._stop_requested() or not math.isfinite(position.total):
                return
            self._save(model, arm, seed, gen, t0, net, opt, position)
            raise self._stopped(f"checkpoint written after batch {position.step} of epoch {position.epoch + 1}/"
                                f"{epochs} of {model} {arm} seed {seed} ({self.path})")
        return on_step

    def finished(self) -> None:
        """The run's row is recorded: its checkpoint is no longer needed."""
        if self.dist_info.is_main:
            self.path.unlink(missing_ok=True)


def _start_run(ckpt: RunCheckpoints | None, model: str, arm: str, seed: int, epochs: int, net: torch.nn.Module,
               gen: torch.Generator) -> tuple[dict, float]:
    """train_network(_kd) keywords for one run (resume state, epoch hook, kept checkpoint) and its start time."""
    if ckpt is None:
        return {}, time.time()
    resume, seconds = ckpt.resume(model, arm, seed, net, gen)
    t0 = time.time() - seconds
    return dict(resume=resume, on_epoch_end=ckpt.hook(model, arm, seed, epochs, gen, t0),
                on_step=ckpt.step_hook(model, arm, seed, epochs, gen, t0), ckpt=ckpt.path), t0


def train_arm(arm: str, model: str, inputs: torch.Tensor, labels: torch.Tensor, prepare: Callable,
              spec: DatasetSpec, recipe: TrainRecipe, seeds: list[int], score: Callable[[torch.nn.Module], float],
              device: torch.device, log: RunLog, pick: Callable[[int], tuple] | None = None,
              ckpt: RunCheckpoints | None = None, lr_flag: str = "--lr") -> dict:
    """Train one fresh `model` per seed on the arm's data and `score` it once, after the last epoch;
    `pick(seed)` may draw the data per run. With `ckpt`, a run in flight is checkpointed and resumed;
    `lr_flag` is the flag a diverged run tells the user to lower."""
    accs = []
    for seed in seeds:
        done = log.find(model=model, arm=arm, seed=seed)
        if done is not None:  # finished by an earlier, interrupted invocation of the same configuration
            accs.append(float(done["test_acc"]))
            log.info(f"  {model} {arm:6s} seed {seed}: test acc {accs[-1]:.4f} (resumed from {log.csv_path})")
            continue
        if ckpt is not None:
            ckpt.between_runs()
        torch.manual_seed(seed)  # network init comes from the global RNG; the generator drives data order + DSA
        gen = torch.Generator().manual_seed(seed)
        if pick is not None:
            inputs, labels = pick(seed)
        net = get_network(model, spec.channels, spec.num_classes, spec.resolution)
        kw, t0 = _start_run(ckpt, model, arm, seed, recipe.epochs, net, gen)
        losses = train_network(net, inputs, labels, recipe, gen, device, prepare, desc=f"{arm} seed {seed}",
                               lower=f"{lr_flag} (now {recipe.lr:g})", **kw)
        accs.append(_record_run(log, model, arm, seed, len(labels), recipe, losses, score(net), t0))
        if ckpt is not None:
            ckpt.finished()
    return summarize(accs, seeds)


def validate(syn: SyntheticSet | None, spec: DatasetSpec, train, test, *,
             models: list[str], recipe: TrainRecipe, baselines: list[str], runs: int, seed: int, ipc: int | None,
             full_recipe: TrainRecipe | None, device: torch.device, log: RunLog,
             space: str = "normalized", zca_state: dict | None = None, workers: int = 0,
             herding_model: str | None = None, herding_epochs: int = 5,
             ckpt: RunCheckpoints | None = None) -> dict:
    """Run every arm for every model. `train` (for the baselines) and `test` are real splits as `open_split`
    datasets of uint8 images, or (images, labels) pairs. Returns {model: {arm: summary}}.

    The herding subset (`ipc` per class) is selected once, from features of a `herding_model` (default: the first
    of `models`) trained for `herding_epochs` with `seed`, and shared by every model and run; it is computed only
    if some herding run is not already recorded in the log. `ckpt` checkpoints and resumes the run in flight."""
    real_prep, syn_prep = input_space(spec, space, zca_state)
    seeds = [seed + i for i in range(runs)]

    def score(net):  # the real test set, mapped like the baselines' real images
        # standardised test batches depend on the batch size: SPEED tests in batches of 128 (speed.md §5.2)
        return evaluate(net, test, device, real_prep, batch_size=128 if recipe.batch_standardize else 500,
                        batch_standardize=recipe.batch_standardize, workers=workers)
    train = _train_dataset(train, baselines)
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
            res["syn"] = train_arm("syn", model, images, labels, syn_prep, spec, recipe, seeds, score, device, log,
                                   ckpt=ckpt)
        if "random" in baselines:
            train_labels = dataset_labels(train)

            def pick(s, _ipc=ipc):
                idx = _random_subset(train_labels, spec.num_classes, _ipc, s)
                return take(train, idx), train_labels[idx]
            res["random"] = train_arm("random", model, None, None, real_prep, spec, recipe, seeds, score, device,
                                      log, pick=pick, ckpt=ckpt)
            res["random"]["ipc"] = ipc
            if "noaug" in baselines:  # DD-Ranking's ARS: both arms again without the recipe's augmentation
                plain = replace(recipe, dsa=None, mix_p=0.0)
                if syn is not None:
                    res["syn_noaug"] = train_arm("syn_noaug", model, images, labels, syn_prep, spec, plain, seeds,
                                                 score, device, log, ckpt=ckpt)
                res["random_noaug"] = train_arm("random_noaug", model, None, None, real_prep, spec, plain, seeds,
                                                score, device, log, pick=pick, ckpt=ckpt)
        if "herding" in baselines:
            res["herding"] = train_arm("herding", model, None, None, real_prep, spec, recipe, seeds, score, device,
                                       log, pick=pick_herding, ckpt=ckpt)
            res["herding"].update(ipc=ipc, herding_model=herd_model, herding_epochs=herding_epochs)
        if "full" in baselines:
            res["full"] = train_arm("full", model, *train.tensors, real_prep, spec, full_recipe, seeds, score,
                                    device, log, ckpt=ckpt, lr_flag="--full-lr")
        out[model] = res
    return out


def _random_subset(labels: torch.Tensor, num_classes: int, ipc: int, seed: int) -> torch.Tensor:
    """The random baseline's images for run `seed`; offset so the draw never shares a stream with network init."""
    return per_class_indices(labels, num_classes, ipc, 10_000 + seed)


# --------------------------------------------------------------------- KD protocols (decoupled.md §6, §10)
# `--teacher` (or `--soft-labels`) switches validation to the SRe2L / DWA / DELT protocol: a fresh student learns
# from the teacher's soft labels on every augmented, mixed view (utils.kd.train_network_kd). Students and teacher
# see inputs in the TEACHER's normalisation; every set is first mapped to pixel space [0, 1].

# The KD recipe when neither a flag nor a KD preset sets a value: SRe2L/DWA ImageNet train_KD (§6.2, §6.4) with
# DWA's batch 128.
KD_DEFAULTS = dict(epochs=300, optimizer="adamw", lr=1e-3, weight_decay=0.01, wd_on_norm_and_bias=False,
                   momentum=0.9, betas=(0.9, 0.999), batch_size=128, schedule="cosine", warmup_epochs=0,
                   temperature=20.0, t_squared=False, mix="cutmix", mix_alpha=None, mix_p=1.0, crop="rrc",
                   crop_scale=(0.08, 1.0), flip=True, rand_augment=False, teacher_bn_mode="eval",
                   eval_transform="none")
# §6.3 CIFAR (SRe2L relabel_cifar.py) = §6.4 CIFAR (DWA validation_cifar.py): the teacher stays in train mode
# there (§9.1 item 7, parity default; `--teacher-bn-mode eval` is the clean alternative).
_CIFAR_KD = dict(epochs=400, batch_size=128, optimizer="adamw", lr=1e-3, weight_decay=0.01,
                 wd_on_norm_and_bias=True, schedule="cosine", warmup_epochs=0, crop="random-crop-pad4", flip=True,
                 mix="mixup", mix_alpha=0.8, mix_p=1.0, temperature=30.0, t_squared=False, teacher_bn_mode="train",
                 rand_augment=False, eval_transform="none")
# §6.3 Tiny / §6.4 Tiny: SGD on all parameters, 5-epoch linear warm-up from 0.01 then cosine (T_max = E − 5), ×T².
_TINY_KD = dict(optimizer="sgd", lr=0.2, momentum=0.9, weight_decay=1e-4, wd_on_norm_and_bias=True,
                schedule="warmup-cosine", warmup_epochs=5, temperature=20.0, t_squared=True, crop="rrc",
                crop_scale=(0.08, 1.0), flip=True, rand_augment=False, teacher_bn_mode="eval",
                eval_transform="none")
# §6.2 train_KD / §6.4 ImageNet-1K: AdamW without decay on norm/bias, cosine, CutMix every batch; validation
# Resize 256 → CenterCrop 224 (= Resize(⌊R/7⌋·8) → CenterCrop(R) at R = 224).
_IN1K_KD = dict(epochs=300, optimizer="adamw", lr=1e-3, weight_decay=0.01, wd_on_norm_and_bias=False,
                schedule="cosine", warmup_epochs=0, temperature=20.0, t_squared=False, mix="cutmix", mix_alpha=1.0,
                mix_p=1.0, crop="rrc", crop_scale=(0.08, 1.0), flip=True, rand_augment=False,
                teacher_bn_mode="eval", eval_transform="resize-crop")
KD_PRESETS: dict[str, dict] = {
    "sre2l-cifar": _CIFAR_KD,
    "sre2l-tiny": {**_TINY_KD, "epochs": 100, "batch_size": 256, "mix": "none"},
    "sre2l-in1k": {**_IN1K_KD, "batch_size": 1024},
    "dwa-cifar": _CIFAR_KD,
    "dwa-tiny": {**_TINY_KD, "epochs": 200, "batch_size": 64, "mix": "cutmix", "mix_alpha": 1.0, "mix_p": 1.0},
    "dwa-in1k": {**_IN1K_KD, "batch_size": 128},
    # §6.5: batch size and lr depend on the IPC, the classes and the student (delt_batch_size, delt_lr)
    "delt": dict(epochs=300, optimizer="adamw", betas=(0.9, 0.999), weight_decay=0.01, wd_on_norm_and_bias=False,
                 schedule="half-cosine", warmup_epochs=0, temperature=20.0, t_squared=False, mix="cutmix",
                 mix_alpha=1.0, mix_p=1.0, crop="rrc", crop_scale=(0.25, 1.0), flip=True, rand_augment=True,
                 teacher_bn_mode="eval", eval_transform="resize-crop"),
}
# DELT's AdamW lr by student (§6.5); every other listed student (ResNet-18/50/101, -modified, conv3-6) uses 1e-3,
# and so does any student the table lacks (the reference would leave those at lr 0, i.e. untrained).
DELT_LR = {"VGG-11": 5e-4, "VGG-11-BN": 5e-4, "AlexNet": 1e-4}
# DELT's automatic batch size (§6.5): the first row whose IPC threshold the set reaches. The reference lists IPC
# 1, 10/20, 30/40, 50 and 100; IPCs between the listed ones take the row below them [inferred].
DELT_BATCH = ((30, 100), (10, 50), (1, 10))


def delt_batch_size(ipc: int, num_classes: int, dataset: str, student: str) -> int:
    """DELT's --re-batch-size 0 rule (§6.5): by IPC, ×2 for 100 or 1000 classes, halved for ResNet-101 students on
    ImageNet-1K/-100, fixed 100 on Tiny-ImageNet, capped at IPC·C (ImageNet-1K: IPC 50 → 200, 10 → 100,
    1 → 20)."""
    from networks.registry import canonical_name
    if dataset == "TinyImageNet":
        b = 100
    else:
        b = next(size for floor, size in DELT_BATCH if ipc >= floor) if ipc >= 1 else 10
        if num_classes in (100, 1000):
            b *= 2
        if canonical_name(student).startswith("ResNet-101") and dataset in ("ImageNet", "ImageNet100"):
            b //= 2
    return max(1, min(b, ipc * num_classes))


def kd_protocol(preset: str, spec: DatasetSpec, ipc: int | None, student: str, teacher_arch: str | None = None
                ) -> dict:
    """The recipe fields a KD preset sets (keys of KD_DEFAULTS); DELT's batch and lr are computed here."""
    from networks.registry import canonical_name
    out = dict(KD_PRESETS[preset])
    if preset == "delt":
        if not ipc:
            raise UserError("--preset delt needs the IPC (from the set, or --ipc) for its batch size")
        out["lr"] = DELT_LR.get(canonical_name(student), 1e-3)
        out["batch_size"] = delt_batch_size(ipc, spec.num_classes, spec.name, student)
        conv3 = canonical_name("conv3")
        if spec.name == "CIFAR100" and canonical_name(student) == conv3 and teacher_arch is not None \
                and canonical_name(teacher_arch) == conv3:  # the reference's special case
            out.update(batch_size=25, lr=2e-3)
    return out


def kd_recipe(opt: dict, amp: str = "off") -> KDRecipe:
    """A KDRecipe from resolved options (KD_DEFAULTS keys; eval_transform is not a training field)."""
    fields = {k: v for k, v in opt.items() if k != "eval_transform"}
    return KDRecipe(**{**fields, "betas": tuple(fields["betas"]), "crop_scale": tuple(fields["crop_scale"])},
                    amp=amp)


def first_per_class(labels: torch.Tensor, per_class: int, what: str = "the set") -> torch.Tensor:
    """Indices of the first `per_class` images of every class, in stored order. For ImageFolder sets that order
    is the sorted file names, so this is DWA's "first IPC files per class" (§6.4). DELT instead shuffles an
    unsorted listing (§6.5, §9.1 item 9); we always take the sorted first N, which is repeatable anywhere."""
    picked = []
    for c in labels.unique().tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < per_class:
            raise UserError(f"--ipc {per_class}: class {c} of {what} has only {len(idx)} images")
        picked.append(idx[:per_class])
    return torch.cat(picked)


def is_imagefolder_set(syn: SyntheticSet) -> bool:
    return syn.meta.get("method") == "imagefolder" or syn.meta.get("layout") == "imagefolder"


def first_ipc_of_imagefolder(syn: SyntheticSet, ipc: int) -> SyntheticSet:
    """An ImageFolder set restricted to its first `ipc` files per class (pixel decoder: a plain subset)."""
    images, labels = syn.tensors["images"], syn.labels
    idx = first_per_class(labels, ipc, str(syn.meta.get("source", "the set")))
    return SyntheticSet({"images": images[idx]}, labels[idx], {**syn.meta, "ipc": ipc}, syn.lr, None,
                        syn.zca_state, files=syn.files)


def check_teacher_fits(teacher: Teacher, spec: DatasetSpec, source: str) -> None:
    """The teacher must label this data: same channels, class count and resolution (and dataset, when both are
    registry datasets) — else a one-line error before any training."""
    if teacher.num_classes != spec.num_classes:
        raise UserError(f"teacher {source} has {teacher.num_classes} classes but the {spec.name} data has "
                        f"{spec.num_classes}")
    if teacher.channels != spec.channels:
        raise UserError(f"teacher {source} takes {teacher.channels}-channel images, the {spec.name} data has "
                        f"{spec.channels}")
    if teacher.resolution != spec.resolution:
        raise UserError(f"teacher {source} takes {teacher.resolution}px images but the data is "
                        f"{spec.resolution}px; pass --res {teacher.resolution} (and a set of that size)")
    generic = "ImageFolder"
    if teacher.dataset not in (generic, spec.name) and spec.name != generic:
        raise UserError(f"teacher {source} was trained on {teacher.dataset}, not {spec.name}")


def stored_teacher_info(manifest: dict) -> dict:
    """arch / mean / std recorded by the relabel stage, looked up at the top level or under "teacher"."""
    nested = manifest.get("teacher") if isinstance(manifest.get("teacher"), dict) else {}
    get = lambda k: manifest.get(k, nested.get(k))  # noqa: E731
    return {"arch": get("arch") or get("teacher_arch"), "mean": get("mean"), "std": get("std"),
            "path": get("path")}


def set_diversity(teacher: Teacher, images: torch.Tensor, labels: torch.Tensor) -> float:
    """DELT's intra-class diversity measure (§7.2): the mean over classes of the mean pairwise cosine similarity
    of the teacher's penultimate features (lower = more diverse)."""
    feats = teacher_features(teacher, teacher.normalize(_pixels01(images)))
    per_class = intra_class_cosine(feats, labels)
    return float(np.mean(list(per_class.values()))) if per_class else float("nan")


def _pixels01(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


def train_arm_kd(arm: str, model: str, images: torch.Tensor | None, labels: torch.Tensor | None,
                 spec: DatasetSpec, recipe: KDRecipe, seeds: list[int], score: Callable[[torch.nn.Module], float],
                 device: torch.device, log: RunLog, *, prepare: Callable, soft_targets: Callable | None = None,
                 stored=None, shard: Shard = Shard(), teacher_net: torch.nn.Module | None = None,
                 pick: Callable[[int], tuple] | None = None, ckpt: RunCheckpoints | None = None) -> dict:
    """`train_arm` for the KD protocol: one fresh student per seed, scored once after its last epoch. A teacher
    in train BN mode has its buffers restored after every run, so no run sees another run's drift."""
    accs = []
    for seed in seeds:
        done = log.find(model=model, arm=arm, seed=seed)
        if done is not None:
            accs.append(float(done["test_acc"]))
            log.info(f"  {model} {arm:10s} seed {seed}: test acc {accs[-1]:.4f} (resumed from {log.csv_path})")
            continue
        if ckpt is not None:
            ckpt.between_runs()
        if pick is not None:
            images, labels = pick(seed)
        torch.manual_seed(seed)  # network init from the global RNG; the generator drives order, views and mix
        gen = torch.Generator().manual_seed(seed)
        net = get_network(model, spec.channels, spec.num_classes, spec.resolution)
        saved = None
        if teacher_net is not None and recipe.teacher_bn_mode == "train":
            saved = {k: v.detach().clone() for k, v in teacher_net.state_dict().items()}
        kw, t0 = _start_run(ckpt, model, arm, seed, recipe.epochs, net, gen)
        try:
            losses = train_network_kd(net, images, labels, recipe, gen, device, soft_targets=soft_targets,
                                      stored=stored, prepare=prepare, shard=shard, desc=f"{arm} seed {seed}",
                                      lower=f"--lr (now {recipe.lr:g})", **kw)
        finally:
            if saved is not None:
                teacher_net.load_state_dict(saved)
            if teacher_net is not None:
                teacher_net.eval()  # frozen teachers rest in eval mode (features for diversity, the next run)
        accs.append(_record_run(log, model, arm, seed, len(labels), recipe, losses, score(net), t0))
        if ckpt is not None:
            ckpt.finished()
    return summarize(accs, seeds)


def validate_kd(images: torch.Tensor | None, labels: torch.Tensor | None, spec: DatasetSpec, train, test, *,
                models: list[str], recipe_for: Callable[[str], KDRecipe], teacher: Teacher | None,
                norm: tuple[tuple, tuple], baselines: list[str], runs: int, seed: int, ipc: int | None,
                device: torch.device, log: RunLog, stored=None, hard_labels: bool = False,
                eval_transform: str = "none", full_epochs: int = 20, dist_info: DistInfo = DistInfo(),
                workers: int = 0, herding_model: str | None = None, herding_epochs: int = 5,
                teacher_source: str | None = None, ckpt: RunCheckpoints | None = None) -> dict:
    """Every arm of the KD protocol for every student: "syn" (the set, soft labels from the online `teacher` or
    from `stored`), "hard_label" (the same student, recipe and seeds with cross-entropy on the set's hard labels,
    if asked), and the baselines "random" / "herding" / "full" (real images trained with the SAME teacher,
    recipe and seeds). `images` are the set's pixels ([0, 1] float or uint8). Returns {model: {arm: summary}},
    plus "_diversity": {arm: mean intra-class cosine} when a teacher is given (computed on rank 0 only)."""
    mean, std = norm
    prepare = lambda x: normalize(x, mean, std)  # noqa: E731  (pixels -> the teacher's input space)
    eval_tf = EVAL_TRANSFORMS[eval_transform]
    shard = Shard(dist_info.rank, dist_info.world_size)
    seeds = [seed + i for i in range(runs)]
    soft = teacher_soft_targets(teacher.net, recipe_for(models[0]).teacher_bn_mode, recipe_for(models[0]).amp) \
        if teacher is not None else None
    teacher_net = teacher.net if teacher is not None else None

    def score(net):  # the real test set, sharded over ranks, counts summed
        _sync_buffers(net, dist_info)
        c, t = count_correct(net, test, device, lambda x: prepare(eval_tf(to_pixels(x))), batch_size=500,
                             workers=workers, shard=shard)
        counts = all_reduce_sum(torch.tensor([c, t], dtype=torch.float64, device=_collective_device(device)),
                                dist_info)
        return float(counts[0] / counts[1].clamp(min=1))
    train = _train_dataset(train, baselines)
    herd: dict[str, torch.Tensor] = {}
    herd_model = herding_model or models[0]

    def pick_herding(_seed):
        if "idx" not in herd:
            real_prep, _ = input_space(spec, "pixel", None)
            herd["idx"] = herding_indices(*train.tensors, spec, ipc, model=herd_model, epochs=herding_epochs,
                                          seed=seed, device=device, prepare=real_prep)
        return train.tensors[0][herd["idx"]], train.tensors[1][herd["idx"]]
    train_labels = dataset_labels(train) if train is not None else None

    def pick_random(s):
        idx = _random_subset(train_labels, spec.num_classes, ipc, s)
        return take(train, idx), train_labels[idx]
    source = teacher_source or (teacher.meta.get("source") if teacher is not None else None)
    out: dict[str, dict] = {}
    for model in models:
        recipe = recipe_for(model)
        kw = dict(prepare=prepare, shard=shard, teacher_net=teacher_net, ckpt=ckpt)
        res: dict[str, dict] = {}
        if images is not None:
            res["syn"] = train_arm_kd("syn", model, images, labels, spec, recipe, seeds, score, device, log,
                                      soft_targets=None if stored is not None else soft, stored=stored, **kw)
            res["syn"]["teacher"] = source
            res["syn"]["soft_labels"] = str(getattr(stored, "path", "stored")) if stored is not None else "online"
            if hard_labels:
                res["hard_label"] = train_arm_kd("hard_label", model, images, labels, spec, recipe, seeds, score,
                                                 device, log, **kw)
                res["hard_label"]["teacher"] = None
        for b in ("random", "herding", "full"):
            if b not in baselines:
                continue
            if soft is None:
                raise UserError(f"--baseline {b} in KD mode needs an online --teacher to label the real images")
            if b == "full":
                res[b] = train_arm_kd(b, model, *train.tensors, spec, replace(recipe, epochs=full_epochs), seeds,
                                      score, device, log, soft_targets=soft, **kw)
                if hard_labels:  # DD-Ranking's HLR compares hard-label arms: the full data with cross-entropy too
                    res["full_hard_label"] = train_arm_kd("full_hard_label", model, *train.tensors, spec,
                                                          replace(recipe, epochs=full_epochs), seeds, score,
                                                          device, log, **kw)
                    res["full_hard_label"]["teacher"] = None
            else:
                res[b] = train_arm_kd(b, model, None, None, spec, recipe, seeds, score, device, log,
                                      soft_targets=soft, pick=pick_random if b == "random" else pick_herding, **kw)
                res[b]["ipc"] = ipc
            res[b]["teacher"] = source
        out[model] = res
    if teacher is not None and dist_info.is_main:
        div = {}
        if images is not None:
            div["syn"] = set_diversity(teacher, images, labels)
        if "random" in baselines:
            per_seed = [set_diversity(teacher, *pick_random(s)) for s in seeds]
            div["random"] = float(np.mean(per_seed))
            div["random_runs"] = per_seed
        if "herding" in baselines:
            div["herding"] = set_diversity(teacher, *pick_herding(seed))
        out["_diversity"] = div
    return out


def _collective_device(device: torch.device) -> torch.device:
    """gloo reduces CPU tensors, NCCL CUDA ones."""
    return device if device.type == "cuda" and torch.distributed.is_initialized() else torch.device("cpu")


def _sync_buffers(net: torch.nn.Module, dist_info: DistInfo) -> None:
    """Before a sharded evaluation every rank takes rank 0's BatchNorm buffers (each rank updated its own copy on
    its slice of the last batch), so all shards are scored by the same network."""
    if not (dist_info.enabled and torch.distributed.is_initialized()):
        return
    for b in net.buffers():
        if b.is_floating_point():
            torch.distributed.broadcast(b.data, src=0)


# ------------------------------------------------------------------------------------------------ CLI

app = typer.Typer(add_completion=False, context_settings={"help_option_names": ["-h", "--help"]})


@app.command()
@cli_errors
def main(
    syn: Optional[Path] = typer.Option(None, "--syn", "--syn-path", "--syn-data-path", "--train-dir",
                                       help="Synthetic set: a ddtoolkit directory, or a legacy MTT images_*.pt "
                                       "folder, IDC data.pt or SRe2L-style ImageFolder."),
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
                                         "single; speed also standardises every batch (§1.3). KD presets (need "
                                         "--teacher or --soft-labels; decoupled.md §6; each sets only its own "
                                         "keys): sre2l-cifar = dwa-cifar: 400 epochs, batch 128, AdamW 1e-3 wd 0.01 "
                                         "on all params, cosine, random crop pad 4 + flip, mixup (0.8) every batch, "
                                         "T 30, teacher in train BN mode; sre2l-tiny: SGD 0.2/0.9/1e-4, batch 256, "
                                         "100 epochs, 5-epoch warm-up + cosine, T 20 ×T², RRC + flip, no mix; "
                                         "dwa-tiny: as sre2l-tiny with 200 epochs, batch 64, CutMix every batch; "
                                         "sre2l-in1k: AdamW 1e-3 wd 0.01 (none on norm/bias), cosine, 300 epochs, "
                                         "batch 1024, T 20, CutMix, RRC(0.08, 1) + flip, eval Resize ⌊R/7⌋·8 + "
                                         "CenterCrop R; dwa-in1k: the same with batch 128; delt: as sre2l-in1k "
                                         "with a half cosine (ends at 0.5×), RRC(0.25, 1), RandAugment m6 n2 "
                                         "(torchvision's, standing in for timm's), batch by DELT's IPC rule, lr by "
                                         "student (VGG-11 5e-4, AlexNet 1e-4, else 1e-3)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", "--epoch_eval_train", "--re-epochs", help="Training "
                                         "epochs per run (default 300; the papers use 1000; lr drops ×0.1 after "
                                         "half with the default step schedule)."),
    runs: int = typer.Option(5, "--runs", "--num_eval", help="Fresh networks per arm; run i uses seed + i."),
    seed: int = typer.Option(0, "--seed", help="Base seed: network init, batch order, DSA, random subsets."),
    lr: Optional[float] = typer.Option(None, "--lr", "--lr_net", "--adamw-lr", help="SGD lr (default: the set's "
                                       "learned lr if it has one, else 0.01). KD mode: the optimiser's lr "
                                       "(default 1e-3)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "--batch_train", "--re-batch-size",
                                             help="Training batch size (default 256; KD mode: 128, the global "
                                             "batch that torchrun ranks split)."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum (default 0.9)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", "--wd", "--adamw-weight-decay",
                                                 help="Weight decay (default 5e-4; KD mode: 0.01)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="lr schedule: step (default; ×0.1 at E/2), "
                                           "multistep (×0.2 at 2E/3 and 5E/6), cosine, none. KD mode, per "
                                           "epoch: cosine (default) ½(1+cos(πe/E)), half-cosine ½(1+cos(πe/2E)) "
                                           "(DELT), warmup-cosine (linear warm-up from 0.01 for --warmup-epochs, "
                                           "then cosine over the rest; Tiny), linear 1 − e/E, constant."),
    dsa: Optional[bool] = typer.Option(None, "--dsa/--no-dsa", help="Differentiable siamese augmentation on every "
                                       "batch (default on)."),
    dsa_strategy: Optional[str] = typer.Option(None, "--dsa-strategy", "--dsa_strategy", help="DSA families, "
                                               "joined by '_' (default color_crop_cutout_flip_scale_rotate)."),
    dsa_mode: Optional[str] = typer.Option(None, "--dsa-mode", help="single (default): one family per batch "
                                           "(MTT); all: every family; idc: flip, color, one geometric op, cutout."),
    mix_p: Optional[float] = typer.Option(None, "--mix-p", "--mix_p", help="CutMix probability per batch, applied "
                                          "after DSA (default 0: off; idc_dream.md §2.5). KD mode: the "
                                          "probability of --kd-mix per batch (default 1)."),
    beta: Optional[float] = typer.Option(None, "--beta", "--mix-alpha", help="CutMix λ ~ Beta(beta, beta) "
                                         "(default 1). KD mode: α of --kd-mix (default 1 for cutmix, 0.8 for "
                                         "mixup)."),
    batch_standardize: Optional[bool] = typer.Option(None, "--batch-standardize/--no-batch-standardize",
                                                     help="SPEED's per-batch scalar standardisation of train and "
                                                     "test inputs (speed.md §1.3; default off, on with --preset "
                                                     "speed)."),
    baseline: list[str] = typer.Option([], "--baseline", help="Also train on: 'random' (a random real subset of "
                                       "the set's storage IPC, same recipe and seeds), 'herding' (a herding subset "
                                       "of that IPC, selected once; see --herding-model) and/or 'full' (all real "
                                       "training data); 'noaug' (with random: the set and the random subset again "
                                       "without DSA/CutMix, for DD-Ranking's ARS). Repeat the flag for several."),
    ipc: Optional[int] = typer.Option(None, "--ipc", "--IPC", help="IPC of the random and herding baselines "
                                      "(default: the set's storage IPC); required when no --syn is given. With an "
                                      "ImageFolder set (SRe2L/DWA/DELT, recover.py) it also takes the first N "
                                      "files per class in sorted name order (DWA's rule; DELT shuffles an "
                                      "unsorted listing instead, decoupled.md §9.1 item 9)."),
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
                                   "CSV and any run checkpoint beside it instead of resuming from them (needed when "
                                   "its configuration differs)."),
    ckpt_every: int = typer.Option(50, "--ckpt-every", help="While a training run is in flight, write its full "
                                   "state (weights, optimiser, epoch, RNGs) every this many epochs to "
                                   "<results stem>.ckpt.pt, so the same command continues it mid-training with "
                                   "exactly the numbers of an uninterrupted run; the file is deleted once the run's "
                                   "row is recorded. 0: only when SIGTERM/SIGUSR1 stops the run (it is then "
                                   "written after the epoch in flight, exit status 143)."),
    quiet: bool = typer.Option(False, "--quiet", help="Only the final summary."),
    # ---- knowledge-distillation protocol (decoupled.md §6)
    teacher: Optional[Path] = typer.Option(None, "--teacher", "--teacher-path", help="KD mode: a teacher file "
                                           "(ddtoolkit teacher, or a foreign checkpoint with --teacher-arch). The "
                                           "student learns KL(softmax(teacher/T) ‖ student) on every augmented, "
                                           "mixed view; students and teacher see the teacher's normalisation; "
                                           "the student defaults to the teacher's architecture. Test accuracy is "
                                           "measured once after the last epoch (reported: last); the references "
                                           "report the best of their periodic test evaluations instead (§6.6)."),
    teacher_arch: Optional[str] = typer.Option(None, "--teacher-arch", "--arch-name", "--teacher-model",
                                               help="Architecture of a foreign teacher checkpoint (SRe2L/DWA "
                                               "ckpt.pth, RDED .pth, torchvision state_dict), e.g. "
                                               "resnet18_modified, conv4."),
    teacher_norm: Optional[str] = typer.Option(None, "--teacher-norm", help="Normalisation of a foreign teacher: "
                                               "imagenet, cifar10, cifar10-true, cifar100, tiny (default: the "
                                               "dataset's)."),
    soft_labels: Optional[Path] = typer.Option(None, "--soft-labels", "--fkd-path", help="KD mode from stored "
                                               "soft labels (relabel.py output): the recorded views and teacher "
                                               "logits of each epoch replace the online teacher for the set (which "
                                               "must be the one relabelled, in full: no --ipc subset). Batch size "
                                               "and epochs default to the stored ones; the normalisation and "
                                               "student come from --teacher if given, else from the manifest. "
                                               "Baselines still need --teacher."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-T", help="KD temperature (default 20; "
                                                "CIFAR presets 30)."),
    kd_mix: Optional[str] = typer.Option(None, "--kd-mix", "--mix-type", "--mix_type", help="KD batch mix: "
                                         "cutmix (default), mixup or none; the teacher labels the mixed view."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="KD optimiser: adamw (default) or sgd."),
    t_squared: Optional[bool] = typer.Option(None, "--t-squared/--no-t-squared", help="Multiply the KD loss by "
                                             "T² (the Tiny SGD recipes; default off)."),
    teacher_bn_mode: Optional[str] = typer.Option(None, "--teacher-bn-mode", help="eval (default): the teacher "
                                                  "labels with its running BN statistics. train: its BN uses each "
                                                  "mixed batch's statistics, as SRe2L relabel_cifar.py and DWA "
                                                  "validation_cifar.py do (§9.1 item 7; the CIFAR presets' parity "
                                                  "setting); its buffers are restored after every run."),
    hard_labels: bool = typer.Option(False, "--hard-labels/--no-hard-labels", help="KD mode: also train the same "
                                     "student, recipe and seeds with cross-entropy on the set's hard labels and "
                                     "report it alongside (arm hard_label)."),
    amp: str = typer.Option("off", "--amp", help=AMP_HELP + " validate: the student's (and the KD teacher's) "
                            "forward; test accuracy is always measured in fp32."),
    kd_crop: Optional[str] = typer.Option(None, "--kd-crop", help="KD per-image crop: rrc (RandomResizedCrop, "
                                          "default), random-crop-pad4 (CIFAR), none."),
    crop_scale: Optional[str] = typer.Option(None, "--crop-scale", help="KD RandomResizedCrop area range 'min,max' "
                                             "(default 0.08,1; DELT 0.25,1)."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="KD horizontal flip per image (default on)."),
    rand_augment: Optional[bool] = typer.Option(None, "--rand-augment/--no-rand-augment", "--use-rand-augment",
                                                help="KD: torchvision RandAugment m6 n2 per image before the "
                                                "crop, standing in for DELT's timm rand-m6-n2-mstd1.0 (default "
                                                "off; on with --preset delt)."),
    warmup_epochs: Optional[int] = typer.Option(None, "--warmup-epochs", help="KD: epochs of linear lr warm-up "
                                                "from 0.01× (default 0; Tiny presets 5)."),
    betas: Optional[str] = typer.Option(None, "--betas", help="KD AdamW betas 'b1,b2' (default 0.9,0.999)."),
    wd_norm_bias: Optional[bool] = typer.Option(None, "--wd-norm-bias/--no-wd-norm-bias", help="KD: weight decay "
                                                "on normalisation parameters and biases too (CIFAR and Tiny "
                                                "recipes) or not (default: not; ImageNet and DELT)."),
    eval_transform: Optional[str] = typer.Option(None, "--eval-transform", help="KD test view: none (default) or "
                                                 "resize-crop (Resize ⌊R/7⌋·8 then CenterCrop R: DELT and the "
                                                 "ImageNet 256/224 protocol)."),
):
    """Train fresh networks on a distilled set (and baselines) and report last-epoch test accuracy.

    With --teacher (or --soft-labels) the students learn from a teacher's soft labels (SRe2L / DWA / DELT,
    decoupled.md §6); under torchrun the student is trained with DDP (each rank a slice of every batch) and only
    rank 0 writes.
    """
    cli = dict(locals())
    require_at_least({"--epochs": epochs, "--runs": runs, "--batch-size": batch_size, "--ipc": ipc,
                      "--herding-epochs": herding_epochs, "--full-epochs": full_epochs, "--factor": factor,
                      "--res": res, "--train-subset": train_subset, "--test-per-class": test_per_class})
    if ckpt_every < 0:
        raise UserError(f"--ckpt-every must be 0 (only on a stop request) or a positive number of epochs, got "
                        f"{ckpt_every}")
    if teacher is not None or soft_labels is not None:
        return run_kd(cli)
    kd_only = dict(temperature=temperature, kd_mix=kd_mix, optimizer=optimizer, t_squared=t_squared,
                   teacher_bn_mode=teacher_bn_mode, kd_crop=kd_crop, crop_scale=crop_scale, flip=flip,
                   rand_augment=rand_augment, warmup_epochs=warmup_epochs, betas=betas, wd_norm_bias=wd_norm_bias,
                   eval_transform=eval_transform, teacher_arch=teacher_arch, teacher_norm=teacher_norm,
                   hard_labels=hard_labels or None)
    given = [k for k, v in kd_only.items() if v is not None]
    if given:
        raise UserError(f"--{given[0].replace('_', '-')} belongs to the KD protocol: give --teacher (or "
                        "--soft-labels)")
    if preset is not None and preset.lower() in KD_PRESETS:
        raise UserError(f"--preset {preset} is a KD protocol: give --teacher (or --soft-labels)")
    if env_info().enabled:
        raise UserError("torchrun runs the KD protocol only (--teacher); run hard-label validation as one process")
    for b in baseline:
        if b not in ("random", "herding", "full", "noaug"):
            raise UserError(f"unknown --baseline '{b}' (random, herding, full, noaug)")
    if "noaug" in baseline and "random" not in baseline:
        raise UserError("--baseline noaug trains the set and the random subset without augmentation (DD-Ranking's "
                        "ARS): add --baseline random")
    if preset is not None and preset.lower() not in PRESETS:
        raise UserError(f"unknown --preset '{preset}' ({', '.join(PRESETS + tuple(KD_PRESETS))})")
    preset = preset.lower() if preset else None
    if syn is None and not baseline:
        raise UserError("nothing to train: give --syn and/or --baseline")
    if eval_mode not in EVAL_POOLS:
        raise UserError(f"unknown --eval-mode '{eval_mode}' ({', '.join(EVAL_POOLS)})")
    dev = resolve_device(device)
    resolve_amp(amp, dev)

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
        with step(f"fitting ZCA on {len(tr.images)} train images"):
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
        if ipc and is_imagefolder_set(synset) and ipc != synset.meta.get("ipc"):
            synset = first_ipc_of_imagefolder(synset, ipc)  # DWA's first-N-files rule, as in KD mode
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
                         dsa=aug, batch_standardize=batch_standardize, mix_p=opt["mix_p"], beta=opt["beta"],
                         amp=resolve_amp(amp, dev))
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
                  herding_epochs=herding_epochs if herding else None, amp=resolve_amp(amp, dev).mode)
    if results is None:
        results = (syn / "results.json") if (syn is not None and syn.is_dir()) else Path("results/validate.json")
    check_results_writable(results)
    # Per-run resume: every finished run is a CSV row tagged with a fingerprint of this configuration; the same
    # command again skips those runs. A CSV of another configuration is never mixed in.
    key = config_key(config)
    inputs = input_digests(syn, synset)
    log = open_results_log(results.with_suffix(".csv"), key, inputs, quiet, overwrite)
    arms = (["syn"] if synset is not None else []) + [a for b in baseline for a in (
        (["syn_noaug"] if synset is not None else []) + ["random_noaug"] if b == "noaug" else [b])]
    log.info(f"validate: {spec.name} ({spec.num_classes} classes, {spec.resolution}px), arms {arms}, models "
             f"{models}, {runs} runs, {recipe.epochs} epochs (full: {full_epochs}), lr {recipe.lr:g}, batch "
             f"{recipe.batch_size}, CutMix p {recipe.mix_p:g}, preset {preset or 'none'}, device {dev}")
    ckpt = RunCheckpoints(ckpt_path_for(results), key, ckpt_every, log=log, device=dev, inputs=inputs)
    ckpt.open(overwrite)
    t0 = time.time()
    with StopRequest() as stop:  # SIGTERM/SIGUSR1: checkpoint the run in flight after its epoch, exit 143
        ckpt.stop = stop
        by_model = validate(synset, spec, train, test, models=models, recipe=recipe, baselines=baseline,
                            runs=runs, seed=seed, ipc=ipc, full_recipe=full_recipe, device=dev, log=log,
                            space=space, zca_state=zca_state, workers=workers,
                            herding_model=config["herding_model"], herding_epochs=herding_epochs, ckpt=ckpt)
    ckpt.finished()  # one left by a run that was recorded just before an earlier kill
    report = {"dataset": spec.name, "model": base_model, "syn_path": str(syn) if syn else None, "inputs": inputs,
              "space": "zca" if zca_state is not None else "normalized",
              "test_images": len(test[1]) if isinstance(test, tuple) else len(test), "seconds": round(time.time() - t0, 1),
              **by_model[base_model], "by_model": by_model, "config": config,
              "note": "test accuracy after the last epoch (fractions); std = population std over runs"}
    # the set's arm trains on its hard labels here, so it is also DD-Ranking's hard-label synthetic arm
    report["dd_ranking"] = {m: ddranking.scores(arms, syn_hard="syn", full_hard="full", syn_noaug="syn_noaug",
                                                random_noaug="random_noaug") for m, arms in by_model.items()}
    atomic_write_json(report, results)
    for m, arms in by_model.items():
        for arm, s in arms.items():
            print(f"{m:14s} {arm:7s} {100 * s['mean']:6.2f} ± {100 * s['std']:.2f} %  ({len(s['runs'])} runs)")
    _print_dd_ranking(report["dd_ranking"])
    print(f"results: {results}")


def _print_dd_ranking(by_model: dict) -> None:
    for m, result in by_model.items():
        if result:
            print(ddranking.format_line(m, result))


def _pair(text: str | None, flag: str) -> tuple[float, float] | None:
    """'a,b' -> (a, b) for --crop-scale / --betas."""
    if text is None:
        return None
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag} takes two numbers 'a,b', got '{text}'") from None
    return a, b


def _load_kd_teacher(path: Path, arch: str | None, norm: str | None, spec: DatasetSpec, device: torch.device
                     ) -> Teacher:
    try:
        t = load_teacher(path, arch=arch, dataset=spec.name if arch is not None else None, norm=norm,
                         num_classes=spec.num_classes, resolution=spec.resolution, device=device)
    except UserError as e:
        if "not a ddtoolkit teacher file" in str(e):
            raise UserError(f"{path} is not a ddtoolkit teacher file; for a foreign checkpoint pass --teacher-arch "
                            "(and --teacher-norm if it was not trained with the dataset's normalisation)") from None
        raise
    t.meta.setdefault("source", str(path))
    return t


def run_kd(c: dict) -> None:
    """`validate.py --teacher ...`: the KD protocol (decoupled.md §6, §10). `c` holds main()'s arguments."""
    for k, flag in (("dsa", "--dsa"), ("dsa_strategy", "--dsa-strategy"), ("dsa_mode", "--dsa-mode"),
                    ("batch_standardize", "--batch-standardize")):
        if c[k] is not None:
            raise UserError(f"{flag} belongs to the hard-label protocols; KD mode augments with --kd-crop/--flip")
    if c["zca"]:
        raise UserError("--zca does not apply in KD mode: students train in the teacher's normalised space")
    preset = c["preset"].lower() if c["preset"] else None
    if preset is not None and preset not in KD_PRESETS:
        known = ", ".join(KD_PRESETS)
        raise UserError(f"--preset {c['preset']} is not a KD protocol; with --teacher use one of: {known}")
    for b in c["baseline"]:
        if b == "noaug":
            raise UserError("--baseline noaug (DD-Ranking's ARS arms) is for the hard-label protocols, not KD")
        if b not in ("random", "herding", "full"):
            raise UserError(f"unknown --baseline '{b}' (random, herding, full)")
    if c["syn"] is None and not c["baseline"]:
        raise UserError("nothing to train: give --syn and/or --baseline")
    if c["eval_mode"] not in EVAL_POOLS:
        raise UserError(f"unknown --eval-mode '{c['eval_mode']}' ({', '.join(EVAL_POOLS)})")
    if c["hard_labels"] and c["syn"] is None:
        raise UserError("--hard-labels trains on the set's hard labels: give --syn")
    if c["soft_labels"] is not None and c["syn"] is None:
        raise UserError("--soft-labels were recorded for a set: give it with --syn")
    dev = resolve_device(c["device"])
    resolve_amp(c["amp"], dev)
    info = init_distributed(dev)
    try:
        _run_kd(c, preset, device_for(info, dev), info)
    finally:
        cleanup(info)


def _run_kd(c: dict, preset: str | None, dev: torch.device, info: DistInfo) -> None:
    syn, dataset, data_path, res, download, seed = (c["syn"], c["dataset"], c["data_path"], c["res"],
                                                     c["download"], c["seed"])
    synset = None
    if syn is not None:
        synset = load_synset(syn, dataset=dataset, factor=c["factor"])
        dataset = dataset or synset.meta["dataset"]
    if dataset is None:
        raise UserError("--dataset is required when no --syn set names it")
    baseline = list(c["baseline"])
    train = None
    if baseline and c["train_subset"]:
        tr, spec = load_split(dataset, data_path, "train", per_class=c["train_subset"], seed=seed, resolution=res,
                              download=download)
        train = (tr.images, tr.labels)
    elif baseline:
        train, spec = open_split(dataset, data_path, "train", resolution=res, download=download)
    if c["test_per_class"]:
        te, spec = load_split(dataset, data_path, "test", resolution=res, download=download,
                              per_class=c["test_per_class"], seed=seed)
        test = (te.images, te.labels)
    else:
        test, spec = open_split(dataset, data_path, "test", resolution=res, download=download)
    ipc = c["ipc"]
    if synset is not None:
        check_compatible(synset, spec)
        if ipc and is_imagefolder_set(synset) and ipc != synset.meta.get("ipc"):
            synset = first_ipc_of_imagefolder(synset, ipc)
        ipc = ipc or synset.meta["ipc"]
    for b in ("random", "herding"):
        if b in baseline and not ipc:
            raise UserError(f"--baseline {b} needs --ipc when no --syn is given")

    # the teacher (online) and / or the stored soft labels; the normalisation both sides use
    teacher = None
    if c["teacher"] is not None:
        teacher = _load_kd_teacher(c["teacher"], c["teacher_arch"], c["teacher_norm"], spec, dev)
        check_teacher_fits(teacher, spec, str(c["teacher"]))
    stored, manifest = None, None
    if c["soft_labels"] is not None:
        try:
            from utils.softlabels import SoftLabelReader
        except ImportError:
            raise UserError("--soft-labels needs utils/softlabels.py, which this checkout lacks; use --teacher "
                            "(online soft labels) instead") from None
        stored = SoftLabelReader(c["soft_labels"])
        manifest = dict(stored.manifest)
    if baseline and teacher is None:
        raise UserError(f"--baseline {baseline[0]} in KD mode needs an online --teacher to label the real images")
    if teacher is not None:
        norm = (tuple(teacher.mean), tuple(teacher.std))
        arch = teacher.arch
    else:
        rec = stored_teacher_info(manifest)
        if rec["mean"] is None or rec["std"] is None:
            raise UserError(f"{c['soft_labels']}: its manifest records no normalisation; pass --teacher (the file "
                            "the labels came from) so students see the teacher's input space")
        norm, arch = (tuple(rec["mean"]), tuple(rec["std"])), rec["arch"]
    if teacher is not None and manifest is not None:
        rec = stored_teacher_info(manifest)
        if rec["mean"] is not None and [round(v, 6) for v in rec["mean"]] != [round(v, 6) for v in norm[0]]:
            raise UserError(f"{c['soft_labels']} was labelled with mean {rec['mean']}, but teacher {c['teacher']} "
                            f"uses {list(norm[0])}")
    base_model = c["model"] or arch
    if base_model is None:
        raise UserError("no student network: pass --model (the stored labels' manifest names no teacher arch)")
    models = list(dict.fromkeys([base_model, *eval_pool(c["eval_mode"], base_model)]))

    # the recipe: each field from its flag if given, else the KD preset, else KD_DEFAULTS (per student: DELT's
    # lr and batch size depend on it)
    explicit = dict(epochs=c["epochs"], optimizer=c["optimizer"], lr=c["lr"], weight_decay=c["weight_decay"],
                    wd_on_norm_and_bias=c["wd_norm_bias"], momentum=c["momentum"],
                    betas=_pair(c["betas"], "--betas"), batch_size=c["batch_size"], schedule=c["schedule"],
                    warmup_epochs=c["warmup_epochs"], temperature=c["temperature"], t_squared=c["t_squared"],
                    mix=c["kd_mix"], mix_alpha=c["beta"], mix_p=c["mix_p"], crop=c["kd_crop"],
                    crop_scale=_pair(c["crop_scale"], "--crop-scale"), flip=c["flip"],
                    rand_augment=c["rand_augment"], teacher_bn_mode=c["teacher_bn_mode"],
                    eval_transform=c["eval_transform"])
    if stored is not None:  # the relabel stage fixed the batches and the epochs (SRe2L FKD, §6.1)
        stored_bs = int(manifest["batch_size"])
        if explicit["batch_size"] is not None and explicit["batch_size"] != stored_bs:
            raise UserError(f"--batch-size {explicit['batch_size']}: the soft labels in {c['soft_labels']} were "
                            f"stored in batches of {stored_bs}; train with that batch size (or relabel)")
        explicit["batch_size"] = stored_bs
        explicit["epochs"] = explicit["epochs"] or stored.num_epochs()
    resolved = {m: resolve_options(explicit, kd_protocol(preset, spec, ipc, m, arch) if preset else None,
                                   KD_DEFAULTS) for m in models}
    recipes = {m: kd_recipe(o, amp=c["amp"]) for m, o in resolved.items()}
    for r in recipes.values():
        check_recipe(r)
    opt = resolved[base_model]
    if opt["eval_transform"] not in EVAL_TRANSFORMS:
        raise UserError(f"unknown --eval-transform '{opt['eval_transform']}' ({', '.join(EVAL_TRANSFORMS)})")
    if opt["batch_size"] < info.world_size:
        raise UserError(f"--batch-size {opt['batch_size']} is smaller than the {info.world_size} torchrun ranks "
                        "that split every batch")

    images = labels = None
    if synset is not None:
        images, labels = synset.decode()
        images = synset.to_pixels(images)  # every set in pixel space [0, 1]; the teacher's normalisation follows
        if is_imagefolder_set(synset):  # 8-bit files: uint8 is exact and 4× smaller
            images = (images * 255).round().to(torch.uint8)
    kd_config = dict(teacher=str(c["teacher"]) if c["teacher"] else None, teacher_arch=arch,
                     teacher_mean=list(norm[0]), teacher_std=list(norm[1]),
                     soft_labels=str(c["soft_labels"]) if c["soft_labels"] else None,
                     soft_labels_manifest=manifest, hard_labels=c["hard_labels"],
                     amp=False if c["amp"] == "off" else c["amp"],   # fp32 keys from before --amp took a mode
                     world_size=info.world_size,
                     recipe={k: list(v) if isinstance(v, tuple) else v for k, v in opt.items()},
                     lr_by_model={m: r.lr for m, r in recipes.items()},
                     batch_by_model={m: r.batch_size for m, r in recipes.items()})
    herding = "herding" in baseline
    config = dict(dataset=spec.name, data_path=str(data_path), syn=str(syn) if syn else None, models=models,
                  epochs=opt["epochs"], runs=c["runs"], seed=seed, lr=opt["lr"], batch_size=opt["batch_size"],
                  momentum=opt["momentum"], weight_decay=opt["weight_decay"], schedule=opt["schedule"],
                  baseline=baseline, ipc=ipc, full_epochs=c["full_epochs"], factor=c["factor"], res=res,
                  train_subset=c["train_subset"], test_per_class=c["test_per_class"], eval_mode=c["eval_mode"],
                  preset=preset, mix_p=opt["mix_p"], beta=opt["mix_alpha"],
                  herding_model=(c["herding_model"] or base_model) if herding else None,
                  herding_epochs=c["herding_epochs"] if herding else None, kd=kd_config)
    results = c["results"]
    if results is None:
        results = (syn / "results.json") if (syn is not None and syn.is_dir()) else Path("results/validate.json")
    check_results_writable(results)
    key = config_key(config)
    inputs = input_digests(syn, synset, c["teacher"])
    # every rank reads the finished runs (so all skip the same ones); only rank 0 writes
    log = open_results_log(results.with_suffix(".csv"), key, inputs, c["quiet"] or not info.is_main, c["overwrite"])
    if not info.is_main:
        log.csv_path = None
    r0 = recipes[base_model]
    log.info(f"validate (KD): {spec.name} ({spec.num_classes} classes, {spec.resolution}px), student(s) {models}, "
             f"teacher {arch} ({'stored labels' if stored is not None else 'online'}), {c['runs']} runs, "
             f"{r0.epochs} epochs, {r0.optimizer} lr {r0.lr:g}, batch {r0.batch_size}, T {r0.temperature:g}"
             f"{' ×T²' if r0.t_squared else ''}, mix {r0.mix}, crop {r0.crop}, teacher BN {r0.teacher_bn_mode}, "
             f"preset {preset or 'none'}, device {dev}, ranks {info.world_size}")
    ckpt = RunCheckpoints(ckpt_path_for(results), key, c["ckpt_every"], log=log, dist_info=info, device=dev,
                          inputs=inputs)
    ckpt.open(c["overwrite"])
    t0 = time.time()
    with StopRequest() as stop:  # SIGTERM/SIGUSR1: checkpoint the run in flight after its epoch, exit 143
        ckpt.stop = stop
        by_model = validate_kd(images, labels, spec, train, test, models=models, recipe_for=recipes.__getitem__,
                               teacher=teacher, norm=norm, baselines=baseline, runs=c["runs"], seed=seed, ipc=ipc,
                               device=dev, log=log, stored=stored, hard_labels=c["hard_labels"],
                               eval_transform=opt["eval_transform"], full_epochs=c["full_epochs"],
                               dist_info=info, workers=c["workers"], herding_model=config["herding_model"],
                               herding_epochs=c["herding_epochs"],
                               teacher_source=kd_config["teacher"] or stored_teacher_info(manifest or {})["path"],
                               ckpt=ckpt)
    ckpt.finished()  # one left by a run that was recorded just before an earlier kill
    if not info.is_main:
        return
    diversity = by_model.pop("_diversity", None)
    report = {"dataset": spec.name, "model": base_model, "syn_path": str(syn) if syn else None, "inputs": inputs,
              "space": "teacher-normalized", "protocol": "kd",
              "test_images": len(test[1]) if isinstance(test, tuple) else len(test),
              "seconds": round(time.time() - t0, 1), **by_model[base_model], "by_model": by_model,
              "teacher": {"path": kd_config["teacher"], "arch": arch, "mean": list(norm[0]), "std": list(norm[1]),
                          "soft_labels": kd_config["soft_labels"]},
              "diversity_cosine": diversity, "reported": "last", "config": config,
              "note": "test accuracy measured once, after the last epoch (fractions; no model selection on the "
                      "test set, unlike the references' best-of-epochs, decoupled.md §6.6); std = population std "
                      "over runs; diversity_cosine = mean over classes of the mean pairwise cosine similarity of "
                      "the teacher's penultimate features (lower = more diverse)"}
    report["dd_ranking"] = {m: ddranking.scores(arms, syn_hard="hard_label", full_hard="full_hard_label")
                            for m, arms in by_model.items()}
    atomic_write_json(report, results)
    for m, arms in by_model.items():
        for arm, s in arms.items():
            print(f"{m:14s} {arm:10s} {100 * s['mean']:6.2f} ± {100 * s['std']:.2f} %  ({len(s['runs'])} runs)")
    _print_dd_ranking(report["dd_ranking"])
    print(f"results: {results}")


if __name__ == "__main__":
    app()
