"""Tests for utils/zca.py (speed.md §1.2): fit, transform/inverse, train-mean use, saving, kornia parity."""

import kornia
import pytest
import torch

import utils.zca as zca_mod
from utils.errors import UserError
from utils.zca import ZCA

SHAPE = (3, 8, 8)
D = 3 * 8 * 8


def _correlated(n: int, seed: int) -> torch.Tensor:
    """Images with strongly correlated pixels and principal variances from 1000 down to 1e-5 (fixed mixing)."""
    mix_gen = torch.Generator().manual_seed(1234)  # the same distribution for train and held-out sets
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=mix_gen))
    scales = torch.logspace(1.5, -2.5, D)  # standard deviations 30 .. 0.003: variances far above and below eps
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D, generator=gen) * scales
    return (0.5 + z @ basis.t()).reshape(n, *SHAPE)


@pytest.fixture(scope="module")
def data():
    train, test = _correlated(2000, 0), _correlated(500, 1)
    return train, test, ZCA.fit(train, eps=0.1)


def test_round_trip_on_held_out_data(data):
    _, test, zca = data
    z = zca.transform(test)
    assert z.shape == test.shape and z.dtype == test.dtype
    # float32 error relative to pixel values that reach about 100 here
    torch.testing.assert_close(zca.inverse(z), test, atol=1e-3, rtol=0)
    assert (zca.inverse(z) - test).abs().mean() < 1e-4


def test_whitened_train_covariance(data):
    train, _, zca = data
    z = zca.transform(train).reshape(len(train), -1).double()
    cov = torch.cov(z.t())  # unbiased, like the fit
    u, s = zca.eigvecs.double(), zca.eigvals.double()
    expected = u @ torch.diag(s / (s + zca.eps)) @ u.t()
    torch.testing.assert_close(cov, expected, atol=1e-4, rtol=0)
    # On directions whose variance dwarfs eps the whitened variance is close to 1 ...
    strong = s > 100 * zca.eps
    assert strong.sum() >= 20
    var_along = ((u.t() @ cov @ u).diagonal())
    assert torch.all((var_along[strong] - 1).abs() < 0.011)
    # ... and directions far below eps are damped, not blown up (the point of eps = 0.1).
    weak = s < zca.eps / 100
    assert weak.sum() >= 20 and torch.all(var_along[weak] < 0.011)


def test_matches_kornia(data):
    train, test, zca = data
    ref = kornia.enhance.ZCAWhitening(eps=0.1, unbiased=True, compute_inv=True).fit(train)
    torch.testing.assert_close(zca.transform(test), ref(test), atol=1e-4, rtol=0)
    z = ref(test)
    torch.testing.assert_close(zca.inverse(z), ref.inverse_transform(z), atol=1e-4, rtol=0)
    torch.testing.assert_close(zca.mean, ref.mean_vector.reshape(-1), atol=1e-6, rtol=0)


def test_uses_train_mean_and_is_per_image(data):
    train, test, zca = data
    # The train mean image maps to exactly zero whatever batch it is in.
    mean_img = train.mean(0, keepdim=True)
    assert zca.transform(mean_img).abs().max() < 1e-5
    # A shifted test set is NOT re-centred: its whitened mean is (test_mean - train_mean) W.
    shifted = test + 0.3
    z = zca.transform(shifted).reshape(len(test), -1)
    w = zca.eigvecs @ torch.diag(torch.rsqrt(zca.eigvals + 0.1)) @ zca.eigvecs.t()
    expected = (shifted.reshape(len(test), -1) - train.reshape(len(train), -1).mean(0)) @ w
    torch.testing.assert_close(z, expected, atol=1e-4, rtol=0)
    assert z.mean(0).abs().max() > 0.1
    # Each image is transformed on its own (no batch statistics).
    torch.testing.assert_close(zca.transform(test[:3]), zca.transform(test)[:3], atol=5e-5, rtol=0)


def test_state_dict_round_trip(data, tmp_path):
    _, test, zca = data
    path = tmp_path / "zca.pt"
    torch.save(zca.state_dict(), path)
    loaded = ZCA.from_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(loaded.transform(test), zca.transform(test))
    assert torch.equal(loaded.inverse(test), zca.inverse(test))
    # Compact: one D x D matrix (eigenvectors) plus vectors; W and W^-1 are derived, not stored.
    square = [k for k, v in zca.state_dict().items() if torch.is_tensor(v) and v.dim() == 2]
    assert square == ["eigvecs"]


def test_chunked_paths_match_one_shot(data, monkeypatch):
    train, test, zca = data
    monkeypatch.setattr(zca_mod, "_ROW_CHUNK", 128)  # forces many chunks in fit and in transform
    chunked = ZCA.fit(train, eps=0.1)
    torch.testing.assert_close(chunked.transform(test), zca.transform(test), atol=1e-4, rtol=0)
    torch.testing.assert_close(chunked.inverse(test), zca.inverse(test), atol=2e-3, rtol=1e-4)


def test_any_leading_shape_and_gradients(data):
    _, test, zca = data
    x = test[:6].reshape(2, 3, *SHAPE).clone().requires_grad_(True)
    z = zca.transform(x)
    assert z.shape == x.shape
    z.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_wrong_shape_and_bad_state_are_user_errors(data):
    _, _, zca = data
    with pytest.raises(UserError, match="fitted on images of shape"):
        zca.transform(torch.zeros(2, 3, 16, 16))
    with pytest.raises(UserError, match="not a ZCA state"):
        ZCA.from_state_dict({"weights": torch.zeros(3)})
    bad = zca.state_dict()
    del bad["eigvals"]
    with pytest.raises(UserError, match="missing eigvals"):
        ZCA.from_state_dict(bad)
