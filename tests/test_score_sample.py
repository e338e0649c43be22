"""The one-launch stage front (``kernels/score_sample.py``: head logits, then each image's sampling in
its last program) against the two launches it replaces and against the PyTorch reference
(CPU: Triton's interpreter, where programs run one after another; GPU: native, where they race)."""
from __future__ import annotations

import pytest
import torch

from ats_fx import library
from ats_fx.kernels import reference, score_sample
from ats_fx.kernels.sample import sample_with_budget
from ats_fx.kernels.scores import head_scores

from test_kernels import DEVICE, padding_mask, qkv


def holes_mask(B, T, seed=0):
    """Real keys that are not one run: random holes after the class token (a user's mask)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = True
    return mask.to(DEVICE)


def two_launches(q, k, v, mask, p, ratio, k_tokens, width, stats):
    heads = head_scores(q, k, v, mask, q.shape[-1] ** -0.5)
    return sample_with_budget(heads, mask, p, ratio, k_tokens, width, None, stats=stats)


def one_launch(q, k, v, mask, p, ratio, k_tokens, width, stats):
    return score_sample.score_and_sample(q, k, v, mask, q.shape[-1] ** -0.5, "attn_vnorm", p, ratio, k_tokens,
                                         width, stats)


@pytest.mark.parametrize("B,H,T,D,p", [(1, 6, 197, 64, 1), (3, 4, 65, 16, 1), (4, 3, 40, 24, 2), (2, 5, 33, 8, 1)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("mask_kind", ["none", "one-run", "holes"])
@pytest.mark.parametrize("budget", ["rho", "k"])
def test_one_launch_equals_two_launches(B, H, T, D, p, mask_kind, budget):
    """Every output (index, mask, kept, budget, stats, fallback flags) is the two launches' own, for
    several token chunks per head (T > 32), one image or several, and masks of any shape."""
    q, k, v = qkv(B, H, T, D, torch.float32, seed=B * T)
    mask = {"none": None, "one-run": padding_mask(B, T, seed=2), "holes": holes_mask(B, T, seed=3)}[mask_kind]
    ratio, k_tokens = (0.7, None) if budget == "rho" else (None, 12)
    for width in (None, reference.static_budget(T, p, ratio, k_tokens) + p):
        got = one_launch(q, k, v, mask, p, ratio, k_tokens, width, True)
        want = two_launches(q, k, v, mask, p, ratio, k_tokens, width, True)
        for name, g, w in zip(("index", "mask", "kept", "budget", "stats", "bad"), got, want):
            assert torch.equal(g, w), name


def test_one_launch_equals_the_reference():
    """Against the PyTorch reference: scores, budget, then inverse-transform sampling."""
    B, H, T, D, p = 3, 4, 70, 16, 1
    q, k, v = qkv(B, H, T, D, torch.float32, seed=5)
    mask = padding_mask(B, T, seed=4)
    index, out_mask, kept, budget, _, bad = one_launch(q, k, v, mask, p, 0.6, None, None, False)
    scores, want_bad = reference.class_token_scores(q, k, v, mask, p, D**-0.5, with_bad=True)
    want_budget = reference.token_budget(mask, B, T, p, 0.6, None, q.device)
    want = reference.inverse_transform_sample(scores, mask, want_budget, p, None)
    assert torch.equal(budget, want_budget)
    assert torch.equal(bad.bool(), want_bad)
    assert torch.equal(kept, want[2])
    width = index.shape[1]
    assert torch.equal(index[:, : want[0].shape[1]] * want[1], want[0] * want[1])
    assert torch.equal(out_mask[:, : want[1].shape[1]], want[1])
    assert not out_mask[:, want[1].shape[1]:width].any()


def test_one_launch_flags_nan_rows_and_falls_back_to_uniform():
    B, H, T, D, p = 3, 4, 65, 16, 1
    q, k, v = qkv(B, H, T, D, torch.float32, seed=6)
    q = q.clone()
    q[2, 1, 0, 0] = float("nan")
    got = one_launch(q, k, v, None, p, 0.6, None, None, True)
    want = two_launches(q, k, v, None, p, 0.6, None, None, True)
    assert got[5].tolist() == [0, 0, 1] and got[4][1] == 1
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("enabled", [True, False], ids=["one-launch", "two-launches"])
@pytest.mark.parametrize("width", [-1, 30])
def test_library_front_switch(monkeypatch, enabled, width):
    """The library's stage front takes the one launch when enabled (from MIN_BATCH images) and the
    two launches otherwise, with the same result either way; strict batch_max still raises on NaN."""
    calls = []
    real = score_sample.score_and_sample
    monkeypatch.setattr(score_sample, "score_and_sample", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(score_sample, "ENABLED", enabled)
    B, H, T, D, p = 2, 3, 50, 16, 1
    q, k, v = qkv(B, H, T, D, torch.float32, seed=7)
    args = (p, D**-0.5, 0.7, None, "attn_vnorm", width, width < 0, "triton")
    got = library._sample(q, k, v, None, *args)
    assert len(calls) == (1 if enabled else 0)
    monkeypatch.setattr(score_sample, "ENABLED", not enabled)
    want = library._sample(q, k, v, None, *args)
    for g, w in zip(got, want):
        assert g == w if g is None or isinstance(g, bool) else torch.equal(g, w)
    monkeypatch.setattr(score_sample, "ENABLED", enabled)
    monkeypatch.setattr(score_sample, "MIN_BATCH", B + 1)
    calls.clear()
    library._sample(q, k, v, None, *args)
    assert not calls  # fewer images than MIN_BATCH: two launches
    if width < 0:
        q = q.clone()
        q[1, 0, 0, 0] = float("nan")
        monkeypatch.setattr(score_sample, "MIN_BATCH", 1)
        with pytest.raises(Exception, match="(?i)nan|finite"):
            library._sample(q, k, v, None, *args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_one_launch_in_a_cuda_graph_matches_two_launches():
    """Replayed from a CUDA graph over fresh inputs: the counters are zeroed inside the graph, and
    at batch 256 each image's 42 programs race for the last arrival."""
    B, H, T, D, p = 256, 6, 197, 64, 1
    static = [t.contiguous() for t in qkv(B, H, T, D, torch.float16, seed=11)]
    width = reference.static_budget(T, p, 0.87, None) + p
    one_launch(*static, None, p, 0.87, None, width, False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = one_launch(*static, None, p, 0.87, None, width, False)
    for seed in (12, 13, 14):
        for s, f in zip(static, qkv(B, H, T, D, torch.float16, seed=seed)):
            s.copy_(f)
        graph.replay()
        want = two_launches(*static, None, p, 0.87, None, width, False)
        torch.cuda.synchronize()
        for name, a, b in zip(("index", "mask", "kept", "budget"), out, want):
            assert torch.equal(a, b), name
