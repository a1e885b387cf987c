"""Tests for utils/dsa.py (speed.md §1.4, idc_dream.md §2.4)."""

import math

import pytest
import torch

from utils.dsa import DSA, DSAParams, OP_FAMILY, parse_strategy
from utils.errors import UserError

FULL = "color_crop_cutout_flip_scale_rotate"
FAMILIES = ["color", "crop", "cutout", "flip", "scale", "rotate"]
MODES = ["single", "all", "idc"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=_gen(seed))


def _families(plan) -> list[str]:
    """Distinct families of a plan, in order of first appearance."""
    out = []
    for op, _ in plan:
        if OP_FAMILY[op] not in out:
            out.append(OP_FAMILY[op])
    return out


# ---------------------------------------------------------------- Siamese use and per-sample parameters


@pytest.mark.parametrize("strategy,mode", [(f, "all") for f in FAMILIES] + [(FULL, m) for m in MODES])
def test_siamese_plan_gives_equal_outputs_for_batches_of_different_sizes(strategy, mode):
    dsa = DSA(strategy, mode=mode)
    real = _images(5)
    syn = real[:3].clone()
    for seed in range(4):  # several draws so "single"/"idc" exercise several families
        plan = dsa.sample(5, 16, 16, generator=_gen(seed), siamese=True)
        assert all(v.shape[0] == 1 for _, vals in plan for v in vals.values())
        out_real, out_syn = dsa.apply(real, plan), dsa.apply(syn, plan)
        assert out_syn.shape == syn.shape
        torch.testing.assert_close(out_syn, out_real[:3], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_sample_parameters_differ_across_samples(family):
    dsa = DSA(family, mode="all")
    x = _images(1).expand(16, -1, -1, -1).contiguous()  # 16 copies of one image
    out = dsa(x, generator=_gen(3))
    distinct = {tuple(o.flatten().tolist()) for o in out.round(decimals=5)}
    assert len(distinct) > 1
    plan = dsa.sample(16, 16, 16, generator=_gen(3))
    for _, vals in plan:
        for v in vals.values():
            assert v.shape == (16,)


def test_siamese_call_shares_one_transform_over_the_batch():
    x = _images(1).expand(6, -1, -1, -1).contiguous()
    out = DSA(FULL, mode="all")(x, generator=_gen(0), siamese=True)
    assert torch.equal(out, out[:1].expand_as(out))


def test_per_sample_plan_on_other_batch_size_is_rejected():
    dsa = DSA(FULL, mode="all")
    plan = dsa.sample(5, 16, 16, generator=_gen(0))
    with pytest.raises(ValueError, match="siamese=True"):
        dsa.apply(_images(3), plan)


# ---------------------------------------------------------------- gradients and randomness


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_synthetic_pixels(family):
    dsa = DSA(family, mode="all")
    syn = _images(4).requires_grad_(True)
    weights = torch.randn(4, 3, 16, 16, generator=_gen(9))
    for siamese in (False, True):
        syn.grad = None
        (dsa(syn, generator=_gen(1), siamese=siamese) * weights).sum().backward()
        assert torch.isfinite(syn.grad).all()
        assert (syn.grad != 0).any(dim=(1, 2, 3)).all()  # every sample receives gradient


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_repeats_and_other_seed_differs(mode):
    dsa = DSA(FULL, mode=mode)
    x = _images(8)
    a = dsa(x, generator=_gen(42))
    b = dsa(x, generator=_gen(42))
    assert torch.equal(a, b)
    outs = [dsa(x, generator=_gen(s)) for s in range(43, 47)]
    assert all(not torch.allclose(a, o) for o in outs)


def test_global_rng_is_used_without_generator():
    dsa = DSA(FULL, mode="all")
    x = _images(4)
    torch.manual_seed(7)
    a = dsa(x)
    torch.manual_seed(7)
    assert torch.equal(a, dsa(x))


# ---------------------------------------------------------------- exact behaviour of each op


def test_crop_is_an_exact_integer_shift_with_zero_fill():
    dsa = DSA("crop", mode="all")
    x = torch.zeros(1, 1, 10, 12)
    x[0, 0, 5, 6] = 1.0
    plan = [("crop", {"dy": torch.tensor([2]), "dx": torch.tensor([-3])})]
    out = dsa.apply(x, plan)  # out[i, j] = x[i + dy, j + dx]
    expected = torch.zeros_like(x)
    expected[0, 0, 3, 9] = 1.0
    assert torch.equal(out, expected)
    ones = dsa.apply(torch.ones(1, 1, 10, 12), plan)
    assert torch.equal(ones[0, 0, 8:], torch.zeros(2, 12))  # last dy rows vacated
    assert torch.equal(ones[0, 0, :, :3], torch.zeros(10, 3))  # first |dx| columns vacated
    assert ones.sum() == (10 - 2) * (12 - 3)


def test_sampled_crop_range_and_values():
    dsa = DSA("crop", mode="all")
    plan = dsa.sample(2000, 32, 32, generator=_gen(0))
    dy, dx = plan[0][1]["dy"], plan[0][1]["dx"]
    assert dy.min() == -4 and dy.max() == 4 and dx.min() == -4 and dx.max() == 4  # int(32*0.125+0.5)
    out = dsa.apply(torch.ones(2000, 1, 32, 32), plan)
    assert torch.equal(out, out.round())  # no interpolation: pixels stay exactly 0 or 1
    expected_area = (32 - dy.abs()) * (32 - dx.abs())
    assert torch.equal(out.sum(dim=(1, 2, 3)).long(), expected_area)


def test_cutout_zeros_a_square_of_the_right_side():
    dsa = DSA("cutout", mode="all")
    forced = [("cutout", {k: torch.tensor([v]) for k, v in dict(top=4, left=6, height=16, width=16).items()})]
    out = dsa.apply(torch.ones(1, 2, 32, 32), forced)
    expected = torch.ones(1, 2, 32, 32)
    expected[:, :, 4:20, 6:22] = 0
    assert torch.equal(out, expected)

    out = dsa.apply(torch.ones(500, 1, 32, 32), dsa.sample(500, 32, 32, generator=_gen(0)))[:, 0]
    holes = out == 0
    rows, cols = holes.any(2), holes.any(1)
    for r, c, h in zip(rows, cols, holes):
        # the zeros form exactly one rectangle of at most 16 x 16 (clipped at the border)
        assert torch.equal(h, r[:, None] & c[None, :])
        assert 0 < r.sum() <= 16 and 0 < c.sum() <= 16
    full = (rows.sum(1) == 16) & (cols.sum(1) == 16)
    assert full.sum() > 100  # unclipped squares are common and have side int(32*0.5+0.5) = 16


def test_forced_flip_is_exact():
    x = _images(2)
    out = DSA("flip", mode="all").apply(x, [("flip", {"flip": torch.tensor([True, False])})])
    assert torch.equal(out[0], x[0].flip(-1))
    assert torch.equal(out[1], x[1])


def test_color_ops_match_their_formulas():
    dsa = DSA("color", mode="all")
    pixel = torch.tensor([0.2, 0.4, 0.9]).view(1, 3, 1, 1)
    out = dsa.apply(pixel, [("brightness", {"shift": torch.tensor([0.25])})])
    torch.testing.assert_close(out, pixel + 0.25)
    out = dsa.apply(pixel, [("saturation", {"factor": torch.tensor([0.5])})])  # channel mean 0.5
    torch.testing.assert_close(out.flatten(), torch.tensor([0.35, 0.45, 0.7]))
    img = torch.tensor([[[[0.0, 1.0], [2.0, 5.0]]]])  # mean 2
    out = dsa.apply(img, [("contrast", {"factor": torch.tensor([1.5])})])
    torch.testing.assert_close(out, torch.tensor([[[[-1.0, 0.5], [2.0, 6.5]]]]))


def test_sampled_ranges_follow_params():
    plan = DSA(FULL, mode="all").sample(4000, 32, 32, generator=_gen(0))
    vals = {op: v for op, v in plan}
    assert [op for op, _ in plan] == [
        "brightness", "saturation", "contrast", "crop", "cutout", "flip", "scale", "rotate"
    ]
    b = vals["brightness"]["shift"]
    assert b.min() >= -0.5 and b.max() <= 0.5 and b.min() < -0.49 and b.max() > 0.49
    s = vals["saturation"]["factor"]
    assert s.min() >= 0 and s.max() <= 2 and s.max() > 1.98
    c = vals["contrast"]["factor"]
    assert c.min() >= 0.5 and c.max() <= 1.5
    for k in ("sx", "sy"):
        v = vals["scale"][k]
        assert v.min() >= 1 / 1.2 - 1e-6 and v.max() <= 1.2 + 1e-6
    a = vals["rotate"]["angle"]
    assert a.abs().max() <= math.radians(15) + 1e-6 and a.abs().max() > math.radians(14.9)
    assert 0.45 < vals["flip"]["flip"].float().mean() < 0.55
    custom = DSA("rotate", mode="all", params=DSAParams(rotate=5.0)).sample(500, 8, 8, generator=_gen(0))
    assert custom[0][1]["angle"].abs().max() <= math.radians(5) + 1e-6


def test_rotate_angle_is_computed_in_the_originals_float32_order():
    # (u - 0.5) * 2 * ratio / 180 * pi, bit for bit; math.radians(ratio) as one factor is off by an ulp for some u
    u = torch.rand(4000, generator=_gen(3))
    angle = DSA("rotate", mode="all").sample(4000, 8, 8, generator=_gen(3))[0][1]["angle"]
    assert torch.equal(angle, (u - 0.5) * 2 * 15.0 / 180 * math.pi)
    assert not torch.equal(angle, (u - 0.5) * 2.0 * math.radians(15.0))


def test_identity_warps_and_quarter_turn():
    x = _images(2, size=8)
    for align in (True, False):
        dsa = DSA("scale_rotate", mode="all", params=DSAParams(align_corners=align))
        one = torch.ones(1)
        out = dsa.apply(x, [("scale", {"sx": one, "sy": one}), ("rotate", {"angle": torch.zeros(1)})])
        torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    # With align_corners=True a 90-degree turn of a square image is an exact pixel permutation:
    # the originals' grid [[cos, -sin], [sin, cos]] gives out[i, j] = x[j, W-1-i].
    dsa = DSA("rotate", mode="all", params=DSAParams(align_corners=True))
    out = dsa.apply(x, [("rotate", {"angle": torch.tensor([math.pi / 2])})])
    torch.testing.assert_close(out, torch.rot90(x, k=1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_scale_shrinks_content_with_zero_padding():
    # sx = sy = 1.2 samples beyond the border, so the outer ring of a constant image falls off (zero padding)
    dsa = DSA("scale", mode="all")
    out = dsa.apply(torch.ones(1, 1, 32, 32), [("scale", {"sx": torch.tensor([1.2]), "sy": torch.tensor([1.2])})])
    assert out[0, 0, 0, 0] < 0.5 and out[0, 0, 16, 16] == pytest.approx(1.0)


# ---------------------------------------------------------------- modes and strategy parsing


def test_single_mode_applies_exactly_one_family():
    dsa = DSA(FULL, mode="single")
    seen = set()
    for seed in range(80):
        plan = dsa.sample(4, 32, 32, generator=_gen(seed))
        fams = _families(plan)
        assert len(fams) == 1
        seen.update(fams)
        if fams == ["color"]:
            assert [op for op, _ in plan] == ["brightness", "saturation", "contrast"]
    assert seen == set(FAMILIES)


def test_all_mode_follows_string_order():
    plan = DSA("rotate_flip_color", mode="all").sample(2, 8, 8, generator=_gen(0))
    assert [op for op, _ in plan] == ["rotate", "flip", "brightness", "saturation", "contrast"]


def test_idc_mode_order_and_one_geometric_op():
    dsa = DSA("cutout_rotate_color_scale_crop_flip", mode="idc")  # order in the string is irrelevant
    seen = set()
    for seed in range(60):
        ops = [op for op, _ in dsa.sample(4, 32, 32, generator=_gen(seed))]
        assert ops[:4] == ["flip", "brightness", "saturation", "contrast"]  # flip before color
        assert ops[4] in ("crop", "scale", "rotate") and ops[5:] == ["cutout"]  # one geometric, cutout last
        seen.add(ops[4])
    assert seen == {"crop", "scale", "rotate"}
    ops = [op for op, _ in DSA("color_crop_cutout", mode="idc").sample(2, 32, 32, generator=_gen(0))]
    assert ops == ["brightness", "saturation", "contrast", "crop", "cutout"]
    ops = [op for op, _ in DSA("color_cutout", mode="idc").sample(2, 32, 32, generator=_gen(0))]
    assert ops == ["brightness", "saturation", "contrast", "cutout"]  # no geometric op present


def test_strategy_parsing():
    assert parse_strategy(FULL) == FAMILIES
    x = _images(3)
    for empty in ("", "none"):
        dsa = DSA(empty)
        assert dsa.sample(3, 16, 16, generator=_gen(0)) == []
        assert torch.equal(dsa(x, generator=_gen(0)), x)
    with pytest.raises(UserError, match="unknown DSA augmentation 'blur'"):
        DSA("color_blur")
    with pytest.raises(UserError, match="unknown DSA mode"):
        DSA(FULL, mode="M")
