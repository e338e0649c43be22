"""Triton kernel 6: a whole ATS stage in one launch, for grids that fit in one wave (batch 1).
Off by default: on the H200 it measured slower than the three kernels it replaces (see ENABLED).

At batch 1 the stage's three kernels (head logits, sampling, attention over the kept rows) are
each a few microseconds of latency on a nearly idle GPU: 9.7 us together at DeiT-S's first stage
on H100, against 5.4 us for cuDNN's dense attention of the same layer (stage_kernels.md,
trace_session9.txt). This kernel runs them as phases of one grid of (row tile x head, image)
programs:

1. head logits: program p computes the (head, 32-token chunk) units p, p + P, ... of its image
   (``scores.head_logits_chunk``, into a (2, B, H, T) float32 scratch);
2. a barrier among the image's P programs;
3. every program combines the heads and samples (``scores.combine_heads`` and
   ``sample.sample_image``: the arithmetic of the sampling kernel, so every program derives the same
   kept set), program 0 writes index, mask, kept, budget and flags, and each program attends its
   BLOCK_M kept rows of its head (``attention_rows.attend_rows``).

The barrier needs every program of an image resident at once, so ``fits_one_wave`` allows at most
one program per SM for the whole grid (one program always fits on an SM). ``SYNC`` holds an
arrival counter and a generation word per image: the last program to arrive resets the counter and
bumps the generation, which the others wait for, so the buffer is left as it was found (counters
at zero) and needs no fill between launches. Two launches that share one SYNC buffer must not run
at the same time.

Triton's CPU interpreter runs programs one after another, where a barrier would wait forever: there
the kernel runs as two launches (PHASE 1, then PHASE 2) with no barrier; the one-launch path is
tested on the GPU.

Reference: the three kernels it replaces (``scores.head_scores``, ``sample.sample_with_budget``,
``attention_rows.attention_rows``), and through them ``reference``.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_rows import attend_rows, multiprocessors
from .pdl import launch_options, use_pdl, wait_for_previous_kernel
from .reference import MIN_TOKENS
from .sample import _float64_bits, budget_in_kernel, sample_image
from .scores import combine_heads, head_logits_chunk


@triton.jit
def _image_barrier(SYNC, P):
    """Wait until all P programs of this image have arrived (SYNC: counter, generation)."""
    tl.debug_barrier()  # every thread of this program has stored its logits
    generation = tl.atomic_add(SYNC + 1, 0, sem="relaxed")
    arrived = tl.atomic_add(SYNC, 1, sem="acq_rel")
    if arrived == P - 1:  # the last one: reset the counter for the next launch, then release
        tl.atomic_xchg(SYNC, 0, sem="relaxed")
        tl.atomic_add(SYNC + 1, 1, sem="release")
    else:
        while tl.atomic_add(SYNC + 1, 0, sem="acquire") == generation:
            pass
    tl.debug_barrier()


@triton.jit
def _stage_kernel(
    Q, K, V, MASK, LOGITS, VNORM, SYNC, INDEX, OUT_MASK, KEPT, BUDGET, BAD, O, RATIO_BITS,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    smb, smt,
    sob, soh, sot, sod,
    T, H, D, W, num_prefix, k_fixed, min_tokens, scale, qk_scale,
    PHASE: tl.constexpr, FROM_L2: tl.constexpr, HAS_MASK: tl.constexpr, USE_VNORM: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, PDL: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_DC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """PHASE 0: the whole stage (GPU); 1: head logits only; 2: sampling and attention only.
    FROM_L2: read the logits past L1 (other programs wrote them during this launch)."""
    wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    if PHASE != 2:
        for u in range(pid, H * tl.cdiv(T, BLOCK_C), P):
            t_chunk = (u // H) * BLOCK_C + tl.arange(0, BLOCK_C)
            head_logits_chunk(Q, K, V, MASK, LOGITS, VNORM, b, (u % H).to(tl.int64), t_chunk,
                              sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, smb, smt,
                              T, H, D, scale, HAS_MASK, USE_VNORM, BLOCK_C, BLOCK_DC)
    if PHASE == 0:
        _image_barrier(SYNC + b * 2, P)
    if PHASE != 1:
        t = tl.arange(0, BLOCK_T)
        inside = t < T
        real = inside
        if HAS_MASK:
            real &= tl.load(MASK + b * smb + t * smt, mask=inside, other=0) != 0
        s, bad = combine_heads(LOGITS, VNORM, b, t, T, H, real & (t >= num_prefix), BLOCK_H, FROM_L2)
        budget = budget_in_kernel(real, num_prefix, k_fixed, min_tokens, RATIO_BITS)
        keep, slot, total = sample_image(s, real, inside, t, budget, num_prefix)
        source = tl.where(keep, t, 0)
        if pid == 0:
            store = inside & (slot < W)
            tl.store(INDEX + b * W + slot, source.to(tl.int64), mask=store)
            tl.store(OUT_MASK + b * W + slot, keep.to(tl.int8), mask=store)
            tl.store(KEPT + b, (total - num_prefix).to(tl.int64))
            tl.store(BUDGET + b, budget.to(tl.int64))
            tl.store(BAD + b, bad.to(tl.int8))
        # This program's rows: output slot r holds the token whose slot is r (slots are a permutation).
        h = (pid % H).to(tl.int64)
        rows = (pid // H) * BLOCK_M + tl.arange(0, BLOCK_M)
        src = tl.sum(tl.where(slot[None, :] == rows[:, None], source[None, :], 0), axis=1)
        n_end = T
        one_run = True  # the real keys are exactly [0, n_end): every mask ATS makes
        if HAS_MASK:
            n_end = tl.max(tl.where(real, t + 1, 0), axis=0)
            one_run = tl.sum(real.to(tl.int32), axis=0) == n_end
        attend_rows(Q, K, V, MASK, O, b, h, rows, src, W, n_end, one_run,
                    sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, smb, smt, sob, soh, sot, sod,
                    D, qk_scale, HAS_MASK, IEEE, UPCAST, True, BLOCK_M, BLOCK_N, BLOCK_D)


# Off: measured slower than the three kernels on the H200 (one_launch_stage.md: 1.24-1.41x their
# time at every batch-1 stage shape, 1.14-1.28x with a kept barrier buffer) and no faster in the
# compiled model (interleaved_s12_deit_s.md). ``ATS_FX_ONE_LAUNCH=1`` or ``stage.ENABLED = True``
# (read when a graph is traced or an eager stage runs) turns it on for experiments.
ENABLED = os.environ.get("ATS_FX_ONE_LAUNCH", "0") == "1"
# The attention phase's tiles: the small-grid setting of attention_rows.default_config (16 x 128,
# 4 warps), the one the three-kernel path uses at batch 1. Head logits take 32-token chunks.
BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES, BLOCK_C = 16, 128, 4, 2, 32


def programs(batch: int, heads: int, width: int) -> int:
    """Programs of the one-launch stage: (row tiles x heads) per image."""
    return triton.cdiv(width, BLOCK_M) * heads * batch


def fits_one_wave(batch: int, heads: int, width: int, device: torch.device) -> bool:
    """The grid has at most one program per SM, so every program of an image is resident together
    (the barrier needs that). False off CUDA."""
    sms = multiprocessors(device)
    return sms > 0 and programs(batch, heads, width) <= sms


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def new_sync(batch: int, device: torch.device) -> torch.Tensor:
    """A barrier buffer for ``launch_stage``: (batch, 2) int32 zeros; reusable across launches."""
    return torch.zeros(batch, 2, device=device, dtype=torch.int32)


def launch_stage(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    num_prefix: int,
    scale: float,
    ratio: Optional[float],
    k_tokens: Optional[int],
    score: str,
    width: int,
    sync: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One static-width ATS stage in one launch: ``(out, index, mask, kept, budget, bad)``, as
    ``head_scores`` -> ``sample_with_budget(..., width)`` -> ``attention_rows`` return them.

    ``q, k, v`` are (B, H, T, dh) with any strides; ``width`` is K + p. ``sync``: a buffer from
    ``new_sync`` (allocated here, one fill, when None). On a GPU the grid must fit in one wave."""
    B, H, T, D = q.shape
    if width < 1 or width > T:
        raise ValueError(f"width must be in [1, {T}] (K + prefix tokens), got {width}")
    if q.is_cuda and not interpreted() and not fits_one_wave(B, H, width, q.device):
        raise ValueError(f"{programs(B, H, width)} programs do not fit in one wave of "
                         f"{multiprocessors(q.device)} SMs: use the three-kernel path")
    device = q.device
    heads = torch.empty(2, B, H, T, device=device, dtype=torch.float32)
    index = torch.empty(B, width, device=device, dtype=torch.int64)
    out_mask = torch.empty(B, width, device=device, dtype=torch.int8)
    kept = torch.empty(B, device=device, dtype=torch.int64)
    budget = torch.empty(B, device=device, dtype=torch.int64)
    bad = torch.empty(B, device=device, dtype=torch.int8)
    # (B, R, H, dh) memory like attention_rows: the model's transpose(1, 2).reshape is a view.
    out = torch.empty(B, width, H, D, device=device, dtype=q.dtype).transpose(1, 2)
    if sync is None:
        sync = new_sync(B, device)
    mask = out_mask if key_mask is None else key_mask.view(torch.int8) if key_mask.dtype == torch.bool else key_mask
    pdl = use_pdl(q)
    for phase in ((1, 2) if interpreted() else (0,)):
        _stage_kernel[(programs(1, H, width), B)](
            q, k, v, mask, heads[0], heads[1], sync, index, out_mask, kept, budget, bad, out,
            _float64_bits(ratio or 0.0),
            *q.stride(), *k.stride(), *v.stride(),
            mask.stride(0), mask.stride(-1),
            *out.stride(),
            T, H, D, width, num_prefix, -1 if k_tokens is None else int(k_tokens), MIN_TOKENS,
            float(scale), float(scale) * math.log2(math.e),
            PHASE=phase, FROM_L2=phase == 0, HAS_MASK=key_mask is not None, USE_VNORM=score == "attn_vnorm",
            IEEE=q.dtype == torch.float32,
            UPCAST=q.dtype == torch.bfloat16 and interpreted(), PDL=pdl,
            # head logits step through dh as head_scores does (64 at most), attention takes it whole
            BLOCK_C=BLOCK_C, BLOCK_DC=min(triton.next_power_of_2(D), 64), BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_T=triton.next_power_of_2(T),
            BLOCK_H=triton.next_power_of_2(H), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=False, **launch_options(pdl),
        )
    return out, index, out_mask.view(torch.bool), kept, budget, bad
