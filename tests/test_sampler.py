"""Property tests of the reference sampler and scores (ATS-NOTES §1-§3)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ats_fx.errors import ATSInputError
from ats_fx.kernels import reference as R
from ats_fx.testing.eager import sample_tokens


@st.composite
def score_batches(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(3, 40))
    p = draw(st.integers(0, min(3, T - 2)))  # 0: no class token (CaiT's self-attention blocks)
    seed = draw(st.integers(0, 2**16))
    peak = draw(st.floats(0.0, 8.0))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, generator=g, dtype=torch.float64) * peak
    real = torch.full((B,), T)
    if draw(st.booleans()):  # trailing padding, as an earlier ATS stage leaves it
        real = torch.randint(p + 1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < real[:, None]
    s = logits.softmax(-1) * mask
    s[:, :p] = 0
    s = s / s.sum(1, keepdim=True)
    k = draw(st.integers(1, T))
    return s, mask, p, k


@settings(max_examples=150, deadline=None)
@given(score_batches())
def test_sampler_properties(case):
    scores, mask, p, k = case
    budget = R.token_budget(mask, scores.shape[0], scores.shape[1], p, None, k, scores.device)
    index, out_mask, kept = R.inverse_transform_sample(scores, mask, budget, p)
    for b in range(scores.shape[0]):
        rows = index[b][out_mask[b]].tolist()
        assert rows[:p] == list(range(p)), "prefix tokens first, always kept"
        assert rows == sorted(set(rows)), "unique and ascending"
        assert all(mask[b, r] for r in rows), "padding never picked"
        assert 1 <= kept[b] <= budget[b], "1 <= K' <= K"
        assert len(rows) == kept[b] + p
        # batched sampler equals the one-image reference on the image's real tokens
        n = int(mask[b].sum())
        assert rows == sample_tokens(scores[b, :n], int(budget[b]), p)
    assert index.shape[1] == int(kept.max()) + p, "batch_max truncates to max K'+p"


def test_one_dominant_token_gives_one_and_uniform_gives_k():
    T, p, K = 50, 1, 20
    dominant = torch.zeros(1, T)
    dominant[0, 17] = 1.0
    budget = torch.tensor([K])
    _, _, kept = R.inverse_transform_sample(dominant, None, budget, p)
    assert kept.item() == 1
    uniform = torch.ones(1, T)
    uniform[0, :p] = 0
    uniform /= uniform.sum()
    _, _, kept = R.inverse_transform_sample(uniform, None, budget, p)
    assert kept.item() == K


def test_static_padding_has_fixed_width():
    s = torch.zeros(3, 30)
    s[:, 5] = 1
    index, mask, kept = R.inverse_transform_sample(s, None, torch.tensor([10, 10, 10]), 1, out_tokens=11)
    assert index.shape == (3, 11) and mask.sum(1).tolist() == [2, 2, 2] and kept.tolist() == [1, 1, 1]


def test_budget_rule_rounds_and_floors_at_eight():
    mask = torch.arange(197)[None, :] < torch.tensor([[197], [100], [9]])
    b = R.token_budget(mask, 3, 197, 1, 0.87, None, mask.device)
    assert b.tolist() == [171, 87, 8]  # round(0.87*197)=171, round(87)=87, max(round(7.83), 8)=8 capped at 8
    b = R.token_budget(None, 1, 197, 1, None, 500, mask.device)
    assert b.tolist() == [196]  # k is capped at the scored tokens


def test_scores_normalised_and_zero_on_prefix_and_padding():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    s = R.class_token_scores(q, k, v, mask, 2, 8**-0.5)
    torch.testing.assert_close(s.sum(1), torch.ones(2))
    assert (s[:, :2] == 0).all() and (s[1, 9:] == 0).all()
    # per head, then summed over heads (paper eq. 3): check against a loop
    a = torch.softmax(q[0, :, 0:1] @ k[0].transpose(1, 2) * 8**-0.5, -1)[:, 0]
    want = (a * v[0].norm(dim=-1))[:, 2:].sum(0)
    torch.testing.assert_close(s[0, 2:], want / want.sum())


def test_attn_only_score_drops_vnorm():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 10, 4, generator=g) for _ in range(3))
    s = R.class_token_scores(q, k, v * 100, None, 1, 0.5, score="attn")
    s2 = R.class_token_scores(q, k, v, None, 1, 0.5, score="attn")
    torch.testing.assert_close(s, s2)


def test_nan_scores_raise_in_strict_and_fall_back_otherwise():
    q, k, v = (torch.randn(2, 2, 10, 4) for _ in range(3))
    q[1, 0, 0, 0] = float("nan")
    with pytest.raises(ATSInputError, match="not finite"):
        R.class_token_scores(q, k, v, None, 1, 0.5)
    s = R.class_token_scores(q, k, v, None, 1, 0.5, strict=False)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s[1, 1:], torch.full((9,), 1 / 9))


def test_reference_op_is_differentiable():
    q, k, v = (torch.randn(2, 2, 10, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    res = R.ats_attention(q, k, v, None, num_prefix=1, scale=0.5, k_tokens=4)
    res.out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_unused_quantile_slots_keep_nothing_without_a_prefix():
    """With no prefix token 0 is scored like any other: a budget below T must not keep it for free."""
    scores = torch.zeros(1, 10, dtype=torch.float64)
    scores[0, 6] = 1.0
    index, mask, kept = R.inverse_transform_sample(scores, None, torch.tensor([4]), 0)
    assert kept.item() == 1 and index[mask].tolist() == [6]


def _padded_qkv(B=3, H=2, T=9, D=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    real = torch.tensor([T, T - 3, 5])
    return q, k, v, torch.arange(T)[None, :] < real[:, None], real


def test_weight_scores_with_a_class_token_equal_class_token_scores():
    q, k, v, mask, _ = _padded_qkv()
    attn = R.attention_weights(q, k, mask, 0.5)
    got, bad = R.weight_scores(attn, v, mask, 1)
    torch.testing.assert_close(got, R.class_token_scores(q, k, v, mask, 1, 0.5))
    assert not bad.any()


def test_mean_query_scores_and_talking_heads_ignore_padding():
    """Without a class token the score is the mean over real queries of |A_h[i, j]|·‖V_h,j‖ with A
    after the head mixing; padded keys and queries change nothing (each image alone as reference)."""
    q, k, v, mask, real = _padded_qkv()
    g = torch.Generator().manual_seed(1)
    mix = tuple(torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((2, 2), (2,), (2, 2), (2,)))
    for m in (None, mix):
        attn = R.attention_weights(q, k, mask, 0.5, mix=m)
        got, _ = R.weight_scores(attn, v, mask, 0)
        for b, n in enumerate(real.tolist()):
            a = R.attention_weights(q[b:b + 1, :, :n], k[b:b + 1, :, :n], None, 0.5, mix=m)
            torch.testing.assert_close(attn[b, :, :n, :n], a[0])
            assert (attn[b, :, :, n:] == 0).all()  # padded keys get weight 0, also after the mixing
            want = (a[0].abs().mean(dim=1) * v[b, :, :n].norm(dim=-1)).sum(0)
            torch.testing.assert_close(got[b, :n], want / want.sum())
            assert (got[b, n:] == 0).all()
