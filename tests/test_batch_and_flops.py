"""Batch invariance (ATS-NOTES §5), GFLOPs that fall with rho, and the kept-token trace."""
from __future__ import annotations

import pytest
import torch

import ats_fx
from conftest import hf_vit, timm_model


def test_batch_invariance_on_mixed_images():
    model = timm_model("deit_small_patch16_224", img_size=64, depth=6).double()
    ats = ats_fx.transform(model, range(2, 6), ratio=0.6)
    g = torch.Generator().manual_seed(3)
    # a mixed batch: noise, smooth images, a constant image, a high-contrast image
    smooth = torch.nn.functional.interpolate(torch.randn(2, 3, 8, 8, generator=g), size=64, mode="bilinear")
    x = torch.cat([torch.randn(2, 3, 64, 64, generator=g), smooth, torch.zeros(1, 3, 64, 64),
                   torch.randn(1, 3, 64, 64, generator=g) * 5]).double()
    batched = ats(x)
    kept = torch.stack([t.kept for t in ats_fx.kept_tokens(ats)])
    assert (kept.max(1).values > kept.min(1).values).any(), "images should keep different K'"
    alone = torch.cat([ats(img[None]) for img in x])
    torch.testing.assert_close(batched, alone)


def test_gflops_fall_as_rho_falls():
    model = timm_model("deit_small_patch16_224", img_size=64, depth=6)
    x = torch.randn(4, 3, 64, 64)
    dense = ats_fx.count_flops(model, x)
    prev = dense.mean()
    for rho in (1.0, 0.7, 0.4):
        flops = ats_fx.count_flops(ats_fx.transform(model, range(1, 6), ratio=rho), x)
        assert (flops < dense).all()
        # per image K' is adaptive (not monotone image by image); the mean cost falls with rho
        assert flops.mean() < prev, (rho, flops, prev)
        prev = flops.mean()
    # dense matches the analytic count of a ViT (MACs): patch embedding + blocks + head
    d, n, hidden = 64, 17, 256
    block = n * (4 * d * d + 2 * d * hidden) + 2 * n * n * d
    analytic = (16 * d * 16 * 16 * 3 + 6 * block + d * 1000) / 1e9
    torch.testing.assert_close(dense, torch.full((4,), analytic, dtype=torch.float64), rtol=1e-3, atol=0)


def test_trace_positions_are_consistent():
    model = hf_vit("sdpa")
    ats = ats_fx.transform(model, [0, 2], ratio=0.5)
    ats(torch.randn(4, 3, 64, 64))
    first, second = ats_fx.kept_tokens(ats)
    for b in range(4):
        p1 = first.positions[b][first.positions[b] >= 0].tolist()
        p2 = second.positions[b][second.positions[b] >= 0].tolist()
        assert p1[0] == 0 and p2[0] == 0
        assert set(p2) <= set(p1), "a later stage keeps a subset of the earlier one's tokens"
        assert p2 == sorted(p2)
        assert len(p2) == second.kept[b] + 1
    assert (first.tokens_in == 65).all()
    assert (second.tokens_in == first.tokens_out).all()


def test_static_padding_has_fixed_shapes_and_same_logits():
    model = timm_model("vit_tiny_patch16_224", img_size=64).double()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    a = ats_fx.transform(model, range(1, 4), ratio=0.5, padding="batch_max")
    s = ats_fx.transform(model, range(1, 4), ratio=0.5, padding="static")
    torch.testing.assert_close(a(x), s(x))
    widths = [t.positions.shape[1] for t in ats_fx.kept_tokens(s)]
    # K + p: max(round(0.5 * 17), 8) = 9 (half rounds up), then max(round(0.5 * 10), 8) = 8 twice
    assert widths == [9 + 1, 8 + 1, 8 + 1]


def test_training_gradients_flow():
    model = timm_model("vit_tiny_patch16_224", img_size=32).train()
    ats = ats_fx.transform(model, range(1, 4), ratio=0.5)
    assert ats.training
    loss = ats(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in ats.parameters()]
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads)


def test_flops_of_cait_count_and_fall():
    """FlopCounterMode on CaiT (a parameter view passed between blocks) counts dense and ATS."""
    import timm

    import ats_fx

    model = timm.create_model("cait_xxs24_224", depth=2, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    dense = ats_fx.count_flops(model, x)
    ats = ats_fx.count_flops(ats_fx.transform(model, "0-1", ratio=0.5), x)
    assert (ats < 0.8 * dense).all() and all(p.requires_grad for p in model.parameters())


def test_static_padding_counts_the_rows_it_runs():
    """At rho=1.0 static padding runs every row (dense FLOPs, plus the class row's scoring), while
    batch_max counts only the rows ATS keeps; where K + p is under the token count static saves too."""
    from conftest import timm_model

    def gflops(model, x, **kw):
        return float(ats_fx.count_flops(ats_fx.transform(model, **kw) if kw else model, x).mean())

    base = timm_model("vit_tiny_patch16_224", img_size=64, depth=12)
    x = torch.randn(4, 3, 64, 64)
    dense = gflops(base, x)
    static = gflops(base, x, stages="3-11", ratio=1.0, padding="static")
    assert static == pytest.approx(dense, rel=0.02)
    assert gflops(base, x, stages="3-11", ratio=1.0, padding="batch_max") < static
    wide = timm_model("vit_tiny_patch16_224", img_size=128, depth=12)  # 64 patch tokens: K=48 drops rows
    x = torch.randn(4, 3, 128, 128)
    static = gflops(wide, x, stages=3, k=48, padding="static")
    assert gflops(wide, x, stages=3, k=48, padding="batch_max") <= static < 0.9 * gflops(wide, x)


@pytest.mark.parametrize("padding", ["batch_max", "static"])
def test_flops_of_the_triton_attention_equal_the_reference_count(monkeypatch, padding):
    """``ats_fx::attention_rows`` (the Triton attention the CUDA path runs, here under the interpreter)
    carries a FLOP formula, so ``count_flops`` counts what the reference path counts on the CPU.
    Without it the kept rows' attention counted nothing on CUDA (GPU FLOPs ratios came out high)."""
    from torch.utils import flop_counter

    model = timm_model("deit_small_patch16_224", img_size=64, depth=4)
    x = torch.randn(2, 3, 64, 64)
    ref = ats_fx.count_flops(ats_fx.transform(model, "1-3", ratio=0.7, padding=padding, kernels="reference"), x)
    fast = ats_fx.transform(model, "1-3", ratio=0.7, padding=padding, kernels="triton")
    torch.testing.assert_close(ats_fx.count_flops(fast, x), ref, rtol=1e-12, atol=0)
    monkeypatch.delitem(flop_counter.flop_registry, torch.ops.ats_fx.attention_rows)
    assert (ats_fx.count_flops(fast, x) < 0.99 * ref).all()  # the count the formula adds is real
