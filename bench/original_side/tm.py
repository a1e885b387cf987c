"""Adapter run INSIDE the original MTT / SPEED checkout (bench/original_runner.py): imports only torch, numpy, the
standard library and the original's own modules, never this repository.

One outer iteration of trajectory matching lives in the originals' `main(args)` (distill.py), which also loads the
dataset, the expert files and wandb. So instead of re-writing that loop, this adapter reads the checkout's own
distill.py, takes the statements of the outer loop's body from the student's construction
(`student_net = get_network(...)`) through the meta-gradient's `.backward()` (or, for `outer_update`, through the
last optimiser step and SPEED's lr clamp), and executes exactly those statements of the original in a namespace
filled with the state the bench sends: the original's own `get_network` (its ConvNet), `ReparamModule`,
`DiffAugment`, SPEED's FReeNet, the synthetic tensors, one expert trajectory and the learned lr.

How the random draws of those statements are aligned:
- expert and start epoch: `args.load_all` with a one-expert buffer [theta_0, theta*] and `max_start_epoch` 1,
  `expert_epochs` 1, so the original's `np.random.randint` draws can only give expert 0 and epoch 0;
- synthetic batch order: `torch.randperm` returns, in order, the permutations the bench drew for our side (the
  original re-seeds the global RNG from the wall clock when it builds the student, speed.md bug 8, so its own
  draws could not be aligned);
- augmentation: off (`args.dsa` False and `args.no_aug` True), as on our side; or, when the bench sends
  `dsa_state`, on, with the global RNG set to that state at the first permutation: the original's DiffAugment then
  draws (family, then each op's values, step by step) what the bench's DSA sampler drew from the same state.
"""
from __future__ import annotations

import ast
import contextlib
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


def _shim_missing_imports() -> None:
    """SPEED's networks.py imports timm (four ImageNet constants, unused by FReeNet) and einops (used only by its
    ViT). Where they are not installed, stand-ins let the module import; calling an einops stand-in raises."""
    try:
        import timm.data  # noqa: F401
    except ImportError:
        timm = types.ModuleType("timm")
        data = types.ModuleType("timm.data")
        for name in ("IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "IMAGENET_INCEPTION_MEAN",
                     "IMAGENET_INCEPTION_STD"):
            setattr(data, name, None)
        timm.data = data
        sys.modules.update({"timm": timm, "timm.data": data})
    try:
        import einops  # noqa: F401
        import einops.layers.torch  # noqa: F401
    except ImportError:
        def unavailable(*a, **k):
            raise RuntimeError("einops is not installed; the parity bench only shims its import")
        einops = types.ModuleType("einops")
        layers = types.ModuleType("einops.layers")
        layers_torch = types.ModuleType("einops.layers.torch")
        einops.rearrange = einops.repeat = unavailable
        layers_torch.Rearrange = unavailable
        einops.layers, layers.torch = layers, layers_torch
        sys.modules.update({"einops": einops, "einops.layers": layers, "einops.layers.torch": layers_torch})


def _loop_body(root: Path, script: str = "distill.py", bound: str = "Iteration") -> list[ast.stmt]:
    """The body of the outer loop `for it in range(... args.<bound> ...)` in `main` of the original's script
    (distill.py: iterations; buffer.py: experts)."""
    tree = ast.parse((Path(root) / script).read_text(), filename=script)
    main = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)
    if main is None:
        raise RuntimeError(f"{script} has no main(args); not the MTT/SPEED checkout this adapter reads")
    for node in ast.walk(main):
        if (isinstance(node, ast.For) and isinstance(node.target, ast.Name) and node.target.id == "it"
                and bound in ast.unparse(node.iter)):
            return node.body
    raise RuntimeError(f"{script}'s main has no `for it in range(... args.{bound} ...)` loop")


def _is_call_of(stmt: ast.stmt, attr: str) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
            and isinstance(stmt.value.func, ast.Attribute) and stmt.value.func.attr == attr)


def _statements(root: Path, through: str) -> types.CodeType:
    """The original's statements from the student's construction through the meta-gradient's backward pass
    (`through="backward"`) or through the outer update (`through="update"`: the optimiser steps and, where the
    original has it, the clamp of the learned lr that follows them)."""
    body = _loop_body(root)
    first = next((i for i, s in enumerate(body) if isinstance(s, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "student_net" for t in s.targets)), None)
    backward = next((i for i, s in enumerate(body) if _is_call_of(s, "backward")), None)
    if first is None or backward is None or backward < first:
        raise RuntimeError("could not find the student's construction and the backward pass in distill.py")
    last = backward
    if through == "update":
        steps = [i for i, s in enumerate(body) if i > backward and _is_call_of(s, "step")]
        if not steps:
            raise RuntimeError("distill.py: no optimiser step after the backward pass")
        last = steps[-1]
        # SPEED clamps the learned lr right after the steps (`syn_lr.data = ...clip(...)`).
        nxt = body[last + 1] if last + 1 < len(body) else None
        if nxt is not None and isinstance(nxt, ast.Assign) and "syn_lr" in ast.unparse(nxt.targets[0]):
            last += 1
    module = ast.Module(body=body[first:last + 1], type_ignores=[])
    return compile(module, str(Path(root) / "distill.py"), "exec")


@contextlib.contextmanager
def _given_permutations(perms: list[torch.Tensor], rng_state: torch.Tensor | None = None):
    """`torch.randperm` hands out the bench's permutations in order (and refuses a size it was not given). With
    `rng_state`, the first call also sets the global RNG to it: the original's DiffAugment draws from the global RNG
    after that point, so its draws are the ones the bench's DSA sampler made from the same state."""
    queue = list(perms)
    saved = torch.randperm
    pending = [rng_state] if rng_state is not None else []

    def randperm(n, *args, **kwargs):
        if pending:
            torch.set_rng_state(pending.pop())
        if not queue:
            raise RuntimeError("the original drew more synthetic-batch permutations than the bench prepared")
        p = queue.pop(0)
        if int(n) != len(p):
            raise RuntimeError(f"the original drew a permutation of {n}, the bench prepared one of {len(p)}")
        return p.clone()

    torch.randperm = randperm
    try:
        yield queue
    finally:
        torch.randperm = saved


class _Args(types.SimpleNamespace):
    pass


def _common_args(payload: dict) -> _Args:
    """Augmentation off, unless the bench sends the RNG state its DSA draws started from (then DSA on)."""
    from utils import ParamDiffAug
    dsa = payload.get("dsa_state") is not None
    return _Args(model=payload["model"], device="cpu", distributed=False, load_all=True, max_start_epoch=1,
                 expert_epochs=1, syn_steps=int(payload["syn_steps"]), batch_syn=int(payload["batch_syn"]),
                 dsa=dsa, no_aug=not dsa,
                 dsa_strategy=payload.get("dsa_strategy", "color_crop_cutout_flip_scale_rotate"),
                 dsa_param=ParamDiffAug(), texture=False)


def _namespace(payload: dict, args: _Args) -> dict:
    import utils
    from reparam_module import ReparamModule
    trajectory = [[t.clone() for t in payload["start"]], [t.clone() for t in payload["target"]]]
    return {"torch": torch, "np": np, "nn": nn, "args": args, "it": 0, "get_network": utils.get_network,
            "ReparamModule": ReparamModule, "DiffAugment": utils.DiffAugment, "buffer": [trajectory],
            "channel": int(payload["channel"]), "num_classes": int(payload["num_classes"]),
            "im_size": tuple(int(v) for v in payload["im_size"]), "criterion": nn.CrossEntropyLoss(),
            "label_syn": payload["labels"].clone()}


def _layout(ns: dict) -> list[int]:
    """The original student's parameter sizes, in the order its ReparamModule flattens them."""
    return [int(n) for n in ns["student_net"]._param_numels]


def mtt_step(root: Path, payload: dict) -> dict:
    """MTT (mtt-distillation distill.py): one outer iteration's matching loss and its gradients w.r.t. the
    synthetic images and the learned lr; with payload["through"] == "update", also the tensors after the outer step."""
    args = _common_args(payload)
    args.lr_img, args.lr_lr = float(payload["lr_img"]), float(payload["lr_lr"])
    ns = _namespace(payload, args)
    image_syn = payload["images"].clone().requires_grad_(True)
    syn_lr = payload["syn_lr"].clone().requires_grad_(True)
    ns.update(image_syn=image_syn, syn_lr=syn_lr,
              optimizer_img=torch.optim.SGD([image_syn], lr=args.lr_img, momentum=0.5),
              optimizer_lr=torch.optim.SGD([syn_lr], lr=args.lr_lr, momentum=0.5))
    through = payload.get("through", "backward")
    with _given_permutations(payload["perms"], payload.get("dsa_state")):
        exec(_statements(root, through), ns)
    # the optimiser steps leave .grad in place, so the gradients are read after either slice
    out = {"loss": ns["grand_loss"].detach().clone(), "layout": _layout(ns),
           "grad_images": image_syn.grad.clone(), "grad_syn_lr": syn_lr.grad.clone()}
    if through == "update":
        out.update(images=image_syn.detach().clone(), syn_lr=syn_lr.detach().clone())
    return out


def _speed_freenet(payload: dict) -> nn.Module:
    """SPEED's FReeNet class (networks.py) with the shape of the bench's FReeNet and its weights, loaded strictly
    (the toolkit keeps the original's state-dict keys)."""
    _shim_missing_imports()
    import networks
    d = payload["decoder"]
    net = networks.FReeNet(img_size=int(d["resolution"]), patch_size=int(d["patch"]),
                           decoder_embed_dim=int(d["dim"]), decoder_depth=int(d["depth"]),
                           decoder_num_heads=int(d["heads"]), mlp_ratio=float(d["mlp_ratio"]),
                           norm_layer=partial(nn.LayerNorm, eps=1e-6))
    net.load_state_dict(payload["freenet"], strict=True)
    return net


def speed_step(root: Path, payload: dict) -> dict:
    """SPEED (SPEED distill.py): one outer iteration's matching loss, L1 term and the gradients of the total loss
    w.r.t. the SAET, the SCM, every FReeNet parameter and the learned lr; with payload["through"] == "update", also
    the tensors after the four optimiser steps and the lr clamp."""
    _shim_missing_imports()
    freenet = _speed_freenet(payload)
    args = _common_args(payload)
    args.num_scm, args.momentum = int(payload["n_per_class"]), float(payload["inner_momentum"])
    args.l1_weight = float(payload["l1_weight"])
    lrs = payload["lrs"]
    ns = _namespace(payload, args)
    saet = payload["saet"].clone().requires_grad_(True)
    scm = payload["scm"].clone().requires_grad_(True)
    syn_lr = payload["syn_lr"].clone().requires_grad_(True)
    ns.update(saet=saet, scm=scm, freenet=freenet, syn_lr=syn_lr,
              optimizer_saet=torch.optim.SGD([saet], lr=float(lrs["saet"]), momentum=0.95),
              optimizer_scm=torch.optim.SGD([scm], lr=float(lrs["scm"]), momentum=0.95),
              optimizer_freenet=torch.optim.SGD(freenet.parameters(), lr=float(lrs["freenet"]), momentum=0.95),
              optimizer_lr=torch.optim.SGD([syn_lr], lr=float(lrs["lr"]), momentum=0.95))
    through = payload.get("through", "backward")
    with _given_permutations(payload["perms"], payload.get("dsa_state")):
        exec(_statements(root, through), ns)
    out = {"loss": ns["grand_loss"].detach().clone(), "l1": ns["l1_penalty"].detach().clone(),
           "layout": _layout(ns), "grad_saet": saet.grad.clone(), "grad_scm": scm.grad.clone(),
           "grad_syn_lr": syn_lr.grad.clone(),
           "grad_freenet": {k: p.grad.clone() for k, p in freenet.named_parameters()}}
    if through == "update":
        out.update(saet=saet.detach().clone(), scm=scm.detach().clone(), syn_lr=syn_lr.detach().clone(),
                   freenet={k: v.detach().clone() for k, v in freenet.state_dict().items()})
    if "sparsify" in payload:   # the decode checks too, in the same process (one interpreter start fewer)
        out.update(speed_decode(root, payload))
    return out


def speed_decode(root: Path, payload: dict) -> dict:
    """SPEED's decode of the dense codes (as in the unroll), its feature sparsification (utils.py, top-k per
    (image, head), ties kept), and the decode of the sparsified codes (as its evaluation and saved files do)."""
    _shim_missing_imports()
    from utils import feature_sparsification
    freenet = _speed_freenet(payload)
    saet, scm = payload["saet"], payload["scm"]
    with torch.no_grad():
        dense = freenet.forward(saet.repeat(scm.shape[0], 1, 1), scm)
        out = {"decode": dense}
        for name, codes in payload["sparsify"].items():
            pruned = feature_sparsification(codes.clone(), top_k=int(payload["top_k"]), device="cpu")
            out[f"sparse_{name}"] = pruned
            out[f"decode_{name}"] = freenet.forward(saet.repeat(pruned.shape[0], 1, 1), pruned)
    return out


class _GivenOrder:
    """A stand-in for buffer.py's shuffled DataLoader: each pass (epoch) yields the batches of the next of the
    bench's permutations, in order, the last batch shorter (as a DataLoader without drop_last)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, perms: list, batch: int):
        self.images, self.labels, self.perms, self.batch = images, labels, list(perms), batch

    def __iter__(self):
        if not self.perms:
            raise RuntimeError("the original ran more epochs than the bench prepared batch orders for")
        order = self.perms.pop(0)
        for s in range(0, len(order), self.batch):
            idx = order[s:s + self.batch]
            yield self.images[idx], self.labels[idx]


def expert_trajectory(root: Path, payload: dict) -> dict:
    """One expert of the original's buffer.py: its loop statements from the teacher's construction through
    `trajectories.append(timestamps)`, with the original's `get_network` (the bench's initial weights copied into
    its ConvNet in parameter order), its `epoch()` (SPEED's standardises every batch; MTT's does not), plain SGD
    at args.lr_teacher, no augmentation, and the bench's batch order. Returns the snapshots flattened (E+1, P).
    Needs copy_on_cpu: the original snapshots with `.cpu()`, which on a CPU aliases the live weights."""
    _shim_missing_imports()
    import utils
    init = payload["init"]

    def get_network(*a, **k):
        net = utils.get_network(*a, **k)
        params = list(net.parameters())
        if [tuple(p.shape) for p in params] != [tuple(t.shape) for t in init]:
            raise RuntimeError("the original's network has another parameter layout than the bench's")
        with torch.no_grad():
            for p, t in zip(params, init):
                p.copy_(t)
        return net

    args = _Args(model=payload["model"], device="cpu", dataset=payload["dataset"], lr_teacher=float(payload["lr"]),
                 mom=0.0, l2=0.0, decay=False, train_epochs=int(payload["epochs"]), dsa=False, dc_aug_param=None,
                 dsa_param=utils.ParamDiffAug(), dsa_strategy="color_crop_cutout_flip_scale_rotate")
    images, labels = payload["images"], payload["labels"]
    ns = {"torch": torch, "np": np, "nn": nn, "args": args, "it": 0, "get_network": get_network, "epoch": utils.epoch,
          "criterion": nn.CrossEntropyLoss(), "trajectories": [], "channel": int(payload["channel"]),
          "num_classes": int(payload["num_classes"]), "im_size": tuple(int(v) for v in payload["im_size"]),
          "trainloader": _GivenOrder(images, labels, payload["perms"], int(payload["batch"])),
          "testloader": [(images[:8], labels[:8])]}
    body = _loop_body(root, "buffer.py", "num_experts")
    first = next((i for i, s in enumerate(body) if isinstance(s, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == "teacher_net" for t in s.targets)), None)
    last = next((i for i, s in enumerate(body) if _is_call_of(s, "append")
                 and ast.unparse(s.value.func.value) == "trajectories"), None)
    if first is None or last is None or last < first:
        raise RuntimeError("could not find the teacher's construction and trajectories.append in buffer.py")
    exec(compile(ast.Module(body=body[first:last + 1], type_ignores=[]), str(Path(root) / "buffer.py"), "exec"), ns)
    (traj,) = ns["trajectories"]
    return {"trajectory": torch.stack([torch.cat([p.reshape(-1) for p in snap]) for snap in traj])}
