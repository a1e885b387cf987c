"""Adapter run INSIDE the IDC / DREAM original checkout by bench/original_runner.py (see bench/parity_gm.py).

Imports only torch, numpy and the original's own modules (never this repository). Each function takes the checkout
root and a payload dict of tensors/numbers/strings and returns such a dict.

The original's own requirements (matplotlib, efficientnet_pytorch; DREAM also fast_pytorch_kmeans) must be
importable in the subprocess (e.g. installed with `pip install --target DIR` and DIR on PYTHONPATH). Two shims, neither
changes a value:
- `np.int` (removed in numpy 1.24, used by the original's CutMix box, idc_dream.md §9.1 item 6) is set to `int`;
- DiffAug's output is returned in the standard (contiguous NCHW) memory layout. Its crop builds the result through
  a permute, which for ONE-channel images leaves strides that also read as channels-last; on the CPU the next
  conv2d then propagates channels-last and the ConvNet's final `x.view` raises (a CPU-only trap: on CUDA the
  original runs). The copy holds the same values and is differentiable.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch


def _shims() -> None:
    if not hasattr(np, "int"):
        np.int = int
    from misc.augment import DiffAug
    if not getattr(DiffAug.__call__, "_ddt_layout", False):
        call = DiffAug.__call__

        def standard_layout_call(self, x, *a, **k):
            return call(self, x, *a, **k).clone(memory_format=torch.contiguous_format)
        standard_layout_call._ddt_layout = True
        DiffAug.__call__ = standard_layout_call


def _parse_args(argv: list[str]):
    """The original's argument.py parses sys.argv at import time (§9.1 item 18): set it, then import."""
    _shims()
    sys.argv = ["condense.py"] + list(argv)
    sys.modules.pop("argument", None)
    import argument
    return argument.args


class _Stopped(Exception):
    pass


def _stop_after_outer(condense, outer: int, captured: dict) -> None:
    """End the original's loop when outer iteration `outer` begins, keeping its synthetic set as it stands after
    `outer` outer iterations (what its own save at that point would hold: not clamped). The loop calls
    define_model at the start of every outer iteration (fix_iter 1), and keeps S in the Synthesizer it built;
    both are wrapped to observe, nothing else changes. Needed because the original saves only at
    n_iter//10, //5, //2 and n_iter, and n_iter < 50 divides by zero in its log interval (§9.1 item 8)."""
    define_model, synthesizer = condense.define_model, condense.Synthesizer
    calls = {"n": 0}

    class ObservedSynthesizer(synthesizer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            captured["synset"] = self

    def counting_define_model(*a, **k):
        calls["n"] += 1
        if calls["n"] == outer + 1:
            syn = captured["synset"]
            captured["data"], captured["targets"] = syn.data.detach().clone(), syn.targets.clone()
            raise _Stopped()
        return define_model(*a, **k)
    condense.Synthesizer, condense.define_model = ObservedSynthesizer, counting_define_model


def condense_run(root: Path, payload: dict) -> dict:
    """The original's own condense() (its loop, loader, augmentation, network) with the command line `argv`, writing
    into `save_dir`; returns its saved [data, targets]. Seeds numpy and torch with `seed` first (the original seeds
    only when --seed > 0). `--test` must be in argv: it skips the 1000-epoch evaluations inside the loop.
    With `stop_after` K, the run ends after K outer iterations and data.pt holds S at that point."""
    args = _parse_args(payload["argv"])
    save = Path(payload["save_dir"])
    save.mkdir(parents=True, exist_ok=True)
    args.save_dir = str(save)
    args.workers = 0
    if "niter" in payload:   # outer iterations = niter * 100 // inner_loop, read inside condense()
        args.niter = int(payload["niter"])
    np.random.seed(int(payload["seed"]))
    torch.manual_seed(int(payload["seed"]))
    import condense
    from misc.utils import Logger
    captured: dict = {}
    stop_after = int(payload.get("stop_after", 0))
    if stop_after:
        _stop_after_outer(condense, stop_after, captured)
    try:
        condense.condense(args, Logger(str(save)), device="cpu")
        data, targets = torch.load(save / "data.pt", weights_only=True)
    except _Stopped:
        data, targets = captured["data"], captured["targets"]
        torch.save([data, targets], save / "data.pt")
    return {"data": data, "targets": targets, "lr_img": float(args.lr_img)}


# ------------------------------------------------------------------------------------------ shared state

def _load_convnet(args, nclass: int, ours: dict):
    """The original's own network (train.define_model with the original's args) holding the toolkit's weights.

    Key mapping (explicit): the toolkit's ConvNet keeps one flat `features` Sequential (conv, norm, act, pool per
    block); the original keeps `layers.conv.<d>` and `layers.norm.<d>`. A 4-D `features.<i>.weight` starts block
    d; the next 1-D-weight module of `features` is that block's norm. `classifier.*` is named alike."""
    from train import define_model
    model = define_model(args, nclass)
    mapped, block, kind = {}, -1, {}
    for key, value in ours.items():
        parts = key.split(".")
        if parts[0] == "classifier":
            mapped[key] = value
            continue
        index = parts[1]
        if index not in kind:
            kind[index] = "conv" if ours[f"features.{index}.weight"].dim() == 4 else "norm"
            if kind[index] == "conv":
                block += 1
        mapped[f"layers.{kind[index]}.{block}.{parts[2]}"] = value
    model.load_state_dict(mapped)
    return model


class _Draws:
    """Replaces np.random.uniform / randint / permutation while active: every draw of the original's DiffAug
    (batch mode) comes from the queues the bench sends, in call order, so both sides get the same parameters.
    A randint value outside the bounds the original asks for is refused (the two sides disagree on the draw)."""

    def __init__(self, uniform: list, randint: list):
        self.uniform, self.randint = list(uniform), list(randint)

    def __enter__(self):
        self.saved = np.random.uniform, np.random.randint
        np.random.uniform, np.random.randint = self._uniform, self._randint
        return self

    def __exit__(self, *exc):
        np.random.uniform, np.random.randint = self.saved
        return False

    def _uniform(self, low=0.0, high=1.0, size=None):
        if size is not None or (low, high) != (0.0, 1.0):
            raise RuntimeError(f"unexpected np.random.uniform({low}, {high}, size={size}) in batch mode")
        if not self.uniform:
            raise RuntimeError("the original asked for more uniform draws than the bench sent")
        return float(self.uniform.pop(0))

    def _randint(self, low, high=None, size=None):
        if high is None:
            low, high = 0, low
        if size is not None:
            raise RuntimeError(f"unexpected np.random.randint(size={size}) in batch mode")
        if not self.randint:
            raise RuntimeError("the original asked for more integer draws than the bench sent")
        v = int(self.randint.pop(0))
        if not low <= v < high:
            raise RuntimeError(f"integer draw {v} outside the original's range [{low}, {high})")
        return v

    def left(self) -> int:
        return len(self.uniform) + len(self.randint)


# ------------------------------------------------------------------------------------------ IDC quantities

def decode(root: Path, payload: dict) -> dict:
    """Synthesizer.decode (single / multi / bound) of the original, for each case of the payload."""
    out = []
    for case in payload["cases"]:
        x = case["images"]
        args = _parse_args(["-d", case["dataset"], "--ipc", str(len(x)), "-f", str(case["factor"]),
                            "--decode_type", case["mode"], "--test"] + payload.get("extra_argv", []))
        import condense
        synset = condense.Synthesizer(args, 1, x.shape[1], x.shape[2], x.shape[3])
        data, target = synset.decode(x, torch.zeros(len(x), dtype=torch.long), bound=int(case.get("bound", 128)))
        out.append({"images": data, "targets": target})
    return {"cases": out}


def mix_init(root: Path, payload: dict) -> dict:
    """Synthesizer.init(loader, 'mix') (IDC): the loader's class_sample(c, n) returns the class's first n images,
    as the original's in-memory loader does (§9.1 item 3)."""
    real = payload["images"]              # [nclass, n, C, R, R] in [0, 1]
    args = _parse_args(["-d", payload["dataset"], "--ipc", str(payload["ipc"]), "-f", str(payload["factor"]),
                        "--test"])
    import condense

    class FirstImages:
        def class_sample(self, c, ipc=-1):
            return real[c][:ipc], torch.full((ipc,), c, dtype=torch.long)
    synset = condense.Synthesizer(args, real.shape[0], real.shape[2], real.shape[3], real.shape[4])
    synset.init(FirstImages(), init_type="mix")
    return {"data": synset.data.detach().clone()}


def diffaug_ops(root: Path, payload: dict) -> dict:
    """One DiffAug op (batch mode, one draw shared by the batch) per case, from the queued draws; plus the whole
    matching augmentation of condense.diffaug (normalise, then DiffAug(aug_type, batch=True))."""
    _shims()
    from misc.augment import DiffAug
    out = []
    for case in payload["cases"]:
        x = case["images"]
        if case["op"] == "pipeline":
            args = _parse_args(["-d", case["dataset"], "--ipc", "1", "-a", case["aug_type"], "--test"])
            import condense
            fn, _ = condense.diffaug(args)
        else:
            op = getattr(DiffAug(strategy=case["op"], batch=True), f"{case['op']}_fn")
            fn = lambda x, op=op: op(x, True)  # noqa: E731
        with _Draws(case["uniform"], case["randint"]) as d:
            y = fn(x)
            if d.left():
                raise RuntimeError(f"{case['op']}: {d.left()} draws were not used")
        out.append(y)
    return {"outputs": out}


def match_grad(root: Path, payload: dict) -> dict:
    """The matching loss of one class and its gradient w.r.t. the STORED synthetic images, through the original's
    own chain: synset.sample(c) (decode + subsample), condense.diffaug's matching augmentation on the concatenated
    real + synthetic batch (draws queued), condense.matchloss, backward."""
    args = _parse_args(payload["argv"] + ["--test"])
    import condense
    stored = payload["stored"]            # [nclass * ipc, C, R, R], class-major
    nclass, c = int(payload["nclass"]), int(payload["label"])
    synset = condense.Synthesizer(args, nclass, stored.shape[1], stored.shape[2], stored.shape[3])
    synset.data = stored.clone().requires_grad_(True)
    model = _load_convnet(args, nclass, payload["state_dict"]).to(stored.dtype)
    model.train()
    real = payload["real"]
    lab = torch.full((len(real),), c, dtype=torch.long)
    img_syn, lab_syn = synset.sample(c, max_size=args.batch_syn_max)
    aug, _ = condense.diffaug(args)
    with _Draws(payload["uniform"], payload["randint"]) as d:
        img_aug = aug(torch.cat([real, img_syn]))
        if d.left():
            raise RuntimeError(f"{d.left()} augmentation draws were not used")
    loss = condense.matchloss(args, img_aug[:len(real)], img_aug[len(real):], lab, lab_syn, model)
    loss.backward()
    return {"loss": loss.detach(), "grad": synset.data.grad.detach(), "lr_img": float(args.lr_img)}


def lr_img(root: Path, payload: dict) -> dict:
    """args.lr_img after argument.py's tune_lr_img, for each (dataset, ipc, base lr) case."""
    values = []
    for case in payload["cases"]:
        args = _parse_args(["-d", case["dataset"], "--ipc", str(case["ipc"]), "--lr_img", repr(case["lr_img"]),
                            "--test"] + payload.get("extra_argv", []))
        values.append(float(args.lr_img))
    return {"lr_img": torch.tensor(values, dtype=torch.float64)}


def image_updates(root: Path, payload: dict) -> dict:
    """The original's synthetic-image optimiser (SGD over all of S, momentum mom_img, one step per class with that
    class's gradient, classes in order) over several inner iterations, fed fixed per-class gradients."""
    args = _parse_args(payload["argv"] + ["--test"])
    S = payload["S"].clone().requires_grad_(True)
    grads = payload["grads"]               # [inner, nclass * ipc, C, R, R], each zero outside its class rows
    nclass, ipc = int(payload["nclass"]), int(payload["ipc"])
    opt = torch.optim.SGD([S], lr=args.lr_img, momentum=args.mom_img)
    for g in grads:
        for c in range(nclass):
            opt.zero_grad()
            S.grad = torch.zeros_like(S)
            S.grad[c * ipc:(c + 1) * ipc] = g[c * ipc:(c + 1) * ipc]
            opt.step()
    return {"S": S.detach()}


# ------------------------------------------------------------------------------------------ DREAM quantities

class _Features(torch.nn.Module):
    """A 'network' whose embedding is its input: lets DREAM's NEW_Strategy cluster features the bench gives."""

    def embed(self, x):
        return x


def _start_points(starts: list, centres: list):
    """fast_pytorch_kmeans's 'random' init replaced, call by call, by the data points the bench chose (the same
    points the toolkit's k-means starts from); everything after the init is the library's own loop. The final
    centres of each fit are appended to `centres`."""
    from fast_pytorch_kmeans import kmeans as km
    queue = [torch.as_tensor(s) for s in starts]
    original, fit_predict = km.init_methods["random"], km.KMeans.fit_predict

    def recording_fit_predict(self, X, centroids=None):
        out = fit_predict(self, X, centroids)
        centres.append(self.centroids.detach().clone())
        return out

    def given(X, n_clusters, minibatch):
        if not queue:
            raise RuntimeError("k-means was called more often than the bench sent start points for")
        idx = queue.pop(0)
        if len(idx) != n_clusters:
            raise RuntimeError(f"start points for {len(idx)} clusters, the original asks for {n_clusters}")
        return X[idx].clone()
    km.init_methods["random"] = given
    km.KMeans.fit_predict = recording_fit_predict

    def restore():
        km.init_methods["random"], km.KMeans.fit_predict = original, fit_predict
    return restore


def dream_query(root: Path, payload: dict) -> dict:
    """DREAM's representative choice, NEW_Strategy(images, net).query(k): the net's embeddings of all the class's
    images (raw [0, 1] pixels, as DREAM feeds them), fast_pytorch_kmeans with k clusters, the nearest image to
    each centre. With `features` instead of images/state_dict, the clustering runs on those features as given."""
    args = _parse_args(["-d", payload["dataset"], "--ipc", "1", "--match", "grad", "--test"])
    from new_strategy import NEW_Strategy
    centres: list = []
    restore = _start_points(payload["starts"], centres)
    try:
        if "features" in payload:
            strategy = NEW_Strategy(payload["features"], _Features())
            features = payload["features"]
        else:
            model = _load_convnet(args, int(payload["nclass"]), payload["state_dict"])
            model.eval()
            strategy = NEW_Strategy(payload["images"], model)
            features = strategy.get_embeddings(payload["images"])
        idx = strategy.query(int(payload["k"]))
    finally:
        restore()
    return {"indices": idx, "features": features, "centres": centres[0]}
