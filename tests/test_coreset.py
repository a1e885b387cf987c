"""coreset.py: seeded per-class selection written as a synthetic set."""
import json

import pytest
import torch
from typer.testing import CliRunner

import coreset
from tests.test_validate import make_mnist_like
from utils.errors import UserError
from utils.synset import load_synset


def test_selectors():
    labels = torch.arange(10).repeat(5)  # 5 per class, interleaved
    a = coreset.select_random(labels, 10, 2, seed=0)
    assert labels[a].tolist() == sorted(list(range(10)) * 2)
    assert torch.equal(a, coreset.select_random(labels, 10, 2, seed=0))
    assert not torch.equal(a, coreset.select_random(labels, 10, 2, seed=1))
    first = coreset.select_first(labels, 10, 2, seed=0)
    assert first[:2].tolist() == [0, 10]  # the first two images of class 0 in dataset order


def test_cli_writes_a_set_and_refuses_bad_input(tmp_path):
    (tmp_path / "data").mkdir()                 # outputs beside the data: inside it they are refused
    make_mnist_like(tmp_path / "data")
    out = tmp_path / "set"
    args = ["--dataset", "MNIST", "--data-path", str(tmp_path / "data"), "--ipc", "3", "--out", str(out)]
    r = CliRunner().invoke(coreset.app, args + ["--export-imagefolder"])
    assert r.exit_code == 0, r.output
    syn = load_synset(out)
    x, y = syn.decode()
    assert x.shape == (30, 1, 28, 28) and y.bincount().tolist() == [3] * 10
    assert 0 <= x.min() and x.max() <= 1 and syn.space == "pixel"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["method"] == "coreset-random" and meta["args"]["ipc"] == 3 and meta["ipc"] == 3
    assert (out / "grid.png").is_file() and len(list((out / "images").rglob("*.png"))) == 30
    r = CliRunner().invoke(coreset.app, args)
    assert r.exit_code == 2 and "--overwrite" in r.output
    r = CliRunner().invoke(coreset.app, args[:-1] + [str(tmp_path / "big"), "--ipc", "21"])
    assert r.exit_code == 2 and "per class were asked for" in r.output
    assert not (tmp_path / "big").exists()  # nothing half-written
    r = CliRunner().invoke(coreset.app, ["--dataset", "Nope", "--ipc", "1", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown dataset 'Nope'" in r.output


# ------------------------------------------------------------------------------ herding (idc_dream.md §5 item 10)

def _naive_herding(feats, ipc):
    """Direct statement of the rule: step k picks the unchosen row whose addition puts the mean nearest μ."""
    mu, chosen = feats.mean(0), []
    for _ in range(ipc):
        best = min((i for i in range(len(feats)) if i not in chosen),
                   key=lambda i: torch.linalg.norm(feats[chosen + [i]].mean(0) - mu).item())
        chosen.append(best)
    return chosen


def test_herding_follows_the_running_mean_not_the_nearest_points():
    from utils.coreset import herding_select
    # class 0 (rows 0, 2, 4, 6, 8) has mean 0; the 4th pick must undo the drift of the first three (-3), where the
    # 4 points nearest the mean would take 1.4
    vals0 = [-3.0, 1.0, 1.2, 1.4, -0.6]
    vals1 = [10.0, 11.0, 12.0, 13.0, 14.0]  # class 1 (odd rows): mean 12
    feats = torch.tensor([v for pair in zip(vals0, vals1) for v in pair]).view(-1, 1)
    labels = torch.tensor([0, 1] * 5)
    idx = herding_select(feats, labels, 2, 4)
    assert idx.tolist()[:4] == [8, 2, 4, 0]  # -0.6, 1, 1.2, -3 (global row numbers, herding order)
    assert labels[idx].tolist() == [0] * 4 + [1] * 4  # class-major
    assert idx.tolist()[4] == 5  # 12: the class-1 mean itself comes first


def test_herding_matches_the_direct_rule_on_random_features():
    from utils.coreset import herding_select
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 7, generator=g)
    labels = torch.randperm(60, generator=g) % 3
    idx = herding_select(feats, labels, 3, 6)
    for c in range(3):
        rows = torch.nonzero(labels == c).flatten()
        expect = [int(rows[i]) for i in _naive_herding(feats[rows], 6)]
        assert idx[6 * c:6 * (c + 1)].tolist() == expect
    assert len(set(idx.tolist())) == 18  # never the same image twice
    with pytest.raises(UserError, match="class 0 has only"):
        herding_select(feats[:4], torch.tensor([0, 0, 1, 1]), 2, 3)


def test_feature_net_is_seeded_and_embeddings_batch_independent():
    from utils.coreset import default_prepare, embed_features, feature_net
    from utils.datasets import get_dataset_spec
    from dataclasses import replace
    spec = replace(get_dataset_spec("MNIST"), resolution=8, num_classes=2)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1] * 4)
    state = torch.random.get_rng_state()
    a = feature_net(images, labels, spec, model="MLP", epochs=2, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's global RNG is left alone
    b = feature_net(images, labels, spec, model="MLP", epochs=2, seed=3)
    c = feature_net(images, labels, spec, model="MLP", epochs=2, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], sc[k]) for k in sa)
    prep = default_prepare(spec)
    a.train()
    f1 = embed_features(a, images, prep, batch_size=3)
    assert a.training  # mode restored
    a.eval()
    with torch.no_grad():
        assert torch.allclose(f1, a.embed(prep(images)), atol=1e-6)
    assert f1.shape[0] == 8 and not f1.requires_grad
    with pytest.raises(UserError, match="at least 1 epoch"):
        feature_net(images, labels, spec, model="MLP", epochs=0)


def test_herding_indices_end_to_end(tmp_path):
    from utils.coreset import herding_indices
    from utils.datasets import load_split
    make_mnist_like(tmp_path, n_train=4)
    data, spec = load_split("MNIST", tmp_path, "train")
    kw = dict(model="ConvNet-1", epochs=1, seed=0)
    idx = herding_indices(data.images, data.labels, spec, 2, **kw)
    assert data.labels[idx].tolist() == sorted(list(range(10)) * 2)
    assert torch.equal(idx, herding_indices(data.images, data.labels, spec, 2, **kw))  # seeded
    with pytest.raises(UserError, match="per class were asked"):
        herding_indices(data.images, data.labels, spec, 5, **kw)


def test_cli_herding_method(tmp_path):
    (tmp_path / "data").mkdir()
    make_mnist_like(tmp_path / "data", n_train=4)
    out = tmp_path / "herd"
    r = CliRunner().invoke(coreset.app, ["--dataset", "MNIST", "--data-path", str(tmp_path / "data"), "--ipc", "2",
                                         "--out", str(out), "--method", "herding", "--herding-model", "ConvNet-1",
                                         "--herding-epochs", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    x, y = load_synset(out).decode()
    assert x.shape == (20, 1, 28, 28) and y.bincount().tolist() == [2] * 10
    meta = json.loads((out / "meta.json").read_text())
    assert meta["method"] == "coreset-herding"
    assert meta["args"]["herding_model"] == "ConvNet-1" and meta["args"]["herding_epochs"] == 1
    assert "herding" in coreset.SELECTORS
