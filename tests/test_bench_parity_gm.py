"""bench/parity_gm.py (IDC, DREAM) and its adapter bench/original_side/gm.py, without the original checkouts:
the aligned-draw plumbing, the index comparison, the k-means start points, the adapter's state-dict mapping, and
the adapter run through the real runner over a tiny fake original."""
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import parity_gm  # noqa: E402
import utils.dsa as dsa_module  # noqa: E402
from original_runner import OriginalFailed, run_original  # noqa: E402
from networks import get_network  # noqa: E402
from utils.dsa import DSA, DSAParams  # noqa: E402
from utils.kmeans import kmeans  # noqa: E402

ADAPTER = ROOT / "bench" / "original_side" / "gm.py"


def test_queued_draws_feed_the_toolkits_own_sampler():
    p = DSAParams(align_corners=False)
    with parity_gm.queued_draws([0.25, 0.75], [3, -2]):
        bright = dsa_module._sample_op("brightness", 1, 32, 32, p, None)
        sat = dsa_module._sample_op("saturation", 1, 32, 32, p, None)
        crop = dsa_module._sample_op("crop", 1, 32, 32, p, None)
    assert bright["shift"].item() == pytest.approx(-0.25)
    assert sat["factor"].item() == pytest.approx(1.5)
    assert (crop["dy"].item(), crop["dx"].item()) == (3, -2)
    # outside the range the sampler asks for: the two sides would not share the draw
    with pytest.raises(RuntimeError, match=r"integer draw 9 outside utils.dsa's range \[-4, 5\)"):
        with parity_gm.queued_draws([], [9, 0]):
            dsa_module._sample_op("crop", 1, 32, 32, p, None)
    with pytest.raises(RuntimeError, match="1 queued augmentation draws were not used"):
        with parity_gm.queued_draws([0.5, 0.5], []):
            dsa_module._sample_op("brightness", 1, 32, 32, p, None)
    assert dsa_module._uniform is not None and torch.rand(1).shape == (1,)   # samplers restored


def test_queued_dsa_takes_the_idc_matching_draws_in_order():
    rng = np.random.RandomState(0)
    u, r = parity_gm.matching_draws(rng, 28, "color_crop_cutout")
    assert len(u) == 3 and len(r) == 5 and r[0] == 0
    assert all(-4 <= v <= 4 for v in r[1:3]) and all(0 <= v < 29 for v in r[3:])   # 14-px cutout: centre 0..28
    plan = parity_gm.QueuedDSA("color_crop_cutout", u, r).sample(1, 28, 28, siamese=True)
    assert [op for op, _ in plan] == ["brightness", "saturation", "contrast", "crop", "cutout"]
    assert plan[0][1]["shift"].item() == pytest.approx(u[0] - 0.5)
    assert plan[3][1]["dy"].item() == r[1] and plan[4][1]["top"].item() == r[3] - 7
    with pytest.raises(ValueError, match=r"not \['scale'\]"):
        parity_gm.matching_draws(rng, 32, "color_scale")


def test_index_line_counts_differing_positions():
    same = parity_gm.index_line("dream", "q", torch.tensor([3, 1, 2]), torch.tensor([3, 1, 2]))
    one = parity_gm.index_line("dream", "q", torch.tensor([3, 1, 2]), torch.tensor([3, 0, 2]))
    short = parity_gm.index_line("dream", "q", torch.tensor([3, 1]), torch.tensor([3, 1, 2]))
    assert same.ok and same.max_abs == 0 and same.tol == 0
    assert not one.ok and one.max_abs == 1 and one.rel == pytest.approx(1 / 3)
    assert not short.ok and "2 vs original 3 indices" in short.note


def test_kmeans_starts_are_the_points_the_toolkit_starts_from():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(7)
    starts = parity_gm.kmeans_starts(gen, 50, 6)
    centres, _ = kmeans(x, 6, gen, iters=0)     # no iteration: the centres are the start points
    assert len(set(starts.tolist())) == 6
    assert torch.equal(centres, x[starts])


def _fake_original(tmp_path, brightness_offset="0.5"):
    """A tiny 'original' with the module layout the adapter imports (argument.py parsing sys.argv at import,
    misc/augment.py's DiffAug drawing with np.random in batch mode, train.py's define_model)."""
    root = tmp_path / "orig"
    (root / "misc").mkdir(parents=True)
    (root / "condense.py").write_text("")
    (root / "misc" / "__init__.py").write_text("")
    (root / "argument.py").write_text(textwrap.dedent("""
        import argparse
        p = argparse.ArgumentParser()
        p.add_argument('-d', default='cifar10')
        args, _ = p.parse_known_args()
    """))
    (root / "misc" / "augment.py").write_text(textwrap.dedent(f"""
        import numpy as np
        import torch.nn.functional as F
        class DiffAug:
            def __init__(self, strategy='', batch=False):
                self.batch = batch
            def brightness_fn(self, x, batch=True):
                return x + (np.random.uniform() - {brightness_offset})
            def crop_fn(self, x, batch=True):
                dy, dx = np.random.randint(-4, 5), np.random.randint(-4, 5)
                h, w = x.shape[-2:]
                p = F.pad(x, (4, 4, 4, 4))
                return p[:, :, 4 + dy:4 + dy + h, 4 + dx:4 + dx + w]
    """))
    (root / "train.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.ModuleDict({
                    'conv': nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)]),
                    'norm': nn.ModuleList([nn.GroupNorm(8, 8), nn.GroupNorm(8, 8)])})
                self.classifier = nn.Linear(8 * 2 * 2, 10)
            def forward(self, x):
                for conv, norm in zip(self.layers['conv'], self.layers['norm']):
                    x = nn.functional.avg_pool2d(nn.functional.relu(norm(conv(x))), 2)
                return self.classifier(x.flatten(1))
        def define_model(args, nclass):
            return Net()
    """))
    return root


def test_adapter_replays_the_draws_into_the_originals_numpy_sampler(tmp_path):
    root = _fake_original(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    cases = [{"op": "brightness", "images": x, "uniform": [0.8], "randint": []},
             {"op": "crop", "images": x, "uniform": [], "randint": [2, -3]}]
    out = run_original(root, ADAPTER, "diffaug_ops", {"cases": cases})["outputs"]
    torch.testing.assert_close(out[0], x + 0.3)
    # the toolkit's crop with the same draws gives the same image (rows shifted by dy, columns by dx)
    with parity_gm.queued_draws([], [2, -3]):
        values = dsa_module._sample_op("crop", 1, 32, 32, DSAParams(align_corners=False), None)
    ours = DSA("crop", mode="all", params=DSAParams(align_corners=False)).apply(x, [("crop", values)])
    torch.testing.assert_close(out[1], ours)
    with pytest.raises(OriginalFailed, match=r"integer draw 7 outside the original's range \[-4, 5\)"):
        run_original(root, ADAPTER, "diffaug_ops", {"cases": [dict(cases[1], randint=[7, 0])]})
    with pytest.raises(OriginalFailed, match="1 draws were not used"):
        run_original(root, ADAPTER, "diffaug_ops", {"cases": [dict(cases[0], uniform=[0.8, 0.1])]})


def test_a_divergent_original_op_fails_its_line(tmp_path):
    root = _fake_original(tmp_path, brightness_offset="0.4")
    x = torch.randn(2, 3, 8, 8)
    theirs = run_original(root, ADAPTER, "diffaug_ops",
                          {"cases": [{"op": "brightness", "images": x, "uniform": [0.8], "randint": []}]})
    with parity_gm.queued_draws([0.8], []):
        values = dsa_module._sample_op("brightness", 1, 8, 8, DSAParams(), None)
    line = parity_gm.compare("idc", "DSA brightness", DSA("color", mode="all").apply(x, [("brightness", values)]),
                             theirs["outputs"][0])
    assert not line.ok and line.max_abs == pytest.approx(0.1, abs=1e-6)


def test_adapter_maps_the_toolkits_convnet_weights_onto_the_originals_layout(tmp_path, monkeypatch):
    root = _fake_original(tmp_path)
    monkeypatch.syspath_prepend(str(root))
    for name in ("train", "argument"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    spec = importlib.util.spec_from_file_location("gm_adapter_under_test", ADAPTER)
    adapter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adapter)
    torch.manual_seed(0)
    ours = get_network("ConvNet-2-w8", 3, 10, 8)
    theirs = adapter._load_convnet(None, 10, ours.state_dict())
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(theirs(x), ours(x))
    assert torch.equal(theirs.layers["norm"][1].weight, ours.state_dict()["features.5.weight"])


def test_original_condense_helper_refuses_bad_input_in_one_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "idc_original_condense.py"), "--original", str(tmp_path),
           "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]
    bad_count = subprocess.run(cmd + ["--outer-iterations", "0"], capture_output=True, text=True)
    no_checkout = subprocess.run(cmd, capture_output=True, text=True)
    assert bad_count.returncode == 2 and bad_count.stderr.strip() == \
        "error: --outer-iterations and --inner-loop must be at least 1"
    assert no_checkout.returncode == 2 and no_checkout.stderr.startswith("error: --original ")
    assert "no condense.py there" in no_checkout.stderr and len(no_checkout.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
