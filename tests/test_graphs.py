"""CUDA graphs for eager ATS models at inference (ats_fx/graphs.py). The replay tests need a GPU; the
decision of when a call replays is tested everywhere."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.utils._pytree as pytree

import ats_fx
from ats_fx import dispatch, graphs
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
        assert dispatch.graphs_apply(True, False, "auto", "ats", (y,))  # autograd on: replayed as one node


class _StandInReplay:
    """On the CPU no call replays a graph: stand in for one (the forward pass under static padding,
    without autograd, outputs copied), and count the replays."""

    def __init__(self, monkeypatch, perturb: bool = False):
        self.calls, self.perturb = 0, perturb
        monkeypatch.setattr(dispatch, "graphs_apply", lambda enabled, training, *a: enabled and not training)
        monkeypatch.setattr(graphs.GraphCache, "__call__", self.replay)

    def replay(self, forward, stages, inputs):  # patched on the class, but bound to the stand-in
        self.calls += 1
        assert not torch.is_grad_enabled()
        with dispatch.static_padding():
            out = forward(*inputs)
        if self.perturb:  # as if rounding had moved a token: the recompute will keep other positions
            stage = stages()[0]
            stage.last = dataclasses.replace(stage.last, positions=stage.last.positions.flip(-1))
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


def _grads(model, x, out):
    loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum()
    wanted = [x] + [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, wanted, allow_unused=True)


def test_autograd_on_call_replays_and_its_backward_recomputes_the_pass(monkeypatch, caplog):
    replay = _StandInReplay(monkeypatch)
    model = timm_model("vit_tiny_patch16_224", img_size=48, patch_size=8).double().eval()
    ats = ats_fx.transform(model, "1-3", ratio=0.5)
    plain = ats_fx.transform(model, "1-3", ratio=0.5, padding="static", cuda_graphs=False)
    x = torch.randn(3, 3, 48, 48, dtype=torch.float64, requires_grad=True)
    out = ats(x)  # autograd on, eval mode: replayed, as one autograd node
    assert replay.calls == 1 and type(out.grad_fn).__name__ == "_ReplayedBackward"
    want = plain(x)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    kept = [t.positions.clone() for t in ats_fx.kept_tokens(ats)]
    with caplog.at_level("INFO", logger="ats_fx.api"):
        got = _grads(ats, x, out)
    for g, w in zip(got, _grads(plain, x, want)):  # the recompute differentiates the same pass
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, t.positions) for a, t in zip(kept, ats_fx.kept_tokens(ats)))  # the call's trace
    assert [r for r in caplog.records if "now run eagerly" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    again = ats(x)  # being differentiated: autograd-on calls run eagerly from now on
    assert replay.calls == 1 and type(again.grad_fn).__name__ != "_ReplayedBackward"
    with torch.no_grad():
        ats(x)
    assert replay.calls == 2


def test_autograd_on_call_with_nothing_to_differentiate_replays_without_a_node(monkeypatch):
    replay = _StandInReplay(monkeypatch)
    model = timm_model("vit_tiny_patch16_224", img_size=48, patch_size=8).eval().requires_grad_(False)
    ats = ats_fx.transform(model, "1-3", ratio=0.5)
    out = ats(torch.randn(2, 3, 48, 48))
    assert replay.calls == 1 and out.grad_fn is None and not out.requires_grad
    training = ats_fx.transform(model.train(), "1-3", ratio=0.5)
    training(torch.randn(2, 3, 48, 48))
    assert replay.calls == 1  # train mode never replays


def test_replayed_token_output_differentiates_its_tokens(monkeypatch):
    _StandInReplay(monkeypatch)
    model = timm_model("vit_tiny_patch16_224", img_size=48, patch_size=8, global_pool="", num_classes=0).double()
    ats = ats_fx.transform(model, "1-3", ratio=0.5, token_output="kept")
    plain = ats_fx.transform(model, "1-3", ratio=0.5, token_output="kept", padding="static", cuda_graphs=False)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    got, want = ats(x), plain(x)
    assert torch.equal(got.positions, want.positions) and not got.positions.requires_grad
    params = [p for p in ats.parameters()]
    g = torch.autograd.grad(got.tokens.square().sum(), params, allow_unused=True)
    w = torch.autograd.grad(want.tokens.square().sum(), list(plain.parameters()), allow_unused=True)
    assert sum(a is not None for a in g) > 10
    for a, b in zip(g, w):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-12, atol=1e-12))


def test_recompute_that_keeps_other_tokens_warns(monkeypatch, caplog):
    _StandInReplay(monkeypatch, perturb=True)
    model = timm_model("vit_tiny_patch16_224", img_size=48, patch_size=8).eval()
    ats = ats_fx.transform(model, "1-3", ratio=0.5)
    out = ats(torch.randn(2, 3, 48, 48))
    with caplog.at_level("WARNING", logger="ats_fx.api"):
        out.sum().backward()
    noted = [r.getMessage() for r in caplog.records if "recompute kept other tokens" in r.getMessage()]
    assert len(noted) == 1 and "positions differ" in noted[0] and "cuda_graphs=False" in noted[0]
    assert sum(p.grad is not None for p in ats.parameters()) > 10


def test_deepcopy_of_a_model_holding_graphs_starts_without_them():
    # A captured CUDA graph cannot be copied: the copy gets an empty cache, the original keeps its own.
    class Uncopyable:
        def __deepcopy__(self, memo):
            raise TypeError("cannot pickle 'CUDAGraph' object")

    model = timm_model("vit_tiny_patch16_224", img_size=48, patch_size=8)
    ats = ats_fx.transform(model, "1-3", ratio=0.5)
    ats._ats_graphs.graphs["shape"] = Uncopyable()
    twin = copy.deepcopy(ats)
    assert not twin._ats_graphs.graphs and twin._ats_graphs is not ats._ats_graphs and "shape" in ats._ats_graphs.graphs
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), ats(x))


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


@cuda
def test_autograd_on_replay_equals_eager_and_differentiates_like_it():
    model, graphed, _ = _models()
    plain = ats_fx.transform(model, range(1, 4), ratio=0.5, padding="static", cuda_graphs=False).cuda()
    x = torch.randn(3, 3, 64, 64, device="cuda", requires_grad=True)
    out, want = graphed(x), plain(x)
    assert type(out.grad_fn).__name__ == "_ReplayedBackward" and len(graphed._ats_graphs.graphs) == 1
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(a.kept, b.kept) for a, b in zip(ats_fx.kept_tokens(graphed), ats_fx.kept_tokens(plain)))
    w = torch.linspace(-1, 1, out.shape[-1], device="cuda")
    got = torch.autograd.grad((out * w).sum(), [x, *graphed.parameters()], allow_unused=True)
    ref = torch.autograd.grad((want * w).sum(), [x, *plain.parameters()], allow_unused=True)
    for a, b in zip(got, ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    assert graphed(x).grad_fn is not None and type(graphed(x).grad_fn).__name__ != "_ReplayedBackward"
