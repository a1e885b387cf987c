"""recover.py: BN loss, schedules, DWA, DELT's EarlyLate plan, grouping exactness, output layout, resume,
slices and the two-process run (decoupled.md §1.3-§1.6, §3, §4, §5, §8.2)."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import recover as R
from networks.registry import get_network
from utils.synset import load_synset
from utils.teacher import load_teacher, save_teacher

ROOT = Path(__file__).resolve().parent.parent


def _teacher_file(tmp_path: Path, classes: int = 4, res: int = 16, arch: str = "ConvNet-2-BN-w8") -> Path:
    torch.manual_seed(0)
    net = get_network(arch, 3, classes, res)
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(4):
            net(torch.randn(16, 3, res, res) * 0.7 + 0.3)
    path = tmp_path / "teacher.pt"
    save_teacher(path, net, arch=arch, dataset="CIFAR10", num_classes=classes, channels=3, resolution=res,
                 mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
    return path


def _init_folder(tmp_path: Path, classes: int = 4, per_class: int = 3, res: int = 16) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "init"
    for c in range(classes):
        d = root / f"{c:05d}"
        d.mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(d / f"{k:03d}_img.png")
    return root


def _cfg(**kw) -> R.RecoverConfig:
    base = dict(iterations=6, lr=0.1, batch_size=4, r_bn=0.05, jitter=2, rrc=True, flip=True, init="noise")
    base.update(kw)
    return R.RecoverConfig(**base)


# ------------------------------------------------------------------------------------------------ BN loss


def test_bn_loss_matches_hand_computation():
    bn = nn.BatchNorm2d(2)
    bn.running_mean.copy_(torch.tensor([0.5, -1.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.5]))
    net = nn.Sequential(nn.Identity(), bn, nn.Flatten())
    net.eval()
    hooks = R.BNStatHooks(net, first_bn_multiplier=10.0, r_var=3.0)
    x = torch.arange(2 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 2, 2, 2)
    net(x)
    got = hooks.losses(1)
    # by hand: channel 0 holds {0,1,2,3, 8,9,10,11}, channel 1 holds {4..7, 12..15}
    c0 = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11.])
    c1 = c0 + 4
    m = torch.stack([c0.mean(), c1.mean()])
    v = torch.stack([((c0 - c0.mean()) ** 2).mean(), ((c1 - c1.mean()) ** 2).mean()])  # biased
    want = 10.0 * (torch.linalg.norm(m - bn.running_mean) + 3.0 * torch.linalg.norm(v - bn.running_var))
    assert got.shape == (1,)
    assert torch.allclose(got[0], want)


def test_bn_loss_per_unit_equals_separate_forwards(tmp_path):
    t = load_teacher(_teacher_file(tmp_path))
    hooks = R.BNStatHooks(t.net, 10.0, 1.0)
    a, b = torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)
    t.net(a)
    la = hooks.losses(1)
    t.net(b)
    lb = hooks.losses(1)
    t.net(torch.cat([a, b]))
    both = hooks.losses(2)
    assert torch.allclose(both, torch.cat([la, lb]), rtol=1e-5, atol=1e-5)
    t.net(torch.cat([a, b]))
    assert not torch.allclose(hooks.losses(1), la)   # pooling the two units changes the objective


def test_first_bn_layer_is_weighted(tmp_path):
    t = load_teacher(_teacher_file(tmp_path))
    hooks = R.BNStatHooks(t.net, 10.0, 1.0)
    assert hooks.weights[0] == 10.0 and set(hooks.weights[1:]) == {1.0}
    assert hooks.layers[0] is next(m for m in t.net.modules() if isinstance(m, nn.BatchNorm2d))


# ------------------------------------------------------------------------------------------------ schedules


def test_cosine_lr_and_crop_floor():
    assert R.cosine_lr(0.25, 0, 100) == 0.25
    assert math.isclose(R.cosine_lr(0.25, 50, 100), 0.125)
    assert 0 < R.cosine_lr(0.25, 99, 100) < 1e-3          # last step small but not zero
    assert R.crop_floor("cosine", 0, 100, 1.0) == 1.0
    assert math.isclose(R.crop_floor("cosine", 50, 100, 1.0), 0.08 + 0.92 * 0.5)
    assert R.crop_floor("cosine", 60, 100, 0.5) == 0.08    # past the milestone
    assert R.crop_floor("linear", 25, 100, 0.5) == pytest.approx(0.08 + 0.92 * 0.5)
    assert R.crop_floor("step", 10, 100, 0.5) == 1.0
    assert R.crop_floor("none", 0, 100, 1.0) == 0.08


def test_delt_schedule_equals_spec_worked_example():
    # decoupled.md §5.3: IPC 50, ITR 4000, RI 500 -> s = [7,7,6,6,6,6,6,6]
    assert R.round_sizes(50, 8) == [7, 7, 6, 6, 6, 6, 6, 6]
    its = R.image_iterations(50, 4000, 500)
    want = [4000] * 7 + [3500] * 7 + [3000] * 6 + [2500] * 6 + [2000] * 6 + [1500] * 6 + [1000] * 6 + [500] * 6
    assert its == want
    assert sum(its) / (50 * 4000) == pytest.approx(0.5775)
    its10 = R.image_iterations(10, 4000, 500)
    assert its10 == [4000, 4000, 3500, 3500, 3000, 2500, 2000, 1500, 1000, 500]
    assert sum(its10) / (10 * 4000) == pytest.approx(0.6375)
    assert [R.start_round(i, 5, 8) for i in range(5)] == [0, 1, 2, 3, 4]


def test_delt_units_drop_empty_rounds_for_straddling_classes():
    cfg = R.RecoverConfig(method="delt", iterations=40, round_iterations=10, early_late=True, batch_size=6,
                          init="real")
    units = R.plan_units(cfg, num_classes=2, ipc_range=(0, 4), class_range=(0, 2), ipc_total=4)
    assert [len(u.classes) for u in units] == [6, 2]
    # the second unit holds class 1's indices 2, 3, which start in rounds 2 and 3: rounds 0, 1 are dropped
    second = units[1]
    assert second.indices == (2, 3)
    assert second.iterations == 20
    assert R.unit_iterations(second) == [20, 10]        # same per-index budgets as in a whole-class batch
    assert R.unit_iterations(units[0]) == [40, 30, 20, 10, 40, 30]


def test_sre2l_units_are_ipc_times_class_blocks():
    cfg = _cfg(batch_size=3)
    units = R.plan_units(cfg, num_classes=7, ipc_range=(2, 4), class_range=(0, 7), ipc_total=4)
    assert [(u.indices[0], u.classes) for u in units] == [
        (2, (0, 1, 2)), (2, (3, 4, 5)), (2, (6,)), (3, (0, 1, 2)), (3, (3, 4, 5)), (3, (6,))]
    groups = R.group_units(units, 4)
    assert [[u.key for u in g] for g in groups] == [[units[0].key, units[1].key], [units[2].key],
                                                   [units[3].key, units[4].key], [units[5].key]]


def test_sample_crop_is_inside_and_seeded():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    boxes = [R.sample_crop(32, (0.08, 1.0), g1) for _ in range(50)]
    assert boxes == [R.sample_crop(32, (0.08, 1.0), g2) for _ in range(50)]
    for i, j, h, w in boxes:
        assert 0 <= i and 0 <= j and i + h <= 32 and j + w <= 32 and h > 0 and w > 0
    assert len(set(boxes)) > 10
    assert R.sample_crop(32, (1.0, 1.0), g1) == (0, 0, 32, 32)


# ------------------------------------------------------------------------------------------------ DWA


def test_dwa_perturbation_moves_rho_and_restores_exactly(tmp_path):
    t = load_teacher(_teacher_file(tmp_path))
    before = [p.detach().clone() for p in t.net.parameters()]
    buffers = [b.detach().clone() for b in t.net.buffers()]
    saved = R.SavedWeights(t.net)
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4)
    R.directed_weight_adjustment(t.net, x, y, steps=1, rho=0.05)
    moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(t.net.parameters(), before)))
    assert moved.item() == pytest.approx(0.05, rel=1e-4)          # one step: exactly rho
    loss_before = F.cross_entropy(_forward_with(t.net, before, x), y)
    assert F.cross_entropy(t.net(x), y) > loss_before           # ascent raised the CE
    R.directed_weight_adjustment(t.net, x, y, steps=5, rho=0.05)
    assert all(not p.requires_grad for p in t.net.parameters())  # frozen again
    saved.restore()
    assert all(torch.equal(p, b) for p, b in zip(t.net.parameters(), before))
    assert all(torch.equal(p, b) for p, b in zip(t.net.buffers(), buffers))  # BN statistics never touched


def _forward_with(net, params, x):
    current = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p, v in zip(net.parameters(), params):
            p.copy_(v)
        out = net(x)
        for p, v in zip(net.parameters(), current):
            p.copy_(v)
    return out


def test_dwa_steps_have_norm_rho_over_k(tmp_path):
    t = load_teacher(_teacher_file(tmp_path))
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4)
    prev = [p.detach().clone() for p in t.net.parameters()]
    total = [p.detach().clone() for p in t.net.parameters()]
    for _ in range(3):
        R.directed_weight_adjustment(t.net, x, y, steps=1, rho=0.03 / 3)
        step = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(t.net.parameters(), prev)))
        assert step.item() == pytest.approx(0.01, rel=1e-4)
        prev = [p.detach().clone() for p in t.net.parameters()]
    dist = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(t.net.parameters(), total)))
    assert dist.item() <= 0.03 + 1e-6


def test_dwa_group_restores_teacher_and_differs_from_sre2l_real_init(tmp_path):
    tp = _teacher_file(tmp_path)
    t = load_teacher(tp)
    init = R.RealInit(_init_folder(tmp_path), t, "stretch")
    before = [p.detach().clone() for p in t.net.parameters()]
    unit = R.plan_units(_cfg(method="dwa", init="real"), 4, (0, 1), (0, 4), 1)[0]
    dwa = R.recover_group([unit], _cfg(method="dwa", init="real", rho=0.5, dwa_steps=3), t, init, torch.device("cpu"))
    assert all(torch.equal(p, b) for p, b in zip(t.net.parameters(), before))
    plain = R.recover_group([unit], _cfg(method="dwa", init="real", rho=0.0), t, init, torch.device("cpu"))
    assert not torch.allclose(dwa.images, plain.images)


# ------------------------------------------------------------------------------------------------ the loop


def test_recovery_lowers_the_objective(tmp_path):
    t = load_teacher(_teacher_file(tmp_path))
    cfg = _cfg(iterations=60, lr=0.1, rrc=False, flip=False, jitter=0)
    unit = R.plan_units(cfg, 4, (0, 1), (0, 4), 1)[0]
    res = R.recover_group([unit], cfg, t, None, torch.device("cpu"))
    first, last = res.log[0], res.log[-1]
    assert last["bn"] < 0.5 * first["bn"]
    assert last["ce"] < first["ce"]
    lo, hi = t.pixel_bounds()
    assert torch.all(res.images >= lo - 1e-6) and torch.all(res.images <= hi + 1e-6)   # clipped to valid pixels


def test_grouped_units_equal_separate_runs(tmp_path):
    t = load_teacher(_teacher_file(tmp_path))
    cfg = _cfg(iterations=5)
    units = R.plan_units(cfg, 4, (0, 3), (0, 4), 3)
    together = R.recover_group(units, cfg, t, None, torch.device("cpu")).images
    apart = torch.cat([R.recover_group([u], cfg, t, None, torch.device("cpu")).images for u in units])
    assert torch.allclose(together, apart, atol=1e-4)


def test_delt_inactive_images_stay_at_their_init(tmp_path):
    t = load_teacher(_teacher_file(tmp_path))
    init = R.RealInit(_init_folder(tmp_path), t, "center")
    cfg = R.RecoverConfig(method="delt", iterations=8, round_iterations=4, early_late=True, batch_size=3,
                          init="real", rrc=True, flip=True, jitter=0, crop_schedule="cosine", milestone=1.0)
    unit = R.plan_units(cfg, 4, (0, 3), (0, 4), 3)[0]          # class 0: indices 0, 1 start at round 0, 2 at 1
    assert R.unit_iterations(unit) == [8, 8, 4]
    x0 = R.initial_images(unit, cfg, t, init, torch.Generator())
    cfg_first_round = R.RecoverConfig(**{**cfg.__dict__, "iterations": 4})
    # run only the first round: index 2 must be untouched (zero gradient, zero Adam update)
    unit_r0 = R.Unit(unit.key, unit.classes, unit.indices, unit.active[:1], unit.round_len)
    out = R.recover_group([unit_r0], cfg_first_round, t, init, torch.device("cpu")).images
    assert torch.equal(out[2], x0[2])
    assert not torch.allclose(out[0], x0[0])


# ------------------------------------------------------------------------------------------------ output


def test_to_uint8_truncates_like_the_reference(tmp_path):
    t = load_teacher(_teacher_file(tmp_path))
    px = torch.tensor([0.0, 0.5, 0.99999, 1.2, -0.1]).view(1, 1, 5, 1).expand(1, 3, 5, 1)
    x = t.normalize(px)
    assert R.to_uint8(x, t, "floor")[0, 0, :, 0].tolist() == [0, 127, 254, 255, 0]
    assert R.to_uint8(x, t, "round")[0, 0, :, 0].tolist() == [0, 128, 255, 255, 0]
    assert R.image_path(Path("o"), 7, 12, "jpeg") == Path("o/new007/class007_id012.jpg")


class _Result:
    def __init__(self, r):
        self.returncode = r.exit_code
        self.stderr = r.output + ("" if r.exception is None or isinstance(r.exception, SystemExit)
                                  else repr(r.exception))


def _run(args):
    """The CLI in-process (much faster than a subprocess per call); the torchrun test uses real processes."""
    return _Result(CliRunner().invoke(R.app, [str(a) for a in args]))


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("new*/*"))}


def test_cli_writes_reference_layout_readable_by_validate(tmp_path):
    tp = _teacher_file(tmp_path)
    out = tmp_path / "syn"
    r = _run(["--teacher", tp, "--method", "sre2l", "--ipc", 2, "--iterations", 4, "--out", out, "--quiet"])
    assert r.returncode == 0, r.stderr
    assert sorted(_files(out)) == [f"new{c:03d}/class{c:03d}_id{k:03d}.jpg" for c in range(4) for k in range(2)]
    assert (out / "grid.png").is_file() and (out / "log.csv").is_file()
    syn = load_synset(out)
    images, labels = syn.decode()
    assert images.shape == (8, 3, 16, 16) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert syn.meta["mean"] == [0.5, 0.4, 0.3] and syn.meta["method"] == "sre2l"


def test_resume_and_slices_give_the_same_images(tmp_path):
    tp = _teacher_file(tmp_path)
    common = ["--teacher", tp, "--method", "sre2l", "--iterations", 4, "--quiet", "--batch-size", 2]
    full = tmp_path / "full"
    assert _run([*common, "--ipc", 3, "--out", full]).returncode == 0
    want = _files(full)
    # slices of the work written into one folder by separate jobs
    sliced = tmp_path / "sliced"
    assert _run([*common, "--ipc-start", 0, "--ipc-end", 1, "--out", sliced]).returncode == 0
    assert _run([*common, "--ipc-range", "1:3", "--class-range", "0:2", "--out", sliced]).returncode == 0
    assert _run([*common, "--ipc-range", "1:3", "--class-range", "2:4", "--out", sliced]).returncode == 0
    assert _files(sliced) == want
    # a killed job: one unit's manifest and an image are gone; the re-run redoes only that unit
    (full / ".units" / "ipc0001_c0002.json").unlink()
    (full / "new002" / "class002_id001.jpg").unlink()
    stamp = (full / "new000" / "class000_id000.jpg").stat().st_mtime_ns
    r = _run([*common, "--ipc", 3, "--out", full])
    assert r.returncode == 0, r.stderr
    assert _files(full) == want
    assert (full / "new000" / "class000_id000.jpg").stat().st_mtime_ns == stamp


def test_other_run_in_out_is_refused(tmp_path):
    tp = _teacher_file(tmp_path)
    out = tmp_path / "syn"
    assert _run(["--teacher", tp, "--ipc", 1, "--iterations", 2, "--out", out, "--quiet"]).returncode == 0
    r = _run(["--teacher", tp, "--ipc", 1, "--iterations", 3, "--out", out, "--quiet"])
    assert r.returncode == 2 and "other settings" in r.stderr and "Traceback" not in r.stderr
    r = _run(["--teacher", tp, "--ipc", 1, "--iterations", 3, "--out", out, "--quiet", "--overwrite"])
    assert r.returncode == 0
    assert json.loads((out / "meta.json").read_text())["config"]["iterations"] == 3


@pytest.mark.parametrize("args, message", [
    (["--teacher", "missing.pt", "--ipc", 1], "not found"),
    (["--method", "dwa", "--ipc", 1], "--init-path"),
    (["--method", "nope", "--ipc", 1], "--method"),
    (["--preset", "nope", "--ipc", 1], "unknown recover preset"),
    # a DWA command line without --method dwa would silently run SRe2L
    (["--steps", 12, "--rho", 0.015, "--ipc", 1], "--steps is a DWA setting but the method is sre2l: add --method dwa"),
    (["--rho", 0.015, "--ipc", 1], "--rho is a DWA setting but the method is sre2l"),
    (["--method", "dwa", "--round-iterations", 5, "--ipc", 1], "--round-iterations is a DELT setting but the method "
                                                               "is dwa: add --method delt"),
    (["--init-path", "somewhere", "--ipc", 1], "--init-path is for real initialisation, but sre2l starts from noise"),
    (["--exp-name", "../up", "--ipc", 1], "--exp-name must be a plain folder name"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    tp = _teacher_file(tmp_path)
    full = ["--teacher", tp, *args] if args[0] != "--teacher" else args
    r = _run([*full, "--out", tmp_path / "o", "--iterations", 1, "--quiet"])
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "o").glob("new*"))


def test_init_folder_with_too_few_images_is_refused(tmp_path):
    tp = _teacher_file(tmp_path)
    init = _init_folder(tmp_path, per_class=1)
    r = _run(["--teacher", tp, "--method", "delt", "--init-path", init, "--ipc", 2, "--iterations", 2,
              "--round-iterations", 1, "--out", tmp_path / "o", "--quiet"])
    assert r.returncode == 2 and "index 1 is needed" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process(tmp_path):
    tp = _teacher_file(tmp_path)
    init = _init_folder(tmp_path)
    common = ["--teacher", tp, "--method", "delt", "--init-path", init, "--ipc", 3, "--iterations", 4,
              "--round-iterations", 2, "--batch-size", 3, "--group", 2, "--quiet"]
    one = tmp_path / "one"
    assert _run([*common, "--out", one]).returncode == 0
    two = tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(_free_port()), str(ROOT / "recover.py"), *map(str, common), "--out", str(two)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _files(two) == _files(one) and len(_files(one)) == 12
    assert (two / "log_shard0of2.csv").is_file() and (two / "log_shard1of2.csv").is_file()
    assert (two / "grid.png").is_file()


@pytest.mark.parametrize("method", ["sre2l", "dwa"])
def test_bench_naive_loop_is_the_same_algorithm(tmp_path, method):
    """bench/recover_speed.py times a faithful naive loop: with augmentation off and the same initial images it
    must land on the same images as recover_group (so the speed ratio compares like with like)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import recover_speed as bench
    t = load_teacher(_teacher_file(tmp_path))
    cfg = _cfg(method=method, iterations=6, rrc=False, flip=False, jitter=0, dwa_steps=2, rho=0.05,
               batch_size=4, init="noise")
    unit = R.plan_units(cfg, 4, (0, 1), (0, 4), 1)[0]
    gen = torch.Generator().manual_seed(R.unit_seed(cfg.seed, cfg.method, unit.key))
    x0 = R.initial_images(unit, cfg, t, None, gen)
    before = [p.detach().clone() for p in t.net.parameters()]
    ours = R.recover_group([unit], cfg, t, None, torch.device("cpu")).images
    naive = bench.naive_unit(t.net, cfg, t, 4, torch.device("cpu"), False, x0=x0)
    assert torch.allclose(ours, naive, atol=1e-4)
    if method == "dwa":   # the naive loop leaves its perturbation in place (the reference reloads the teacher)
        assert not all(torch.equal(p, b) for p, b in zip(t.net.parameters(), before))


def test_tiny_presets_follow_the_original_scripts():
    """The Tiny-ImageNet rows against the originals' scripts: SRe2L recover_tiny.sh (lr 0.1, r-bn 1, 4000 iterations,
    batch 100, jitter 4 both ways), DWA run_tiny.sh (lr 0.1, r-bn 0.01, 2000 iterations, batch 200, K 12, rho 15e-3,
    r-var 11); DELT publishes no Tiny script, so its row takes SRe2L's Tiny lr and r-bn as its comment says."""
    sre2l = R.resolve_config("sre2l-tiny", {}, 50)
    assert (sre2l.lr, sre2l.r_bn, sre2l.iterations, sre2l.batch_size, sre2l.jitter, sre2l.jitter_mode) == \
        (0.1, 1.0, 4000, 100, 4, "symmetric")
    dwa = R.resolve_config("dwa-tiny", {}, 50)
    assert (dwa.lr, dwa.r_bn, dwa.iterations, dwa.batch_size, dwa.dwa_steps, dwa.rho, dwa.r_var) == \
        (0.1, 0.01, 2000, 200, 12, 15e-3, 11.0)
    delt = R.resolve_config("delt-tiny", {}, 50)
    assert (delt.method, delt.lr, delt.r_bn) == ("delt", sre2l.lr, sre2l.r_bn)


def test_dwa_command_line_of_the_original_runs(tmp_path):
    """DWA's run_cifar.sh spelling (plus --teacher and --method dwa) works; --exp-name puts the images in
    --syn-data-path/<name> as the original does."""
    tp = _teacher_file(tmp_path)
    init = _init_folder(tmp_path)
    r = _run(["--teacher", tp, "--method", "dwa", "--iteration", 2, "--r-bn", 0.01, "--batch-size", 4, "--lr", 0.25,
              "--exp-name", "distillation-ipc1", "--store-best-images", "--syn-data-path", tmp_path / "syn_data",
              "--init-path", init, "--steps", 2, "--rho", 15e-3, "--ipc-start", 0, "--ipc-end", 1, "--r-var", 11,
              "--quiet"])
    assert r.returncode == 0, r.stderr
    out = tmp_path / "syn_data" / "distillation-ipc1"
    assert sorted(_files(out)) == [f"new{c:03d}/class{c:03d}_id000.jpg" for c in range(4)]
    cfg = json.loads((out / "meta.json").read_text())["config"]
    assert (cfg["method"], cfg["dwa_steps"], cfg["rho"], cfg["r_var"], cfg["iterations"]) == ("dwa", 2, 15e-3, 11.0, 2)
