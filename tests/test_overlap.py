"""The overlapped static stage (``ats_fx/overlap.py``): sampling on a side stream beside every
row's attention, then a gather of the kept rows. It must give exactly what the sequential stage
gives (same kept tokens, same rows), eagerly, compiled and under FlopCounterMode. On the CPU
the same steps run on Triton's interpreter without streams (``dispatch.OVERLAP = "on"``)."""
from __future__ import annotations

import pytest
import torch

import ats_fx
from ats_fx import dispatch, library
from ats_fx.passes import defer as defer_pass
from ats_fx.kernels import reference
from ats_fx.kernels.attention_rows import launch_attention
from ats_fx.kernels.gather_rows import gather_rows
from ats_fx.kernels.sample import sample_with_budget
from ats_fx.kernels.scores import head_scores
from conftest import MODELS, logits
from test_defer import _stages
from test_kernels import DEVICE, padding_mask, qkv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("B,H,T,D,W", [(2, 3, 37, 16, 20), (1, 5, 50, 24, 50), (3, 2, 9, 64, 1)])
def test_gather_rows_kernel(B, H, T, D, W, dtype):
    x, _, _ = qkv(B, H, T, D, dtype)  # strided like a fused projection
    index = torch.randint(0, T, (B, W), generator=torch.Generator().manual_seed(W)).to(DEVICE)
    got = gather_rows(x, index)
    assert torch.equal(got, reference.gather_rows(x, index))
    assert got.transpose(1, 2).is_contiguous()  # (B, W, H, dh) memory, as attention_rows returns


@pytest.mark.parametrize("masked", [False, True], ids=["first-stage", "padded"])
@pytest.mark.parametrize("prefix,ratio,k", [(1, 0.7, None), (2, None, 9), (1, 1.0, None)])
def test_overlapped_stage_equals_sequential_kernels(masked, prefix, ratio, k):
    B, H, T, D = 3, 4, 41, 16
    q, k_, v = qkv(B, H, T, D, torch.float32)
    mask = padding_mask(B, T) if masked else None
    scale = D**-0.5
    width = reference.static_budget(T, prefix, ratio, k) + prefix
    # The input token set's original positions (-1 at padding), as a later stage receives them.
    given = torch.randperm(3 * T, generator=torch.Generator().manual_seed(1))[:B * T].reshape(B, T).to(DEVICE)
    given = given if mask is None else torch.where(mask, given, -1)
    out, index, kept_mask, kept, budget, positions = library.overlapped_stage(
        q, k_, v, mask, prefix, scale, ratio, k, "attn_vnorm", width, positions=given)
    heads = head_scores(q, k_, v, mask, scale)
    i2, m2, k2, b2, _, _ = sample_with_budget(heads, mask, prefix, ratio, k, width, None, stats=False)
    assert torch.equal(index, i2) and torch.equal(kept_mask, m2) and torch.equal(kept, k2) and torch.equal(budget, b2)
    # The sampling kernel writes the kept rows' original positions, as the stage's gather and where did.
    assert torch.equal(positions, torch.where(kept_mask, given.gather(1, index), -1))
    first = library.overlapped_stage(q, k_, v, mask, prefix, scale, ratio, k, "attn_vnorm", width)[5]
    assert torch.equal(first, torch.where(kept_mask, index, -1))
    assert kept_mask.dtype == torch.bool and out.shape == (B, H, width, D)
    torch.testing.assert_close(out, launch_attention(q, k_, v, i2, mask, scale, width), atol=1e-5, rtol=1e-5)
    # and the paper's math in float64 at the kept rows (padding rows are masked downstream)
    want = reference.ats_attention(q.double(), k_.double(), v.double(), mask, num_prefix=prefix, scale=scale,
                                   ratio=ratio, k_tokens=k, padding="static")
    assert torch.equal(want.index, index)
    rows = kept_mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out.double()[rows], want.out[rows], atol=1e-5, rtol=1e-5)


def _stage_ops(model) -> list:
    return [n.target for n in model.graph.nodes if n.op == "call_module" and "ats" in n.target]


@pytest.mark.parametrize("defer", [True, False], ids=["deferred-gather", "gather-in-stage"])
@pytest.mark.parametrize("name", ["timm_deit_small", "timm_deit3_layerscale", "hf_vit_sdpa", "torchvision_vit",
                                  "hf_dinov2", "timm_beit", "hf_beit"])
def test_model_overlapped_equals_sequential(name, defer, overlap_mode, monkeypatch):
    """The whole model, overlapped (with the gather deferred to the residual add, passes/defer.py,
    or in the stage) against the sequential stage: same kept tokens, same logits."""
    factory, _, chw = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = factory().to(DEVICE)
        x = torch.randn(2, *chw).to(DEVICE)
    monkeypatch.setattr(defer_pass, "ENABLED", defer)
    # op by op: a CUDA graph's warm-up and capture would call each stage (and its hook) again
    ats = ats_fx.transform(model, "1-3", ratio=0.6, padding="static", kernels="triton", cuda_graphs=False)
    stages = _stages(ats)
    assert [s.defer_gather for s in stages] == [defer] * 3
    every_row = []  # each stage call's fifth output: True when it returned every row
    for stage in stages:
        stage.register_forward_hook(lambda m, args, out: every_row.append(out[4]))
    outs, kept = {}, {}
    calls = []
    real = library._overlapped_direct

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    for mode in ("off", "on"):
        overlap_mode(mode)
        every_row.clear()
        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(library, "_overlapped_direct", counted)
            outs[mode] = logits(ats(x))
        kept[mode] = [t.positions for t in ats_fx.kept_tokens(ats)]
        assert len(calls) == (3 if mode == "on" else 0), "every stage runs overlapped in mode 'on', none in 'off'"
        assert every_row == [defer and mode == "on"] * 3
    for a, b in zip(kept["on"], kept["off"]):
        assert torch.equal(a, b)
    torch.testing.assert_close(outs["on"], outs["off"], atol=1e-5, rtol=1e-5)


def _overlaps(q, k, width: int, kernels: str, dropout_p: float) -> bool:
    return dispatch.stage_path(q, k, q, None, class_token=True, width=width, kernels=kernels, selection="ats",
                               dropout_p=dropout_p, bias=None, mix=None) == "overlapped"


def test_training_and_batch_max_never_overlap(overlap_mode):
    overlap_mode("on")
    q = torch.randn(1, 2, 9, 8, device=DEVICE)
    assert _overlaps(q, q, 5, "triton", 0.0)
    assert not _overlaps(q, q, -1, "triton", 0.0)  # batch_max: width unknown
    assert not _overlaps(q, q, 5, "triton", 0.1)  # dropout
    assert not _overlaps(q, q, 5, "reference", 0.0)
    w = q.clone().requires_grad_()
    assert not _overlaps(w, q, 5, "triton", 0.0)  # a gradient: SDPA has the backward
    with torch.no_grad():
        assert _overlaps(w, q, 5, "triton", 0.0)
    table = torch.randn(2, 9, 9, device=DEVICE)  # a position bias table (BEiT) overlaps too
    assert dispatch.stage_path(q, q, q, None, class_token=True, width=5, kernels="triton", selection="ats",
                               dropout_p=0.0, bias=table, mix=None) == "overlapped"
    assert dispatch.stage_path(q, q, q, None, class_token=True, width=5, kernels="triton", selection="ats",
                               dropout_p=0.0, bias=table.requires_grad_(), mix=None) == "sampled"
    overlap_mode("off")
    assert not _overlaps(q, q, 5, "triton", 0.0)
    overlap_mode("auto")
    if DEVICE == "cpu":
        assert not _overlaps(q, q, 5, "triton", 0.0)  # auto: CUDA only


def test_every_stage_path_is_decided_in_one_place():
    """Talking heads or no prefix: the attention weights; a baseline selection; else sampled."""
    q = torch.randn(1, 2, 9, 8)
    common = dict(width=5, kernels="reference", dropout_p=0.0, bias=None)
    assert dispatch.stage_path(q, q, q, None, class_token=False, selection="ats", mix=None, **common) == "weights"
    assert dispatch.stage_path(q, q, q, None, class_token=True, selection="ats", mix=(q,), **common) == "weights"
    assert dispatch.stage_path(q, q, q, None, class_token=True, selection="topk", mix=None, **common) == "baseline"
    assert dispatch.stage_path(q, q, q, None, class_token=True, selection="ats", mix=None, **common) == "sampled"


def test_compiled_overlapped_stage_matches_eager(overlap_mode, monkeypatch):
    """Under torch.compile the stage is the registered op ``ats_fx::overlapped_stage`` (opaque to
    Inductor; it returns every row and the add gathers, passes/defer.py), one graph, and the output
    equals the eager overlapped model's and the eager sequential model's."""
    overlap_mode("on")
    torch._dynamo.reset()
    factory, _, chw = MODELS["timm_deit_small"]
    model = factory().to(DEVICE)
    # no CUDA graphs on a GPU: a replay would keep the stage it captured when the test switches overlap off
    options = {"stages": "1-3", "ratio": 0.6, "padding": "static", "kernels": "triton", "cuda_graphs": False}
    eager = ats_fx.transform(model, **options)
    calls = []
    real = library._overlapped_direct

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(library, "_overlapped_direct", counted)
    graphs = []

    def backend(gm, example_inputs, **kw):
        from ats_fx.compile import ats_backend

        graphs.append(gm)
        return ats_backend(gm, example_inputs, options=options)

    compiled = torch.compile(model, backend=backend)
    try:
        with torch.no_grad():
            for seed in range(2):
                x = torch.randn(2, *chw, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
                got = logits(compiled(x))
                torch.testing.assert_close(got, logits(eager(x)), atol=1e-4, rtol=1e-4)
                overlap_mode("off")  # and the sequential stage's logits: the reference of the math
                torch.testing.assert_close(got, logits(eager(x)), atol=1e-4, rtol=1e-4)
                overlap_mode("on")
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    assert len(calls) == 2 * 3 * 2  # two calls, three stages, the compiled and the eager model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream runs beside the main one on a GPU only")
@pytest.mark.parametrize("graphs", [False, True], ids=["launches", "cuda-graph"])
@pytest.mark.parametrize("late_join", [True, False], ids=["join-after-projection", "join-before"])
@pytest.mark.parametrize("name", ["timm_deit_small", "timm_beitv2", "hf_vit_sdpa"])
def test_overlapped_streams_on_a_gpu_agree_with_sequential_on_every_call(name, late_join, graphs, overlap_mode,
                                                                         monkeypatch):
    """On CUDA the sampling runs on a side stream while the main one attends (and, joined after the
    projection, projects): a missing wait or a buffer reused across the streams would show as calls
    that disagree with each other or with the sequential stage."""
    from ats_fx import overlap

    monkeypatch.setattr(overlap, "JOIN_AFTER_PROJECTION", late_join)
    factory, _, chw = MODELS[name]
    torch.manual_seed(0)
    model = factory().cuda().half().eval()
    x = torch.randn(4, *chw, device="cuda", dtype=torch.half)
    with torch.no_grad():
        overlap_mode("off")
        sequential = logits(ats_fx.transform(model, "1-3", ratio=0.6, padding="static", cuda_graphs=False)(x)).float()
        overlap_mode("auto")
        ats = ats_fx.transform(model, "1-3", ratio=0.6, padding="static", cuda_graphs=graphs)
        outs = [logits(ats(x)).float() for _ in range(20)]
    assert all(torch.equal(out, outs[0]) for out in outs)
    torch.testing.assert_close(outs[0], sequential, atol=2e-2, rtol=2e-2)
