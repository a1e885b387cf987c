"""utils/train.py: schedules, a loss that decreases, evaluation, and the NaN guard."""
import pytest
import torch
import torch.nn as nn

from utils.errors import UserError
from utils.train import TrainRecipe, _lr_factor, evaluate, standardize_batch, train_network


def blobs(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    centers = torch.tensor([[2.0, 0], [-2, 0], [0, 2], [0, -2]])
    x = centers[y] + 0.3 * torch.randn(n, 2, generator=g)
    return x, y


def test_lr_schedules():
    assert [_lr_factor("step", e, 10) for e in (0, 4, 5, 9)] == [1, 1, 0.1, 0.1]
    assert _lr_factor("multistep", 6, 9) == pytest.approx(0.2) and _lr_factor("multistep", 8, 9) == pytest.approx(0.04)
    assert _lr_factor("cosine", 0, 10) == 1 and _lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    # 'mtt': 1001 epochs run 502 at the initial lr (indices 0..501), then x0.1 (speed.md §5.2)
    assert [_lr_factor("mtt", e, 1001) for e in (0, 501, 502, 1000)] == [1, 1, 0.1, 0.1]
    with pytest.raises(UserError):
        _lr_factor("warp", 0, 1)


def test_training_lowers_loss_and_learns():
    x, y = blobs()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 4))
    before = evaluate(net, (x, y), torch.device("cpu"))
    losses = train_network(net, x, y, TrainRecipe(epochs=20, lr=0.05, batch_size=32, weight_decay=0),
                           torch.Generator().manual_seed(0), torch.device("cpu"))
    assert losses[-1] < 0.5 * losses[0]
    xt, yt = blobs(seed=1)
    assert evaluate(net, (xt, yt), torch.device("cpu")) > max(0.9, before)
    # a streamed Dataset gives the same number as tensors
    ds = torch.utils.data.TensorDataset(xt, yt)
    plain = [(a, int(b)) for a, b in ds]
    assert evaluate(net, plain, torch.device("cpu"), batch_size=7) == evaluate(net, (xt, yt), torch.device("cpu"))


def test_nan_loss_stops_with_a_message():
    x, y = blobs()
    net = nn.Sequential(nn.Linear(2, 4))
    with pytest.raises(UserError, match="lower the lr"):
        train_network(net, x * float("nan"), y, TrainRecipe(epochs=2, lr=0.1),
                      torch.Generator().manual_seed(0), torch.device("cpu"))


def test_batch_standardize():
    z = standardize_batch(torch.randn(8, 3, 4, 4) * 5 + 3)
    assert abs(z.mean().item()) < 1e-5 and abs(z.std().item() - 1) < 1e-5


# ------------------------------------------------------------------------------------------ CutMix (§2.5)

def _numbered_batch(b=6, h=8, w=8):
    """Sample i is the constant image i (so every pixel tells whose it is); labels are the sample numbers."""
    x = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 2, h, w).clone()
    return x, torch.arange(b)


def test_cutmix_pastes_one_partner_box_and_reports_its_ratio():
    from utils.train import cutmix
    seen_ratios = set()
    for seed in range(20):
        x, y = _numbered_batch()
        before = x.clone()
        mixed, y1, y2, r = cutmix(x, y, 1.0, torch.Generator().manual_seed(seed))
        assert torch.equal(x, before) and torch.equal(y1, y)  # inputs untouched
        assert sorted(y2.tolist()) == y.tolist()  # the partners are a permutation of the batch
        box = mixed[0, 0] != 0 if y2[0] != 0 else None
        for i in range(len(x)):
            own = mixed[i] == i
            partner = mixed[i] == y2[i]
            assert bool((own | partner).all())  # only own and partner pixels
            if y2[i] != i:
                frac = partner[0].float().mean().item()
                assert frac == pytest.approx(1 - r)  # ratio = 1 - box area / image area (clipped box)
                rows, cols = partner[0].any(1), partner[0].any(0)
                if frac > 0:  # the pasted region is one rectangle, the same for every sample
                    assert partner[0].sum() == rows.sum() * cols.sum()
                    assert torch.equal(partner[0], partner[1])  # all channels
                    if box is not None:
                        assert torch.equal(partner[0], box)
        seen_ratios.add(round(r, 4))
        again = cutmix(x, y, 1.0, torch.Generator().manual_seed(seed))
        assert torch.equal(again[0], mixed) and torch.equal(again[2], y2) and again[3] == r  # seeded
    assert len(seen_ratios) > 5 and min(seen_ratios) < 0.8  # boxes of varying, non-trivial size


def test_cutmix_box_side_follows_lambda_and_is_clipped():
    from utils.train import cutmix_box
    g = torch.Generator().manual_seed(0)
    for lam in (0.0, 0.36, 0.75, 0.99, 1.0):
        side = int(32 * (1 - lam) ** 0.5)
        for _ in range(30):
            top, bottom, left, right = cutmix_box(32, 32, lam, g)
            assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
            assert bottom - top <= side and right - left <= side
    # λ = 0: a full-size box around a uniform centre keeps at least half of each side after clipping;
    # λ = 1: an empty box (ratio 1)
    boxes = [cutmix_box(32, 32, 0.0, g) for _ in range(300)]
    assert all(b - t >= 16 and r - l >= 16 for t, b, l, r in boxes)
    assert len({(t, l) for t, b, l, r in boxes}) > 50  # the centre varies
    assert all((b - t) * (r - l) == 0 for t, b, l, r in [cutmix_box(32, 32, 1.0, g) for _ in range(10)])


@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_beta_sampler_moments_and_seeding(beta):
    from utils.train import sample_beta
    g = torch.Generator().manual_seed(1)
    s = torch.tensor([sample_beta(beta, g) for _ in range(3000)], dtype=torch.float64)
    assert (s >= 0).all() and (s <= 1).all()
    var = 1 / (4 * (2 * beta + 1))  # Beta(β, β): mean 1/2, variance 1 / (4 (2β + 1))
    assert s.mean().item() == pytest.approx(0.5, abs=0.025)
    assert s.var().item() == pytest.approx(var, rel=0.12)
    assert sample_beta(beta, torch.Generator().manual_seed(5)) == sample_beta(beta, torch.Generator().manual_seed(5))
    with pytest.raises(UserError):
        sample_beta(0.0, g)


def test_mixed_cross_entropy_weights_the_two_labels():
    import torch.nn.functional as F
    from utils.train import mixed_cross_entropy
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    y, y2 = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([2, 2, 0, 1, 1])
    ce1, ce2 = F.cross_entropy(logits, y), F.cross_entropy(logits, y2)
    assert torch.equal(mixed_cross_entropy(logits, y, y2, 1.0), ce1)
    assert mixed_cross_entropy(logits, y, y2, 0.0).item() == pytest.approx(ce2.item())
    assert mixed_cross_entropy(logits, y, y2, 0.3).item() == pytest.approx(0.3 * ce1.item() + 0.7 * ce2.item())


class _Recorder(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, 8)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.fc(x.flatten(1))


def test_train_network_mixes_after_augmentation():
    """IDC order (§2.5): normalise + DSA first, then CutMix. A stand-in DSA that paints sample i as the constant i
    would erase any earlier mixing; after it, mixed batches hold two constants per sample."""
    class Paint:
        def __call__(self, x, generator=None):
            return torch.arange(len(x), dtype=x.dtype).view(-1, 1, 1, 1).expand_as(x).clone() + 1
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 4
    net = _Recorder(64)
    recipe = TrainRecipe(epochs=4, lr=0.01, batch_size=4, dsa=Paint(), mix_p=1.0)
    train_network(net, x, y, recipe, torch.Generator().manual_seed(0), torch.device("cpu"))
    mixed = [b for b in net.inputs if any(len(s.unique()) == 2 for s in b)]
    assert mixed, "no batch was mixed although mix_p = 1"
    for b in net.inputs:
        assert set(b.unique().tolist()) <= {1.0, 2.0, 3.0, 4.0}  # painted values only: mixing came after DSA
    # mix_p 0: nothing mixed, and the generator stream is the one of a recipe without CutMix fields
    net0 = _Recorder(64)
    train_network(net0, x, y, TrainRecipe(epochs=4, lr=0.01, batch_size=4, dsa=Paint(), mix_p=0.0),
                  torch.Generator().manual_seed(0), torch.device("cpu"))
    assert all(len(s.unique()) == 1 for b in net0.inputs for s in b)


def test_cutmix_training_is_seeded_and_differs_from_plain():
    x, y = blobs(64)
    x = x.view(64, 2, 1, 1).expand(64, 2, 4, 4).contiguous()

    def run(mix_p):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(32, 4))
        return train_network(net, x, y, TrainRecipe(epochs=3, lr=0.05, batch_size=16, mix_p=mix_p, beta=1.0),
                             torch.Generator().manual_seed(0), torch.device("cpu"))
    assert run(0.5) == run(0.5)
    assert run(0.5) != run(0.0)
    with pytest.raises(UserError, match="probability"):
        run(1.5)
