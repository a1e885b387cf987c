"""condense.py (IDC / DREAM) and utils/kmeans.py: presets, loss, optimiser semantics, k-means, loop, resume, CLI."""
import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

import condense as C
from networks import get_network
from tests.test_validate import make_mnist_like
from utils.datasets import get_dataset_spec, load_split
from utils.kmeans import kmeans, nearest_to_centres, representatives
from utils.misc import RunLog
from utils.synset import load_synset

runner = CliRunner()
TINY = dict(net="ConvNet-3-w8", batch_real=4, n_data=8, inner_loop=2, outer=2, niter=1, batch_syn_max=16)


@pytest.fixture
def mnist(tmp_path):
    (tmp_path / "data").mkdir()
    make_mnist_like(tmp_path / "data", n_train=12, n_test=4)
    return tmp_path / "data"


def tiny_cfg(**kw):
    return replace(C.resolve_config("MNIST", 1, 2, False, True, {}), **{**TINY, **kw})


# ------------------------------------------------------------------------------------------ presets

@pytest.mark.parametrize("name,ipc,expect", [
    ("CIFAR10", 1, 5e-4), ("CIFAR10", 10, 5e-3), ("CIFAR100", 20, 1e-2), ("SVHN", 50, 2.5e-2),
    ("MNIST", 1, 1e-5), ("MNIST", 50, 5e-4), ("FashionMNIST", 1, 7.65625e-6), ("FashionMNIST", 10, 7.65625e-5),
    ("FashionMNIST", 20, 1.53125e-4), ("FashionMNIST", 50, 3.828125e-4), ("ImageNet10", 10, 3e-3),
    ("ImageNet10", 20, 6e-3), ("ImageNet100", 10, 1e-3), ("ImageNet100", 20, 2e-3),
])
def test_effective_lr_img_table(name, ipc, expect):
    spec = get_dataset_spec(name)
    cfg = C.resolve_config(name, ipc, 2, False, True, {})
    assert C.effective_lr_img(cfg.lr_img, ipc, spec) == pytest.approx(expect, rel=1e-9)


def test_reproduce_rows_resolve_to_the_spec_numbers():
    c = C.resolve_config("CIFAR10", 10, 2, False, True, {})
    assert (c.net, c.metric, c.lr_img, c.n_data, c.niter, c.inner_loop, c.outer_iterations) == \
        ("ConvNet-3", "mse", 5e-3, 2000, 2000, 100, 2000)
    assert (c.batch_real, c.batch_syn_max, c.mom_img, c.mix_p, c.aug_type, c.mixup_net) == \
        (64, 128, 0.5, 0.5, "color_crop_cutout", "cut")
    assert C.init_mode(c) == "mix" and C.init_mode(replace(c, factor=1)) == "random"
    m = C.resolve_config("MNIST", 10, 2, False, True, {})
    assert (m.metric, m.lr_img, m.n_data, m.aug_type, m.mixup_net) == ("l1", 1e-4, 500, "color_crop", "vanilla")
    assert C.resolve_config("MNIST", 10, 1, False, True, {}).aug_type == "color_crop_cutout"
    s = C.resolve_config("SVHN", 1, 1, False, True, {})
    assert (s.metric, s.n_data) == ("mse", 500)
    i10 = C.resolve_config("ImageNet10", 10, 3, False, True, {})
    assert (i10.net, i10.niter, i10.early, i10.mix_p, i10.decode_type, i10.lr_img) == \
        ("ResNetAP-10", 500, 10, 1.0, "single", 3e-3)
    assert C.resolve_config("ImageNet10", 20, 3, False, True, {}).decode_type == "bound"
    i100 = C.resolve_config("ImageNet100", 20, 1, False, True, {})
    assert (i100.lr, i100.weight_decay, i100.batch_real, i100.pt_from, i100.lr_img) == (0.1, 1e-4, 128, 5, 1e-3)
    d = C.resolve_config("CIFAR10", 10, 2, True, True, {})
    assert (d.batch_real, d.interval, d.early, d.f2_init) == (128, 10, 0, "kmean")
    assert C.init_mode(replace(d, factor=1)) == "kmean"
    assert C.resolve_config("ImageNet10", 10, 3, True, True, {}).early == 0     # DREAM dropped `early`
    t = C.resolve_config("TinyImageNet", 50, 2, True, True, {})
    assert (t.net, t.batch_real, t.n_data, t.metric, t.lr_img) == ("ConvNet-4", 64, 1000, "mse", 1e-6)
    with pytest.raises(Exception, match="DREAM preset"):
        C.resolve_config("TinyImageNet", 10, 2, False, True, {})


def test_defaults_without_reproduce_and_explicit_override():
    c = C.resolve_config("CIFAR10", 10, 2, False, False, {})
    assert (c.metric, c.lr_img, c.n_data, c.niter, c.mix_p) == ("l1", 5e-3, 500, 500, 0.5)
    o = C.resolve_config("CIFAR10", 10, 2, False, True, {"metric": "l1", "n_data": 64, "outer": 3})
    assert (o.metric, o.n_data, o.lr_img, o.outer_iterations) == ("l1", 64, 5e-3, 3)


def test_idc_names_map_to_registry_datasets_and_networks():
    assert C.dataset_name("fashion", None) == "FashionMNIST"
    assert C.dataset_name("imagenet", 100) == "ImageNet100"
    assert C.dataset_name("cifar10", None) == "CIFAR10"
    assert C.network_name("convnet", None) == "ConvNet-3"
    assert C.network_name("convnet", 10) == "ConvNet-3"
    assert C.network_name("resnet_ap", None) == "ResNetAP-10"
    assert C.network_name("ConvNet-4", None) == "ConvNet-4"


# ------------------------------------------------------------------------------------------- matching

def test_matching_distances_against_hand_computed_values():
    gr = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 2, 1, 1)
    gs = torch.tensor([[0.0, 2.0], [3.0, 8.0]]).reshape(2, 2, 1, 1)
    assert C.tensor_distance(gr, gs, "mse").item() == pytest.approx(1 + 16)
    assert C.tensor_distance(gr, gs, "l1").item() == pytest.approx(1 + 4)
    assert C.tensor_distance(gr, gs, "l1_mean").item() == pytest.approx(0.5 + 2.0)
    # cos per output channel: row 0 (1,2)·(0,2)=4 / (sqrt5*2); row 1 (3,4)·(3,8)=41 / (5*sqrt73)
    cos = (1 - 4 / (5 ** 0.5 * 2 + 1e-6)) + (1 - 41 / (5 * 73 ** 0.5 + 1e-6))
    assert C.tensor_distance(gr, gs, "cos").item() == pytest.approx(cos, rel=1e-6)
    assert C.matching_loss([gr, gr], [gs, gr], "l1").item() == pytest.approx(5)


def test_matched_parameters_are_conv_kernels_unless_asked():
    net = get_network("ConvNet-3-w8", 1, 10, 28)
    assert [p.dim() for p in C.matched_params(net)] == [4, 4, 4]
    assert len(C.matched_params(net, bias=True)) == 3 + 3 * 3 + 1  # + conv bias, norm weight/bias, fc bias
    assert [p.dim() for p in C.matched_params(net, fc=True)] == [4, 4, 4, 2]


def test_shared_momentum_closed_form_reproduces_the_sequential_reference():
    """The reference steps ONE SGD(momentum 0.5) per class; the closed form must evaluate each class's gradient at
    exactly the same images (idc_dream.md §2.2)."""
    torch.manual_seed(0)
    n_cls, ipc, lr, mom, steps = 4, 2, 0.1, 0.5, 6
    S0 = torch.rand(n_cls * ipc, 3)
    A = torch.rand(n_cls * ipc, 3)

    def grad_of(S, c, t):      # any state-dependent gradient, zero outside class c
        g = torch.zeros_like(S)
        rows = slice(c * ipc, (c + 1) * ipc)
        g[rows] = torch.sin(S[rows] * A[rows] + t)
        return g

    seq_at = {}
    S = S0.clone().requires_grad_(True)
    opt = torch.optim.SGD([S], lr=lr, momentum=mom)
    for t in range(steps):
        for c in range(n_cls):
            seq_at[(t, c)] = S.detach()[c * ipc:(c + 1) * ipc].clone()
            S.grad = grad_of(S.detach(), c, t)
            opt.step()
    closed_at = {}
    S2, buf = S0.clone(), torch.zeros_like(S0)
    for t in range(steps):
        g = torch.zeros_like(S2)
        for c in range(n_cls):
            closed_at[(t, c)] = S2[c * ipc:(c + 1) * ipc].clone()
            g += grad_of(S2, c, t)
        C.shared_momentum_step(S2, buf, g, lr, mom, n_cls)
    for key in seq_at:
        assert torch.allclose(seq_at[key], closed_at[key], atol=1e-6), key
    # a plain batched momentum step is NOT the same dynamics
    S3, b3 = S0.clone(), torch.zeros_like(S0)
    C.joint_momentum_step(S3, b3, grad_of(S3, 0, 0) + grad_of(S3, 1, 0), lr, mom, n_cls)
    C.joint_momentum_step(S3, b3, grad_of(S3, 0, 1) + grad_of(S3, 1, 1), lr, mom, n_cls)
    assert not torch.allclose(S3[:ipc], closed_at[(2, 0)], atol=1e-4)


def test_one_matching_step_lowers_the_matching_loss():
    torch.manual_seed(0)
    spec = get_dataset_spec("MNIST")
    cfg = replace(tiny_cfg(), metric="mse")
    net = get_network("ConvNet-3-w8", 1, 10, 28)
    params = C.matched_params(net)
    real = torch.rand(8, 1, 28, 28)
    stored = torch.rand(2, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    g, loss0 = C.class_match_grad(net, params, real, stored, 3, cfg, spec, None, gen)
    buf = torch.zeros_like(stored)
    C.shared_momentum_step(stored, buf, g, 1e-3 / max(g.abs().max().item(), 1e-12), 0.5, 1)
    _, loss1 = C.class_match_grad(net, params, real, stored, 3, cfg, spec, None, gen)
    assert loss1 < loss0


# -------------------------------------------------------------------------------------------- k-means

def test_kmeans_finds_separable_clusters_and_representatives():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(20)
    x = centres[truth] + 0.3 * torch.randn(60, 2, generator=g)
    found, assign = kmeans(x, 3, torch.Generator().manual_seed(1))
    # each true cluster maps to exactly one found cluster
    for c in range(3):
        assert len(set(assign[truth == c].tolist())) == 1
    assert len(set(assign.tolist())) == 3
    reps = representatives(x, 3, torch.Generator().manual_seed(1))
    assert sorted(truth[reps].tolist()) == [0, 1, 2]
    # batched over problems, and repeatable with the same generator
    xb = torch.stack([x, x.flip(0)])
    _, ab = kmeans(xb, 3, torch.Generator().manual_seed(2))
    _, ab2 = kmeans(xb, 3, torch.Generator().manual_seed(2))
    assert torch.equal(ab, ab2) and ab.shape == (2, 60)
    assert nearest_to_centres(xb, kmeans(xb, 3, torch.Generator().manual_seed(2))[0]).shape == (2, 3)


def test_kmeans_reseeds_empty_clusters_instead_of_collapsing_to_zero():
    x = torch.tensor([[5.0, 5.0]] * 6 + [[6.0, 6.0], [50.0, 50.0]])
    centres, assign = kmeans(x, 3, torch.Generator().manual_seed(0))
    assert not (centres.abs().sum(-1) == 0).any()
    assert len(set(assign.tolist())) == 3


# ---------------------------------------------------------------------------------------------- loop

def _data(mnist):
    split, spec = load_split("MNIST", mnist, "train")
    return split.images, split.labels, spec


def test_condense_lowers_the_loss_over_iterations_and_keeps_shapes(mnist):
    images, labels, spec = _data(mnist)
    cfg = tiny_cfg(outer=1, inner_loop=12, lr_img=1e-1, fix_iter=1, n_data=4, net_epoch=0)
    log = RunLog(None, quiet=True)
    st = C.condense(cfg, spec, images, labels, torch.device("cpu"), log)
    assert st.S.shape == (10, 1, 28, 28) and st.it == 1
    assert not torch.equal(st.S, C.condense(replace(cfg, outer=0), spec, images, labels, "cpu", log).S)


def test_interrupted_run_resumes_to_the_same_result(mnist, tmp_path):
    images, labels, spec = _data(mnist)
    log = RunLog(None, quiet=True)
    for dream in (False, True):
        cfg = tiny_cfg(outer=3, dream=dream, interval=1, init="auto", f2_init="kmean")
        full = C.condense(cfg, spec, images, labels, torch.device("cpu"), log)

        class Kill(Exception):
            pass

        def stop_after_one(st):
            C.atomic_torch_save(C.checkpoint_dict(st, "fp"), tmp_path / "ck.pt")
            raise Kill

        with pytest.raises(Kill):
            C.condense(cfg, spec, images, labels, torch.device("cpu"), log, on_outer=stop_after_one)
        resumed = C.condense(cfg, spec, images, labels, torch.device("cpu"), log,
                             state=C.load_checkpoint(tmp_path / "ck.pt", "fp"))
        assert torch.equal(full.S, resumed.S), dream
        if dream:
            assert len(full.dream_idx) == 10 and all(len(i) == cfg.batch_real for i in full.dream_idx)
            assert all(int(labels[i].min()) == c == int(labels[i].max()) for c, i in enumerate(full.dream_idx))


def test_init_from_first_real_images_and_mix_tiling(mnist):
    images, labels, spec = _data(mnist)
    cfg = tiny_cfg(factor=1, ipc=2)
    S = C.initial_images(cfg, spec, images, [torch.nonzero(labels == c).flatten() for c in range(10)], None,
                         torch.Generator().manual_seed(0))
    first = torch.nonzero(labels == 3).flatten()[:2]
    assert torch.equal(S[6:8], images[first].float() / 255)
    with pytest.raises(Exception, match="needs 48"):
        C.initial_images(tiny_cfg(ipc=12, factor=2), spec, images,
                         [torch.nonzero(labels == c).flatten() for c in range(10)], None, torch.Generator())


def test_cli_writes_a_set_validate_reads_and_resumes(mnist, tmp_path):
    out = tmp_path / "run"
    args = ["-d", "mnist", "--data-path", str(mnist), "--ipc", "1", "-f", "2", "--reproduce", "--net",
            "ConvNet-3-w8", "--outer-iterations", "2", "--inner-loop", "1", "--batch-real", "4", "--n-data", "4",
            "--out", str(out), "--snapshots", "0,1", "--quiet"]
    r = runner.invoke(C.app, args)
    assert r.exit_code == 0, r.output
    for f in ("synset.pt", "meta.json", "grid.png", "grid_stored.png", "ckpt.pt", "log.csv", "config.json",
              "data.pt", "snapshots/it0/synset.pt", "snapshots/it1/synset.pt"):
        assert (out / f).exists(), f
    syn = load_synset(out)
    x, y = syn.decode()
    assert x.shape == (40, 1, 28, 28) and syn.meta["decoder_args"]["factor"] == 2 and syn.meta["ipc"] == 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr_img_effective"] == pytest.approx(1e-5)
    # the same command again finds the finished checkpoint: nothing to redo, same set, log not duplicated;
    # --overwrite starts afresh and, being seeded, lands on the same set
    before = torch.load(out / "synset.pt", weights_only=True)["tensors"]["images"]
    rows = (out / "log.csv").read_text()
    assert runner.invoke(C.app, args).exit_code == 0
    assert (out / "log.csv").read_text() == rows
    assert torch.equal(before, torch.load(out / "synset.pt", weights_only=True)["tensors"]["images"])
    r = runner.invoke(C.app, args[:-1] + ["--overwrite", "--quiet"])
    assert r.exit_code == 0
    assert torch.equal(before, torch.load(out / "synset.pt", weights_only=True)["tensors"]["images"])
    # a checkpoint of other settings is refused
    (out / "synset.pt").unlink()
    r = runner.invoke(C.app, [a if a != "ConvNet-3-w8" else "ConvNet-3-w4" for a in args])
    assert r.exit_code == 2 and "other settings" in r.output


@pytest.mark.parametrize("extra,msg", [
    (["-d", "nosuch"], "unknown dataset"),
    (["-d", "mnist", "--match", "bi_match"], "not implemented"),
    (["-d", "mnist", "--metric", "l2"], "l2"),
    (["-d", "mnist", "--ipc", "20"], "needs 80"),
    (["-d", "mnist", "--net", "nosuchnet"], "unknown network"),
])
def test_bad_input_is_a_one_line_error(mnist, tmp_path, extra, msg):
    r = runner.invoke(C.app, ["--data-path", str(mnist), "--out", str(tmp_path / "o"), "--net", "ConvNet-3-w4",
                              "--outer-iterations", "1", "--inner-loop", "1"] + extra)
    assert r.exit_code == 2
    assert msg in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()            # nothing half-written


def test_pretrain_then_condense_from_pretrained_networks(mnist, tmp_path):
    pre = tmp_path / "pre"
    base = ["-d", "mnist", "--data-path", str(mnist), "--net", "ConvNet-3-w4", "--batch-real", "8", "--quiet"]
    r = runner.invoke(C.app, base + ["--pretrain", "--pt-from", "1", "--pt-num", "2", "--pretrain-seeds", "0,1",
                                     "--out", str(pre)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (pre / "ConvNet-3-w4_seed1").glob("*.pt")) == ["checkpoint1.pt", "checkpoint2.pt"]
    ck = C.pretrained_checkpoints(pre)
    net = get_network("ConvNet-3-w4", 1, 10, 28)
    import random
    tag = C.load_pretrained(net, ck, tiny_cfg(net="ConvNet-3-w4", pt_from=1, pt_num=2), random.Random(0))
    folder, epoch = tag.split("/epoch")
    state = torch.load(pre / folder / f"checkpoint{epoch}.pt", weights_only=True)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items())
    r = runner.invoke(C.app, base + ["--pretrained", str(pre), "--pt-from", "2", "--outer-iterations", "1",
                                     "--inner-loop", "1", "--n-data", "4", "--ipc", "1", "-f", "1",
                                     "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output


def test_row_scripts_are_current_and_resolve_to_presets():
    import re
    import subprocess
    import sys
    from pathlib import Path
    root = Path(C.__file__).resolve().parent
    for method in ("idc", "dream"):
        r = subprocess.run([sys.executable, str(root / "scripts" / method / "make_scripts.py"), "--check"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        rows = [p for p in (root / "scripts" / method).glob("*.sh") if re.fullmatch(r"[a-z0-9]+_f\d_ipc\d+\.sh", p.name)]
        assert len(rows) == (36 if method == "idc" else 15)
        for p in rows:
            text = p.read_text()
            m = re.search(r"condense\.py --reproduce (--dream )?-d (\w+) (?:--nclass (\d+) )?-f (\d) --ipc (\d+)", text)
            assert m, p
            name = C.dataset_name(m[2], int(m[3]) if m[3] else None)
            cfg = C.resolve_config(name, int(m[5]), int(m[4]), bool(m[1]), True, {})
            assert cfg.dream == (method == "dream")


@pytest.mark.parametrize("opts", [
    dict(init_select="random"), dict(momentum_mode="joint"), dict(dream=True, dream_embed="raw", interval=1),
    dict(decode_type="multi"), dict(decode_type="bound", ipc=1, factor=3, batch_syn_max=6),
    dict(metric="cos", bias=True, fc=True), dict(metric="l1_mean", mixup_net="vanilla"), dict(early=1),
    dict(factor=1, init="noise"), dict(fix_iter=2, outer=3),
])
def test_every_option_path_runs_and_moves_the_images(mnist, opts):
    images, labels, spec = _data(mnist)
    cfg = tiny_cfg(**{**dict(outer=1, inner_loop=1, lr_img=1.0), **opts})
    log = RunLog(None, quiet=True)
    start = C.condense(replace(cfg, outer=0), spec, images, labels, "cpu", log).S.clone()
    end = C.condense(cfg, spec, images, labels, "cpu", log).S
    assert end.shape == start.shape == (10 * cfg.ipc, 1, 28, 28)
    assert torch.isfinite(end).all() and not torch.equal(start, end)


def test_validate_reads_the_condense_output_folder(mnist, tmp_path):
    import validate
    out = tmp_path / "run"
    r = runner.invoke(C.app, ["-d", "mnist", "--data-path", str(mnist), "--ipc", "1", "-f", "2", "--reproduce",
                              "--net", "ConvNet-3-w4", "--outer-iterations", "1", "--inner-loop", "1",
                              "--batch-real", "4", "--n-data", "4", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(validate.app, ["--syn", str(out), "--data-path", str(mnist), "--preset", "idc", "--epochs", "1",
                                     "--runs", "1", "--model", "ConvNet-3-w4", "--baseline", "random", "--quiet"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "results.json").read_text())
    assert report["config"]["preset"] == "idc"
    rows = (out / "results.csv").read_text().splitlines()
    syn_row = next(line for line in rows if ",syn," in line)
    assert ",40," in syn_row          # 1 stored image x 4 decoded x 10 classes trained on
