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
