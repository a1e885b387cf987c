"""Parity of recover.py (SRe2L, DWA, DELT), utils/kd.py and relabel.py's FKD replay with the originals' code.
Bare `§N` references in this module are sections of docs/methods/decoupled.md.

    python bench/parity.py --method sre2l --original /path/to/SRe2L
    python bench/parity.py --method dwa   --original /path/to/Diversity-Driven-Synthesis
    python bench/parity.py --method delt  --original /path/to/DELT
    python bench/parity.py --method kd    --original /path/to/SRe2L

Our side runs the toolkit's real code (recover.recover_group on a work unit of recover.plan_units, utils.kd.kd_loss,
utils.softlabels.replay/apply_mix/crop_pixels, relabel.teacher_logits); the draws it makes (initial noise, crop
boxes, flips, roll shifts) are recorded on the way and handed to the original (bench/original_side/decoupled.py),
which replays them into its own draw sites. The teacher is a seeded random ResNet-18-modified (BN running
statistics randomised too), loaded into each original's own construction of that model (torchvision resnet18 with
the 3x3 stem and no max-pool; state_dict keys are the same, DataParallel's `module.` prefix added on their side).
What each line compares is in docs/PARITY.md ("SRe2L, DWA, DELT, KD").
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import recover  # noqa: E402
from networks.registry import get_network  # noqa: E402
from original_runner import run_original  # noqa: E402
from parity_common import ParityLine, compare  # noqa: E402
from relabel import teacher_logits  # noqa: E402
from utils.kd import kd_loss  # noqa: E402
from utils.softlabels import apply_mix, crop_pixels, load_set_pixels, replay  # noqa: E402
from utils.teacher import NORMALIZATIONS, Teacher, freeze  # noqa: E402

ADAPTER = "bench/original_side/decoupled.py"
CIFAR10 = NORMALIZATIONS["cifar10"]
QUIRKS_NOTE = "default fixes DWA's ascent leak into the first pixel step (spec 9.1 item 4); --reference-quirks matches"


# ------------------------------------------------------------------------------------------------ shared state


def random_teacher(num_classes: int, seed: int) -> Teacher:
    """A seeded ResNet-18-modified with randomised BN affine and running statistics (so every BN term of the loss
    is non-trivial), frozen in eval mode, with CIFAR-10 (kuangliu) normalisation."""
    torch.manual_seed(seed)
    net = get_network("ResNet-18-modified", channels=3, num_classes=num_classes, resolution=32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return Teacher(freeze(net), "ResNet-18-modified", "CIFAR10", num_classes, 3, 32, *CIFAR10)


def state_dict(teacher: Teacher) -> dict:
    return {k: v.detach().clone() for k, v in teacher.net.state_dict().items()}


@contextlib.contextmanager
def recording(module, name: str, store: list, take=lambda args, kwargs, out: out):
    """Wrap module.name so that every call's result (or `take(args, kwargs, result)`) is appended to `store`; the
    wrapped function itself runs unchanged."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        store.append(take(args, kwargs, out))
        return out
    setattr(module, name, wrapper)
    try:
        yield store
    finally:
        setattr(module, name, real)


@contextlib.contextmanager
def replaced(obj, name: str, value):
    real = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, real)


def run_ours(units, cfg, teacher: Teacher, init=None, dtype=torch.float32) -> dict:
    """recover.recover_group on the units, recording its initial images, augmentation draws (with the crop floor
    each was drawn at), the DWA ascent's weights, and for every Adam step the pixel gradient it is taken with and
    the pixels it starts from. With dtype float64 the teacher and the pixels are float64 (the trajectory lines)."""
    if dtype != torch.float32:
        teacher = dataclasses.replace(teacher, net=copy.deepcopy(teacher.net).to(dtype))
    x0, draws, weights, grads, before = [], [], [], [], []
    snap = (lambda a, k, out: [p.detach().clone() for p in a[0].parameters()])
    real_init, real_step = recover.initial_images, torch.optim.Adam.step

    def initial_images(*a, **k):
        x0.append(real_init(*a, **k).to(dtype))
        return x0[-1]

    def adam_step(opt, *a, **k):
        x = opt.param_groups[0]["params"][0]
        grads.append(x.grad.detach().clone())
        before.append(x.detach().clone())
        return real_step(opt, *a, **k)
    with contextlib.ExitStack() as st:
        st.enter_context(replaced(torch.optim.Adam, "step", adam_step))
        st.enter_context(replaced(recover, "initial_images", initial_images))
        st.enter_context(recording(recover, "draw_augmentation", draws, lambda a, k, out: (out, float(a[2]))))
        st.enter_context(recording(recover, "directed_weight_adjustment", weights, snap))
        st.enter_context(recording(recover, "_leak_ascent_gradients", weights, snap))
        res = recover.recover_group(units, cfg, teacher, init, torch.device("cpu"), log_every=1)
    shape = res.images.shape
    after = [b.reshape(shape) for b in before[1:]] + [res.images]
    return {"x0": x0[0].reshape(shape), "draws": [d for d, _ in draws], "floors": [f for _, f in draws],
            "weights": weights[0] if weights else None, "images": torch.stack(after),
            "grads": torch.stack([g.reshape(shape) for g in grads]),
            "ce": torch.tensor([r["ce"] for r in res.log], dtype=torch.float64),
            "bn": torch.tensor([r["bn"] for r in res.log], dtype=torch.float64),
            "loss": torch.tensor([r["loss"] for r in res.log], dtype=torch.float64)}


def fp32_gradient_line(method: str, quantity: str, ours, theirs, ours_fp64, tol: float, gating: bool = True,
                       note: str = "") -> ParityLine:
    """An fp32 pixel gradient is held to `tol`, or to twice our own fp32-vs-fp64 error of the same gradient where
    that is larger: the original cannot be asked to agree with us more closely than fp32 rounding lets our own
    result agree with its exact value (DWA's step-1 gradient, summed over the K ascent passes, is such a case)."""
    own = compare(method, quantity, ours, ours_fp64).rel
    if own * 2 > tol:
        note = (f"tol = 2 x our fp32-vs-fp64 error {own:.1e}" + (f"; {note}" if note else ""))
        tol = 2 * own
    return compare(method, quantity, ours, theirs, tol=tol, gating=gating, note=note)


def step_lines(method: str, fp32: tuple[dict, dict], fp64: tuple[dict, dict], tol: float, label: str = "",
               gating: bool = True, note: str = "") -> list[ParityLine]:
    """fp32 (the production dtype): R_BN, CE and the total loss of every step and the first step's pixel
    gradient. fp64 on both sides: the pixel gradient of every step and the pixels after every step (Adam's
    first steps move each pixel by lr * g / (|g| + eps), which turns fp32 rounding of a near-zero gradient into a
    visible pixel difference, so the trajectory is compared where rounding is not the question)."""
    sfx = f" ({label})" if label else ""
    (o, t), (o64, t64) = fp32, fp64
    T = len(o["loss"])
    kw = dict(tol=tol, gating=gating, note=note)
    return [compare(method, f"BN-statistics loss R_BN, steps 1..{T}{sfx}", o["bn"], t["bn"], **kw),
            compare(method, f"CE, steps 1..{T}{sfx}", o["ce"], t["ce"], **kw),
            compare(method, f"total loss, steps 1..{T}{sfx}", o["loss"], t["loss"], **kw),
            fp32_gradient_line(method, f"pixel gradient, step 1{sfx}", o["grads"][0], t["grads"][0],
                               o64["grads"][0], tol, gating, note),
            compare(method, f"pixel gradient, steps 1..{T}, fp64{sfx}", o64["grads"], t64["grads"], **kw),
            compare(method, f"images after steps 1..{T} (Adam, cosine lr, clip), fp64{sfx}", o64["images"],
                    t64["images"], **kw)]


# ------------------------------------------------------------------------------------------------ SRe2L


SRE2L_ITERS = 3


def check_sre2l(root: Path, args) -> list[ParityLine]:
    """SRe2L CIFAR recovery: noise init, roll jitter, 100-class teacher, the first class batch (10 classes)."""
    teacher = random_teacher(100, args.seed)
    runs = []
    for dtype in (torch.float32, torch.float64):
        cfg = recover.resolve_config("sre2l-cifar100", {"iterations": SRE2L_ITERS, "batch_size": 10,
                                                        "seed": args.seed}, 1)
        unit = recover.plan_units(cfg, 100, (0, 1), (0, 10), 1)[0]
        ours = run_ours([unit], cfg, teacher, dtype=dtype)
        payload = {"state_dict": state_dict(teacher), "x0": ours["x0"], "shifts": [d.shift for d in ours["draws"]],
                   "batch_size": 10, "iterations": SRE2L_ITERS, "lr": cfg.lr, "jitter": cfg.jitter,
                   "r_bn": cfg.r_bn, "first_bn_multiplier": cfg.first_bn_multiplier, "fp64": dtype == torch.float64}
        theirs = run_original(root, ADAPTER, "sre2l_recover", payload, extra_paths=("SRe2L/*small_dataset",))
        runs.append((ours, theirs))
    return step_lines("sre2l", runs[0], runs[1], args.tol)


# ------------------------------------------------------------------------------------------------ DWA


DWA_ITERS = 3


def _dwa_init(tmp: Path, teacher: Teacher, seed: int) -> torch.Tensor:
    """DWA's CIFAR init file tensor_0.pt: one real-like image per class, already normalised (§4.4)."""
    g = torch.Generator().manual_seed(seed + 7)
    pixels = torch.rand(teacher.num_classes, 3, 32, 32, generator=g)
    x0 = teacher.normalize(pixels)
    torch.save(x0, tmp / "tensor_0.pt")
    return x0


def check_dwa(root: Path, args) -> list[ParityLine]:
    """DWA CIFAR-10 recovery: real init from tensor_0.pt, K = 12 ascent steps of rho/K, roll jitter, r-var 11."""
    teacher = random_teacher(10, args.seed)
    base = state_dict(teacher)
    theta0 = torch.cat([p.detach().reshape(-1) for p in teacher.net.parameters()]).double()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="ddt-parity-dwa-") as tmp:
        tmp = Path(tmp)
        _dwa_init(tmp, teacher, args.seed)
        init = recover.RealInit(tmp, teacher, "stretch")
        for quirks in (True, False):
            cfg = recover.resolve_config("dwa-cifar10", {"iterations": DWA_ITERS, "seed": args.seed,
                                                          "reference_quirks": quirks}, 1)
            unit = recover.plan_units(cfg, 10, (0, 1), (0, 10), 1)[0]
            for dtype in (torch.float32, torch.float64):
                ours = run_ours([unit], cfg, teacher, init, dtype=dtype)
                if not all(torch.equal(v, base[k]) for k, v in teacher.net.state_dict().items()):
                    raise AssertionError("recover_group did not restore the DWA teacher's weights")
                their_key = ("theirs", dtype)
                if quirks:
                    payload = {"state_dict": base, "x0": ours["x0"], "shifts": [d.shift for d in ours["draws"]],
                               "dataset": "cifar10", "batch_size": cfg.batch_size, "iterations": DWA_ITERS,
                               "lr": cfg.lr, "jitter": cfg.jitter, "r_bn": cfg.r_bn,
                               "first_bn_multiplier": cfg.first_bn_multiplier, "rho": cfg.rho, "steps": cfg.dwa_steps,
                               "r_var": cfg.r_var, "fp64": dtype == torch.float64}
                    runs[their_key] = run_original(root, ADAPTER, "dwa_recover", payload,
                                                   extra_paths=("distillation",))
                runs[(quirks, dtype)] = ours
    flat = (lambda ws: torch.cat([w.reshape(-1) for w in ws]).double())
    f32, f64 = torch.float32, torch.float64
    theirs32, theirs64 = runs[("theirs", f32)], runs[("theirs", f64)]
    K = 12
    lines = [compare("dwa", f"perturbed weights after the {K} ascent steps (reference flag)",
                     flat(runs[(True, f32)]["weights"]), flat(theirs32["weights"]), tol=args.tol),
             compare("dwa", f"ascent displacement theta_K - theta_0, fp64 (reference flag)",
                     flat(runs[(True, f64)]["weights"]) - theta0, flat(theirs64["weights"]) - theta0, tol=args.tol),
             compare("dwa", f"perturbed weights after the {K} ascent steps (default)",
                     flat(runs[(False, f32)]["weights"]), flat(theirs32["weights"]), tol=args.tol,
                     note="the leak fix detaches the view, the weight gradient is the same")]
    lines += step_lines("dwa", (runs[(True, f32)], theirs32), (runs[(True, f64)], theirs64), args.tol,
                        "reference flag")
    lines += [compare("dwa", "pixel gradient, step 1, fp64 (default)", runs[(False, f64)]["grads"][0],
                      theirs64["grads"][0], tol=args.tol, gating=False, note=QUIRKS_NOTE),
              compare("dwa", f"images after steps 1..{DWA_ITERS}, fp64 (default)", runs[(False, f64)]["images"],
                      theirs64["images"], tol=args.tol, gating=False, note=QUIRKS_NOTE)]
    return lines


def base_params(teacher: Teacher) -> list[torch.Tensor]:
    return [p.detach().clone() for p in teacher.net.parameters()]


# ------------------------------------------------------------------------------------------------ DELT


# (name, IPC, ITR, RI, B, classes): the ImageNet-1K scripts' IPC 50 / 10 rounds, IPC < R (empty trailing rounds
# dropped), classes straddling batches (B not a multiple of IPC) and an odd small case.
DELT_PLANS = [("IPC 50, ITR 4000, RI 500, B 100", 50, 4000, 500, 100, 4),
              ("IPC 10, ITR 4000, RI 500, B 100", 10, 4000, 500, 100, 20),
              ("IPC 5 < 8 rounds, B 100", 5, 4000, 500, 100, 40),
              ("IPC 30, B 100 (classes straddle batches)", 30, 4000, 500, 100, 10),
              ("IPC 7, ITR 300, RI 100, B 16", 7, 300, 100, 16, 5)]


def our_plan(ipc: int, itr: int, ri: int, batch: int, classes: int):
    cfg = recover.resolve_config("delt-cifar", {"iterations": itr, "round_iterations": ri, "batch_size": batch}, ipc)
    units = recover.plan_units(cfg, classes, (0, ipc), (0, classes), ipc)
    return units


def check_delt_plan(root: Path, args) -> list[ParityLine]:
    lines = []
    for name, ipc, itr, ri, batch, classes in DELT_PLANS:
        units = our_plan(ipc, itr, ri, batch, classes)
        payload = {"ipc": ipc, "iteration": itr, "round_iterations": ri, "batch_size": batch,
                   "num_classes": classes, "batches": [list(u.classes) for u in units]}
        theirs = run_original(root, ADAPTER, "delt_round_plan", payload, extra_paths=("recover",))
        ours_masks, their_masks = [], []
        for u, plan, total in zip(units, theirs["plans"], theirs["totals"]):
            n = len(u.classes)
            mine = torch.tensor(u.active, dtype=torch.float64)
            other = torch.zeros(len(plan), n, dtype=torch.float64)
            for r, positions in enumerate(plan):
                other[r, positions] = 1.0
            ours_masks.append(torch.cat([mine.reshape(-1), torch.tensor([float(u.iterations)])]))
            their_masks.append(torch.cat([other.reshape(-1), torch.tensor([float(total)])]))
        same_count = len(units) == len(theirs["plans"])
        ours_v = torch.cat(ours_masks) if same_count else torch.zeros(1)
        theirs_v = torch.cat(their_masks) if same_count else torch.ones(2)
        lines.append(compare("delt", f"round plan + T per batch: {name}", ours_v, theirs_v, tol=args.tol))
    return lines


DELT_RUN = dict(ipc=2, iteration=4, round_iterations=2, batch_size=4, jitter=2)


def _write_init_folder(folder: Path, classes: int, ipc: int, seed: int) -> None:
    """An init ImageFolder of PNGs (lossless), class folders 00000.. as DELT/RDED name them."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = folder / f"{c:05d}"
        d.mkdir(parents=True)
        for k in range(ipc):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{k:03d}_img.png")


def check_delt_recover(root: Path, args) -> list[ParityLine]:
    teacher = random_teacher(10, args.seed)
    p = DELT_RUN
    runs = []
    with tempfile.TemporaryDirectory(prefix="ddt-parity-delt-") as tmp:
        folder = Path(tmp) / "init"
        _write_init_folder(folder, 10, p["ipc"], args.seed)
        cfg = recover.resolve_config("delt-cifar", {"iterations": p["iteration"], "round_iterations":
                                                    p["round_iterations"], "batch_size": p["batch_size"],
                                                    "jitter": p["jitter"], "seed": args.seed}, p["ipc"])
        unit = recover.plan_units(cfg, 10, (0, p["ipc"]), (0, 10), p["ipc"])[0]
        init = recover.RealInit(folder, teacher, cfg.init_resize)
        for dtype in (torch.float32, torch.float64):
            ours = run_ours([unit], cfg, teacher, init, dtype=dtype)
            payload = dict(p, num_classes=10, dataset="cifar10", input_size=32, lr=cfg.lr, r_bn=cfg.r_bn,
                           first_bn_multiplier=cfg.first_bn_multiplier, milestone=cfg.milestone,
                           init_path=str(folder), state_dict=state_dict(teacher),
                           crops=[list(d.crop) for d in ours["draws"]], flips=[d.flip for d in ours["draws"]],
                           shifts=[d.shift for d in ours["draws"]], fp64=dtype == torch.float64)
            runs.append((ours, run_original(root, ADAPTER, "delt_recover", payload, extra_paths=("recover",))))
    ours, theirs = runs[0]
    lines = [compare("delt", "initial images (its ImageFolder + transforms vs RealInit)", ours["x0"],
                     theirs["x0"], tol=args.tol),
             compare("delt", "crop floor s_min(t), cosine easy-to-hard", torch.tensor(ours["floors"]),
                     theirs["crop_floor"], tol=args.tol)]
    return lines + step_lines("delt", runs[0], runs[1], args.tol, "EarlyLate, RRC + flip + roll")


def check_delt(root: Path, args) -> list[ParityLine]:
    return check_delt_plan(root, args) + check_delt_recover(root, args)


# ------------------------------------------------------------------------------------------------ KD / FKD


KD_T = 3.0       # train_KD / train_FKD's default temperature


def check_kd(root: Path, args) -> list[ParityLine]:
    lines = []
    g = torch.Generator().manual_seed(args.seed)
    teacher = random_teacher(10, args.seed)
    student = random_teacher(10, args.seed + 100).net
    n = 8
    images = teacher.normalize(torch.rand(n, 3, 32, 32, generator=g))
    labels = torch.arange(n) % 10
    perm = torch.randperm(n, generator=g)
    lam = 0.63
    top, left, bottom, right = 5, 9, 23, 27         # the original's (bbx1, bby1, bbx2, bby2): rows, then columns
    soft = torch.randn(n, 10, generator=g) * 3
    payload = {"images": images, "labels": labels, "perm": perm, "lam": lam, "bbox": [top, left, bottom, right],
               "soft": soft, "temperature": KD_T, "num_classes": 10, "student": state_dict_of(student),
               "teacher": state_dict(teacher)}
    theirs = run_original(root, ADAPTER, "kd_losses", payload, extra_paths=("SRe2L/validate",))
    mixed = apply_mix(images, 1, perm, lam, torch.tensor([top, left, bottom, right]))
    student.train()
    with torch.enable_grad():
        out = student(mixed)
    online = kd_loss(out, teacher.net(mixed), KD_T)
    stored = kd_loss(out, soft, KD_T)
    lines.append(compare("kd", "KD loss, teacher online (train_KD, T 3, batchmean)", online, theirs["train_KD"],
                         tol=args.tol))
    lines.append(compare("kd", "KD loss, stored soft labels (train_FKD, T 3)", stored, theirs["train_FKD"],
                         tol=args.tol))
    return lines + check_fkd_replay(root, args, teacher)


def state_dict_of(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def check_fkd_replay(root: Path, args, teacher: Teacher) -> list[ParityLine]:
    """SRe2L's relabel writes (coords, flip, mix index, λ, box, logits) per batch; we turn each record into ours and
    replay it with utils.softlabels on the same images."""
    with tempfile.TemporaryDirectory(prefix="ddt-parity-fkd-") as tmp:
        folder = Path(tmp) / "syn"
        rng = np.random.default_rng(args.seed)
        for c in range(10):
            d = folder / f"new{c:03d}"
            d.mkdir(parents=True)
            for k in range(2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    d / f"class{c:03d}_id{k:03d}.png")
        payload = {"folder": str(folder), "size": 32, "scale": [0.08, 1.0], "mean": list(teacher.mean),
                   "std": list(teacher.std), "batch_size": 8, "seed": args.seed, "num_classes": 10,
                   "teacher": state_dict(teacher)}
        theirs = run_original(root, ADAPTER, "fkd_relabel", payload)
        pixels, _ = load_set_pixels(folder, "CIFAR10")
    src_all = teacher.normalize(pixels)
    boxes_o, boxes_t, mix_o, mix_t, lab_o, lab_t, view_o, view_t, soft_o = ([] for _ in range(9))
    for rec in theirs["records"]:
        boxes_o.append(crop_pixels(rec["coords"], 32, 32))
        boxes_t.append(rec["boxes"])
        a1, b1, a2, b2 = rec["bbox"].tolist()
        ours_rec = {"coords": rec["coords"], "flip": rec["flip"].bool(), "mix": 1, "perm": rec["perm"],
                    "lam": rec["lam"], "box": torch.tensor([a1, b1, a2, b2])}
        mix_o.append(apply_mix(rec["views"], 1, rec["perm"], rec["lam"], ours_rec["box"]))
        mix_t.append(rec["mixed"])
        lab_o.append(teacher_logits(teacher.net, rec["mixed"]))
        lab_t.append(rec["logits"].float())
        views = replay(src_all[rec["indices"]], ours_rec, 32)
        view_o.append(views)
        view_t.append(rec["mixed"])
        soft_o.append(teacher_logits(teacher.net, views))
    view_err = (torch.cat(view_o) - torch.cat(view_t)).abs().max().item() * min(teacher.std) * 255
    note = (f"ours crops/resizes the float image (antialiased bilinear), the original the 8-bit PIL image: "
            f"views within {view_err:.2f} of an 8-bit level")
    return [compare("kd", "FKD crop boxes from the recorded coords", torch.cat(boxes_o), torch.cat(boxes_t),
                    tol=args.tol),
            compare("kd", "FKD cutmix of the same views (recorded perm/lam/box)", torch.cat(mix_o), torch.cat(mix_t),
                    tol=args.tol),
            compare("kd", "FKD soft labels of the same views", torch.cat(lab_o), torch.cat(lab_t), tol=args.tol),
            compare("kd", "FKD replayed views (record -> crop, flip, mix)", torch.cat(view_o), torch.cat(view_t),
                    tol=args.tol, gating=False, note=note),
            compare("kd", "FKD replayed soft labels", torch.cat(soft_o), torch.cat(lab_t), tol=args.tol,
                    gating=False, note=note)]


PARITY_METHODS = {
    "sre2l": (check_sre2l, "SRe2L/*small_dataset/recover_cifar.py"),
    "dwa": (check_dwa, "distillation/distillation_cifar.py"),
    "delt": (check_delt, "recover/recover.py"),
    "kd": (check_kd, "SRe2L/relabel/utils_fkd.py"),
}
