"""distill.py: the unroll, the loss, checkpointing, one step, presets and the CLI (MTT and SPEED)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import distill
from distill import (DistillConfig, PixelImages, SpeedCode, Unroll, checkpointed_loss, parameter_distance,
                     plan_unroll, resolve_config, unroll_batches, unrolled_loss)
from networks import get_network
from networks.functional import FlatNet, flatten_params
from utils.amp import Amp
from utils.datasets import get_dataset_spec
from utils.dsa import DSA
from utils.errors import UserError


def test_parameter_distance_hand_case():
    start, target = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0])   # ||start - target||^2 = 25
    theta = torch.tensor([3.0, 0.0])                                      # ||theta - target||^2 = 16
    assert parameter_distance(theta, start, target).item() == pytest.approx(16 / 25)
    assert parameter_distance(target, start, target).item() == 0


def test_unroll_batches_follow_the_reference_order():
    # speed.md §3.6: permutation split into chunks of `batch`, consumed from the END (short remainder first)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    batches = unroll_batches(10, 4, 3, g)
    assert [len(b) for b in batches] == [2, 4, 4]
    assert torch.equal(batches[0], perm[8:]) and torch.equal(batches[1], perm[4:8]) and torch.equal(batches[2],
                                                                                                    perm[:4])
    nxt = unroll_batches(10, 4, 4, torch.Generator().manual_seed(0))[3]  # a 4th step draws a fresh permutation
    assert len(nxt) == 2
    assert all(len(b) == 5 for b in unroll_batches(5, None, 3, g))


def tiny_unroll(steps=3, momentum=0.9, dsa=True, seed=0):
    torch.manual_seed(seed)
    net = get_network("ConvNet-1-w8", 3, 4, 8)
    student = FlatNet(net)
    start = flatten_params(net)
    target = start + 0.05 * torch.randn_like(start)
    cfg = DistillConfig(method="mtt", ipc=2, batch_syn=3, syn_steps=steps, inner_momentum=momentum)
    labels = torch.arange(4).repeat_interleave(2)
    aug = DSA() if dsa else None
    u, used = plan_unroll(student, start, target, labels, 8, cfg, aug, torch.Generator().manual_seed(seed), (8, 8),
                          "cpu")
    return u, used


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_checkpointed_unroll_equals_full_unroll(momentum):
    u, used = tiny_unroll(steps=4, momentum=momentum)
    x0 = torch.randn(len(used), 3, 8, 8)
    grads = []
    for fn in (unrolled_loss, checkpointed_loss):
        x = x0.clone().requires_grad_(True)
        a = torch.tensor(0.02, requires_grad=True)
        loss = fn(u, x, a)
        loss.backward()
        grads.append((loss.detach(), x.grad, a.grad))
    (l1, gx1, ga1), (l2, gx2, ga2) = grads
    assert torch.allclose(l1, l2, rtol=1e-5)
    assert gx1.abs().sum() > 0 and torch.allclose(gx1, gx2, rtol=1e-4, atol=1e-7)
    assert torch.allclose(ga1, ga2, rtol=1e-4)


def test_unroll_without_steps_change_is_the_start_distance():
    u, used = tiny_unroll(steps=1, dsa=False)
    x = torch.randn(len(used), 3, 8, 8)
    # alpha 0: the student does not move, so the loss is exactly 1
    assert unrolled_loss(u, x, torch.tensor(0.0)).item() == pytest.approx(1.0)


def test_inner_update_rules():
    u, _ = tiny_unroll(momentum=0.9)
    th, m, g = torch.ones(3), torch.full((3,), 2.0), torch.full((3,), 4.0)
    th2, m2 = u.update(th, m, g, 0.5)
    assert torch.allclose(m2, torch.full((3,), 0.9 * 2 + 0.1 * 4)) and torch.allclose(th2, 1 - 0.5 * m2)
    u0 = replace(u, momentum=0.0)
    th3, m3 = u0.update(th, m, g, 0.5)
    assert torch.allclose(th3, torch.full((3,), 1 - 2.0)) and torch.equal(m3, g)


def _fixed_problem(method):
    """A tiny target trajectory made by actually training on real-looking data, and a parameterisation."""
    torch.manual_seed(0)
    spec = replace(get_dataset_spec("CIFAR10"), resolution=8)
    net = get_network("ConvNet-1-w8", 3, 10, 8)
    start = flatten_params(net)
    xr = torch.randn(40, 3, 8, 8)
    yr = torch.arange(10).repeat(4)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for _ in range(10):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xr), yr).backward()
        opt.step()
    target = flatten_params(net)
    if method == "mtt":
        cfg = DistillConfig(method="mtt", ipc=1, model="ConvNet-1-w8", syn_steps=5, batch_syn=None, lr_img=100,
                            outer_momentum=0.5, inner_momentum=0.0)
        params = PixelImages(cfg, spec, "cpu", torch.randn(10, 3, 8, 8))
    else:
        cfg = DistillConfig(method="speed", ipc=1, model="ConvNet-1-w8", syn_steps=5, batch_syn=10, n_per_class=2,
                            num_saet=4, dim=8, depth=1, heads=2, patch=2, top_k=8, l1_weight=1e-6)
        params = SpeedCode(cfg, spec, "cpu", torch.Generator().manual_seed(0))
    return cfg, spec, params, FlatNet(net), start, target


@pytest.mark.parametrize("method", ["mtt", "speed"])
def test_one_distillation_step_lowers_the_loss(method):
    cfg, spec, params, student, start, target = _fixed_problem(method)
    n = distill.num_images(cfg, spec)
    labels = torch.arange(10).repeat_interleave(n // 10)
    u, used = plan_unroll(student, start, target, labels, n, cfg, None, torch.Generator().manual_seed(1), (8, 8),
                          "cpu")
    alpha = torch.tensor(0.05, requires_grad=True)

    def loss():
        return unrolled_loss(u, params.decode(used), alpha) + params.regularizer()
    before = loss()
    for o in params.optimizers:
        o.zero_grad()
    before.backward()
    for o in params.optimizers:
        o.step()
    after = loss()
    assert after.item() < before.item()


def test_presets_resolve_per_dataset_and_ipc():
    cifar = get_dataset_spec("CIFAR10")
    c1 = resolve_config("speed", cifar, 1, {})
    assert (c1.n_per_class, c1.num_saet, c1.dim, c1.heads, c1.syn_steps, c1.batch_syn) == (17, 16, 32, 2, 60, 64)
    c10 = resolve_config("speed", cifar, 10, {})
    assert (c10.n_per_class, c10.dim, c10.top_k, c10.l1_weight) == (124, 96, 48, 3e-7)
    tiny = resolve_config("speed", get_dataset_spec("TinyImageNet"), 10, {})
    assert (tiny.model, tiny.patch, tiny.n_per_class, tiny.batch_syn, tiny.syn_steps) == ("ConvNetD4", 8, 78, 780, 20)
    woof = resolve_config("speed", get_dataset_spec("imagewoof"), 1, {})
    assert (woof.model, woof.l1_weight, woof.n_per_class) == ("ConvNetD5", 3e-7, 15)
    # an explicit flag wins; changing the code's shape re-derives the images per class from the budget
    small = resolve_config("speed", cifar, 1, {"dim": 16, "syn_steps": 7})
    assert small.syn_steps == 7 and small.dim == 16 and small.n_per_class > 17
    mtt = resolve_config("mtt", cifar, 10, {})
    assert (mtt.syn_steps, mtt.max_start_epoch, mtt.inner_momentum, mtt.lr_floor, mtt.batch_syn) == (30, 20, 0.0,
                                                                                                     None, None)
    with pytest.raises(UserError):
        resolve_config("kip", cifar, 10, {})


# sha256 of every published row's resolved settings (json, sorted keys) at commit 95c0d95, before derived presets
# were reworked: SPEED's 20 rows and MTT's 9. A published row must resolve byte-identically forever. `amp` is a run
# option, not a row's value (it became the `--amp` mode string after 95c0d95), so it is left out of the digest.
PUBLISHED_SPEED_SHA256 = "86c3dee5c92414235a542ec8c18bee31a227b510cb7c52082238e1e76853ec6d"
PUBLISHED_MTT_SHA256 = "6be7ff2b68a2f759c28bacdcfe23810d53b849216274685f83b3e9fb9946ca80"


def test_published_rows_resolve_exactly_as_published():
    import hashlib
    from dataclasses import asdict
    from utils.speed import SPEED_PRESETS

    def digest(method, keys):
        rows = {}
        for name, ipc in sorted(keys):
            cfg = asdict(resolve_config(method, get_dataset_spec(name), ipc, {}))
            assert cfg.pop("topk_share") is None                   # the reference's dense training
            assert cfg.pop("amp") == "off"                         # fp32 unless asked
            rows[f"{name}/{ipc}"] = cfg
        return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    assert digest("speed", SPEED_PRESETS) == PUBLISHED_SPEED_SHA256
    assert digest("mtt", distill.MTT_PRESETS) == PUBLISHED_MTT_SHA256
    c1 = resolve_config("speed", get_dataset_spec("CIFAR10"), 1, {})
    assert distill.topk_start(c1) is None and distill.trained_dense_at_end(c1)


def test_derived_rows_train_the_saved_codes_for_the_last_share():
    fm = get_dataset_spec("FashionMNIST")
    cfg = resolve_config("speed", fm, 1, {"iterations": 300})
    assert (cfg.topk_share, distill.topk_start(cfg), distill.trained_dense_at_end(cfg)) == (0.5, 150, False)
    assert distill.topk_start(replace(cfg, iterations=301)) == 151            # the last round(0.5 * 301) = 150
    assert distill.topk_start(resolve_config("speed", fm, 1, {"iterations": 300, "topk_from": 7})) == 7
    off = resolve_config("speed", fm, 1, {"iterations": 300, "topk_share": 0.0})
    assert distill.topk_start(off) is None and distill.trained_dense_at_end(off)
    assert distill.topk_start(resolve_config("speed", fm, 1, {"iterations": 300, "topk_share": 1.0})) == 0
    with pytest.raises(UserError, match="--topk-share must lie in"):
        distill.check_config(resolve_config("speed", fm, 1, {"topk_share": 1.5}), fm)
    # MTT without a published row: the nearest published row (CIFAR-10 at the largest IPC <= the requested one)
    mtt = resolve_config("mtt", fm, 1, {})
    assert (mtt.syn_steps, mtt.max_start_epoch, mtt.lr_img, mtt.lr_lr, mtt.inner_momentum, mtt.batch_syn) == \
        (50, 2, 1000, 1e-7, 0.0, None)
    assert resolve_config("mtt", get_dataset_spec("CIFAR10"), 5, {}).syn_steps == 50
    assert resolve_config("mtt", get_dataset_spec("SVHN"), 20, {}).syn_steps == 30
    assert resolve_config("mtt", get_dataset_spec("imagenette"), 10, {}).lr_img == 10000   # 128 px: Tiny's row


def test_stored_form_note_gives_the_kept_code_mass_when_trained_dense():
    from utils.speed import kept_code_mass, topk_prune
    cfg, spec, params, *_ = _fixed_problem("speed")          # dense training (the reference), k 8 of L·K 64
    note = distill.stored_form_note(cfg, params)
    kept = kept_code_mass(params.scm, cfg.top_k)
    assert kept < 0.5 and note.startswith("warning: ") and "\n" not in note
    assert f"keeps {100 * kept:.1f} % of the trained code mass (top 8 of 64 codes" in note
    assert distill.stored_form_note(replace(cfg, topk_share=0.5), params) is None      # trained through the top-k
    assert distill.stored_form_note(replace(cfg, scm_train="topk-ste"), params) is None
    with torch.no_grad():                      # codes already top-k sparse: the stored set is what was trained
        params.scm.copy_(topk_prune(params.scm, cfg.top_k))
    assert distill.stored_form_note(cfg, params) is None
    mtt_cfg, _, mtt_params, *_ = _fixed_problem("mtt")
    assert distill.stored_form_note(mtt_cfg, mtt_params) is None


def test_every_published_speed_row_passes_the_checks():
    from utils.speed import SPEED_PRESETS
    for (name, ipc) in SPEED_PRESETS:
        spec = get_dataset_spec(name)
        cfg = resolve_config("speed", spec, ipc, {})
        distill.check_config(cfg, spec)
        assert distill.num_images(cfg, spec) == spec.num_classes * cfg.n_per_class


def test_config_errors_are_one_line():
    cifar = get_dataset_spec("CIFAR10")
    with pytest.raises(UserError, match="budget"):
        distill.check_config(resolve_config("speed", cifar, 1, {"n_per_class": 500}), cifar)
    with pytest.raises(UserError, match="divisible"):
        distill.check_config(resolve_config("speed", cifar, 10, {"patch": 5, "n_per_class": 10}), cifar)
    with pytest.raises(UserError):
        distill.check_config(resolve_config("mtt", cifar, 10, {"syn_steps": 0}), cifar)


def test_unroll_type_is_a_dataclass_with_replayable_plans():
    u, used = tiny_unroll(steps=3)
    assert isinstance(u, Unroll) and len(u.plans) == 3 and all(p is not None for p in u.plans)
    x = torch.randn(len(used), 3, 8, 8)
    a = torch.tensor(0.01)
    assert unrolled_loss(u, x, a).item() == unrolled_loss(u, x, a).item()  # same plans -> same loss




# ------------------------------------------------------------------------------------------------ CLI

from typer.testing import CliRunner  # noqa: E402

import buffer as B  # noqa: E402
import validate as V  # noqa: E402
from tests.test_validate import make_mnist_like  # noqa: E402
from utils.synset import load_synset  # noqa: E402
from utils.trajectory import buffer_files, load_buffer_file, save_buffer_file  # noqa: E402

runner = CliRunner()
NET = "ConvNet-1-w8"


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Tiny MNIST-like data and 2 experts x 3 epochs made by buffer.py."""
    root = tmp_path_factory.mktemp("distill")
    (root / "data").mkdir()
    make_mnist_like(root / "data", n_train=12, n_test=5)
    r = runner.invoke(B.app, ["--dataset", "MNIST", "--data-path", str(root / "data"), "--model", NET,
                              "--train-epochs", "3", "--num-experts", "2", "--batch-train", "32",
                              "--buffer-path", str(root / "buffers"), "--quiet"])
    assert r.exit_code == 0, r.output
    return root


def _distill(experts, out, *extra, method="speed"):
    return runner.invoke(distill.app, ["--dataset", "MNIST", "--ipc", "1", "--method", method, "--model", NET,
                                       "--data-path", str(experts / "data"), "--buffer-path",
                                       str(experts / "buffers"), "--iterations", "4", "--syn-steps", "3",
                                       "--max-start-epoch", "1", "--batch-syn", "16", "--out", str(out),
                                       "--quiet", *extra])


def _tensors(out):
    return torch.load(out / "synset.pt", weights_only=True)["tensors"]


def test_cli_speed_writes_a_set_validate_decodes(experts, tmp_path):
    out = tmp_path / "speed"
    r = _distill(experts, out)
    assert r.exit_code == 0, r.output
    for f in ("synset.pt", "meta.json", "grid.png", "ckpt.pt", "log.csv", "config.json", "images_final.pt"):
        assert (out / f).is_file(), f
    meta = json.loads((out / "meta.json").read_text())
    assert meta["decoder"] == "speed" and meta["ipc"] == 1 and meta["method"] == "speed"
    t = _tensors(out)
    assert t["scm_index"].dtype == torch.int16 and t["scm_value"].shape == t["scm_index"].shape
    syn = load_synset(out)
    images, labels = syn.decode()
    assert images.shape == (50, 1, 28, 28) and torch.equal(labels, torch.arange(10).repeat_interleave(5))
    assert torch.allclose(images, torch.load(out / "images_final.pt", weights_only=True))
    assert 0.001 <= float(syn.lr) and len((out / "log.csv").read_text().splitlines()) == 5
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["storage_floats"] <= cfg["budget_floats"] == 10 * 784
    r = runner.invoke(V.app, ["--syn", str(out), "--data-path", str(experts / "data"), "--model", NET, "--epochs",
                              "2", "--runs", "1", "--preset", "speed", "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["batch_standardize"] is True and res["config"]["schedule"] == "mtt"


def test_cli_resume_after_interruption_equals_uninterrupted(experts, tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert _distill(experts, full, "--ckpt-every", "2").exit_code == 0
    real = distill.distill

    def interrupted(*a, **k):
        on_iter = a[-1]

        def stop(st, fill):
            on_iter(st, fill)
            if st.it == 3:       # killed after iteration 3; the last checkpoint is from iteration 2
                raise KeyboardInterrupt
        return real(*a[:-1], stop)
    monkeypatch.setattr(distill, "distill", interrupted)
    cut = tmp_path / "cut"
    r = _distill(experts, cut, "--ckpt-every", "2")
    assert r.exit_code == 130 and not (cut / "synset.pt").exists()
    monkeypatch.setattr(distill, "distill", real)
    assert _distill(experts, cut, "--ckpt-every", "2").exit_code == 0
    a, b = _tensors(full), _tensors(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (cut / "log.csv").read_text().splitlines()
    assert len(rows) == 5  # iteration 2 logged once, not twice
    # more iterations continue the finished run (the fingerprint leaves --iterations out)
    assert _distill(experts, cut, "--iterations", "5").exit_code == 0
    assert len((cut / "log.csv").read_text().splitlines()) == 6


def test_cli_mtt_starts_from_real_images_and_checkpointing_matches(experts, tmp_path):
    r = _distill(experts, tmp_path / "mtt", "--iterations", "0", method="mtt")
    assert r.exit_code == 0, r.output
    init = _tensors(tmp_path / "mtt")["images"]
    assert init.shape == (10, 1, 28, 28)
    # real init: each image is a normalised real image of its class (the class's bright block is there)
    from utils.datasets import get_dataset_spec, normalize
    spec = get_dataset_spec("MNIST")
    bright = normalize(torch.ones(1, 1, 1, 1), spec.mean, spec.std).item()
    for c in range(10):
        r0, c0 = 2 + 8 * (c // 3), 2 + 8 * (c % 3)
        assert torch.allclose(init[c, 0, r0:r0 + 6, c0:c0 + 6], torch.tensor(bright))
    outs = []
    for name, extra in (("plain", ()), ("ckpt", ("--checkpoint-unroll",))):
        assert _distill(experts, tmp_path / name, "--iterations", "3", *extra, method="mtt").exit_code == 0
        outs.append(_tensors(tmp_path / name)["images"])
    assert not torch.equal(outs[0], init) and torch.allclose(outs[0], outs[1], atol=1e-4)


def test_legacy_buffer_without_meta_is_read(experts, tmp_path):
    src = buffer_files(experts / "buffers" / "MNIST" / NET)[0]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_buffer_file(load_buffer_file(src), legacy / "replay_buffer_0.pt")
    r = _distill(experts, tmp_path / "out", "--expert-dir", str(legacy), "--iterations", "1")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["space"] == "normalized"


@pytest.mark.parametrize("extra,msg", [
    (("--buffer-path", "/nonexistent/buffers"), "buffer"),
    (("--model", "ConvNet-2-w8", "--expert-dir", "EXPERTS"), "parameters"),
    (("--n-per-class", "500"), "budget"),
    (("--model", "NoSuchNet"), "NoSuchNet"),
    (("--method", "kip"), "kip"),
])
def test_bad_input_is_one_line_and_writes_nothing(experts, tmp_path, extra, msg):
    out = tmp_path / "bad"
    extra = [str(experts / "buffers" / "MNIST" / NET) if e == "EXPERTS" else e for e in extra]
    r = _distill(experts, out, *extra)
    assert r.exit_code == 2 and msg.lower() in r.output.lower() and len(r.output.strip().splitlines()) == 1
    assert not out.exists()  # caught before the output folder is created


def test_help_lists_new_and_original_flag_spellings():
    r = runner.invoke(distill.app, ["--help"], env={"COLUMNS": "220"})
    for flag in ("--syn_steps", "--syn-steps", "--expert_epochs", "--max_start_epoch", "--lr_teacher", "--num_scm",
                 "--top_k", "--l1_weight", "--Iteration", "--checkpoint-unroll", "--buffer_path", "--no_aug"):
        assert flag in r.output, flag


def test_straight_through_topk_forward_is_the_saved_codes_backward_is_dense():
    from utils.speed import straight_through_topk, topk_prune
    torch.manual_seed(0)
    a = torch.randn(3, 2, 4, 5, requires_grad=True)
    out = straight_through_topk(a, 6)
    assert torch.equal(out.detach(), topk_prune(a.detach(), 6))
    assert ((out != 0).flatten(2).sum(-1) == 6).all()
    (out * torch.arange(a.numel()).reshape(a.shape)).sum().backward()
    assert torch.equal(a.grad, torch.arange(a.numel()).reshape(a.shape).float())  # identity backward


def test_unpublished_row_runs_with_explicit_shape_only():
    tiny = get_dataset_spec("TinyImageNet")
    with pytest.raises(UserError, match="IPC50|IPC 50"):
        resolve_config("speed", tiny, 50, {})
    shape = dict(num_saet=128, dim=256, depth=2, heads=8, patch=8, top_k=128)
    cfg = resolve_config("speed", tiny, 50, shape)
    distill.check_config(cfg, tiny)
    assert cfg.model == "ConvNetD4" and cfg.n_per_class > 78


def test_cli_warns_at_the_end_when_the_saved_codes_are_not_what_was_trained(experts, tmp_path):
    r = _distill(experts, tmp_path / "dense", "--topk-share", "0", "--iterations", "2")
    assert r.exit_code == 0, r.output
    warn = r.stderr.splitlines()                         # --quiet: the note is all there is on stderr, one line
    assert len(warn) == 1 and warn[0].startswith("warning: the saved set keeps ")
    assert "% of the trained code mass (top 37 of 784 codes" in warn[0]
    assert r.stdout.splitlines()[-1].startswith("wrote speed set: 50 images")
    r = _distill(experts, tmp_path / "derived", "--iterations", "2")               # the derived default
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output


def test_cli_speed_topk_ste_trains_the_saved_codes(experts, tmp_path):
    r = _distill(experts, tmp_path / "ste", "--scm-train", "topk-ste", "--iterations", "2")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ste" / "config.json").read_text())["scm_train"] == "topk-ste"


def test_proximal_l1_soft_thresholds_the_codes():
    cfg, spec, params, *_ = _fixed_problem("speed")
    params.cfg = replace(cfg, l1_mode="proximal", l1_weight=1e-3, lr_scm=100.0)   # threshold 0.1
    with torch.no_grad():
        params.scm.copy_(torch.tensor([0.05, -0.05, 0.3, -0.3]).repeat(params.scm.numel() // 4).view_as(params.scm))
    assert not params.regularizer().requires_grad        # the L1 term leaves the loss
    params.after_step()
    vals = params.scm.detach().flatten()[:4]
    assert torch.allclose(vals, torch.tensor([0.0, 0.0, 0.2, -0.2]))


def test_masked_topk_trains_only_the_kept_codes_and_topk_from_switches():
    from utils.speed import masked_topk, topk_prune
    torch.manual_seed(0)
    a = torch.randn(2, 2, 3, 4, requires_grad=True)
    out = masked_topk(a, 5)
    assert torch.equal(out.detach(), topk_prune(a.detach(), 5))
    out.sum().backward()
    assert torch.equal(a.grad, (out.detach() != 0).float())      # gradient 1 on kept codes, 0 elsewhere
    cfg, spec, params, *_ = _fixed_problem("speed")
    params.cfg = replace(cfg, topk_from=3)
    idx = torch.arange(4)
    params.iteration = 2
    dense = params.decode(idx)
    params.iteration = 3
    pruned = params.decode(idx)
    with torch.no_grad():
        expect = params.freenet(params.saet, topk_prune(params.scm[idx], cfg.top_k))
    assert torch.allclose(pruned, expect) and not torch.allclose(dense, pruned)


def test_bench_naive_unroll_computes_the_same_loss_and_gradients():
    """bench/distill_speed.py compares against a faithful naive unroll: same numbers, different structure."""
    import importlib.util
    from pathlib import Path
    path = Path(distill.__file__).resolve().parent / "bench" / "distill_speed.py"
    spec_ = importlib.util.spec_from_file_location("distill_speed", path)
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    cfg, spec, params, student, start, target = _fixed_problem("speed")
    net = get_network("ConvNet-1-w8", 3, 10, 8)
    n = distill.num_images(cfg, spec)
    labels = torch.arange(10).repeat_interleave(n // 10)
    u, used = plan_unroll(student, start, target, labels, n, cfg, DSA(), torch.Generator().manual_seed(2), (8, 8),
                          "cpu")
    alpha = torch.tensor(0.05, requires_grad=True)
    ours = unrolled_loss(u, params.decode(used), alpha)
    g_ours = torch.autograd.grad(ours, [params.scm, params.saet, alpha])
    naive = bench.naive_loss(net, params, u, [used[b] for b in u.batches], alpha, "speed")
    g_naive = torch.autograd.grad(naive, [params.scm, params.saet, alpha])
    assert torch.allclose(ours, naive, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-8) for a, b in zip(g_ours, g_naive))


def test_amp_unroll_runs_and_stays_close():
    """--amp bf16 (autocast of the student) exercised on CPU: same loss to bf16 precision."""
    u, used = tiny_unroll(steps=2, dsa=False)
    x = torch.randn(len(used), 3, 8, 8, requires_grad=True)
    a = torch.tensor(0.05)
    full = unrolled_loss(u, x, a)
    half = unrolled_loss(replace(u, amp=Amp("bf16", "cpu")), x, a)
    half.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert abs(full.item() - half.item()) < 0.05 * full.item()
