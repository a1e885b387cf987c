"""bench/original_runner.py runs an original's code on the CPU in isolation; bench/parity.py compares and gates."""
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import parity  # noqa: E402
from original_runner import OriginalFailed, check_original, run_original  # noqa: E402
from parity_common import compare  # noqa: E402


@pytest.fixture
def fake_original(tmp_path):
    """A CUDA-only 'original' whose top-level module is called `utils`, like most of the papers' repositories."""
    root = tmp_path / "orig"
    root.mkdir()
    (root / "utils.py").write_text(textwrap.dedent("""
        import torch
        def scale(x):
            w = torch.full((1,), 3.0, device='cuda').cuda()
            net = torch.nn.Linear(2, 2).cuda().to('cuda:0')
            return (x.to('cuda') * w).cuda(), torch.cuda.is_available(), next(net.parameters()).device.type
        def snapshot(x):
            s = x.cpu()
            x.add_(1.0)
            return s
    """))
    adapter = tmp_path / "adapter.py"
    adapter.write_text(textwrap.dedent("""
        import utils  # the original's, not the toolkit's package
        def run(root, payload):
            y, avail, dev = utils.scale(payload["x"])
            return {"y": y, "avail": avail, "dev": dev, "file": utils.__file__}
        def snap(root, payload):
            x = payload["x"].clone()
            return {"snap": utils.snapshot(x), "x": x}
    """))
    return root, adapter


def test_runner_runs_cuda_code_on_cpu_with_the_originals_own_modules(fake_original):
    root, adapter = fake_original
    out = run_original(root, adapter, "run", {"x": torch.arange(4.0)})
    assert torch.equal(out["y"], torch.arange(4.0) * 3)
    assert out["avail"] is False and out["dev"] == "cpu"
    assert Path(out["file"]).resolve() == (root / "utils.py").resolve()


def test_cpu_snapshot_aliases_unless_copy_on_cpu(fake_original):
    root, adapter = fake_original
    x = torch.zeros(3)
    aliased = run_original(root, adapter, "snap", {"x": x})
    copied = run_original(root, adapter, "snap", {"x": x}, copy_on_cpu=True)
    assert torch.equal(aliased["snap"], torch.ones(3))     # the CPU trap: the snapshot moved with the weights
    assert torch.equal(copied["snap"], torch.zeros(3))     # as on a GPU: .cpu() copied
    assert torch.equal(copied["x"], torch.ones(3))


def test_runner_reports_the_originals_failure(fake_original):
    root, adapter = fake_original
    with pytest.raises(OriginalFailed, match="KeyError"):
        run_original(root, adapter, "run", {"not_x": torch.zeros(1)})


def test_check_original_refuses_a_folder_without_its_marker(tmp_path):
    with pytest.raises(OriginalFailed, match="no condense.py there"):
        check_original(tmp_path, "condense.py")


def test_compare_relative_error_and_gating():
    a = torch.tensor([1.0, 2.0, 4.0])
    ok = compare("x", "q", a, a * (1 + 1e-7))
    bad = compare("x", "q", a, a + torch.tensor([0.0, 0.0, 0.01]))
    info = compare("x", "q", a, a + 1, gating=False, note="fix")
    shape = compare("x", "q", a, a[:2])
    assert ok.ok and ok.rel < 1e-6
    assert not bad.ok and bad.rel == pytest.approx(0.01 / 4.01, rel=1e-4)
    assert info.ok and "INFO" in info.render() and "fix" in info.render()
    assert not shape.ok and "shape" in shape.note


def test_parity_cli_fails_on_a_line_out_of_tolerance(tmp_path, monkeypatch, capsys):
    (tmp_path / "marker.py").write_text("")
    monkeypatch.setattr(parity, "_load_registry", lambda: None)
    monkeypatch.setitem(parity.METHODS, "fake", (lambda root, args: [compare("fake", "q", [1.0], [1.1])],
                                                 "marker.py"))
    assert parity.main(["--method", "fake", "--original", str(tmp_path)]) == 1
    assert "FAIL" in capsys.readouterr().out
    monkeypatch.setitem(parity.METHODS, "fake", (lambda root, args: [compare("fake", "q", [1.0], [1.0])],
                                                 "marker.py"))
    assert parity.main(["--method", "fake", "--original", str(tmp_path)]) == 0
