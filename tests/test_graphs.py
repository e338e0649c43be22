"""CUDA graphs for eager ATS models at inference (ats_fx/graphs.py). The replay tests need a GPU; the
decision of when a call replays is tested everywhere."""
from __future__ import annotations

import copy

import pytest
import torch

import ats_fx
from ats_fx import dispatch
from conftest import timm_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_graphs_apply_only_at_inference_on_cuda_without_tracing():
    x = torch.randn(2, 3)
    with torch.no_grad():
        assert not dispatch.graphs_apply(True, False, "auto", "ats", (x,))  # CPU
    if torch.cuda.is_available():
        y = x.cuda()
        with torch.no_grad():
            assert dispatch.graphs_apply(True, False, "auto", "ats", (y,))
            assert not dispatch.graphs_apply(False, False, "auto", "ats", (y,))  # cuda_graphs=False
            assert not dispatch.graphs_apply(True, True, "auto", "ats", (y,))  # train mode
            assert not dispatch.graphs_apply(True, False, "batch_max", "ats", (y,))
            assert not dispatch.graphs_apply(True, False, "auto", "topk", (y,))
        assert not dispatch.graphs_apply(True, False, "auto", "ats", (y,))  # autograd on


def test_inference_with_autograd_on_warns_once_that_graphs_need_no_grad(monkeypatch, caplog):
    # On the CPU no call replays a graph: pretend this one would, but for autograd.
    monkeypatch.setattr(dispatch, "graphs_apply", lambda enabled, *a: enabled and not torch.is_grad_enabled())
    model = timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    ats = ats_fx.transform(model, "1-3", ratio=0.5)
    with caplog.at_level("WARNING", logger="ats_fx.api"):
        first, second = ats(x), ats(x)
    noted = [r for r in caplog.records if "autograd on" in r.getMessage()]
    assert len(noted) == 1 and "torch.inference_mode()" in noted[0].getMessage()
    assert first.requires_grad and torch.equal(first, second)
    plain = ats_fx.transform(model, "1-3", ratio=0.5, cuda_graphs=False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="ats_fx.api"):
        plain(x)
    assert not [r for r in caplog.records if "autograd on" in r.getMessage()]


def test_static_padding_block_fixes_auto_padding():
    q = torch.randn(1, 2, 20, 8)
    assert dispatch.padding_for("auto", q, 10) == "batch_max"
    with dispatch.static_padding():
        assert dispatch.padding_for("auto", q, 10) == "static"
        assert dispatch.padding_for("batch_max", q, 10) == "batch_max"


def _models(name="deit_small_patch16_224", **kw):
    model = timm_model(name, img_size=64).cuda().eval()
    graphed = ats_fx.transform(model, range(1, 4), ratio=0.5, **kw).cuda()
    plain = ats_fx.transform(model, range(1, 4), ratio=0.5, cuda_graphs=False, **kw).cuda()
    return model, graphed, plain


@cuda
@pytest.mark.parametrize("name", ["deit_small_patch16_224", "vit_base_patch16_reg4_gap_256", "beitv2_base_patch16_224"])
def test_replayed_forward_equals_eager_on_fresh_inputs(name):
    _, graphed, plain = _models(name)
    with torch.no_grad():
        for batch in (1, 3, 3, 5, 3):  # capture, replay, new shapes, replay again
            x = torch.randn(batch, 3, 64, 64, device="cuda")
            got = graphed(x)
            want = plain(x)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            kept = [t.kept for t in ats_fx.kept_tokens(graphed)]
            assert all(torch.equal(a, t.kept) for a, t in zip(kept, ats_fx.kept_tokens(plain)))
    assert len(graphed._ats_graphs.graphs) == 3 and not graphed._ats_graphs.failed


@cuda
def test_outputs_are_not_overwritten_by_the_next_replay():
    _, graphed, _ = _models()
    with torch.no_grad():
        a_in, b_in = torch.randn(2, 3, 64, 64, device="cuda"), torch.randn(2, 3, 64, 64, device="cuda")
        a = graphed(a_in)
        a_copy = a.clone()
        graphed(b_in)
    assert torch.equal(a, a_copy)


@cuda
def test_moving_the_model_drops_its_graphs_and_training_runs_eagerly():
    model, graphed, plain = _models()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        graphed(x)
    graphed.half()
    assert not graphed._ats_graphs.graphs
    with torch.no_grad():
        torch.testing.assert_close(graphed(x.half()), plain.half()(x.half()), atol=2e-2, rtol=2e-2)
    out = graphed.float()(x)  # autograd on: eager, with a graph to differentiate
    assert out.grad_fn is not None
    copied = copy.deepcopy(graphed)
    assert not copied._ats_graphs.graphs


@cuda
def test_ats_backend_replays_cuda_graphs_without_a_mode_and_hands_out_copies():
    model = timm_model("deit_small_patch16_224", img_size=64).cuda().eval()
    plain = ats_fx.transform(model, range(1, 4), ratio=0.5, padding="static", cuda_graphs=False).cuda()
    compiled = torch.compile(model, backend="ats", options={"stages": "1-3", "ratio": 0.5})
    off = torch.compile(copy.deepcopy(model), backend="ats", options={"stages": "1-3", "ratio": 0.5,
                                                                      "cuda_graphs": False})
    with torch.no_grad():
        xs = [torch.randn(4, 3, 64, 64, device="cuda") for _ in range(4)]
        outs = [compiled(x) for x in xs]  # kept across calls: no "overwritten by a subsequent run"
        for x, out in zip(xs, outs):
            torch.testing.assert_close(out, plain(x), atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(off(x), plain(x), atol=2e-3, rtol=2e-3)
