"""utils/speed.py: FReeNet (speed.md §3.2), configurations (§4), budget (§3.4), sparsity and compact storage
(§3.3, §7 bug 11), the `speed` decoder (§5.1) and the reader of the original's files (§5.3)."""
import math

import pytest
import torch
import torch.nn.functional as F

from utils.datasets import get_dataset_spec
from utils.errors import UserError
from utils.speed import (BYTES_PER_NONZERO, DERIVED_DEFAULTS, SPEED_PRESETS, FReeNet, SpeedConfig, budget_floats,
                         check_budget, count_params, derive_config, infer_decoder_args, load_reference_files,
                         pack_scm, speed_decoder_args, speed_preset, speed_tensors, storage_floats, topk_prune,
                         unpack_scm)
from utils.synset import DECODERS, SyntheticSet, load_synset, make_meta, save_synset


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def spec_keys(depth):
    keys = []
    for t in range(depth):
        for m in ("norm1", "mhsc.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"decoder_blocks.{t}.{m}.weight", f"decoder_blocks.{t}.{m}.bias"]
    return keys + ["decoder_pred.weight", "decoder_pred.bias"]


# ----------------------------------------------------------------------------------------------- FReeNet

def test_state_dict_keys_and_init_follow_the_original():
    net = FReeNet(dim=12, depth=2, heads=3, patch=4)
    sd = net.state_dict()
    assert list(sd) == spec_keys(2)
    assert sd["decoder_pred.weight"].shape == (3 * 16, 12)
    assert sd["decoder_blocks.1.mlp.fc1.weight"].shape == (12, 12)              # mlp_ratio 1
    for k, v in sd.items():
        if k.endswith("bias"):
            assert torch.all(v == 0), k
        elif ".norm" in k:
            assert torch.all(v == 1), k
        else:                                                                   # Xavier-uniform bound
            bound = math.sqrt(6 / sum(v.shape))
            assert v.abs().max() <= bound and v.abs().max() > 0.5 * bound, k
    assert all(m.eps == 1e-6 for m in net.modules() if isinstance(m, torch.nn.LayerNorm))
    a = FReeNet(8, 1, 2, 2, generator=gen(3)).state_dict()
    b = FReeNet(8, 1, 2, 2, generator=gen(3)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dim,depth,patch,channels", [(32, 1, 4, 3), (96, 2, 4, 3), (192, 3, 8, 1), (20, 4, 2, 3)])
def test_param_count_formula(dim, depth, patch, channels):
    net = FReeNet(dim, depth, 2, patch, channels)
    n = sum(p.numel() for p in net.parameters())
    assert n == count_params(dim, depth, patch, channels) == FReeNet.count_params(dim, depth, patch, channels)
    assert n == depth * (3 * dim * dim + 7 * dim) + channels * patch * patch * (dim + 1)


def test_bad_shapes_are_user_errors():
    with pytest.raises(UserError, match="divisible"):
        FReeNet(10, 1, 3, 4)
    net = FReeNet(8, 1, 2, 2)
    with pytest.raises(UserError, match="SAET"):
        net(torch.zeros(1, 4, 6), torch.zeros(1, 2, 4, 4))
    with pytest.raises(UserError, match="SCM"):
        net(torch.zeros(1, 4, 8), torch.zeros(1, 3, 4, 4))
    with pytest.raises(UserError, match="square"):
        net(torch.zeros(1, 4, 8), torch.zeros(1, 2, 5, 4))


_ARCH_CACHE = {}


@pytest.mark.parametrize("key", sorted(SPEED_PRESETS) + sorted(DERIVED_DEFAULTS))
def test_output_shapes_for_every_config(key):
    cfg = SPEED_PRESETS.get(key) or DERIVED_DEFAULTS[key]
    channels = get_dataset_spec(cfg.dataset).channels
    arch = (cfg.dim, cfg.depth, cfg.heads, cfg.patch, channels)
    if arch not in _ARCH_CACHE:
        _ARCH_CACHE[arch] = FReeNet(*arch)
    net = _ARCH_CACHE[arch]
    g, lk = gen(), (cfg.tokens_per_image, cfg.num_saet)
    saet = torch.randn(1, cfg.num_saet, cfg.dim, generator=g) * 0.2
    scm = topk_prune(torch.randn(2, cfg.heads, *lk, generator=g) * 0.2, cfg.top_k)
    with torch.no_grad():
        out = net(saet, scm)
    assert out.shape == (2, channels, cfg.resolution, cfg.resolution)
    assert torch.isfinite(out).all()
    assert cfg.resolution == get_dataset_spec(cfg.dataset).resolution


def test_hand_decoded_image_places_patches_row_major():
    # D=2, h=1, T=1, p=1, 1 channel, K=1, E = [1, 0]: Z_l = (A_l, 0). proj = identity, MLP = 0, so
    # X_1 = LN(LN(Z_l)) = (±1, ∓1) up to eps, and with W_pred = [1, 0] pixel l = sign(A_l) (0 for A_l = 0).
    net = FReeNet(dim=2, depth=1, heads=1, patch=1, channels=1)
    b = net.decoder_blocks[0]
    with torch.no_grad():
        b.mhsc.proj.weight.copy_(torch.eye(2))
        b.mlp.fc2.weight.zero_()
        net.decoder_pred.weight.copy_(torch.tensor([[1.0, 0.0]]))
    saet = torch.tensor([[[1.0, 0.0]]])
    scm = torch.tensor([2.0, -3.0, 0.0, 5.0]).reshape(1, 1, 4, 1)
    img = net(saet, scm)
    assert img.shape == (1, 1, 2, 2)
    assert torch.allclose(img[0, 0], torch.tensor([[1.0, -1.0], [0.0, 1.0]]), atol=1e-5)


def test_patch_vector_is_read_as_row_col_channel():
    # W_pred = 0, bias = 0..11: every patch decodes to the bias, laid out as (p, p, C) = (2, 2, 3)
    net = FReeNet(dim=4, depth=1, heads=2, patch=2, channels=3)
    with torch.no_grad():
        net.decoder_pred.weight.zero_()
        net.decoder_pred.bias.copy_(torch.arange(12.0))
    img = net(torch.randn(1, 3, 4), torch.randn(1, 2, 9, 3))                 # g = 3, R = 6
    for gi in range(3):
        for gj in range(3):
            for pi in range(2):
                for pj in range(2):
                    for c in range(3):
                        assert img[0, c, gi * 2 + pi, gj * 2 + pj] == (pi * 2 + pj) * 3 + c


def test_a_single_nonzero_row_changes_only_its_patch():
    torch.manual_seed(0)
    net = FReeNet(dim=8, depth=2, heads=2, patch=4, channels=3)
    saet = torch.randn(1, 5, 8)
    g, p = 4, 4                                                              # L = 16, R = 16
    for l in (0, 6, 13):
        scm = torch.zeros(1, 2, 16, 5)
        scm[0, 1, l, 2] = 1.5
        img = net(saet, scm)[0]
        background = net(saet, torch.zeros(1, 2, 16, 5))[0]                 # every patch = the background patch
        assert torch.allclose(background[:, :4, :4], background[:, 8:12, 4:8])
        diff = (img - background).abs().sum(0) > 1e-6
        expect = torch.zeros(16, 16, dtype=torch.bool)
        expect[(l // g) * p:(l // g + 1) * p, (l % g) * p:(l % g + 1) * p] = True
        assert torch.equal(diff, expect), l


def naive_decode(net, saet, scm):
    """The original's structure written out: the head products are recomputed inside every block."""
    n, h, l, k = scm.shape
    dh = net.dim // h
    x = torch.zeros(n, l, net.dim)
    for blk in net.decoder_blocks:
        z = torch.cat([scm[:, j] @ saet[0, :, j * dh:(j + 1) * dh] for j in range(h)], dim=-1)
        m = F.linear(z, blk.mhsc.proj.weight, blk.mhsc.proj.bias)
        y = F.layer_norm(x + m, (net.dim,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        hid = F.gelu(F.linear(y, blk.mlp.fc1.weight, blk.mlp.fc1.bias), approximate="none")
        x = F.layer_norm(y + F.linear(hid, blk.mlp.fc2.weight, blk.mlp.fc2.bias), (net.dim,), blk.norm2.weight,
                         blk.norm2.bias, 1e-6)
    out = F.linear(x, net.decoder_pred.weight, net.decoder_pred.bias)      # (n, L, p*p*C)
    g, p, c = int(math.isqrt(l)), net.patch, net.channels
    img = torch.zeros(n, c, g * p, g * p)
    for idx in range(l):
        patch = out[:, idx].reshape(n, p, p, c).permute(0, 3, 1, 2)
        img[:, :, (idx // g) * p:(idx // g + 1) * p, (idx % g) * p:(idx % g + 1) * p] = patch
    return img


def test_z_once_equals_per_block_recomputation_and_is_differentiable():
    torch.manual_seed(1)
    net = FReeNet(dim=12, depth=3, heads=3, patch=2, channels=3)
    for prm in net.parameters():                          # non-trivial LN and bias values
        prm.data.add_(0.1 * torch.randn_like(prm))
    saet = (0.2 * torch.randn(1, 6, 12)).requires_grad_()
    scm = (0.2 * torch.randn(3, 3, 16, 6)).requires_grad_()
    fast = net(saet, scm)
    assert torch.allclose(fast, naive_decode(net, saet, scm), atol=1e-5)
    fast.square().sum().backward()
    assert saet.grad.abs().sum() > 0 and scm.grad.abs().sum() > 0
    assert all(prm.grad is not None for prm in net.parameters())


# ---------------------------------------------------------------------------------------- configurations

# speed.md §3.4 table: budget, SAET, FReeNet, N, nnz, cost, cost/budget
TABLE = {
    ("CIFAR10", 1): (30720, 512, 4880, 170, 16320, 29872, 0.972),
    ("CIFAR10", 10): (307200, 6144, 32976, 1240, 178560, 306960, 0.999),
    ("CIFAR10", 50): (1536000, 12288, 345072, 2720, 783360, 1532400, 0.998),
    ("CIFAR100", 1): (307200, 6144, 61296, 1100, 158400, 305040, 0.993),
    ("CIFAR100", 10): (3072000, 12288, 345072, 6200, 1785600, 3035760, 0.988),
    ("CIFAR100", 50): (15360000, 12288, 345072, 10000, 9960000, 15297360, 0.996),
    ("TinyImageNet", 1): (2457600, 32768, 446144, 3400, 1305600, 2437312, 0.992),
    ("TinyImageNet", 10): (24576000, 32768, 446144, 15600, 15974400, 24440512, 0.994),
    ("imagenette", 1): (491520, 49152, 260928, 150, 115200, 482880, 0.982),
    ("imagenette", 10): (4915200, 98304, 964032, 1110, 2557440, 4898496, 0.997),
}


@pytest.mark.parametrize("key", sorted(TABLE))
def test_budget_table_of_the_spec(key):
    budget, saet, freenet, n, nnz, cost, ratio = TABLE[key]
    cfg = SPEED_PRESETS[key]
    c = get_dataset_spec(cfg.dataset).num_classes
    assert budget_floats(c, cfg.ipc, 3, cfg.resolution) == budget
    assert cfg.num_saet * cfg.dim == saet
    assert count_params(cfg.dim, cfg.depth, cfg.patch, 3) == freenet
    assert c * cfg.n_per_class == n and n * cfg.heads * cfg.top_k == nnz
    assert storage_floats(cfg, c, 3) == cost
    assert round(check_budget(cfg, c, 3), 3) == ratio


def test_presets_cover_the_published_table():
    assert len(SPEED_PRESETS) == 8 + 6 * 2
    subsets = ("imagenette", "imagewoof", "imagefruit", "imagemeow", "imagesquawk", "imageyellow")
    for name in ("CIFAR10", "CIFAR100", "TinyImageNet", *subsets):
        assert get_dataset_spec(name).name == name                         # the registry's canonical spelling
    c10 = SPEED_PRESETS[("CIFAR10", 10)]
    assert c10.name == "CIFAR10_IPC10_freenet_patch4_dec96d1b3h" and c10.tokens_per_image == 64
    assert (c10.n_per_class, c10.num_saet, c10.top_k, c10.l1_weight, c10.batch_syn, c10.syn_steps,
            c10.max_start_epoch, c10.model) == (124, 64, 48, 3e-7, 128, 60, 20, "ConvNet")
    tiny = speed_preset("tiny", 10)
    assert (tiny.model, tiny.resolution, tiny.patch, tiny.top_k, tiny.l1_weight, tiny.batch_syn, tiny.syn_steps) == \
        ("ConvNetD4", 64, 8, 128, 7e-9, 780, 20)
    assert tiny.reference_name == "Tiny_IPC10_freenet_patch8_dec256d2b8h"
    c100 = SPEED_PRESETS[("CIFAR100", 50)]
    assert (c100.top_k, c100.l1_weight, c100.n_per_class) == (166, 3e-8, 100)
    for s in subsets:
        one, ten = SPEED_PRESETS[(s, 1)], SPEED_PRESETS[(s, 10)]
        big = s in ("imagenette", "imagefruit", "imagemeow")
        assert (one.l1_weight, ten.l1_weight) == ((7e-7, 7e-8) if big else (3e-7, 3e-8))
        assert one.tokens_per_image == 256 and (one.dim, one.depth, one.heads, one.top_k, one.n_per_class) == \
            (192, 2, 4, 192, 15)
        assert (ten.dim, ten.heads, ten.top_k, ten.n_per_class, ten.batch_syn, ten.syn_steps) == \
            (384, 6, 384, 111, 32, 40)
        assert one.reference_name == "ImageNet_IPC1_freenet_patch8_dec192d2b4h"


def test_every_preset_and_derived_default_is_within_budget():
    for cfg in SPEED_PRESETS.values():                                     # §3.4: 97-99.9 % of the budget
        assert 0.97 <= check_budget(cfg, get_dataset_spec(cfg.dataset).num_classes, 3) <= 1.0
    for cfg in DERIVED_DEFAULTS.values():
        spec = get_dataset_spec(cfg.dataset)
        assert check_budget(cfg, spec.num_classes, spec.channels) <= 1.0


def test_derive_config_reproduces_published_n_per_class_and_picks_the_largest():
    for cfg in SPEED_PRESETS.values():
        spec = get_dataset_spec(cfg.dataset)
        d = derive_config(cfg.dataset, cfg.ipc, spec.num_classes, 3, cfg.resolution, patch=cfg.patch,
                          num_saet=cfg.num_saet, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, top_k=cfg.top_k,
                          l1_weight=cfg.l1_weight, batch_syn=cfg.batch_syn, syn_steps=cfg.syn_steps,
                          max_start_epoch=cfg.max_start_epoch, model=cfg.model)
        assert d == cfg
    for cfg in DERIVED_DEFAULTS.values():
        spec = get_dataset_spec(cfg.dataset)
        over = SpeedConfig(**{**cfg.__dict__, "n_per_class": cfg.n_per_class + 1})
        assert storage_floats(cfg, 10, spec.channels) <= budget_floats(10, cfg.ipc, spec.channels, cfg.resolution)
        with pytest.raises(UserError, match="over the IPC"):
            check_budget(over, 10, spec.channels)
    fm = speed_preset("FashionMNIST", 10)
    assert (fm.resolution, fm.patch, fm.tokens_per_image, fm.dim, fm.top_k) == (28, 4, 49, 48, 37)
    # one-channel defaults store more images than pixel storage would at every IPC
    assert [speed_preset("FashionMNIST", i).n_per_class for i in (1, 10, 50)] == [5, 40, 89]
    assert speed_preset("SVHN", 10).n_per_class == SPEED_PRESETS[("CIFAR10", 10)].n_per_class
    with pytest.raises(UserError, match="cannot hold one image"):
        derive_config("MNIST", 1, 10, 1, 28, patch=4, num_saet=64, dim=192, depth=3, heads=6, top_k=48,
                      l1_weight=1e-7, batch_syn=64, syn_steps=10, max_start_epoch=5)


def test_derived_defaults_follow_one_rule_from_the_nearest_published_row():
    from utils.speed import DERIVED_TOPK_SHARE, derive_defaults, reference_row
    # the reference row: family of the nearest resolution, largest published IPC <= the requested one
    assert reference_row(28, 1) is SPEED_PRESETS[("CIFAR10", 1)]
    assert reference_row(28, 5) is SPEED_PRESETS[("CIFAR10", 1)]
    assert reference_row(32, 100) is SPEED_PRESETS[("CIFAR10", 50)]
    assert reference_row(64, 10) is SPEED_PRESETS[("TinyImageNet", 10)]
    assert reference_row(224, 1) is SPEED_PRESETS[("imagenette", 1)]
    # RGB at the reference's geometry (SVHN): rho = 1, so the published code shape itself, trained in two phases
    for ipc in (1, 10, 50):
        svhn, c10 = speed_preset("SVHN", ipc), SPEED_PRESETS[("CIFAR10", ipc)]
        assert {**svhn.__dict__, "dataset": "CIFAR10", "topk_share": None} == c10.__dict__
        assert svhn.topk_share == DERIVED_TOPK_SHARE == 0.5
    # 28 px, one channel, IPC 1 by hand: p = the divisor of 28 nearest 4·28/32 = 3.5 -> 4 (L = 49);
    # rho = 784 / 3072, D = 2·round(32·sqrt(rho)/2) = 16; k = round(48·49/64) = 37 (the kept fraction of the row);
    # budget 7840 floats, fixed K·D + FReeNet = 256 + 880 + 272 = 1408, 1110 per image per class -> N/c = 5
    fm = speed_preset("FashionMNIST", 1)
    assert (fm.patch, fm.tokens_per_image, fm.dim, fm.num_saet, fm.depth, fm.heads, fm.top_k, fm.n_per_class) == \
        (4, 49, 16, 16, 1, 2, 37, 5)
    assert storage_floats(fm, 10, 1) == 1408 + 5 * 1110
    assert (fm.l1_weight, fm.batch_syn, fm.syn_steps, fm.max_start_epoch, fm.model) == (3e-6, 64, 60, 10, "ConvNet")
    # every derived row: the reference's kept fraction to within one code, D a multiple of h, largest fitting N/c
    for (name, ipc), cfg in DERIVED_DEFAULTS.items():
        ref = reference_row(cfg.resolution, ipc)
        lk, ref_lk = cfg.tokens_per_image * cfg.num_saet, ref.tokens_per_image * ref.num_saet
        assert abs(cfg.top_k / lk - ref.top_k / ref_lk) <= 0.5 / lk, (name, ipc)
        assert cfg.dim % cfg.heads == 0 and (cfg.heads, cfg.depth, cfg.num_saet) == (ref.heads, ref.depth,
                                                                                        ref.num_saet)
        assert cfg == derive_defaults(name, ipc) and cfg.topk_share == DERIVED_TOPK_SHARE
    # the rule reads geometry, never the name: MNIST and Fashion-MNIST get the same code
    assert {**speed_preset("MNIST", 10).__dict__, "dataset": "x"} == {**speed_preset("FashionMNIST", 10).__dict__,
                                                                      "dataset": "x"}
    # any IPC of a dataset the paper never ran; published rows carry no two-phase training
    assert speed_preset("FashionMNIST", 5).n_per_class > speed_preset("FashionMNIST", 1).n_per_class
    assert speed_preset("ImageNet10", 1).patch == 14 and speed_preset("ImageNet10", 1).tokens_per_image == 256
    assert all(cfg.topk_share is None for cfg in SPEED_PRESETS.values())


def test_kept_code_mass_hand_case():
    from utils.speed import kept_code_mass
    scm = torch.tensor([3.0, -1.0, 1.0, -5.0, 0.0, 2.0, -2.0, 0.0]).view(2, 1, 2, 2)
    assert kept_code_mass(scm, 2) == pytest.approx((5 + 3 + 2 + 2) / (10 + 4))
    assert kept_code_mass(scm, 4) == 1.0 and kept_code_mass(torch.zeros(1, 1, 2, 2), 1) == 1.0
    assert kept_code_mass(scm, 1, chunk_elements=4) == pytest.approx((5 + 2) / 14)   # chunked = whole
    with pytest.raises(UserError, match="top_k = 5"):
        kept_code_mass(scm, 5)


def test_preset_errors():
    with pytest.raises(UserError, match="no TinyImageNet IPC50.*derive_config"):
        speed_preset("TinyImageNet", 50)
    with pytest.raises(UserError, match="IPC 1, 10"):
        speed_preset("imagewoof", 50)
    with pytest.raises(UserError, match="unknown dataset"):
        speed_preset("NoSuchSet", 1)
    with pytest.raises(UserError, match="divisible"):
        SpeedConfig(**{**SPEED_PRESETS[("CIFAR10", 1)].__dict__, "patch": 5})


# ---------------------------------------------------------------------------------------------- sparsity

def test_topk_prune_keeps_the_k_largest_per_image_and_head():
    scm = torch.randn(3, 2, 4, 5, generator=gen(), requires_grad=True)
    out = topk_prune(scm, 7)
    assert not out.requires_grad
    flat, orig = out.reshape(3, 2, 20), scm.detach().reshape(3, 2, 20)
    assert torch.equal((flat != 0).sum(-1), torch.full((3, 2), 7))
    for i in range(3):
        for j in range(2):
            top = orig[i, j].abs().topk(7).indices
            assert torch.equal(flat[i, j, top], orig[i, j, top])
    # ties at the threshold are all kept (as the reference)
    tie = torch.tensor([5.0, -3.0, 3.0, 1.0]).reshape(1, 1, 2, 2)
    assert torch.equal(topk_prune(tie, 2), torch.tensor([5.0, -3.0, 3.0, 0.0]).reshape(1, 1, 2, 2))


def test_pack_unpack_round_trip_and_six_bytes_per_nonzero():
    scm = torch.randn(4, 3, 64, 16, generator=gen())                      # L·K = 1024
    packed = pack_scm(scm, 48)
    assert packed["index"].dtype == torch.int16 and packed["value"].dtype == torch.float32
    assert packed["index"].shape == packed["value"].shape == (4, 3, 48)
    assert packed["index"].element_size() + packed["value"].element_size() == BYTES_PER_NONZERO == 6
    assert torch.equal(unpack_scm(packed, 64, 16), topk_prune(scm, 48))
    small = 1500                                                            # one (image, head) row per chunk
    assert torch.equal(topk_prune(scm, 48, chunk_elements=small), topk_prune(scm, 48))
    assert all(torch.equal(pack_scm(scm, 48, chunk_elements=small)[k], packed[k]) for k in packed)
    pos = packed["index"].long() & 0xFFFF
    assert torch.all(pos[..., 1:] > pos[..., :-1])                         # sorted by position
    # the full 16-bit range: positions >= 32768 survive the int16 bit pattern
    big = torch.zeros(2, 1, 256, 256)
    big[0, 0, 255, 255], big[0, 0, 200, 3], big[1, 0, 0, 0] = 2.0, -1.0, 3.0
    pk = pack_scm(big, 2)
    assert pk["index"].min() < 0
    assert torch.equal(unpack_scm(pk, 256, 256), big)
    with pytest.raises(UserError, match="16-bit"):
        pack_scm(torch.zeros(1, 1, 257, 256), 2)
    # exactly k even with ties, lowest positions first
    tie = torch.tensor([5.0, -3.0, 3.0, 1.0]).reshape(1, 1, 2, 2)
    assert torch.equal(unpack_scm(pack_scm(tie, 2), 2, 2), torch.tensor([5.0, -3.0, 0.0, 0.0]).reshape(1, 1, 2, 2))


# --------------------------------------------------------------------------------------------- the decoder

def make_speed_set(top_k=5):
    """A tiny CIFAR10 SPEED set: R 32, p 8 (L 16), K 4, D 8, T 2, h 2, 2 images per class."""
    torch.manual_seed(0)
    cfg = SpeedConfig("CIFAR10", 1, "ConvNet", 32, 8, 2, 4, top_k, 3e-6, 8, 2, 2, 8, 2, 2)
    net = FReeNet(cfg.dim, cfg.depth, cfg.heads, cfg.patch, 3)
    saet = 0.2 * torch.randn(1, cfg.num_saet, cfg.dim)
    scm = 0.2 * torch.randn(20, cfg.heads, cfg.tokens_per_image, cfg.num_saet)
    labels = torch.arange(10).repeat_interleave(cfg.n_per_class)
    meta = make_meta(get_dataset_spec("CIFAR10"), space="normalized", ipc=1, method="speed",
                     decoder="speed", decoder_args=speed_decoder_args(cfg, 3))
    syn = SyntheticSet(speed_tensors(saet, scm, net, cfg.top_k), labels, meta, lr=torch.tensor(0.01))
    return syn, net, saet, scm, cfg


def test_speed_decoder_round_trip_through_the_synset_format(tmp_path):
    assert "speed" in DECODERS
    syn, net, saet, scm, cfg = make_speed_set()
    assert set(syn.tensors) == {"saet", "scm_index", "scm_value", *("freenet." + k for k in spec_keys(2))}
    assert syn.meta["decoder_args"] == {"dim": 8, "depth": 2, "heads": 2, "patch": 8, "channels": 3,
                                        "resolution": 32, "num_saet": 4, "tokens": 16, "top_k": 5, "mlp_ratio": 1.0}
    save_synset(syn, tmp_path / "set")
    back = load_synset(tmp_path / "set")
    images, labels = back.decode()
    with torch.no_grad():
        direct = net(saet, topk_prune(scm, cfg.top_k))
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.float32
    assert torch.allclose(images, direct, atol=1e-6)
    assert torch.equal(labels, torch.arange(10).repeat_interleave(2))
    assert (tmp_path / "set" / "grid.png").is_file()


def test_speed_decoder_refuses_inconsistent_sets():
    syn, *_ = make_speed_set()
    bad = SyntheticSet(dict(syn.tensors), syn.labels[:-1], syn.meta)
    with pytest.raises(UserError, match="labels"):
        bad.decode()
    t = {k: v for k, v in syn.tensors.items() if k != "freenet.decoder_pred.bias"}
    with pytest.raises(UserError, match="FReeNet weights"):
        SyntheticSet(t, syn.labels, syn.meta).decode()


# ------------------------------------------------------------------------------- the original's files (§5.3)

def test_reference_files_load_and_convert(tmp_path):
    torch.manual_seed(0)
    net = FReeNet(dim=8, depth=2, heads=2, patch=8, channels=3)
    saet = 0.2 * torch.randn(1, 4, 8)
    pruned = topk_prune(0.2 * torch.randn(20, 2, 16, 4), 5)
    # the original's layout: dense saet, sparse COO scm (int64 indices), an OrderedDict state_dict, 0-dim lr
    torch.save(saet.clone(), tmp_path / "saet_best.pt")
    torch.save(pruned.to_sparse(), tmp_path / "scm_best.pt")
    torch.save(net.state_dict(), tmp_path / "freenet_best.pt")
    torch.save(torch.tensor(0.0123), tmp_path / "syn_lr_best.pt")
    s, a, state, lr = load_reference_files(tmp_path / "saet_best.pt", tmp_path / "scm_best.pt",
                                           tmp_path / "freenet_best.pt", tmp_path / "syn_lr_best.pt")
    assert torch.equal(s, saet) and torch.equal(a, pruned) and not a.is_sparse
    assert lr.shape == () and lr.item() == pytest.approx(0.0123)
    assert list(state) == spec_keys(2)
    loaded = FReeNet(8, 2, 2, 8)
    loaded.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(loaded(s, a), net(saet, pruned))
    assert load_reference_files(tmp_path / "saet_best.pt", tmp_path / "scm_best.pt",
                                tmp_path / "freenet_best.pt")[3] is None
    args = infer_decoder_args(s, a, state)
    assert args == {"dim": 8, "depth": 2, "heads": 2, "patch": 8, "channels": 3, "resolution": 32, "num_saet": 4,
                    "tokens": 16, "top_k": 5, "mlp_ratio": 1.0}
    with pytest.raises(UserError, match="not found"):
        load_reference_files(tmp_path / "nope.pt", tmp_path / "scm_best.pt", tmp_path / "freenet_best.pt")
    with pytest.raises(UserError, match="SCM tensor"):
        load_reference_files(tmp_path / "saet_best.pt", tmp_path / "saet_best.pt", tmp_path / "freenet_best.pt")
