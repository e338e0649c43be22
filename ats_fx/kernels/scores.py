"""Triton kernel 1: the class token's significance scores (ATS-NOTES §1).

One program per image reads the class query row, K and V of every head once, forms the class
attention row with a full softmax over the real keys, multiplies by ‖V_j‖, sums over heads and
normalises, accumulating in float32 whatever the input dtype. A row whose denominator is 0 or not
finite falls back to uniform scores and is flagged, so the caller can raise in strict mode.

Reference: ``reference.class_token_scores`` (same arguments, same result).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _class_token_scores_kernel(
    Q, K, V, MASK, S, BAD,
    sqb, sqh, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    smb, smt,
    T, H, D, num_prefix, scale,
    HAS_MASK: tl.constexpr, USE_VNORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    real = t < T
    if HAS_MASK:
        real &= tl.load(MASK + b * smb + t * smt, mask=t < T, other=0) != 0
    scored = real & (t >= num_prefix)
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    for h in range(H):
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
        total += tl.where(scored, p, 0.0)
    denom = tl.sum(total, axis=0)
    # Not (denom > 0) catches 0 and NaN; denom * 0 != 0 catches inf.
    bad = (denom <= 0.0) | (denom != denom) | (denom * 0.0 != 0.0)
    n_scored = tl.sum(scored.to(tl.float32), axis=0)
    uniform = tl.where(scored, 1.0 / tl.maximum(n_scored, 1.0), 0.0)
    safe = tl.where(bad, 1.0, denom)
    s = tl.where(bad, uniform, total / safe)
    tl.store(S + b * T + t, s, mask=t < T)
    tl.store(BAD + b, bad.to(tl.int8))


def class_token_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    num_prefix: int,
    scale: float,
    score: str = "attn_vnorm",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores S (B, T) float32 and a per-image flag (B,) int8, 1 for rows that fell back to uniform.

    ``q, k, v`` are (B, H, T, dh) with any strides; only the class row of q is read.
    """
    B, H, T, D = k.shape
    scores = torch.empty(B, T, device=q.device, dtype=torch.float32)
    bad = torch.empty(B, device=q.device, dtype=torch.int8)
    block_t = triton.next_power_of_2(T)
    # Keep a (BLOCK_T, BLOCK_D) tile of K and of V within ~8K elements each.
    block_d = max(1, min(triton.next_power_of_2(D), 8192 // block_t))
    mask = key_mask if key_mask is not None else scores  # dummy pointer when HAS_MASK is False
    _class_token_scores_kernel[(B,)](
        q, k, v, mask, scores, bad,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        mask.stride(0), mask.stride(1),
        T, H, D, num_prefix, float(scale),
        HAS_MASK=key_mask is not None, USE_VNORM=score == "attn_vnorm",
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4 if block_t <= 256 else 8,
    )
    return scores, bad
