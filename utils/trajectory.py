"""Expert trajectories in MTT's file layout (speed.md §1.5, §1.6) and the order distillation reads them in (§3.5).

A trajectory is a list of snapshots; snapshot e is the list of a network's parameter tensors (CPU, fp32, each with
its own shape, in `net.parameters()` order) after e epochs, snapshot 0 being the fresh network. A buffer file
`replay_buffer_<n>.pt` is `torch.save` of a plain Python list of trajectories, so the structure is a list of lists
of lists of tensors: the same objects MTT/SPEED save and load, which keeps their buffers readable here and ours
readable by them. Loading goes through `weights_only=True` (MTT's files hold only lists and tensors, so they pass).

Directory layout (§1.6): `<buffer_path>/<dataset>` + (ImageNet subsets) `/<subset>/<res>` + (CIFAR10/CIFAR100
without ZCA) `_NO_ZCA` + `/<model>`, e.g. `buffers/CIFAR10/ConvNet`, `buffers/Tiny/ConvNetD4`,
`buffers/ImageNet/imagenette/128/ConvNetD5`.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from utils.errors import UserError
from utils.io import atomic_torch_save, safe_torch_load

BUFFER_PATTERN = re.compile(r"replay_buffer_(\d+)\.pt")
NO_ZCA_DATASETS = ("CIFAR10", "CIFAR100")  # the only datasets whose folder gets `_NO_ZCA` (MTT's buffer.py)
# Registry names whose folder MTT spells differently (the toolkit's TinyImageNet is MTT's `Tiny`).
MTT_DIR_NAMES = {"TinyImageNet": "Tiny"}
DEFAULT_SUBSET_RES = 128  # MTT's --res default for the ImageNet subsets

Snapshot = list[Tensor]
Trajectory = list[Snapshot]


# ------------------------------------------------------------------------------------------ layout

def expert_dir(buffer_path: str | Path, dataset: str, model: str, zca: bool, subset: str | None = None,
               res: int | None = None) -> Path:
    """The folder of one configuration's buffer files (speed.md §1.6):
    `<buffer_path>/<dataset>[/<subset>/<res>][_NO_ZCA]/<model>`; `_NO_ZCA` only for CIFAR10/CIFAR100 without ZCA,
    `res` defaults to 128 when a subset is given. Names are MTT's; the registry names that differ are translated
    (TinyImageNet -> Tiny; a subset name such as imagenette given as `dataset` -> ImageNet/imagenette/<res>), so
    `spec.name` works too. `expert_dir_for` also accepts aliases (tiny, cifar-10, ...)."""
    from utils.datasets import IMAGENET_SUBSETS
    if subset is None and dataset in IMAGENET_SUBSETS:
        dataset, subset = "ImageNet", dataset
    d = Path(buffer_path) / MTT_DIR_NAMES.get(dataset, dataset)
    if subset:
        d = d / subset / str(res or DEFAULT_SUBSET_RES)
    if dataset in NO_ZCA_DATASETS and not zca:
        d = d.with_name(d.name + "_NO_ZCA")
    return d / model


def mtt_layout(dataset: str, res: int | None = None) -> tuple[str, str | None, int | None]:
    """(dataset, subset, res) of MTT's folder naming for a dataset name of the toolkit's registry (or an alias):
    an ImageNet subset such as `imagenette` -> ("ImageNet", "imagenette", res or 128), TinyImageNet -> "Tiny",
    every other dataset its registry name."""
    from utils.datasets import IMAGENET_SUBSETS, get_dataset_spec
    name = get_dataset_spec(dataset).name
    if name in IMAGENET_SUBSETS:
        return "ImageNet", name, int(res or DEFAULT_SUBSET_RES)
    return MTT_DIR_NAMES.get(name, name), None, None


def expert_dir_for(buffer_path: str | Path, dataset: str, model: str, zca: bool, res: int | None = None) -> Path:
    """`expert_dir` for a registry dataset name (what buffer.py writes and distillation should read):
    `expert_dir_for("buffers", "TinyImageNet", "ConvNetD4", False)` -> `buffers/Tiny/ConvNetD4`."""
    from utils.datasets import get_dataset_spec
    return expert_dir(buffer_path, get_dataset_spec(dataset).name, model, zca, res=res)


def buffer_index(path: str | Path) -> int | None:
    """n of a `replay_buffer_<n>.pt` path, else None."""
    m = BUFFER_PATTERN.fullmatch(Path(path).name)
    return int(m[1]) if m else None


def buffer_files(directory: str | Path, required: bool = True) -> list[Path]:
    """The `replay_buffer_<n>.pt` files of a folder, sorted by n. With `required`, a missing folder or one without
    buffer files is a one-line UserError."""
    d = Path(directory)
    if not d.is_dir():
        if not required:
            return []
        raise UserError(f"expert folder {d} does not exist; make the expert trajectories with buffer.py "
                        "(same --dataset, --model, --zca and --buffer-path)")
    found = sorted((buffer_index(p), p) for p in d.iterdir() if p.is_file() and buffer_index(p) is not None)
    if not found and required:
        raise UserError(f"{d} holds no replay_buffer_<n>.pt files; make them with buffer.py "
                        "(same --dataset, --model, --zca and --buffer-path)")
    return [p for _, p in found]


# ------------------------------------------------------------------------------------------ files

def _own_storage(t: Tensor) -> Tensor:
    """A CPU fp32 tensor that owns exactly its storage (torch.save writes a view's whole base storage)."""
    t = t.detach().to("cpu", torch.float32)
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t


def check_trajectories(obj, where: str) -> list:
    """Raise a one-line UserError unless `obj` is a list of trajectories (non-empty lists of snapshots, each a
    list of tensors, the same number per snapshot)."""
    if not isinstance(obj, list):
        raise UserError(f"{where} is not an expert buffer: it holds a {type(obj).__name__}, not a list of "
                        "trajectories")
    for i, traj in enumerate(obj):
        if not isinstance(traj, list) or not traj:
            raise UserError(f"{where}: expert {i} is not a non-empty list of snapshots")
        n = None
        for e, snap in enumerate(traj):
            if not isinstance(snap, (list, tuple)) or not snap or not all(isinstance(p, Tensor) for p in snap):
                raise UserError(f"{where}: expert {i}, snapshot {e} is not a list of parameter tensors")
            if n is None:
                n = len(snap)
            elif len(snap) != n:
                raise UserError(f"{where}: expert {i} has snapshots of {n} and of {len(snap)} tensors")
    return obj


def save_buffer_file(trajectories: list, path: str | Path) -> None:
    """Write a list of trajectories atomically as MTT does (`torch.save` of nested lists of tensors)."""
    check_trajectories(trajectories, str(path))
    plain = [[[_own_storage(p) for p in snap] for snap in traj] for traj in trajectories]
    atomic_torch_save(plain, path)


def load_buffer_file(path: str | Path) -> list:
    """Load one buffer file (ours or MTT/SPEED's) with weights_only=True; a corrupt or foreign file is a one-line
    UserError naming it."""
    data = safe_torch_load(path, "expert buffer file")
    data = [list(t) for t in data] if isinstance(data, tuple) else data
    return check_trajectories(data, str(path))


def flatten_snapshot(snapshot: Snapshot) -> Tensor:
    """One snapshot as a single 1-D fp32 vector, tensors flattened and concatenated in order (MTT's view)."""
    return torch.cat([p.reshape(-1).float() for p in snapshot])


def num_snapshots(trajectory: Trajectory) -> int:
    """Snapshots in a trajectory: training epochs + 1."""
    return len(trajectory)


# ------------------------------------------------------------------------------------------ sampling

class ExpertStream:
    """Hands out expert trajectories in the order of speed.md §3.5, all randomness from `generator`.

    Default mode: the file list is shuffled; one file is loaded (only one is ever held in memory), its experts
    shuffled and handed out in order; then the next file; after the last file the list is reshuffled and the
    walk starts again, so every expert of every file is seen exactly once per pass. `load_all`: every file is
    loaded up front and each call draws an expert uniformly. `max_files` keeps the first files of the (sorted)
    list, `max_experts` the first experts of each file (default mode) or of the whole pool (`load_all`), as MTT's
    ablation flags do.

    Nothing is drawn before the first `next()`, so restoring the generator before or after building the stream
    makes no difference. `state_dict()` (ints and lists of ints) with the generator's state, restored through
    `load_state_dict`, continues with exactly the same sequence.
    """

    def __init__(self, files: list[Path], generator: torch.Generator, load_all: bool = False,
                 max_files: int | None = None, max_experts: int | None = None):
        files = [Path(f) for f in files]
        if max_files is not None:
            if max_files < 1:
                raise UserError(f"max_files must be at least 1, got {max_files}")
            files = files[:max_files]
        if not files:
            raise UserError("no expert buffer files to read; make them with buffer.py")
        if max_experts is not None and max_experts < 1:
            raise UserError(f"max_experts must be at least 1, got {max_experts}")
        self.files = files
        self.generator = generator
        self.load_all = load_all
        self.max_experts = max_experts
        self.num_experts_seen = 0
        self.file_order: list[int] | None = None   # indices into self.files, None until the first draw
        self.file_pos = 0                          # position in file_order of the file being handed out
        self.expert_order: list[int] = []          # shuffled expert indices of that file
        self.expert_pos = 0                        # next position in expert_order
        self._buffer: list | None = None           # the loaded file (default mode) or the whole pool (load_all)
        self._loaded: int | None = None            # index into self.files of the file in _buffer
        if load_all:
            pool = []
            for f in files:
                pool += load_buffer_file(f)
            self._buffer = pool[:max_experts] if max_experts is not None else pool

    def _load(self, file_index: int) -> list:
        if self._loaded != file_index:
            self._buffer = None  # drop the previous file before reading the next: one file in memory
            buf = load_buffer_file(self.files[file_index])
            self._buffer = buf[:self.max_experts] if self.max_experts is not None else buf
            self._loaded = file_index
        return self._buffer

    def _perm(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.generator).tolist()

    def _open_next_file(self) -> None:
        if self.file_order is None:
            self.file_order, self.file_pos = self._perm(len(self.files)), 0
        else:
            self.file_pos += 1
            if self.file_pos == len(self.file_order):
                self.file_order, self.file_pos = self._perm(len(self.files)), 0
        buf = self._load(self.file_order[self.file_pos])
        self.expert_order, self.expert_pos = self._perm(len(buf)), 0

    def next(self) -> Trajectory:
        """The next expert trajectory."""
        self.num_experts_seen += 1
        if self.load_all:
            i = int(torch.randint(0, len(self._buffer), (1,), generator=self.generator))
            return self._buffer[i]
        if self.file_order is None or self.expert_pos >= len(self.expert_order):
            self._open_next_file()
        buf = self._load(self.file_order[self.file_pos])  # after a resume: reload the file in progress
        if len(buf) != len(self.expert_order):
            raise UserError(f"{self.files[self._loaded]} holds {len(buf)} experts, the resumed stream expected "
                            f"{len(self.expert_order)}; the buffer folder changed since the state was saved")
        traj = buf[self.expert_order[self.expert_pos]]
        self.expert_pos += 1
        return traj

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """Where the stream stands: plain ints and lists (the generator's state is the caller's to save)."""
        return {"load_all": int(self.load_all), "num_files": len(self.files),
                "file_order": list(self.file_order) if self.file_order is not None else [],
                "started": int(self.file_order is not None), "file_pos": self.file_pos,
                "expert_order": list(self.expert_order), "expert_pos": self.expert_pos,
                "num_experts_seen": self.num_experts_seen}

    def load_state_dict(self, d: dict) -> None:
        """Continue from a `state_dict()` of a stream over the same files."""
        try:
            if int(d["load_all"]) != int(self.load_all) or int(d["num_files"]) != len(self.files):
                raise UserError(f"expert-stream state is for {d['num_files']} files (load_all {bool(d['load_all'])}),"
                                f" this stream has {len(self.files)} (load_all {self.load_all}); resume with the "
                                "same buffer folder and flags")
            self.num_experts_seen = int(d["num_experts_seen"])
            self.file_order = [int(i) for i in d["file_order"]] if int(d["started"]) else None
            self.file_pos = int(d["file_pos"])
            self.expert_order = [int(i) for i in d["expert_order"]]
            self.expert_pos = int(d["expert_pos"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not an expert-stream state ({type(e).__name__}: {e})") from None
