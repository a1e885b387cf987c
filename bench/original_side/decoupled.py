"""Adapter for the decoupled originals: SRe2L (VILA-Lab/SRe2L), DWA (AngusDujw/Diversity-Driven-Synthesis), DELT
(VILA-Lab/DELT), and SRe2L's KD/FKD code. It runs INSIDE the original's world (bench/original_runner.py): it imports
only torch/numpy/torchvision and the original's own modules, never this repository.

Each function takes the shared state (teacher weights, initial images, the augmentation draws our side made) and
drives the original's OWN functions (its main_syn/get_images loops, its model construction, its hooks, its Perterb
optimiser, its round logic, its relabel loader and mix code). What is reached in-process, never by editing files:
- `torch.load` returns the payload's weights / init tensor for the paths the original hard-codes;
- the draws the original takes from `random.randint` (jitter), `torch.randn` (SRe2L noise) and torchvision's
  RandomResizedCrop.get_params / RandomHorizontalFlip (DELT) replay the draws our side made;
- the quantities are read where the original computes them: the CE criterion's value, the BN hooks' r_feature,
  the loss given to backward(), the pixels after each clip, the teacher after the run.
A loop that would go on (more batches, more ipc indices) is stopped with `_Enough` once the compared part is done.
"""
from __future__ import annotations

import contextlib
import importlib
import random
import sys
import types
from argparse import Namespace

import numpy as np
import torch
import torch.nn as nn


class _Enough(Exception):
    """Raised from a probe to stop the original's loop once the compared iterations are done."""


def _stub_wandb() -> None:
    """DWA imports wandb at module level (only logs with it); a no-op module stands in when it is not installed."""
    if "wandb" in sys.modules:
        return
    try:
        importlib.import_module("wandb")
        return
    except ImportError:
        pass
    m = types.ModuleType("wandb")
    m.log = m.init = m.finish = m.login = lambda *a, **k: None
    m.api = Namespace(api_key="offline")
    sys.modules["wandb"] = m


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class _Probe:
    """Records what the original computes in one recovery loop, one row per optimiser step (read at the clip,
    which every original calls right after its Adam step)."""

    def __init__(self, limit: int | None = None):
        self.ce = None
        self.loss = None
        self.rows: list[dict] = []
        self.hooks: list = []
        self.first_bn_multiplier = 10.0
        self.limit = limit
        self.model = None            # the teacher whose BNFeatureHooks get_images attaches (found at the first clip)
        self.hook_class = None
        self.grads: list = []

    def adam_step(self, original):
        """torch.optim.Adam.step wrapper: records the pixel gradient each step is taken with."""
        probe = self

        def step(opt, *a, **k):
            probe.grads.append(opt.param_groups[0]["params"][0].grad.detach().clone())
            return original(opt, *a, **k)
        return step

    def criterion_class(self):
        probe = self

        class RecordingCE(nn.CrossEntropyLoss):
            def forward(self, input, target):
                out = super().forward(input, target)
                probe.ce = out
                return out
        return RecordingCE

    def backward(self, original):
        probe = self

        def backward(tensor, *a, **k):
            probe.loss = tensor
            return original(tensor, *a, **k)
        return backward

    def clip_wrapper(self, clip_fn):
        probe = self

        def clip(image_tensor, *a, **k):
            out = clip_fn(image_tensor, *a, **k)
            if not probe.hooks and probe.model is not None:
                probe.hooks = _bn_hooks_of(probe.model, probe.hook_class)
            r = [h.r_feature.detach().clone() for h in probe.hooks]
            rescale = [probe.first_bn_multiplier] + [1.0] * (len(r) - 1)
            probe.rows.append({"ce": float(probe.ce), "loss": float(probe.loss),
                               "bn": float(sum(w * v for w, v in zip(rescale, r))),
                               "images": out.detach().clone()})
            if probe.limit is not None and len(probe.rows) >= probe.limit:
                raise _Enough
            return out
        return clip

    def result(self) -> dict:
        return {"ce": torch.tensor([r["ce"] for r in self.rows], dtype=torch.float64),
                "loss": torch.tensor([r["loss"] for r in self.rows], dtype=torch.float64),
                "bn": torch.tensor([r["bn"] for r in self.rows], dtype=torch.float64),
                "images": torch.stack([r["images"] for r in self.rows]),
                "grads": torch.stack(self.grads)}


def _bn_hooks_of(model: nn.Module, hook_class) -> list:
    """The original's BNFeatureHook objects attached to `model`, in module order (= the order of its loss list)."""
    found = []
    for m in model.modules():
        for h in m._forward_hooks.values():
            owner = getattr(h, "__self__", None)
            if isinstance(owner, hook_class):
                found.append(owner)
    return found


def _shift_draws(shifts):
    """random.randint replacement: the original draws (off1, off2) per iteration; we hand back ours in order."""
    flat = [int(v) for s in shifts for v in s]
    it = iter(flat)

    def randint(a, b):
        v = next(it)
        if not (a <= v <= b):
            raise AssertionError(f"replayed shift {v} outside the original's range [{a}, {b}]")
        return v
    return randint


def _torch_load_redirect(mapping: dict):
    """torch.load for the hard-coded paths: a suffix of the path -> the object to return."""
    real = torch.load

    def load(path, *a, **k):
        p = str(path)
        for suffix, obj in mapping.items():
            if p.endswith(suffix):
                return obj
        return real(path, *a, **k)
    return load


# ------------------------------------------------------------------------------------------------ SRe2L


def sre2l_recover(root, payload: dict) -> dict:
    """SRe2L CIFAR recovery (`*small_dataset/recover_cifar.py`): main_syn builds its modified torchvision ResNet-18
    (100 classes), loads our weights as its DataParallel checkpoint, and get_images runs its first class batch
    for `iterations` steps from our noise and our jitter draws."""
    mod = importlib.import_module("recover_cifar")
    utils = importlib.import_module("utils")
    state = {"module." + k: v for k, v in payload["state_dict"].items()}
    args = Namespace(batch_size=payload["batch_size"], iteration=payload["iterations"], lr=payload["lr"],
                     jitter=payload["jitter"], r_bn=payload["r_bn"], first_bn_multiplier=payload["first_bn_multiplier"],
                     arch_name="resnet18", arch_path="teacher.pth", verifier=False, store_best_images=False,
                     syn_data_path="unused", ipc_start=0, ipc_end=1)
    probe = _Probe(limit=payload["iterations"])
    probe.first_bn_multiplier = args.first_bn_multiplier
    x0 = payload["x0"]
    real_randn = torch.randn

    def randn(*shape, **kw):               # the batch's Gaussian init: ours
        size = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        assert tuple(size) == tuple(x0.shape), (size, x0.shape)
        return x0.clone().requires_grad_(bool(kw.get("requires_grad", False)))

    real_get_images = mod.get_images

    def get_images(a, model, hook, ipc_id):
        probe.model, probe.hook_class = model, utils.BNFeatureHook
        if payload.get("fp64"):
            model.double()
        return real_get_images(a, model, hook, ipc_id)

    with contextlib.ExitStack() as st:
        st.enter_context(_patched(torch.optim.Adam, "step", probe.adam_step(torch.optim.Adam.step)))
        st.enter_context(_patched(torch, "load", _torch_load_redirect({"teacher.pth": {"state_dict": state}})))
        st.enter_context(_patched(torch, "randn", randn))
        st.enter_context(_patched(random, "randint", _shift_draws(payload["shifts"])))
        st.enter_context(_patched(nn, "CrossEntropyLoss", probe.criterion_class()))
        st.enter_context(_patched(torch.Tensor, "backward", probe.backward(torch.Tensor.backward)))
        st.enter_context(_patched(mod, "clip_cifar", probe.clip_wrapper(mod.clip_cifar)))
        st.enter_context(_patched(mod, "get_images", get_images))
        try:
            mod.main_syn(args, 0)
        except _Enough:
            pass
    del real_randn
    return probe.result()


# ------------------------------------------------------------------------------------------------ DWA


def dwa_recover(root, payload: dict) -> dict:
    """DWA CIFAR recovery (`distillation/distillation_cifar.py`): main_syn builds its modified ResNet-18, loads our
    weights from its hard-coded checkpoint path, get_images loads our initial tensor from `tensor_0.pt`, runs the
    K ascent steps of its Perterb optimiser at t = 0 and `iterations` pixel steps with our jitter draws. Returns the
    per-step losses and pixels and the teacher's weights after the run (the original never restores them)."""
    _stub_wandb()
    mod = importlib.import_module("distillation_cifar")
    utils = importlib.import_module("utils")
    mod.wandb_metrics = {}
    state = {"module." + k: v for k, v in payload["state_dict"].items()}
    args = Namespace(dataset=payload["dataset"], batch_size=payload["batch_size"], iteration=payload["iterations"],
                     lr=payload["lr"], jitter=payload["jitter"], r_bn=payload["r_bn"],
                     first_bn_multiplier=payload["first_bn_multiplier"], arch_name="resnet18", verifier=False,
                     verifier_arch=None, store_best_images=False, syn_data_path="unused", exp_name="parity",
                     init_path="init", rho=payload["rho"], steps=payload["steps"], r_var=payload["r_var"],
                     ipc_start=0, ipc_end=1)
    probe = _Probe()
    probe.first_bn_multiplier = args.first_bn_multiplier
    models = []
    real_get_images = mod.get_images

    def get_images(a, model, hook, ipc_id):
        models.append(model)
        probe.model, probe.hook_class = model, utils.BNFeatureHook
        if payload.get("fp64"):
            model.double()
        return real_get_images(a, model, hook, ipc_id)

    loads = {"resnet18_E200/ckpt.pth": {"state_dict": state}, "init/tensor_0.pt": payload["x0"].clone()}
    with contextlib.ExitStack() as st:
        st.enter_context(_patched(torch.optim.Adam, "step", probe.adam_step(torch.optim.Adam.step)))
        st.enter_context(_patched(torch, "load", _torch_load_redirect(loads)))
        st.enter_context(_patched(random, "randint", _shift_draws(payload["shifts"])))
        st.enter_context(_patched(nn, "CrossEntropyLoss", probe.criterion_class()))
        st.enter_context(_patched(torch.Tensor, "backward", probe.backward(torch.Tensor.backward)))
        st.enter_context(_patched(mod, "clip_image", probe.clip_wrapper(mod.clip_image)))
        st.enter_context(_patched(mod, "get_images", get_images))
        mod.main_syn(args, 0)
    net = models[0].module
    out = probe.result()
    out["weights"] = [p.detach().clone() for p in net.parameters()]
    return out


# ------------------------------------------------------------------------------------------------ DELT


def _delt_args(payload: dict) -> Namespace:
    return Namespace(ipc=payload["ipc"], iteration=payload["iteration"], round_iterations=payload["round_iterations"],
                     use_early_late=True, min_iterations=payload["iteration"], round_lr_reset=False,
                     batch_size=payload["batch_size"], workers=0, lr=payload.get("lr", 0.25),
                     jitter=payload.get("jitter", 0), r_bn=payload.get("r_bn", 0.01),
                     first_bn_multiplier=payload.get("first_bn_multiplier", 10.0), arch_name="resnet18",
                     arch_path="teacher.pth", easy2hard_mode="cosine", milestone=payload.get("milestone", 1.0),
                     gpu_device="-1", store_best_images=False, syn_data_path="unused", exp_name="parity",
                     init_data_path=payload.get("init_path", "unused"), dataset=payload.get("dataset", "cifar10"),
                     num_classes=payload["num_classes"], input_size=payload.get("input_size", 32))


def delt_round_plan(root, payload: dict) -> dict:
    """DELT's EarlyLate plan from its own code (`recover/recover.py`): for each class-major batch of the run,
    get_round_imgs_indx gives the batch positions of each round and get_images drops the empty rounds and
    shortens the iteration count (read when it builds its lr schedule, where the probe stops it); between
    batches, the per-class save counter advances through its get_img_indx, as save_images would advance it
    with --store-best-images (the scripts' setting)."""
    mod = importlib.import_module("recover")
    args = _delt_args(payload)
    class_iterations = torch.ones((args.num_classes,), dtype=torch.long) * args.iteration
    mod.img_indxer = {}
    plans, totals = [], []
    captured = {}
    real_rounds = mod.get_round_imgs_indx

    def rounds(a, ci, targets, indexer):
        captured["slicing"] = real_rounds(a, ci, targets, indexer)
        return captured["slicing"]

    def lr_policy(base_lr, warmup, epochs):
        captured["total"] = int(epochs)
        raise _Enough

    for targets in payload["batches"]:
        targets = torch.tensor(targets, dtype=torch.long)
        inputs = torch.zeros(len(targets), 3, 2, 2)
        with _patched(mod, "get_round_imgs_indx", rounds), _patched(mod, "lr_cosine_policy", lr_policy):
            try:
                mod.get_images(args, inputs, targets, nn.Identity(), [], class_iterations, mod.img_indxer)
            except _Enough:
                pass
        plans.append([list(map(int, r)) for r in captured["slicing"]])
        totals.append(captured["total"])
        for c in targets.tolist():          # what save_images does per saved image
            mod.get_img_indx(c)
    return {"plans": plans, "totals": totals}


def _float_as(dtype):
    """Tensor.type replacement: get_images casts its inputs with `.type(torch.float)`; in an fp64 comparison
    that cast keeps them fp64."""
    real = torch.Tensor.type

    def type_(self, dtype_=None, *a, **k):
        if dtype_ is None:
            return real(self)
        return real(self, dtype if dtype_ is torch.float32 else dtype_, *a, **k)
    return type_


def delt_recover(root, payload: dict) -> dict:
    """DELT recovery (`recover/recover.py`): main_syn builds its modified ResNet-18, loads our weights, reads the
    init folder with its own ImageFolder/transforms, and get_images runs the first batch with our crop boxes,
    flips and shifts replayed into torchvision's RandomResizedCrop/RandomHorizontalFlip and random.randint."""
    from torchvision import transforms
    mod = importlib.import_module("recover")
    utils = importlib.import_module("utils")
    args = _delt_args(payload)
    probe = _Probe()
    probe.first_bn_multiplier = args.first_bn_multiplier
    crops = iter([tuple(int(v) for v in c) for c in payload["crops"]])
    flips = iter([bool(f) for f in payload["flips"]])
    scales = []

    def get_params(img, scale, ratio):
        scales.append(float(scale[0]))
        return next(crops)

    def flip_forward(self, img):
        return img.flip(-1) if next(flips) else img

    real_get_images = mod.get_images
    calls = []

    def get_images(a, inputs, targets, model, hooks, ci, indexer):
        probe.hooks = list(hooks)
        if payload.get("fp64"):
            model.double()
            inputs = inputs.double()
        calls.append(inputs.clone())
        with _patched(torch.Tensor, "type", _float_as(torch.float64 if payload.get("fp64") else torch.float32)):
            real_get_images(a, inputs, targets, model, hooks, ci, indexer)
        raise _Enough                      # only the first batch is compared

    state = {"model": payload["state_dict"]}
    with contextlib.ExitStack() as st:
        st.enter_context(_patched(torch.optim.Adam, "step", probe.adam_step(torch.optim.Adam.step)))
        st.enter_context(_patched(torch, "load", _torch_load_redirect({"teacher.pth": state})))
        st.enter_context(_patched(random, "randint", _shift_draws(payload["shifts"])))
        st.enter_context(_patched(transforms.RandomResizedCrop, "get_params", staticmethod(get_params)))
        st.enter_context(_patched(transforms.RandomHorizontalFlip, "forward", flip_forward))
        st.enter_context(_patched(nn, "CrossEntropyLoss", probe.criterion_class()))
        st.enter_context(_patched(torch.Tensor, "backward", probe.backward(torch.Tensor.backward)))
        st.enter_context(_patched(mod, "clip", probe.clip_wrapper(mod.clip)))
        st.enter_context(_patched(mod, "get_images", get_images))
        try:
            mod.main_syn(args)
        except _Enough:
            pass
    del utils
    out = probe.result()
    out["x0"] = calls[0]
    out["crop_floor"] = torch.tensor(scales, dtype=torch.float64)
    return out


# ------------------------------------------------------------------------------------------------ KD / FKD


class _OneBatchLoader(list):
    """A loader of prepared batches, with the `dataset.set_epoch` train_FKD calls."""
    dataset = Namespace(set_epoch=lambda epoch: None)


def _kl_recorder(store: list):
    class RecordingKL(nn.KLDivLoss):
        def forward(self, input, target):
            out = super().forward(input, target)
            store.append(out.detach().clone())
            return out
    return RecordingKL


def _student(payload: dict) -> nn.Module:
    import torchvision
    net = torchvision.models.resnet18(num_classes=payload["num_classes"])
    net.conv1 = nn.Conv2d(3, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
    net.maxpool = nn.Identity()
    net.load_state_dict(payload["student"])
    return net


def kd_losses(root, payload: dict) -> dict:
    """One training step of SRe2L's `validate/train_KD.py` (teacher online) and `validate/train_FKD.py` (stored
    soft labels), on our images, student and teacher weights and cutmix state (handed to the original's mix_aug in
    its fkd_load mode); returns the KL loss each computed."""
    _stub_wandb()
    sys.path.append(str(root / "SRe2L"))
    fkd = importlib.import_module("relabel.utils_fkd")
    out = {}
    for name in ("train_KD", "train_FKD"):
        mod = importlib.import_module(name)
        mod.wandb_metrics = {}
        losses: list = []
        student = _student(payload)
        mix = dict(rand_index=payload["perm"], lam=payload["lam"], bbox=[int(v) for v in payload["bbox"]])
        margs = Namespace(mode="fkd_load", mix_type="cutmix", cutmix=1.0)

        def mix_aug(images, args, rand_index=None, lam=None, bbox=None):
            return fkd.mix_aug(images, margs, **mix)

        args = Namespace(temperature=payload["temperature"], gradient_accumulation_steps=1, batch_size=len(
            payload["images"]), mix_type="cutmix", mode="fkd_load",
            optimizer=torch.optim.SGD(student.parameters(), lr=0.0),
            scheduler=Namespace(get_last_lr=lambda: [0.0]))
        if name == "train_KD":
            teacher = _student({"num_classes": payload["num_classes"], "student": payload["teacher"]})
            args.teacher_model = teacher
            args.train_loader = _OneBatchLoader([(payload["images"].clone(), payload["labels"].clone())])
        else:
            batch = ((payload["images"].clone(), payload["labels"].clone(), None, None),
                     payload["perm"], payload["lam"], payload["bbox"], payload["soft"].clone())
            args.train_loader = _OneBatchLoader([batch])
        with _patched(nn, "KLDivLoss", _kl_recorder(losses)), _patched(mod, "mix_aug", mix_aug):
            mod.train(student, args, epoch=0)
        out[name] = losses[0]
    return out


def fkd_relabel(root, payload: dict) -> dict:
    """SRe2L's relabel (`relabel/generate_soft_label.py` save() over its ImageFolder_FKD_MIX / ComposeWithCoords /
    RandomResizedCropWithCoords / RandomHorizontalFlipWithRes, cutmix in fkd_save mode) on an image folder, with
    our teacher. Returns each batch's record as the original writes it (coords, flips, mix index, λ, box, logits),
    the image indices each batch held, its crop boxes in pixels, and the views before and after the mix."""
    import os
    import tempfile
    import torchvision
    import torchvision.transforms as transforms
    from torchvision.transforms import InterpolationMode
    sys.path.append(str(root / "SRe2L" / "relabel"))
    fkd = importlib.import_module("utils_fkd")
    gsl = importlib.import_module("generate_soft_label")
    torch.manual_seed(payload["seed"])
    np.random.seed(payload["seed"])
    teacher = _student({"num_classes": payload["num_classes"], "student": payload["teacher"]}).eval()
    indices, boxes, before, after = [], [], [], []
    real_getitem = fkd.ImageFolder_FKD_MIX.__getitem__
    real_params = fkd.RandomResizedCropWithCoords.get_params

    def getitem(self, index):
        indices.append(int(index))
        return real_getitem(self, index)

    def get_params(img, scale, ratio):
        box = real_params(img, scale, ratio)
        boxes.append([int(v) for v in box])
        return box

    def mix_aug(images, args, rand_index=None, lam=None, bbox=None):
        before.append(images.clone())
        res = fkd.mix_aug(images, args, rand_index, lam, bbox)
        after.append(res[0].clone())
        return res

    with tempfile.TemporaryDirectory() as tmp:
        dataset = fkd.ImageFolder_FKD_MIX(
            fkd_path=tmp, mode="fkd_save", root=payload["folder"],
            transform=fkd.ComposeWithCoords(transforms=[
                fkd.RandomResizedCropWithCoords(size=payload["size"], scale=tuple(payload["scale"]),
                                                interpolation=InterpolationMode.BILINEAR),
                fkd.RandomHorizontalFlipWithRes(),
                transforms.ToTensor(),
                transforms.Normalize(mean=payload["mean"], std=payload["std"])]))
        generator = torch.Generator()
        generator.manual_seed(payload["seed"])
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
        loader = torch.utils.data.DataLoader(dataset, batch_size=payload["batch_size"], sampler=sampler,
                                             num_workers=0)
        args = Namespace(mode="fkd_save", mix_type="cutmix", cutmix=1.0, use_fp16=False)
        with _patched(fkd.ImageFolder_FKD_MIX, "__getitem__", getitem), \
                _patched(fkd.RandomResizedCropWithCoords, "get_params", staticmethod(get_params)), \
                _patched(gsl, "mix_aug", mix_aug):
            gsl.save(loader, teacher, tmp, args)
        records = []
        for b in range(len(loader)):
            # the original's batch file holds tensors plus numpy scalars (lam, bbox): allow those, nothing else
            with torch.serialization.safe_globals([np.core.multiarray.scalar, np.dtype,
                                                   type(np.dtype("float64")), type(np.dtype("int64"))]):
                coords, flip, mix_index, lam, bbox, logits = torch.load(os.path.join(tmp, f"batch_{b}.tar"),
                                                                        weights_only=True)
            n = len(coords)
            records.append({"coords": coords, "flip": flip, "perm": mix_index, "lam": float(lam),
                            "bbox": torch.tensor([int(v) for v in bbox]), "logits": logits,
                            "indices": torch.tensor(indices[len(records) * payload["batch_size"]:][:n]),
                            "boxes": torch.tensor(boxes[len(records) * payload["batch_size"]:][:n]),
                            "views": before[len(records)], "mixed": after[len(records)]})
    del torchvision
    return {"records": records, "classes": dataset.classes}


# ------------------------------------------------------------------------------------------------ DWA, whole run


def dwa_distill(root, payload: dict) -> dict:
    """DWA's CIFAR distillation run end to end (`distillation/distillation_cifar.py` main loop: main_syn per ipc
    index, --store-best-images), our teacher's weights returned for its hard-coded checkpoint path, the init
    tensors read from `init_path` by its own torch.load. The original seeds nothing; Python's `random` (its
    jitter draws) is seeded here so that a run can be repeated."""
    import os
    _stub_wandb()
    mod = importlib.import_module("distillation_cifar")
    mod.wandb_metrics = {}
    random.seed(payload["seed"])
    torch.manual_seed(payload["seed"])
    state = {"module." + k: v for k, v in payload["state_dict"].items()}
    args = Namespace(dataset="cifar10", batch_size=100, iteration=payload["iterations"], lr=payload["lr"],
                     jitter=payload["jitter"], r_bn=payload["r_bn"], first_bn_multiplier=10.0, arch_name="resnet18",
                     verifier=False, verifier_arch=None, store_best_images=True,
                     syn_data_path=os.path.join(payload["out"], ""), exp_name="", init_path=payload["init_path"],
                     rho=payload["rho"], steps=payload["steps"], r_var=payload["r_var"], ipc_start=0,
                     ipc_end=payload["ipc"])
    args.syn_data_path = payload["out"]
    with _patched(torch, "load", _torch_load_redirect({"resnet18_E200/ckpt.pth": {"state_dict": state}})):
        for ipc_id in range(args.ipc_start, args.ipc_end):
            mod.main_syn(args, ipc_id)
    return {"written": sorted(str(p) for p in __import__("pathlib").Path(payload["out"]).rglob("*.jpg"))}
