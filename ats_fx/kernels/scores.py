"""Triton kernel 1: the class token's significance scores (ATS-NOTES §1), one program per
(image, head).

Each program reads its head's class query row, K and V once, forms the class attention row with
a full softmax over the real keys and multiplies by ‖V_j‖ (float32 whatever the input dtype),
writing one row of ``P`` (B, H, T). The heads are then summed and normalised by
``combine_heads``, in the sampling kernel itself on the library's path (``sample.py``), so a
stage costs two launches. One program per image looping over the heads (the first version) ran
36 us per stage at batch 1 on H100, serially on one SM; per (image, head) it is a few.

``combine_heads`` sums the heads in a fixed order (deterministic, unlike atomics) and falls back
to uniform scores for a row whose denominator is 0 or not finite, flagging it so the caller can
raise in strict mode.

Reference: ``reference.class_token_scores`` (``class_token_scores`` here: same arguments, same
result).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _head_scores_kernel(
    Q, K, V, MASK, P,
    sqb, sqh, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    smb, smt,
    T, H, D, num_prefix, scale,
    HAS_MASK: tl.constexpr, USE_VNORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    real = t < T
    if HAS_MASK:
        real &= tl.load(MASK + b * smb + t * smt, mask=t < T, other=0) != 0
    logits = tl.zeros([BLOCK_T], dtype=tl.float32)
    vsq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        tile = (t[:, None] < T) & (d[None, :] < D)
        q = tl.load(Q + b * sqb + h * sqh + d * sqd, mask=d < D, other=0.0).to(tl.float32)
        k = tl.load(K + b * skb + h * skh + t[:, None] * skt + d[None, :] * skd, mask=tile, other=0.0)
        logits += tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        if USE_VNORM:
            v = tl.load(V + b * svb + h * svh + t[:, None] * svt + d[None, :] * svd, mask=tile, other=0.0)
            v = v.to(tl.float32)
            vsq += tl.sum(v * v, axis=1)
    logits = tl.where(real, logits * scale, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)
    if USE_VNORM:
        p = p * tl.sqrt(vsq)
    p = tl.where(real & (t >= num_prefix), p, 0.0)
    tl.store(P + (b * H + h) * T + t, p, mask=t < T)


@triton.jit
def combine_heads(P, b, t, T, H, scored):
    """(S, bad) of image ``b``: the heads of ``P`` summed in order and normalised over the scored
    tokens; uniform over them (bad = True) when the sum is 0 or not finite."""
    total = tl.zeros(t.shape, dtype=tl.float32)
    for h in range(H):
        total += tl.load(P + (b * H + h) * T + t, mask=scored, other=0.0)
    denom = tl.sum(total, axis=0)
    # Not (denom > 0) catches 0 and NaN; denom * 0 != 0 catches inf.
    bad = (denom <= 0.0) | (denom != denom) | (denom * 0.0 != 0.0)
    n_scored = tl.sum(scored.to(tl.float32), axis=0)
    uniform = tl.where(scored, 1.0 / tl.maximum(n_scored, 1.0), 0.0)
    safe = tl.where(bad, 1.0, denom)
    return tl.where(bad, uniform, total / safe), bad


@triton.jit
def _normalise_kernel(P, MASK, S, BAD, smb, smt, T, H, num_prefix, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    scored = (t < T) & (t >= num_prefix)
    if HAS_MASK:
        scored &= tl.load(MASK + b * smb + t * smt, mask=t < T, other=0) != 0
    s, bad = combine_heads(P, b, t, T, H, scored)
    tl.store(S + b * T + t, s, mask=t < T)
    tl.store(BAD + b, bad.to(tl.int8))


def head_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    num_prefix: int,
    scale: float,
    score: str = "attn_vnorm",
) -> torch.Tensor:
    """P (B, H, T) float32: each head's class attention row times ‖V_j‖ (``score="attn"``: the row
    alone), 0 at the prefix and at padded tokens. ``q, k, v`` are (B, H, T, dh) with any strides;
    only the class row of q is read."""
    B, H, T, D = k.shape
    heads = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    block_t = triton.next_power_of_2(T)
    # Keep a (BLOCK_T, BLOCK_D) tile of K and of V within ~8K elements each.
    block_d = max(1, min(triton.next_power_of_2(D), 8192 // block_t))
    mask = key_mask if key_mask is not None else heads  # dummy pointer when HAS_MASK is False
    _head_scores_kernel[(B, H)](
        q, k, v, mask, heads,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        mask.stride(0), mask.stride(-1),
        T, H, D, num_prefix, float(scale),
        HAS_MASK=key_mask is not None, USE_VNORM=score == "attn_vnorm",
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4 if block_t <= 256 else 8,
    )
    return heads


def class_token_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    num_prefix: int,
    scale: float,
    score: str = "attn_vnorm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores S (B, T) float32 and a per-image flag (B,) int8, 1 for rows that fell back to uniform:
    ``head_scores`` then ``combine_heads`` (two launches; the library folds the second into the
    sampling kernel)."""
    heads = head_scores(q, k, v, key_mask, num_prefix, scale, score)
    B, H, T = heads.shape
    scores = torch.empty(B, T, device=q.device, dtype=torch.float32)
    bad = torch.empty(B, device=q.device, dtype=torch.int8)
    mask = key_mask if key_mask is not None else scores
    _normalise_kernel[(B,)](heads, mask, scores, bad, mask.stride(0), mask.stride(-1), T, H, num_prefix,
                            HAS_MASK=key_mask is not None, BLOCK_T=triton.next_power_of_2(T),
                            num_warps=4 if T <= 256 else 8)
    return scores, bad
