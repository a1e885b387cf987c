"""utils/formation.py: IDC multi-formation decoding and mix initialisation (idc_dream.md §1)."""
import pytest
import torch
import torch.nn.functional as F

from utils.formation import (block_sizes, bound_split, crop_boxes, decode_class, decode_multi, decode_set,
                             decode_single, tile_mix)
from utils.synset import SyntheticSet, make_meta
from utils.datasets import get_dataset_spec


def test_decode_shapes_and_factor_one_identity():
    x = torch.rand(3, 1, 28, 28)
    assert decode_single(x, 1) is x
    assert decode_single(x, 2).shape == (12, 1, 28, 28)
    assert decode_multi(x, 2).shape == (15, 1, 28, 28)          # 3 * (1 + 4)


def test_each_crop_lands_in_row_major_order():
    # stored image n: patch (i, j) filled with the constant 10*n + (i*2 + j); decoded index (i*f + j)*ipc + n
    ipc, f, r = 3, 2, 8
    x = torch.zeros(ipc, 1, r, r)
    for n in range(ipc):
        for k, top, left in crop_boxes(r, f):
            x[n, :, top:top + 4, left:left + 4] = 10 * n + k
    dec = decode_single(x, f)
    for k in range(f * f):
        for n in range(ipc):
            assert torch.allclose(dec[k * ipc + n], torch.full((1, r, r), float(10 * n + k)))


def test_padding_is_grey_at_bottom_right_when_f_does_not_divide_r():
    # R = 7, f = 3: pad 2 px of 0.5 at the bottom/right; crops of side 3; the last crop holds 1 real + 2 pad rows
    x = torch.zeros(1, 1, 7, 7)
    dec = decode_single(x, 3)
    assert dec.shape == (9, 1, 7, 7)
    assert torch.allclose(dec[0], torch.zeros(1, 7, 7))          # top-left crop: all real zeros
    corner = F.interpolate(F.pad(x, (0, 2, 0, 2), value=0.5)[:, :, 6:9, 6:9], size=(7, 7), mode="bilinear",
                           align_corners=False)
    assert torch.allclose(dec[8], corner[0])
    assert dec[8].max() == pytest.approx(0.5)                    # grey padding visible in the last crop
    assert [b[1:] for b in crop_boxes(224, 3)] == [(t, l) for t in (0, 75, 150) for l in (0, 75, 150)]


def test_decoding_is_differentiable():
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    decode_single(x, 2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bound_mode_matches_the_spec_examples():
    assert bound_split(20, 3) == [(3, 12), (2, 3), (1, 5)]     # 108 + 12 + 5 = 125 decoded
    assert bound_split(10, 3) == [(3, 10)]
    x = torch.rand(20, 3, 24, 24)
    assert decode_class(x, 3, "bound").shape[0] == 125


def test_mix_init_decodes_back_to_the_real_images_in_order():
    # §1.3: decode(init_mix(x)) returns the down-then-up-sampled real images, in order
    for r, f in ((32, 2), (28, 2), (26, 3)):                    # 26 mod 3 = 2 = f - 1: blocks line up
        ipc = 2
        real = torch.rand(ipc * f * f, 3, r, r)
        dec = decode_single(tile_mix(real, ipc, f), f)
        sizes = block_sizes(r, f)
        for k in range(len(real)):
            i, j = divmod(k // ipc, f)
            small = F.interpolate(real[k:k + 1], size=(sizes[i], sizes[j]))
            s = -(-r // f)
            padded = F.pad(small, (0, s - sizes[j], 0, s - sizes[i]), value=0.5)
            expect = F.interpolate(padded, size=(r, r), mode="bilinear", align_corners=False)
            assert torch.allclose(dec[k], expect[0], atol=1e-6), (r, f, k)
    assert block_sizes(224, 3) == [75, 75, 74]


def test_registered_decoder_decodes_a_saved_set_class_by_class():
    spec = get_dataset_spec("FashionMNIST")
    spec = type(spec)(**{**spec.__dict__, "class_names": tuple(str(i) for i in range(10))})
    images = torch.rand(20, 1, 28, 28)
    labels = torch.arange(10).repeat_interleave(2)
    meta = make_meta(spec, space="pixel", ipc=2, method="idc", decoder="multiformation",
                     decoder_args={"factor": 2})
    x, y = SyntheticSet({"images": images}, labels, meta).decode()
    assert x.shape == (80, 1, 28, 28)
    assert torch.equal(y, torch.arange(10).repeat_interleave(8))
    ref_x, _ = decode_set(images, labels, 2)
    assert torch.equal(x, ref_x)
    assert torch.allclose(x[:8], decode_single(images[:2], 2))
