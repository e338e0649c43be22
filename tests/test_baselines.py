"""The paper's baselines (top-K, random K) that the accuracy curves compare ATS against."""
import pytest
import timm
import torch

import ats_fx
from ats_fx.errors import ATSConfigError
from ats_fx.kernels import reference
from ats_fx.testing import eager


def test_top_k_keeps_the_highest_scores_prefix_first_in_original_order():
    scores = torch.tensor([[0.0, 0.1, 0.4, 0.05, 0.3, 0.15],
                           [0.0, 0.5, 0.1, 0.2, 0.2, 0.0]])
    mask = torch.tensor([[True] * 6, [True, True, True, True, True, False]])
    budget = torch.tensor([3, 2])
    index, out_mask, kept = reference.top_k_select(scores, mask, budget, num_prefix=1)
    assert kept.tolist() == [3, 2]
    assert index[0].tolist() == [0, 2, 4, 5]  # 0.4, 0.3, 0.15 in position order
    assert index[1, :3].tolist() == [0, 1, 3]  # 0.5, then the first of the tied 0.2s
    assert out_mask.tolist() == [[True] * 4, [True, True, True, False]]


def test_top_k_never_picks_padding_even_with_a_large_budget():
    scores = torch.rand(4, 9)
    mask = torch.arange(9)[None, :] < torch.tensor([[9], [5], [3], [9]])
    index, out_mask, kept = reference.top_k_select(scores, mask, torch.full((4,), 20), num_prefix=1)
    assert kept.tolist() == [8, 4, 2, 8]
    assert bool(mask.gather(1, index)[out_mask].all())


@pytest.mark.parametrize("selection", ["topk", "random"])
def test_baselines_keep_exactly_k_tokens(selection):
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=5).eval()
    ats = ats_fx.transform(model, "2-5", k=[12, 10, 8, 6], selection=selection)
    with torch.no_grad():
        ats(torch.randn(3, 3, 64, 64))
    trace = ats_fx.kept_tokens(ats)
    assert [t.kept.tolist() for t in trace] == [[12] * 3, [10] * 3, [8] * 3, [6] * 3]
    for t in trace:  # unique positions per image
        for row in t.positions:
            real = row[row >= 0].tolist()
            assert len(set(real)) == len(real) and real[0] == 0


def test_random_selection_differs_between_draws_and_follows_the_seed():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=5).eval()
    ats = ats_fx.transform(model, 2, k=10, selection="random")
    x = torch.randn(2, 3, 64, 64)
    picks = []
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        with torch.no_grad():
            ats(x)
        picks.append(ats_fx.kept_tokens(ats)[0].positions.clone())
    assert not torch.equal(picks[0], picks[1])
    assert torch.equal(picks[0], picks[2])


def test_top_k_model_matches_the_eager_per_image_reference():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=5).double().eval()
    ats = ats_fx.transform(model, "1-5", ratio=0.6, selection="topk", example_inputs=torch.randn(1, 3, 64, 64).double())
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    stages = {i: {"ratio": 0.6, "selection": "topk"} for i in range(1, 6)}
    with torch.no_grad():
        got = ats(x)
        want = torch.stack([eager.timm_forward(model, img, stages) for img in x])
    torch.testing.assert_close(got, want)


def test_top_k_spends_more_tokens_than_ats_at_the_same_k():
    """ATS keeps K' <= K unique tokens; top-K always keeps K: the curves compare per GFLOP."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=5).eval()
    with torch.no_grad():  # sharpen attention so ATS repeats picks
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(6)
    x = torch.randn(3, 3, 64, 64)
    kept = {}
    for selection in ("ats", "topk"):
        ats = ats_fx.transform(model, 2, k=12, selection=selection)
        with torch.no_grad():
            ats(x)
        kept[selection] = ats_fx.kept_tokens(ats)[0].kept
    assert (kept["topk"] == 12).all() and (kept["ats"] <= 12).all() and (kept["ats"] < 12).any()


def test_unknown_selection_and_compiled_baselines_are_refused():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=5).eval()
    with pytest.raises(ATSConfigError, match="selection='best'"):
        ats_fx.transform(model, 2, selection="best")
    ats = ats_fx.transform(model, 2, selection="topk")
    with pytest.raises(Exception, match="eager-only"):
        torch.export.export(ats, (torch.randn(2, 3, 64, 64),))
