"""Parity of trajectory matching (distill.py: MTT and SPEED) with the originals, one outer iteration from identical
state. Registered in bench/parity.py as `--method mtt` and `--method speed`; docs/PARITY.md says what each line
compares.

Shared state, drawn here and handed to both sides: the synthetic images (MTT) or SPEED's SAET / SCM / FReeNet
weights (our own initialisation), the learned lr, one expert trajectory [theta_0, theta*] (a fresh ConvNet and a
perturbed copy), and the permutations that order the synthetic minibatches. Augmentation is off on both sides.

Ours runs through distill.py's own functions: one iteration of `distill.distill` (expert stream over a one-expert
buffer file, plan_unroll, the unroll, the outer optimisers and SPEED's lr clamp), then `plan_unroll` +
`unrolled_loss` / `checkpointed_loss` again from the same generator state for the gradients of the loss. The
original runs the statements of its own distill.py loop body (bench/original_side/tm.py) with its own ConvNet,
ReparamModule and FReeNet.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from original_runner import OriginalFailed, run_original
from parity_common import ParityLine, compare

ADAPTER = "bench/original_side/tm.py"


@dataclass(frozen=True)
class TMCase:
    """The shapes of one parity run (small: the comparison is of the computation, not of the scale)."""
    dataset: str = "CIFAR10"     # 3 channels, 32 px, 10 classes: the originals' FReeNet decodes 3 channels
    model: str = "ConvNet"       # the originals' default student (width 128, depth 3, instance norm)
    syn_steps: int = 4
    dsa_steps: int = 8           # the unroll with DSA (shared draws): more steps, so more families are drawn
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"   # both originals' default, mode single
    target_noise: float = 0.01   # theta* = theta_0 + this * N(0, 1), per tensor
    # MTT
    ipc: int = 2
    # SPEED
    n_per_class: int = 3
    batch_syn: int = 8           # < N = 30: chunks 8, 8, 8, 6 popped from the end, then a fresh permutation
    num_saet: int = 8
    dim: int = 16
    depth: int = 2
    heads: int = 2
    patch: int = 4
    top_k: int = 20
    l1_weight: float = 3e-6
    # expert training (buffer.py): uniform [0, 1) images with random labels, plain SGD, no augmentation
    expert_images: int = 40
    expert_batch: int = 16       # batches of 16, 16, 8
    expert_epochs: int = 2


def _spec(case: TMCase):
    from utils.datasets import get_dataset_spec
    return get_dataset_spec(case.dataset)


def mtt_config(case: TMCase):
    """Our MTT settings (distill.MTT_COMMON: plain-SGD inner step, no lr floor, outer momentum 0.5, whole set per
    step) at the parity shapes; one expert epoch and one start epoch so both sides read [theta_0, theta*]."""
    from distill import MTT_COMMON, DistillConfig
    return replace(DistillConfig(), **{**MTT_COMMON, "iterations": 1}, method="mtt", dataset=case.dataset,
                   ipc=case.ipc, model=case.model, syn_steps=case.syn_steps, expert_epochs=1, max_start_epoch=1,
                   dsa=False, lr_img=1000.0, lr_lr=1e-5, lr_teacher=0.01)


def speed_config(case: TMCase):
    """Our SPEED defaults (EMA inner step 0.9, outer momentum 0.95, lrs 10 / 100 / 0.01 / 1e-5, lr floor 0.001,
    dense SCM training, L1 by subgradient, no inner standardisation) at the parity shapes."""
    from distill import DistillConfig
    return replace(DistillConfig(), method="speed", dataset=case.dataset, ipc=1, model=case.model,
                   syn_steps=case.syn_steps, expert_epochs=1, max_start_epoch=1, iterations=1, dsa=False,
                   batch_syn=case.batch_syn, n_per_class=case.n_per_class, num_saet=case.num_saet, dim=case.dim,
                   depth=case.depth, heads=case.heads, patch=case.patch, top_k=case.top_k,
                   l1_weight=case.l1_weight)


def shared_expert(cfg, spec, gen: torch.Generator, noise: float) -> tuple[list, list]:
    """[theta_0, theta*] as lists of parameter tensors in our ConvNet's `parameters()` order (MTT's snapshot
    layout): a fresh network, and a copy moved by noise * N(0, 1)."""
    from networks import get_network
    net = get_network(cfg.model, spec.channels, spec.num_classes, spec.resolution)
    start = [p.detach().clone() for p in net.parameters()]
    target = [p + noise * torch.randn(p.shape, generator=gen) for p in start]
    return start, target


@contextlib.contextmanager
def _recording_batch_generator():
    """Wrap distill.unroll_batches to record the generator state before it draws the synthetic batches (so the
    same permutations can be drawn again) and after (where plan_unroll's DSA draws begin)."""
    import distill
    real = distill.unroll_batches
    seen: list = []

    def recording(n, batch, steps, gen):
        before = gen.get_state()
        out = real(n, batch, steps, gen)
        seen.append((before, gen.get_state()))
        return out

    distill.unroll_batches = recording
    try:
        yield seen
    finally:
        distill.unroll_batches = real


def permutations(state: torch.Tensor, n: int, count: int) -> list[torch.Tensor]:
    """The first `count` permutations of n a generator in `state` draws (unroll_batches draws nothing else)."""
    g = torch.Generator()
    g.set_state(state)
    return [torch.randperm(n, generator=g) for _ in range(count)]


def run_ours(cfg, spec, make_params, start: list, target: list, seed: int, outer_step: bool = True) -> dict:
    """With `outer_step`, one outer iteration of distill.distill (the updated tensors); then, from the generator
    state its unroll drew from (or a generator seeded `seed`), the loss and its gradients through unrolled_loss and
    checkpointed_loss (only unrolled_loss without `outer_step`). `make_params()` builds the parameterisation in the
    shared initial state. Returns also the generator states where the batches and the DSA draws began."""
    import distill as D
    from utils.misc import RunLog
    from utils.trajectory import ExpertStream, flatten_snapshot, save_buffer_file

    n = D.num_images(cfg, spec)
    gen = torch.Generator().manual_seed(seed)
    out = {"n": n}
    if outer_step:
        params = make_params()
        with tempfile.TemporaryDirectory(prefix="ddt-parity-tm-") as tmp:
            buf = Path(tmp) / "replay_buffer_0.pt"
            save_buffer_file([[start, target]], buf)
            stream = ExpertStream([buf], gen)
            with _recording_batch_generator() as seen:
                state = D.distill(cfg, spec, params, stream, gen, "cpu", RunLog(None, quiet=True), D.RunState())
        if len(seen) != 1:
            raise RuntimeError(f"expected one unroll in one outer iteration, saw {len(seen)}")
        out.update(updated=params, updated_lr=state.alpha, batch_state=seen[0][0])
    else:
        out["batch_state"] = gen.get_state()

    student = D.make_student(cfg, spec)
    dsa = D.DSA(cfg.dsa_strategy, mode="single") if cfg.dsa else None
    labels = torch.arange(spec.num_classes).repeat_interleave(n // spec.num_classes)
    passes = (("unrolled", D.unrolled_loss), ("checkpointed", D.checkpointed_loss))
    for name, loss_fn in passes if outer_step else passes[:1]:
        g = torch.Generator()
        g.set_state(out["batch_state"])
        with _recording_batch_generator() as seen:
            u, used = D.plan_unroll(student, flatten_snapshot(start), flatten_snapshot(target), labels, n, cfg, dsa,
                                    g, (spec.resolution,) * 2, "cpu")
        out["dsa_state"] = seen[0][1]
        out["dsa_ops"] = [[op for op, _ in plan] for plan in u.plans if plan is not None]
        p = make_params()
        alpha = torch.tensor(cfg.lr_teacher, requires_grad=True)
        match = loss_fn(u, p.decode(used), alpha)
        reg = p.regularizer()
        (match + reg).backward()
        out[name] = {"params": p, "alpha": alpha, "match": match.detach(), "reg": reg.detach()}
    out["layout"] = torch.tensor(student.numels)
    return out


def _dsa_note(ours: dict) -> str:
    from utils.dsa import OP_FAMILY
    families = sorted({OP_FAMILY[op] for plan in ours["dsa_ops"] for op in plan})
    return f"families drawn: {', '.join(families)}"


def expert_lines(method: str, root: Path, args, case: TMCase, variants: list[tuple[str, bool, bool, str]]
                 ) -> list[ParityLine]:
    """buffer.py's expert training (`train_expert`) against the original buffer.py's loop statements: the same
    initial network, the same images and batch order (recorded from our generator), no augmentation; every
    snapshot compared. `variants`: (label, batch_standardize, gating, note). The original runs with copy_on_cpu:
    its `.cpu()` snapshots would otherwise alias the live weights on a CPU (every snapshot = the final weights)."""
    import copy

    import buffer as B
    from networks import get_network
    spec = _spec(case)
    gen = torch.Generator().manual_seed(args.seed + 3)
    n = case.expert_images
    # pixel-like values in [0, 1) (not already standardised, so the per-batch standardisation matters)
    images = torch.rand(n, spec.channels, spec.resolution, spec.resolution, generator=gen)
    labels = torch.randint(0, spec.num_classes, (n,), generator=gen)
    torch.manual_seed(args.seed + 4)
    net0 = get_network(case.model, spec.channels, spec.num_classes, spec.resolution)
    state = torch.Generator().manual_seed(args.seed + 5).get_state()
    payload = {"model": case.model, "dataset": spec.name, "lr": 0.01, "epochs": case.expert_epochs,
               "channel": spec.channels, "num_classes": spec.num_classes, "im_size": [spec.resolution] * 2,
               "images": images, "labels": labels, "batch": case.expert_batch,
               "perms": permutations(state, n, case.expert_epochs),
               "init": [p.detach().clone() for p in net0.parameters()]}
    theirs = run_original(root, ADAPTER, "expert_trajectory", payload, threads=getattr(args, "threads", 1),
                          copy_on_cpu=True)["trajectory"]
    lines = []
    for label, standardize, gating, note in variants:
        g = torch.Generator()
        g.set_state(state)
        traj = B.train_expert(copy.deepcopy(net0), images, labels, case.expert_epochs, generator=g, lr=0.01,
                              batch_size=case.expert_batch, dsa=None, batch_standardize=standardize, desc="parity")
        ours = torch.stack([torch.cat([p.reshape(-1) for p in snap]) for snap in traj])
        lines.append(compare(method, f"expert trajectory, {case.expert_epochs} epochs{label}", ours, theirs,
                             tol=args.tol, gating=gating, note=note))
    return lines


def _lines(method: str, pairs: list[tuple[str, object, object]], tol: float) -> list[ParityLine]:
    return [compare(method, q, ours, theirs, tol=tol) for q, ours, theirs in pairs]


def check_mtt(root: Path, args, case: TMCase = TMCase()) -> list[ParityLine]:
    """MTT: matching loss, d/d images, d/d syn_lr (whole unroll and --checkpoint-unroll), the images and lr after
    the outer step (SGD momentum 0.5, no clamp), the loss and gradients with DSA on (shared draws), and one expert's
    training (buffer.py --no-batch-standardize gating, its default as INFO)."""
    from distill import PixelImages
    if (root / "recurrent_block.py").is_file():
        raise OriginalFailed(f"--original {root} is SPEED's checkout (it has recurrent_block.py); --method mtt "
                             "needs a checkout of mtt-distillation (or use --method speed)")
    spec = _spec(case)
    cfg = mtt_config(case)
    gen = torch.Generator().manual_seed(args.seed)
    start, target = shared_expert(cfg, spec, gen, case.target_noise)
    n = spec.num_classes * cfg.ipc
    images = torch.randn(n, spec.channels, spec.resolution, spec.resolution, generator=gen)
    ours = run_ours(cfg, spec, lambda: PixelImages(cfg, spec, "cpu", images), start, target, args.seed + 1)
    payload = {"model": cfg.model, "channel": spec.channels, "num_classes": spec.num_classes,
               "im_size": [spec.resolution] * 2, "syn_steps": cfg.syn_steps, "batch_syn": n,
               "labels": torch.arange(spec.num_classes).repeat_interleave(cfg.ipc), "start": start,
               "target": target, "images": images, "syn_lr": torch.tensor(cfg.lr_teacher),
               "lr_img": cfg.lr_img, "lr_lr": cfg.lr_lr, "through": "update",
               "perms": permutations(ours["batch_state"], n, cfg.syn_steps)}
    theirs = run_original(root, ADAPTER, "mtt_step", payload, threads=getattr(args, "threads", 1))
    pairs = [("student parameter layout (sizes, in order)", ours["layout"], torch.tensor(theirs["layout"]))]
    for name, tag in (("unrolled", ""), ("checkpointed", " [--checkpoint-unroll]")):
        o = ours[name]
        pairs += [(f"matching loss{tag}", o["match"], theirs["loss"]),
                  (f"d loss / d images{tag}", o["params"].images.grad, theirs["grad_images"]),
                  (f"d loss / d syn_lr{tag}", o["alpha"].grad, theirs["grad_syn_lr"])]
    pairs += [("images after the outer step", ours["updated"].images.detach(), theirs["images"]),
              ("syn_lr after the outer step", ours["updated_lr"], theirs["syn_lr"])]
    lines = _lines("mtt", pairs, args.tol)

    # DSA on: the original's DiffAugment draws from the global RNG, which is set to the state our plan_unroll's
    # DSA sampling started from; both draw the family, then each op's values, step by step, in the same order.
    cfg_dsa = replace(cfg, dsa=True, syn_steps=case.dsa_steps, dsa_strategy=case.dsa_strategy)
    ours_dsa = run_ours(cfg_dsa, spec, lambda: PixelImages(cfg_dsa, spec, "cpu", images), start, target,
                        args.seed + 6, outer_step=False)
    theirs_dsa = run_original(root, ADAPTER, "mtt_step", {
        **payload, "syn_steps": cfg_dsa.syn_steps, "through": "backward", "dsa_state": ours_dsa["dsa_state"],
        "dsa_strategy": cfg_dsa.dsa_strategy,
        "perms": permutations(ours_dsa["batch_state"], n, cfg_dsa.syn_steps)}, threads=getattr(args, "threads", 1))
    o, note, tag = ours_dsa["unrolled"], _dsa_note(ours_dsa), f" [DSA, {cfg_dsa.syn_steps} steps]"
    lines += [compare("mtt", f"matching loss{tag}", o["match"], theirs_dsa["loss"], tol=args.tol, note=note),
              compare("mtt", f"d loss / d images{tag}", o["params"].images.grad, theirs_dsa["grad_images"],
                      tol=args.tol),
              compare("mtt", f"d loss / d syn_lr{tag}", o["alpha"].grad, theirs_dsa["grad_syn_lr"], tol=args.tol)]
    return lines + expert_lines("mtt", root, args, case, [
        (" [--no-batch-standardize]", False, True, ""),
        (" (buffer.py default)", True, False, "buffer.py standardises every batch by default, as SPEED's buffer.py "
         "does (speed.md §1.3); MTT's does not, --no-batch-standardize is MTT's behaviour")])


def _worst(method: str, quantity: str, ours: dict, theirs: dict, tol: float) -> ParityLine:
    """One line for a group of tensors (the FReeNet's): the tensor with the largest relative error, named."""
    if sorted(ours) != sorted(theirs):
        return compare(method, quantity, [0.0], [1.0], tol=tol,
                       note=f"tensor names differ: {sorted(set(ours) ^ set(theirs))}")
    lines = {k: compare(method, quantity, ours[k], theirs[k], tol=tol) for k in ours}
    name, worst = max(lines.items(), key=lambda kv: (kv[1].rel, kv[1].max_abs))
    worst.quantity = f"{quantity} (worst of {len(lines)}: {name})"
    return worst


def _freenet_grads(net) -> dict:
    return {k: p.grad for k, p in net.named_parameters()}



def _speed_step_lines(m: str, tag: str, o: dict, theirs: dict, tol: float, *, with_l1: bool,
                      note: str = "") -> list:
    """One unrolled SPEED step compared: the matching loss (and the L1 term), and the gradients w.r.t. SAET, SCM,
    FReeNet (worst tensor) and syn_lr."""
    lines = [compare(m, f"matching loss{tag}", o["match"], theirs["loss"], tol=tol, note=note)]
    if with_l1:
        lines.append(compare(m, f"L1 term{tag}", o["reg"], theirs["l1"], tol=tol))
    return lines + [
        compare(m, f"d loss / d SAET{tag}", o["params"].saet.grad, theirs["grad_saet"], tol=tol),
        compare(m, f"d loss / d SCM (incl. L1){tag}", o["params"].scm.grad, theirs["grad_scm"], tol=tol),
        _worst(m, f"d loss / d FReeNet{tag}", _freenet_grads(o["params"].freenet), theirs["grad_freenet"], tol),
        compare(m, f"d loss / d syn_lr{tag}", o["alpha"].grad, theirs["grad_syn_lr"], tol=tol)]

def check_speed(root: Path, args, case: TMCase = TMCase()) -> list[ParityLine]:
    """SPEED: matching loss and L1 term; d total loss / d SAET, SCM, FReeNet, syn_lr (whole unroll and
    --checkpoint-unroll); the tensors after the four outer steps and the lr clamp; the decode of the dense codes,
    the top-k sparsification (also on tied values) and the decode of the top-k codes as saved; the loss and
    gradients with DSA on (shared draws); one expert's training (buffer.py)."""
    from distill import SpeedCode
    from utils.speed import decode_images, pack_scm, topk_prune, unpack_scm
    spec = _spec(case)
    cfg = speed_config(case)
    gen = torch.Generator().manual_seed(args.seed)
    start, target = shared_expert(cfg, spec, gen, case.target_noise)
    init_seed = args.seed + 2

    def make_params():  # our own initialisation (E, A ~ N(0, 0.2^2), FReeNet Xavier), the same every call
        return SpeedCode(cfg, spec, "cpu", torch.Generator().manual_seed(init_seed))

    shared = make_params()
    n = spec.num_classes * cfg.n_per_class
    L = (spec.resolution // cfg.patch) ** 2
    ours = run_ours(cfg, spec, make_params, start, target, args.seed + 1)
    freenet_state = {k: v.detach().clone() for k, v in shared.freenet.state_dict().items()}
    common = {"decoder": {"resolution": spec.resolution, "patch": cfg.patch, "dim": cfg.dim, "depth": cfg.depth,
                          "heads": cfg.heads, "mlp_ratio": 1.0},
              "freenet": freenet_state, "saet": shared.saet.detach().clone(), "scm": shared.scm.detach().clone()}
    payload = {**common, "model": cfg.model, "channel": spec.channels, "num_classes": spec.num_classes,
               "im_size": [spec.resolution] * 2, "syn_steps": cfg.syn_steps, "batch_syn": cfg.batch_syn,
               "n_per_class": cfg.n_per_class, "inner_momentum": cfg.inner_momentum, "l1_weight": cfg.l1_weight,
               "labels": torch.arange(spec.num_classes).repeat_interleave(cfg.n_per_class), "start": start,
               "target": target, "syn_lr": torch.tensor(cfg.lr_teacher), "through": "update",
               "lrs": {"saet": cfg.lr_saet, "scm": cfg.lr_scm, "freenet": cfg.lr_freenet, "lr": cfg.lr_lr},
               "perms": permutations(ours["batch_state"], n, cfg.syn_steps)}
    # Tied magnitudes (a grid of 0.25): the original keeps every entry tied with the k-th largest.
    tied = (shared.scm.detach() * 4).round() / 4
    payload.update(top_k=cfg.top_k, sparsify={"random": common["scm"], "tied": tied})
    theirs = run_original(root, ADAPTER, "speed_step", payload, threads=getattr(args, "threads", 1))

    m = "speed"
    lines = [compare(m, "student parameter layout (sizes, in order)", ours["layout"], torch.tensor(theirs["layout"]),
                     tol=args.tol)]
    for name, tag in (("unrolled", ""), ("checkpointed", " [--checkpoint-unroll]")):
        lines += _speed_step_lines(m, tag, ours[name], theirs, args.tol, with_l1=True)
    upd = ours["updated"]
    lines += [compare(m, "SAET after the outer step", upd.saet.detach(), theirs["saet"], tol=args.tol),
              compare(m, "SCM after the outer step", upd.scm.detach(), theirs["scm"], tol=args.tol),
              _worst(m, "FReeNet after the outer step", upd.freenet.state_dict(), theirs["freenet"], args.tol),
              compare(m, "syn_lr after the outer step and the clamp", ours["updated_lr"], theirs["syn_lr"],
                      tol=args.tol)]

    with torch.no_grad():
        dense = shared.decode(torch.arange(n))
        packed = pack_scm(shared.scm, cfg.top_k)
        saved = decode_images(shared.saet, packed, shared.freenet, L)
        lines += [compare(m, "decode of the dense codes (the unroll's images)", dense, theirs["decode"], tol=args.tol),
                  compare(m, "top-k sparsification (topk_prune)", topk_prune(shared.scm, cfg.top_k),
                          theirs["sparse_random"], tol=args.tol),
                  compare(m, "top-k codes as saved (pack_scm -> unpack_scm)", unpack_scm(packed, L, cfg.num_saet),
                          theirs["sparse_random"], tol=args.tol),
                  compare(m, "decode of the saved top-k set (decode_images)", saved, theirs["decode_random"],
                          tol=args.tol),
                  compare(m, "top-k sparsification, tied values (topk_prune)", topk_prune(tied, cfg.top_k),
                          theirs["sparse_tied"], tol=args.tol),
                  compare(m, "top-k codes as saved, tied values (pack_scm)",
                          unpack_scm(pack_scm(tied, cfg.top_k), L, cfg.num_saet), theirs["sparse_tied"], tol=args.tol,
                          gating=False, note="compact storage keeps exactly k per (image, head), lowest position "
                          "first among ties; the original keeps every tie (speed.md bug 11, §3.3); topk_prune "
                          "above reproduces the original")]
    cfg_dsa = replace(cfg, dsa=True, syn_steps=case.dsa_steps, dsa_strategy=case.dsa_strategy)
    ours_dsa = run_ours(cfg_dsa, spec, make_params, start, target, args.seed + 6, outer_step=False)
    payload_dsa = {k: v for k, v in payload.items() if k not in ("sparsify", "top_k")}
    theirs_dsa = run_original(root, ADAPTER, "speed_step", {
        **payload_dsa, "syn_steps": cfg_dsa.syn_steps, "through": "backward", "dsa_state": ours_dsa["dsa_state"],
        "dsa_strategy": cfg_dsa.dsa_strategy,
        "perms": permutations(ours_dsa["batch_state"], n, cfg_dsa.syn_steps)}, threads=getattr(args, "threads", 1))
    lines += _speed_step_lines(m, f" [DSA, {cfg_dsa.syn_steps} steps]", ours_dsa["unrolled"], theirs_dsa, args.tol,
                               with_l1=False, note=_dsa_note(ours_dsa))
    return lines + expert_lines("speed", root, args, case, [(" (buffer.py default)", True, True, "")])


PARITY_METHODS = {"mtt": (check_mtt, "distill.py"), "speed": (check_speed, "recurrent_block.py")}
