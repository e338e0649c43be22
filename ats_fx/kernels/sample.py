"""Triton kernel 2: inverse-transform sampling and compaction in one launch (ATS-NOTES §2).

One program per image: the CDF of its scores, then for every token the question "does some
quantile u_i = (2i-1)/2K land in (C[j-1], C[j]]?" — which is exactly "is j the first token whose CDF
reaches u_i" — so the K searches and the de-duplication become one vectorised test. The kept
tokens (prefix first, then ascending positions) are compacted with a prefix sum: kept token j
goes to slot cumsum(keep)[j] - 1 and every dropped token to a slot after all kept ones, a
permutation, so no slot is written twice and none needs a separate fill.

Reference: ``reference.inverse_transform_sample``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _quantile(i, K):
    # u_i = (2i - 1) / 2K, correctly rounded like the reference's float32 division.
    return tl.math.div_rn((2 * i - 1).to(tl.float32), (2 * K).to(tl.float32))


@triton.jit
def _sample_kernel(
    S, BUDGET, MASK, CDF, INDEX, OUT_MASK, KEPT,
    smb, smt,
    T, W, num_prefix,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    inside = t < T
    real = inside
    if HAS_MASK:
        real &= tl.load(MASK + b * smb + t * smt, mask=inside, other=0) != 0
    s = tl.load(S + b * T + t, mask=inside, other=0.0)
    K = tl.load(BUDGET + b).to(tl.int32)
    cdf = tl.cumsum(s, axis=0)
    # C[j-1] must be the very value the scan gave token j-1 (not cdf - s, which rounds
    # differently), so every quantile is claimed by exactly one token: go through memory.
    tl.store(CDF + b * T + t, cdf, mask=inside)
    tl.debug_barrier()
    prev = tl.load(CDF + b * T + t - 1, mask=inside & (t > 0), other=0.0)
    # First quantile index above prev: count of u_i <= prev is about floor(K*prev + 1/2); fix the
    # estimate's round-off against the exactly rounded quantiles.
    n = tl.minimum(tl.maximum(tl.floor(prev * K.to(tl.float32) + 0.5).to(tl.int32), 0), K)
    n = tl.where((n > 0) & (_quantile(n, K) > prev), n - 1, n)
    n = tl.where((n < K) & (_quantile(n + 1, K) <= prev), n + 1, n)
    first = n + 1
    last_real = tl.max(tl.where(real, t, 0), axis=0)
    # Round-off can leave the last quantiles above C[end]: the last real token takes them.
    reaches = (_quantile(first, K) <= cdf) | (t == last_real)
    keep = real & (((t >= num_prefix) & (first <= K) & reaches) | (t < num_prefix))
    keep_i = keep.to(tl.int32)
    rank = tl.cumsum(keep_i, axis=0)
    total = tl.sum(keep_i, axis=0)
    slot = tl.where(keep, rank - 1, total + t - rank)
    store = inside & (slot < W)
    tl.store(INDEX + b * W + slot, tl.where(keep, t, 0).to(tl.int64), mask=store)
    tl.store(OUT_MASK + b * W + slot, keep.to(tl.int8), mask=store)
    tl.store(KEPT + b, (total - num_prefix).to(tl.int64))


def inverse_transform_sample(
    scores: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    budget: torch.Tensor,
    num_prefix: int,
    width: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index, mask, kept)`` like the reference, for ``width`` output slots (default: all T).

    With ``width=None`` the result has T slots; the caller truncates to max K' + p (batch_max).
    """
    B, T = scores.shape
    W = T if width is None else width
    scores = scores.contiguous().float()
    budget = budget.contiguous()
    # Every slot below min(W, T) is written (the slots are a permutation of the tokens).
    index = torch.empty(B, W, device=scores.device, dtype=torch.int64)
    out_mask = torch.empty(B, W, device=scores.device, dtype=torch.int8)
    kept = torch.empty(B, device=scores.device, dtype=torch.int64)
    cdf = torch.empty(B, T, device=scores.device, dtype=torch.float32)
    mask = key_mask if key_mask is not None else scores
    _sample_kernel[(B,)](
        scores, budget, mask, cdf, index, out_mask, kept,
        mask.stride(0), mask.stride(1),
        T, W, num_prefix,
        HAS_MASK=key_mask is not None, BLOCK_T=triton.next_power_of_2(T),
        num_warps=4 if T <= 256 else 8,
    )
    return index, out_mask.bool(), kept
