"""Triton kernel 1+2 in one launch: head logits, then each image's sampling in its last program.

The two-launch stage front (``scores._head_logits_kernel``, then ``sample._sample_kernel``) spends a
whole kernel on sampling: one latency-bound program per image, ~4-6 us a stage even at batch 256,
where 256 such programs do little work each. Here the (head, token chunk, image) programs of the
head-logits kernel store their logits and ‖V_j‖, then count themselves in on a per-image arrival
counter; the program that arrives last (it sees count = H x chunks - 1) has every store of its
image behind it and runs ``sample.sample_image`` for that image. So an image's sampling overlaps
the other images' head logits, and the sampling kernel's launch is gone.

Why this is ordered: each program stores, then ``debug_barrier`` (all its threads' stores issued
before its one thread's atomic), then an acq_rel atomic at GPU scope; the last program's atomic
acquires every earlier program's release, and its loads of the logits go to L2 (``.cg`` in
``scores.combine_heads``). The counters are zeroed per launch (``torch.zeros``: one memset node
in a CUDA graph), so no state outlives a call, and two launches can never share one.

Unlike the one-launch stage of session 12 (docs/ats-semantics.md), nothing waits at a barrier and
only one program per image samples. Same results as the two launches (the same jit code runs);
launched with ``enable_fp_fusion=False`` like the sampling kernel (its float64 budget must not
contract to an FMA), which also keeps the logits' products and sums unfused.

Reference: ``reference.class_token_scores`` then ``reference.inverse_transform_sample``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import scores
from .pdl import launch_options, use_pdl, wait_for_previous_kernel
from .reference import MIN_TOKENS
from .sample import float64_bits, outputs, sample_image


@triton.jit
def _score_sample_kernel(
    Q, K, V, MASK, LOGITS, VNORM, ARRIVED,
    BUDGET, INDEX, OUT_MASK, KEPT, BAD, STATS, RATIO_BITS,
    sqb, sqh, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    smb, smt,
    T, W, H, D, scale, num_prefix, k_fixed, min_tokens,
    HAS_MASK: tl.constexpr, USE_VNORM: tl.constexpr, HAS_STATS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    LAST_IMAGE_FIRST: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous_kernel(PDL)
    h, b = scores.grid_head_image(LAST_IMAGE_FIRST)
    scores.head_logits_chunk(Q, K, V, MASK, LOGITS, VNORM, sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                             smb, smt, T, H, D, scale, h, tl.program_id(1), b, HAS_MASK, USE_VNORM, BLOCK_C, BLOCK_D)
    tl.debug_barrier()  # every thread's stores are issued before the atomic below releases them
    arrived = tl.atomic_add(ARRIVED + b, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) * tl.num_programs(1) - 1:  # the image's last program
        sample_image(b, LOGITS, VNORM, BUDGET, MASK, INDEX, OUT_MASK, KEPT, BAD, STATS, RATIO_BITS,
                     smb, smt, T, W, H, num_prefix, k_fixed, min_tokens,
                     HAS_MASK, False, HAS_STATS, True, BLOCK_T, BLOCK_H)


# The library's switch: one launch (this kernel) for the stage front, or the two kernels. Decided
# on the H200 (benchmarks/results/session17.md).
ENABLED = False
# Fewest images for one launch; below, the two kernels. At batch 1 the memset of the counters is a
# graph node of its own, which costs about what the sampling launch it saves does (session17.md).
MIN_BATCH = 1


def use_score_sample(batch: int) -> bool:
    """The one-launch front for ``batch`` images: ``ENABLED`` and at least ``MIN_BATCH`` images."""
    return ENABLED and batch >= MIN_BATCH


def score_and_sample(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    scale: float,
    score: str,
    num_prefix: int,
    ratio: Optional[float],
    k_tokens: Optional[int],
    width: Optional[int],
    stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """``scores.head_scores`` then ``sample.sample_with_budget`` in one launch: the same
    ``(index, mask, kept, budget, stats, bad)`` for (B, H, T, dh) ``q, k, v`` (any strides)."""
    B, H, T, D = k.shape
    W = T if width is None else width
    heads = torch.empty(2, B, H, T, device=q.device, dtype=torch.float32)
    arrived = torch.zeros(B, device=q.device, dtype=torch.int32)
    index, out_mask, kept, budget, stats_buf, bad = outputs(B, W, q.device, want_stats=stats)
    mask = key_mask if key_mask is not None else heads  # dummy pointer when HAS_MASK is False
    pdl = use_pdl(q)
    _score_sample_kernel[(H, triton.cdiv(T, scores.BLOCK_T), B)](
        q, k, v, mask, heads[0], heads[1], arrived,
        budget, index, out_mask, kept, bad, stats_buf if stats_buf is not None else kept,
        float64_bits(ratio or 0.0),
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        mask.stride(0), mask.stride(-1),
        T, W, H, D, float(scale), num_prefix, -1 if k_tokens is None else int(k_tokens), MIN_TOKENS,
        HAS_MASK=key_mask is not None, USE_VNORM=score == "attn_vnorm", HAS_STATS=stats_buf is not None,
        BLOCK_C=scores.BLOCK_T, BLOCK_D=min(triton.next_power_of_2(D), 64),
        BLOCK_T=triton.next_power_of_2(T), BLOCK_H=triton.next_power_of_2(H),
        LAST_IMAGE_FIRST=scores.LAST_IMAGE_FIRST, PDL=pdl,
        num_warps=scores.NUM_WARPS, enable_fp_fusion=False, **launch_options(pdl),
    )
    return index, out_mask.view(torch.bool), kept, budget, stats_buf, bad
