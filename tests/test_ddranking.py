"""utils/ddranking.py: DD-Ranking's IOR, HLR, LRS and ARS, checked against numbers worked out by hand."""
import math

import pytest

from utils import ddranking


def arms(**runs):
    return {name: {"runs": values, "mean": sum(values) / len(values)} for name, values in runs.items()}


# Two seeds, accuracies as fractions:
#   syn 0.60, 0.62   random 0.50, 0.55   full (hard labels) 0.90, 0.88
#   IOR = syn - random = 0.10, 0.07     HLR = full - syn = 0.30, 0.26
#   LRS = (exp(0.5 IOR - 0.5 HLR) - exp(-1)) / (e - exp(-1)):
#     seed 0: exp(-0.10)  = 0.904837; (0.904837 - 0.367879) / (2.718282 - 0.367879) = 0.228454
#     seed 1: exp(-0.095) = 0.909373; (0.909373 - 0.367879) / 2.350402            = 0.230383
#   without augmentation: syn 0.40, 0.41, random 0.35, 0.40 -> IOR_noaug 0.05, 0.01
#   ARS = squash(0.5 IOR + 0.5 IOR_noaug): squash(0.075) = 0.302078, squash(0.04) = 0.286305
HAND = dict(syn=[0.60, 0.62], random=[0.50, 0.55], full=[0.90, 0.88], syn_na=[0.40, 0.41], random_na=[0.35, 0.40])


def test_scores_match_the_hand_computation():
    out = ddranking.scores(arms(**HAND), syn_hard="syn", full_hard="full", syn_noaug="syn_na",
                           random_noaug="random_na")
    assert out["IOR"]["runs"] == pytest.approx([0.10, 0.07])
    assert out["IOR"]["mean"] == pytest.approx(0.085) and out["IOR"]["std"] == pytest.approx(0.015)
    assert out["HLR"]["runs"] == pytest.approx([0.30, 0.26]) and out["HLR"]["mean"] == pytest.approx(0.28)
    assert out["LRS"]["runs"] == pytest.approx([0.228454, 0.230383], abs=1e-6)
    assert out["ARS"]["runs"] == pytest.approx([0.302078, 0.286305], abs=1e-6)
    assert out["roles"]["syn_hard"] == "syn" and out["roles"]["w"] == 0.5


def test_scores_are_defined_only_for_the_arms_that_were_trained():
    assert ddranking.scores(arms(syn=[0.5])) == {}                                   # no random arm: nothing
    only_ior = ddranking.scores(arms(syn=[0.6], random=[0.5]), syn_hard="syn", full_hard="full")
    assert set(only_ior) == {"IOR", "roles"}                                          # no full arm: no HLR/LRS
    kd = ddranking.scores(arms(syn=[0.7], random=[0.5], hard_label=[0.3], full_hard_label=[0.8]),
                          syn_hard="hard_label", full_hard="full_hard_label")
    assert kd["HLR"]["runs"] == pytest.approx([0.5]) and kd["IOR"]["runs"] == pytest.approx([0.2])
    assert "ARS" not in kd


def test_fractions_keep_the_scores_in_zero_to_one():
    """Percent fed into the formula (DD-Ranking 0.2.0) would give exp(+-50); fractions stay in [-1, 1]."""
    assert ddranking.lrs(1.0, -1.0) == pytest.approx(1.0) and ddranking.lrs(-1.0, 1.0) == pytest.approx(0.0)
    assert ddranking.lrs(0.0, 0.0) == pytest.approx((1 - math.exp(-1)) / (math.e - math.exp(-1)))
    assert ddranking.ars(1.0, 1.0) == pytest.approx(1.0) and ddranking.ars(-1.0, -1.0) == pytest.approx(0.0)


def test_arms_with_different_run_counts_are_not_paired():
    with pytest.raises(ValueError, match="IOR: arms with 2 and 1 runs cannot be paired by seed"):
        ddranking.scores(arms(syn=[0.6, 0.7], random=[0.5]))


def test_console_line():
    out = ddranking.scores(arms(**HAND), syn_hard="syn", full_hard="full")
    assert ddranking.format_line("ConvNet-3", out) == (
        "ConvNet-3      DD-Ranking: IOR +8.50 ± 1.50, HLR +28.00 ± 2.00, LRS 22.94 ± 0.10 "
        "(IOR/HLR in accuracy points, LRS/ARS in %)")


def test_export_tensors_of_a_normalized_set(tmp_path):
    """What a DD-Ranking user loads: the set's images in its own space, pixels, labels, learned lr."""
    import torch
    from utils.datasets import get_dataset_spec, normalize
    from utils.synset import load_synset, make_meta, save_synset, SyntheticSet
    spec = get_dataset_spec("CIFAR10")
    pixels = torch.rand(20, 3, 32, 32)
    labels = torch.arange(10).repeat(2)
    stored = normalize(pixels, spec.mean, spec.std)
    meta = make_meta(spec, space="normalized", ipc=2, method="test")
    save_synset(SyntheticSet({"images": stored}, labels, meta, lr=torch.tensor(0.03)), tmp_path / "s")
    out = ddranking.export_tensors(load_synset(tmp_path / "s"))
    assert out["space"] == "normalized" and list(out["mean"]) == list(spec.mean)
    assert torch.allclose(out["images"], stored) and torch.allclose(out["images_pixel"], pixels, atol=1e-5)
    assert out["labels"].tolist() == labels.tolist() and out["lr"] == pytest.approx(0.03)
    assert out["soft_labels"] is None
