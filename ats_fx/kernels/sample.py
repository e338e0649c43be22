"""Triton kernel 2: inverse-transform sampling and compaction in one launch (ATS-NOTES §2).

One program per image: the CDF of its scores, then for every token the question "does some
quantile u_i = (2i-1)/2K land in (C[j-1], C[j]]?" — which is exactly "is j the first token whose CDF
reaches u_i" — so the K searches and the de-duplication become one vectorised test. The kept
tokens (prefix first, then ascending positions) are compacted with a prefix sum: kept token j
goes to slot cumsum(keep)[j] - 1 and every dropped token to a slot after all kept ones, a
permutation, so no slot is written twice and none needs a separate fill. Given buffers for them
(``empty_outputs``, the overlapped stage), it also writes each slot's original position.

Reference: ``reference.inverse_transform_sample``.
"""
from __future__ import annotations

import struct
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .pdl import launch_options, use_pdl, wait_for_previous_kernel
from .reference import MIN_TOKENS
from .scores import combine_heads


@triton.jit
def _quantile(i, K):
    # u_i = (2i - 1) / 2K, correctly rounded like the reference's float32 division.
    return tl.math.div_rn((2 * i - 1).to(tl.float32), (2 * K).to(tl.float32))


@triton.jit
def _sample_kernel(
    S, VN, BUDGET, MASK, INDEX, OUT_MASK, KEPT, BAD, STATS, RATIO_BITS, POS, OUT_POS,
    smb, smt, spb, spt,
    T, W, H, num_prefix, k_fixed, min_tokens,
    HAS_MASK: tl.constexpr, BUDGET_GIVEN: tl.constexpr, HAS_STATS: tl.constexpr, FROM_HEADS: tl.constexpr,
    WRITE_POS: tl.constexpr, HAS_POS: tl.constexpr,
    PDL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    b = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    inside = t < T
    real = inside
    if HAS_MASK:
        real &= tl.load(MASK + b * smb + t * smt, mask=inside, other=0) != 0
    if FROM_HEADS:  # S, VN: the per-head logits and value norms of scores.head_scores
        s, bad = combine_heads(S, VN, b, t, T, H, real & (t >= num_prefix), BLOCK_H)
        tl.store(BAD + b, bad.to(tl.int8))
    else:
        s = tl.load(S + b * T + t, mask=inside, other=0.0)
    if BUDGET_GIVEN:
        K = tl.load(BUDGET + b).to(tl.int32)
    else:
        # ATS-NOTES §3, as reference.token_budget: K = max(floor(rho * N_in + 1/2), 8) in float64
        # (no FMA: the launch sets enable_fp_fusion=False), or k; capped at the scored tokens.
        n_in = tl.sum(real.to(tl.int32), axis=0)
        if k_fixed >= 0:
            K = tl.zeros([], dtype=tl.int32) + k_fixed
        else:
            rho = RATIO_BITS.to(tl.int64).to(tl.float64, bitcast=True)
            K = tl.floor(n_in.to(tl.float64) * rho + 0.5).to(tl.int32)
            K = tl.maximum(K, min_tokens)
        K = tl.minimum(K, n_in - num_prefix)
        tl.store(BUDGET + b, K.to(tl.int64))
    cdf = tl.cumsum(s, axis=0)
    # C[j-1] must be the very value the scan gave token j-1 (not cdf - s, which rounds
    # differently), so every quantile is claimed by exactly one token: move it one lane over.
    # (A store, a barrier and a load did the same, no faster: docs/performance.md.)
    prev = tl.where(t > 0, tl.gather(cdf, tl.maximum(t - 1, 0), axis=0), 0.0)
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
    if WRITE_POS:
        # Each slot's original position (-1 for padding): the input token set's positions POS
        # (B, T), or the tokens' own indices at the first stage. Saves the caller a gather and a
        # where per stage.
        source = t.to(tl.int64)
        if HAS_POS:
            source = tl.load(POS + b * spb + t * spt, mask=inside, other=-1).to(tl.int64)
        tl.store(OUT_POS + b * W + slot, tl.where(keep, source, -1), mask=store)
    tl.store(KEPT + b, (total - num_prefix).to(tl.int64))
    if HAS_STATS:
        # Batch width and "any image fell back to uniform scores", for one host read per stage.
        tl.atomic_max(STATS, total)
        if FROM_HEADS:
            tl.atomic_max(STATS + 1, bad.to(tl.int32))
        else:
            tl.atomic_max(STATS + 1, tl.load(BAD + b).to(tl.int32))
        tl.atomic_max(STATS + 2, -total)  # -min_b(K'_b + p): no padding when it equals the max


def inverse_transform_sample(
    scores: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    budget: torch.Tensor,
    num_prefix: int,
    width: Optional[int] = None,
    traceable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index, mask, kept)`` like the reference, for ``width`` output slots (default: all T).
    ``scores``: S (B, T), or the per-head logits and value norms of ``head_scores`` (2, B, H, T), or
    a pair of (B, H, T) tensors.

    With ``width=None`` the result has T slots; the caller truncates to max K' + p (batch_max).
    ``traceable``: launched through ``wrap_triton`` inside a ``triton_op`` (``packaged_ops.py``),
    without PDL. The budget is given, so the kernel's K arithmetic (which needs fp fusion off, a
    launch option ``wrap_triton`` does not pass) is not used.
    """
    index, out_mask, kept, _, _, _ = _launch(scores, key_mask, num_prefix, width, budget=budget, traceable=traceable)
    return index, out_mask, kept


def sample_with_budget(
    scores: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    num_prefix: int,
    ratio: Optional[float],
    k: Optional[int],
    width: Optional[int],
    bad: Optional[torch.Tensor],
    stats: bool = True,
    out: Optional[tuple] = None,
    positions: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """The library's path: K computed in the kernel. ``scores`` are normalised (B, T) with their
    fallback flags ``bad``, or the per-head logits and value norms (2, B, H, T) of
    ``scores.head_scores`` with ``bad=None`` (combined in the kernel, which then writes the flags).

    Returns ``(index, mask, kept, budget, stats, bad)``; ``stats`` = [max_b K'_b + p, any(bad),
    -min_b K'_b - p] (int32, on the device; None unless asked for): one host read gives the
    batch width, the NaN check and whether any image is padded. ``out``: the buffers
    ``empty_outputs`` made, for a caller that allocates on one stream and launches on another; the
    kernel then also writes their last, each slot's original position (-1 for padding), read from
    ``positions`` (B, T), the input tokens' own (None: the tokens' indices)."""
    return _launch(scores, key_mask, num_prefix, width, ratio=ratio, k=k, bad=bad, want_stats=stats, out=out,
                   positions=positions)


def empty_outputs(B: int, T: int, W: int, device: torch.device) -> tuple:
    """Uninitialised ``(index, mask, kept, budget, bad, positions)`` for ``sample_with_budget(out=...)``
    on per-head logits (``bad`` and ``positions`` are written by the kernel)."""
    return (torch.empty(B, W, device=device, dtype=torch.int64), torch.empty(B, W, device=device, dtype=torch.int8),
            torch.empty(B, device=device, dtype=torch.int64), torch.empty(B, device=device, dtype=torch.int64),
            torch.empty(B, device=device, dtype=torch.int8), torch.empty(B, W, device=device, dtype=torch.int64))


# Warps per program (one program per image); None: 4 up to 256 tokens, else 8. 4 was the fastest
# of 1, 2, 4, 8 at every shape timed (docs/performance.md).
NUM_WARPS: Optional[int] = None


# rho reaches the kernel as the bit pattern of its float64 value (an int64 argument, bitcast back):
# a Python float argument arrives as float32 (0.7 -> 0.69999999), which moved K at the x.5
# products (65 x 0.7 = 45.5 -> K = 45, not 46) on the GPU; the CPU interpreter keeps float64 and
# hid it. (A cached float64 device tensor did the same, but a tensor created while CUDA graphs
# record stays in their memory pool untracked, which CUDA graph trees refuse.)
def _float64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _launch(scores, key_mask, num_prefix, width, budget=None, ratio=None, k=None, bad=None, want_stats=False,
            out=None, traceable=False, positions=None):
    if isinstance(scores, tuple):  # logits and value norms in two (B, H, T) tensors
        scores, vnorms = scores
        scores = scores[None]  # (1, B, H, T): the shapes below read as for the stacked pair
    else:
        vnorms = None
    from_heads = scores.dim() == 4  # (2, B, H, T): logits and value norms
    B, T = scores.shape[-3 if from_heads else 0], scores.shape[-1]
    H = scores.shape[2] if from_heads else 1
    W = T if width is None else width
    scores = scores.contiguous().float()
    device = scores.device
    # Every slot below min(W, T) is written (the slots are a permutation of the tokens).
    given = budget is not None
    out_pos = None
    assert positions is None or out is not None, "positions are written into the caller's buffers only"
    if out is not None:  # the caller's buffers (empty_outputs), for per-head logits and no budget
        assert from_heads and not given and W <= T
        index, out_mask, kept, budget, bad, out_pos = out
    else:
        index = torch.empty(B, W, device=device, dtype=torch.int64)
        out_mask = torch.empty(B, W, device=device, dtype=torch.int8)
        kept = torch.empty(B, device=device, dtype=torch.int64)
        if not given:
            budget = torch.empty(B, device=device, dtype=torch.int64)
        if from_heads:
            bad = torch.empty(B, device=device, dtype=torch.int8)
    # The stats buffer needs a fill (one more launch): only when the caller reads it.
    stats = torch.full((3,), -(2**30), device=device, dtype=torch.int32) if want_stats else None
    mask = key_mask if key_mask is not None else scores
    pdl = not traceable and use_pdl(scores)
    # Fusing K's float64 multiply-add into an FMA moved K at x.5 products: off. wrap_triton takes
    # no such option, so a traced launch must be given the budget.
    options = {} if traceable else {"enable_fp_fusion": False}
    assert given or not traceable
    kernel = wrap_triton(_sample_kernel) if traceable else _sample_kernel
    kernel[(B,)](
        scores, vnorms if vnorms is not None else scores[1] if from_heads else scores, budget, mask, index, out_mask,
        kept,
        bad if bad is not None else kept, stats if stats is not None else kept, _float64_bits(ratio or 0.0),
        positions if positions is not None else kept, out_pos if out_pos is not None else kept,
        mask.stride(0), mask.stride(-1),
        positions.stride(0) if positions is not None else 0, positions.stride(-1) if positions is not None else 0,
        T, W, H, num_prefix, -1 if k is None else int(k), MIN_TOKENS,
        HAS_MASK=key_mask is not None, BUDGET_GIVEN=given, HAS_STATS=stats is not None, FROM_HEADS=from_heads,
        WRITE_POS=out_pos is not None, HAS_POS=positions is not None,
        PDL=pdl,
        BLOCK_T=triton.next_power_of_2(T), BLOCK_H=triton.next_power_of_2(H),
        num_warps=NUM_WARPS or (4 if T <= 256 else 8), **options, **launch_options(pdl),
    )
    # Inductor cannot lower a view from int8 to bool (torch 2.11, 2.14): a traced launch compares.
    out_mask = out_mask != 0 if traceable else out_mask.view(torch.bool)
    return index, out_mask, kept, budget, stats, bad
