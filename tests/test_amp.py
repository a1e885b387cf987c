"""utils/amp.py and the `--amp {off,bf16,fp16}` flag of every stage with a training or optimisation loop."""
from __future__ import annotations

import contextlib
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import buffer
import condense as C
import distill
import recover
import relabel
import squeeze
import validate
import utils.amp as A
from networks import get_network
from utils.amp import Amp, resolve_amp
from utils.checkpoint import settings_fingerprint
from utils.datasets import get_dataset_spec
from utils.errors import UserError
from utils.train import TrainRecipe, train_network

runner = CliRunner()
BF16_CPU = Amp("bf16", "cpu")   # used directly, so the numeric tests run on any CPU (emulated bf16 where needed)


# ----------------------------------------------------------------------------------------- resolve_amp

def test_modes_resolve_on_cpu(monkeypatch):
    monkeypatch.setattr(A, "cpu_has_native_bf16", lambda: True)
    assert resolve_amp("off", "cpu") == Amp("off", "cpu") and not resolve_amp("off", "cpu").enabled
    assert resolve_amp("BF16", "cpu") == Amp("bf16", "cpu") and resolve_amp("bf16", "cpu").dtype == torch.bfloat16
    assert resolve_amp(None, "cpu").mode == "off" and resolve_amp(True, "cpu").mode == "bf16"   # old boolean API
    assert resolve_amp("fp16", "cuda") == Amp("fp16", "cuda")   # a device object needs no GPU to exist


@pytest.mark.parametrize("mode,device,native,allow,message", [
    ("half", "cpu", True, True, "--amp must be one of off, bf16, fp16 (got 'half')"),
    ("fp16", "cpu", True, True, "--amp fp16 needs a CUDA GPU (fp16 autocast on CPU is slow); use --amp bf16 or off"),
    ("bf16", "cpu", False, True, "--amp bf16 on this CPU would be emulated and slower (no avx512_bf16/AMX); use "
                                 "--amp off"),
    ("fp16", "cuda", True, False, "--amp fp16 is not supported here (why not); use --amp bf16"),
])
def test_refusals_are_one_line(monkeypatch, mode, device, native, allow, message):
    monkeypatch.setattr(A, "cpu_has_native_bf16", lambda: native)
    with pytest.raises(UserError) as e:
        resolve_amp(mode, device, allow_fp16=allow, fp16_reason="why not")
    assert str(e.value) == message and "\n" not in str(e.value)


def test_off_enters_no_autocast_and_bf16_scaler_is_a_pass_through():
    assert isinstance(A.OFF.autocast(), contextlib.nullcontext)
    with BF16_CPU.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        y = torch.nn.Linear(4, 3)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16 and A.fp32(y).dtype == torch.float32 and A.fp32((y,))[0].dtype == torch.float32
    s = BF16_CPU.scaler()
    loss = torch.tensor(2.0)
    assert s.scale(loss) is loss and not s.is_enabled()


# --------------------------------------------------------------------- every stage's parser takes --amp

STAGE_ARGS = {
    "condense": (C.app, ["--dataset", "FashionMNIST", "--data-path", "{tmp}/none", "--out", "{tmp}/out"]),
    "buffer": (buffer.app, ["--dataset", "FashionMNIST", "--data-path", "{tmp}/none", "--buffer-path", "{tmp}/out"]),
    "distill": (distill.app, ["--dataset", "CIFAR10", "--buffer-path", "{tmp}/none", "--out", "{tmp}/out"]),
    "squeeze": (squeeze.app, ["--dataset", "FashionMNIST", "--data-path", "{tmp}/none", "--out", "{tmp}/out/t.pt"]),
    "recover": (recover.app, ["--teacher", "{tmp}/none.pt", "--out", "{tmp}/out", "--ipc", "1"]),
    "relabel": (relabel.app, ["--syn", "{tmp}/none", "--teacher", "{tmp}/none.pt", "--out", "{tmp}/out"]),
    "validate": (validate.app, ["--baseline", "random", "--dataset", "FashionMNIST", "--data-path", "{tmp}/none",
                                "--results", "{tmp}/out/r.json"]),
}


@pytest.mark.parametrize("stage", sorted(STAGE_ARGS))
@pytest.mark.parametrize("mode,message", [("nope", "error: --amp must be one of off, bf16, fp16 (got 'nope')"),
                                          ("fp16", "error: --amp fp16 needs a CUDA GPU")])
def test_every_stage_parses_amp_and_refuses_bad_modes_in_one_line(tmp_path, stage, mode, message):
    app, args = STAGE_ARGS[stage]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--device", "cpu", "--amp", mode]
    r = runner.invoke(app, args)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith(message), r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", sorted(STAGE_ARGS))
def test_every_stage_help_documents_the_modes(stage):
    r = runner.invoke(STAGE_ARGS[stage][0], ["--help"], env={"COLUMNS": "300", "TERM": "dumb"})
    assert r.exit_code == 0 and "--amp" in r.output and "bf16" in r.output and "fp16" in r.output


# ----------------------------------------------------------------------------- fp32 stays as it was

def test_fp32_default_keeps_fingerprints_of_runs_from_before_the_flag():
    cfg = C.resolve_config("MNIST", 1, 2, False, True, {})
    assert cfg.amp == "off"
    before = {k: v for k, v in asdict(cfg).items() if k != "amp"}
    assert C.config_fingerprint(cfg) == settings_fingerprint(before)
    assert C.config_fingerprint(replace(cfg, amp="bf16")) != C.config_fingerprint(cfg)
    d = distill.resolve_config("speed", get_dataset_spec("CIFAR10"), 1, {})
    keyed = {k: v for k, v in asdict(d).items() if k not in ("iterations", "checkpoint_unroll")}
    assert distill.config_fingerprint(d, {}) == settings_fingerprint({**keyed, "amp": False})


def test_fp32_class_gradient_is_bitwise_the_plain_formula():
    torch.manual_seed(0)
    net = get_network("ConvNet-3", 1, 10, 28)
    params = list(net.parameters())
    x = torch.randn(4, 1, 28, 28)
    ours = C.class_gradient(net, params, x, 3)
    plain = torch.autograd.grad(F.cross_entropy(net(x), torch.full((4,), 3)), params)
    assert all(torch.equal(a, b) for a, b in zip(ours, plain))


def test_fp32_training_loop_is_bitwise_unchanged_by_the_amp_field():
    def run(recipe):
        torch.manual_seed(0)
        net = get_network("ConvNet-3", 1, 10, 28)
        losses = train_network(net, x, y, recipe, torch.Generator().manual_seed(1), torch.device("cpu"))
        return losses, net.state_dict()

    x, y = torch.randn(12, 1, 28, 28), torch.arange(12) % 10
    base = TrainRecipe(epochs=2, batch_size=6)
    (la, wa), (lb, wb) = run(base), run(replace(base, amp=A.OFF))
    assert la == lb and all(torch.equal(wa[k], wb[k]) for k in wa)
    lc, _ = run(replace(base, amp=BF16_CPU))
    assert lc != la and abs(lc[0] - la[0]) < 0.05 * la[0]   # bf16 really ran, and is close


# ---------------------------------------------------------------------------- bf16 is close to fp32

@pytest.mark.parametrize("metric", ["mse", "l1"])
def test_bf16_matching_gradient_within_tolerance(metric):
    """IDC's class matching under bf16 (double backward through the conv net): the pixel gradient is within 15 %
    (relative L2) of fp32 and points the same way (cosine > 0.99); measured ~4 % / 0.999 on this case."""
    torch.manual_seed(0)
    spec = get_dataset_spec("CIFAR10")
    cfg = replace(C.resolve_config("CIFAR10", 2, 2, False, True, {}), aug_type="none", metric=metric)
    net = get_network("ConvNet-3", 3, 10, 32)
    params = C.matched_params(net, cfg.bias, cfg.fc)
    real, stored = torch.rand(16, 3, 32, 32), torch.rand(2, 3, 32, 32)
    g32, l32 = C.class_match_grad(net, params, real, stored, 3, cfg, spec, None, torch.Generator().manual_seed(0))
    g16, l16 = C.class_match_grad(net, params, real, stored, 3, cfg, spec, None, torch.Generator().manual_seed(0),
                                  BF16_CPU)
    assert g16.dtype == torch.float32 and not torch.equal(g16, g32)
    assert float((g16 - g32).norm() / g32.norm()) < 0.15
    assert float(F.cosine_similarity(g16.flatten(), g32.flatten(), 0)) > 0.99
    assert abs(l16 - l32) < 0.05 * abs(l32)


def test_condense_and_distill_refuse_fp16_even_on_a_gpu_device():
    with pytest.raises(UserError, match="^--amp fp16 is not supported here \\(gradient matching"):
        C.resolve_condense_amp("fp16", torch.device("cuda"))
    with pytest.raises(UserError, match="^--amp fp16 is not supported here \\(the unrolled student steps"):
        distill.resolve_distill_amp("fp16", torch.device("cuda"))


# --------------------------------------------------------------------------------- benches and GPU script

def test_amp_speed_condense_prints_the_speedup_last(capsys):
    import re
    from bench import amp_speed
    ratio = amp_speed.main(["--stage", "condense", "--iters", "1", "--rounds", "1", "--per-class", "4",
                            "--batch-real", "4", "--n-data", "8"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"speedup \d+\.\d\d", last) and last == f"speedup {ratio:.2f}" and ratio > 0


def test_gpu_bench_script_dry_run_lists_every_stage_in_both_precisions(tmp_path):
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(["bash", str(root / "scripts/gpu/bench.sh"), "--dry-run", str(tmp_path / "g")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    stages = [ln.split("--stage ")[1].split()[0] for ln in lines]
    assert stages == ["condense", "distill", "recover", "recover", "train"]
    assert all(ln.startswith("timeout 90 ") and "--device cuda --mode bf16" in ln for ln in lines)
    assert not (tmp_path / "g").exists()   # a dry run writes nothing
    bad = subprocess.run(["bash", str(root / "scripts/gpu/bench.sh"), "--fast"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: unknown option --fast (--dry-run, --device cuda|cpu)"


def test_vs_original_refuses_unwired_methods_and_a_wrong_checkout(tmp_path, capsys):
    from bench import vs_original
    from bench.original_runner import OriginalFailed
    with pytest.raises(SystemExit) as e:
        vs_original.main(["--method", "dwa", "--original", str(tmp_path), "--data-dir", str(tmp_path)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --method dwa: DWA's recover step is not wired into this bench yet"
    with pytest.raises(OriginalFailed, match="no condense.py there"):
        vs_original.main(["--method", "idc", "--original", str(tmp_path), "--data-dir", str(tmp_path)])
    assert vs_original.gemm_peak_gflops(torch.float32, n=64, repeats=2) > 0
