"""The shared crop / flip pieces of utils/augment.py (used by squeeze, kd, softlabels and recover)."""
import math

import torch
import torch.nn.functional as F

from utils.augment import (apply_flip, crop_resize, crop_resize_box, draw_pad_offsets, fallback_box, flip_mask,
                           pad_crop, rrc_boxes)


def test_rrc_boxes_are_inside_and_follow_the_scale_and_ratio_ranges():
    H, W = 37, 23
    boxes = rrc_boxes(3000, H, W, (0.1, 0.6), torch.Generator().manual_seed(0))
    assert boxes.dtype == torch.long and boxes.shape == (3000, 4)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    # the sides are rounded to integers, which moves area and aspect a little off the drawn values
    area = (h * w).double() / (H * W)
    assert area.min() >= 0.1 * 0.7 and area.max() <= 0.6 * 1.3
    aspect = w.double() / h.double()
    assert aspect.min() >= 0.75 * 0.8 and aspect.max() <= (4 / 3) / 0.8
    assert 0.85 < aspect.log().mean().exp() < 1.15                      # log-uniform around 1
    assert top.unique().numel() > 10 and left.unique().numel() > 8     # positions spread over the grid
    # a square image with scale (1, 1) and the default ratio: only an aspect rounding to 1 fits (the whole image)
    whole = rrc_boxes(50, 8, 8, (1.0, 1.0), torch.Generator().manual_seed(1))
    assert (whole == torch.tensor([0, 0, 8, 8])).all()


def test_rrc_boxes_fall_back_to_the_centre_crop_clamped_to_the_ratio():
    # scale (1, 1) with aspects in [3, 4] never fits a 16x16 image (w = sqrt(256·a) > 16), so every image gets the
    # fallback; the image's own aspect 1 lies below 3, so w = 16, h = round(16 / 3) = 5, centred: top = (16-5)//2
    g = torch.Generator().manual_seed(2)
    fb = rrc_boxes(7, 16, 16, (1.0, 1.0), g, ratio=(3.0, 4.0))
    assert fb.tolist() == [[5, 0, 5, 16]] * 7
    assert fallback_box(16, 16, (3.0, 4.0)) == (5, 0, 5, 16)
    # a wide 10x30 image with the default ratio: aspect 3 clamped to 4/3 -> h = 10, w = round(13.33) = 13, left 8
    assert rrc_boxes(3, 10, 30, (1.0, 1.0), g).tolist() == [[0, 8, 10, 13]] * 3
    # the fallback still consumes its draws: the stream after it is the same as for any other call of that size
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    rrc_boxes(5, 16, 16, (1.0, 1.0), g1, ratio=(3.0, 4.0))
    rrc_boxes(5, 16, 16, (0.08, 1.0), g2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_rrc_boxes_repeat_from_the_seed_and_take_the_first_try_that_fits():
    a = rrc_boxes(64, 32, 32, (0.08, 1.0), torch.Generator().manual_seed(7))
    b = rrc_boxes(64, 32, 32, (0.08, 1.0), torch.Generator().manual_seed(7))
    c = rrc_boxes(64, 32, 32, (0.08, 1.0), torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # hand replay of the documented draw order for one image: 10 scales, 10 log-aspects, then (top, left)
    g = torch.Generator().manual_seed(11)
    s = 0.08 + (1.0 - 0.08) * torch.rand(1, 10, generator=g, dtype=torch.float64)[0]
    r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(1, 10, generator=g, dtype=torch.float64)[0]
    u = torch.rand(1, 2, generator=g, dtype=torch.float64)[0].tolist()
    for k in range(10):
        area, aspect = 20 * 20 * float(s[k]), math.exp(float(r[k]))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= 20 and 0 < h <= 20:
            break
    expect = [math.floor(u[0] * (20 - h + 1)), math.floor(u[1] * (20 - w + 1)), h, w]
    assert rrc_boxes(1, 20, 20, (0.08, 1.0), torch.Generator().manual_seed(11))[0].tolist() == expect


def test_crop_resize_whole_box_is_the_identity_and_a_view_depends_only_on_its_image():
    x = torch.rand(3, 2, 8, 8)
    full = torch.tensor([[0, 0, 8, 8]] * 3)
    for antialias in (False, True):
        assert torch.equal(crop_resize(x, full, 8, antialias), x)
    # a box of the output size is a plain crop
    assert torch.equal(crop_resize(x, torch.tensor([[2, 1, 4, 4]] * 3), 4, False), x[:, :, 2:6, 1:5])
    boxes = torch.tensor([[0, 0, 5, 6], [1, 2, 7, 4], [3, 3, 2, 2]])
    out = crop_resize(x, boxes, 6, True)
    assert out.shape == (3, 2, 6, 6)
    for i, (t, l, h, w) in enumerate(boxes.tolist()):
        ref = F.interpolate(x[i:i + 1, :, t:t + h, l:l + w], size=(6, 6), mode="bilinear", align_corners=False,
                            antialias=True)[0]
        assert torch.equal(out[i], ref)
        assert torch.equal(crop_resize(x[i:i + 1], boxes[i:i + 1], 6, True)[0], out[i])  # alone = in the batch
    # antialiasing matters when shrinking
    assert not torch.allclose(crop_resize(x, full, 3, True), crop_resize(x, full, 3, False))
    # one box for a whole batch
    assert torch.equal(crop_resize_box(x, (1, 2, 7, 4), 6, True), crop_resize(x, boxes[[1, 1, 1]], 6, True))


def test_pad_crop_by_hand():
    x = torch.arange(1, 17, dtype=torch.float32).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    x[1] += 100
    # image 0: window at (0, 1) of the 1-padded image = a zero row on top, columns 0..3 of the image
    # image 1: window at (2, 2) = rows 1..3 then zeros at the bottom, columns 1..3 then zeros on the right
    y = pad_crop(x, torch.tensor([0, 2]), torch.tensor([1, 2]), 1)
    assert y[0, 0].tolist() == [[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert y[1, 0].tolist() == [[106, 107, 108, 0], [110, 111, 112, 0], [114, 115, 116, 0], [0, 0, 0, 0]]
    assert torch.equal(pad_crop(x, torch.tensor([1, 1]), torch.tensor([1, 1]), 1), x)   # centred: unchanged
    top, left = draw_pad_offsets(500, 2, torch.Generator().manual_seed(0))
    assert set(top.tolist()) == set(range(5)) and set(left.tolist()) == set(range(5))
    t2, l2 = draw_pad_offsets(500, 2, torch.Generator().manual_seed(0))
    assert torch.equal(top, t2) and torch.equal(left, l2)


def test_flip_mask_and_apply_flip():
    m = flip_mask(1000, torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and 400 < int(m.sum()) < 600
    assert torch.equal(m, flip_mask(1000, torch.Generator().manual_seed(0)))
    x = torch.rand(3, 2, 4, 5)
    y = apply_flip(x, torch.tensor([True, False, True]))
    assert torch.equal(y[0], x[0].flip(-1)) and torch.equal(y[1], x[1]) and torch.equal(y[2], x[2].flip(-1))
