"""Triton kernel 1: the class token's significance scores (ATS-NOTES §1).

``_head_logits_kernel`` runs one program per (head, 32-token chunk, image): it reads that part
of K and V once and writes the class row's logits and ‖V_j‖ (float32 whatever the input dtype).
``combine_heads`` then takes each head's softmax over its logits, multiplies by ‖V_j‖, sums the
heads and normalises; on the library's path it runs inside the sampling kernel (``sample.py``),
so a stage costs two launches. (The first version ran one program per image looping over the
heads: 36 us per stage at batch 1 on H100, one SM reading 300 KB; and 47 us at batch 256, where
its 1536 programs of 4 warps could not keep the memory busy.)

``combine_heads`` is deterministic (no atomics) and falls back to uniform scores for a row whose
denominator is 0 or not finite, flagging it so the caller can raise in strict mode.

Reference: ``reference.class_token_scores`` (``class_token_scores`` here: same arguments, same
result).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .pdl import launch_options, use_pdl, wait_for_previous_kernel


@triton.jit
def _head_logits_kernel(
    Q, K, V, MASK, BIAS, POS, LOGITS, VNORM,
    sqb, sqh, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    smb, smt,
    sbl, sbi, sbj,
    spb, spt,
    T, H, D, scale,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, USE_VNORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, LAST_IMAGE_FIRST: tl.constexpr, PDL: tl.constexpr,
):
    """One (head, token chunk, image): the class row's logits (-inf at padded keys) and ||V_j||.
    ``HAS_BIAS``: plus the position bias ``BIAS[h, pos(class), pos(j)]`` of a (L, N, N) table, at
    original positions ``POS[b]`` with ``HAS_POS`` (else the tokens' own indices)."""
    wait_for_previous_kernel(PDL)
    scale = tl.cast(scale, tl.float32)  # fp32 under Inductor's launcher too (it passes Python floats as fp64)
    h = tl.program_id(0).to(tl.int64)  # heads fastest: neighbouring programs read neighbouring bytes
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(2).to(tl.int64)
    if LAST_IMAGE_FIRST:
        b = tl.num_programs(2) - 1 - b
    inside = t < T
    real = inside
    if HAS_MASK:
        real &= tl.load(MASK + b * smb + t * smt, mask=inside, other=0) != 0
    logits = tl.zeros([BLOCK_T], dtype=tl.float32)
    vsq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        tile = inside[:, None] & (d[None, :] < D)
        q = tl.load(Q + b * sqb + h * sqh + d * sqd, mask=d < D, other=0.0).to(tl.float32)
        k = tl.load(K + b * skb + h * skh + t[:, None] * skt + d[None, :] * skd, mask=tile, other=0.0)
        logits += tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        if USE_VNORM:
            v = tl.load(V + b * svb + h * svh + t[:, None] * svt + d[None, :] * svd, mask=tile, other=0.0)
            v = v.to(tl.float32)
            vsq += tl.sum(v * v, axis=1)
    logits = logits * scale
    if HAS_BIAS:
        row = 0  # the class token's position
        col = t
        if HAS_POS:  # padding (-1) reads position 0; it is masked to -inf below
            row = tl.maximum(tl.load(POS + b * spb), 0)
            col = tl.maximum(tl.load(POS + b * spb + t * spt, mask=inside, other=0), 0)
        logits += tl.load(BIAS + h * sbl + row * sbi + col.to(tl.int64) * sbj, mask=inside, other=0.0).to(tl.float32)
    out = (b * H + h) * T + t
    tl.store(LOGITS + out, tl.where(real, logits, float("-inf")), mask=inside)
    tl.store(VNORM + out, tl.sqrt(vsq) if USE_VNORM else tl.full([BLOCK_T], 1.0, tl.float32), mask=inside)


@triton.jit
def combine_heads(LOGITS, VNORM, b, t, T, H, scored, BLOCK_H: tl.constexpr):
    """(S, bad) of image ``b``: each head's softmax over its logits row times ||V_j||, summed over
    the heads and normalised over the scored tokens; uniform over them (bad = True) when the sum
    is 0 or not finite. ``t`` is the (BLOCK_T,) token range, ``scored`` its mask."""
    h = tl.arange(0, BLOCK_H)
    at = (b * H + h[:, None]) * T + t[None, :]
    tile = (h[:, None] < H) & (t[None, :] < T)
    logits = tl.load(LOGITS + at, mask=tile, other=float("-inf"))
    peak = tl.max(logits, axis=1)
    peak = tl.where(h < H, peak, 0.0)  # padding head rows: -inf - 0, weight 0, no NaN
    p = tl.exp(logits - peak[:, None])
    total = tl.sum(p, axis=1)
    p = p / tl.where(h < H, total, 1.0)[:, None]
    p = p * tl.load(VNORM + at, mask=tile, other=0.0)
    s = tl.where(scored, tl.sum(p, axis=0), 0.0)
    denom = tl.sum(s, axis=0)
    # Not (denom > 0) catches 0 and NaN; denom * 0 != 0 catches inf.
    bad = (denom <= 0.0) | (denom != denom) | (denom * 0.0 != 0.0)
    n_scored = tl.sum(scored.to(tl.float32), axis=0)
    uniform = tl.where(scored, 1.0 / tl.maximum(n_scored, 1.0), 0.0)
    safe = tl.where(bad, 1.0, denom)
    return tl.where(bad, uniform, s / safe), bad


@triton.jit
def _normalise_kernel(LOGITS, VNORM, MASK, S, BAD, smb, smt, T, H, num_prefix,
                      HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    scored = (t < T) & (t >= num_prefix)
    if HAS_MASK:
        scored &= tl.load(MASK + b * smb + t * smt, mask=t < T, other=0) != 0
    s, bad = combine_heads(LOGITS, VNORM, b, t, T, H, scored, BLOCK_H)
    tl.store(S + b * T + t, s, mask=t < T)
    tl.store(BAD + b, bad.to(tl.int8))


# Tokens per program and warps of ``_head_logits_kernel``. 32 x 8 was the fastest of 12 settings
# summed over 7 shapes inside CUDA graphs on the H100 (docs/performance.md): 2.3 -> 1.7 us at batch 1,
# 31.9 -> 29.3 us at batch 256 (DeiT-S, 197 tokens); 64 x 4, the earlier choice, stays ahead at
# batch 64 (4.3 vs 5.3 us at 172 tokens).
BLOCK_T = 32
NUM_WARPS = 8
# (An all-heads variant tried one program per (token chunk, image) over every head, reading a token's keys
# of all heads as one run: 134.9 vs 125.4 us over DeiT-S rho=0.87's nine batch-256 stage widths on
# the H200, and 2.6 vs 1.9 us at batch 1 (docs/performance.md, code in commit 005292f). Not adopted.)
# Images in reverse order. The projection that made q, k and v wrote the last images last, so
# those are still in L2 (50 MB on H100; K and V of DeiT-S at batch 256 are 77 MB) when this kernel
# starts; and the attention kernel after it, which goes through the images in order, then starts
# on the images this one read last.
LAST_IMAGE_FIRST = True


def head_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    scale: float,
    score: str = "attn_vnorm",
    out: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    traceable: bool = False,
) -> torch.Tensor:
    """(2, B, H, T) float32: each head's class-row logits (``scale`` applied, -inf at padded keys)
    and ‖V_j‖ (1 with ``score="attn"``). ``q, k, v`` are (B, H, T, dh) with any strides; only
    the class row of q is read. ``combine_heads`` turns them into scores. ``out``: a contiguous
    (2, B, H, T) float32 buffer to write instead of a new one, or a pair of (B, H, T) ones.
    ``bias`` (L, N, N), L = heads or 1: a position bias table over the original tokens, read at
    ``positions`` (B, T) (the original positions of this token set, -1 for padding; None: the
    tokens are the original ones).
    ``traceable``: launched through ``wrap_triton`` inside a ``triton_op``, without PDL
    (``packaged_ops.py``)."""
    B, H, T, D = k.shape
    if out is None:
        out = torch.empty(2, B, H, T, device=q.device, dtype=torch.float32)
    block_t = BLOCK_T
    block_d = min(triton.next_power_of_2(D), 64)
    mask = key_mask if key_mask is not None else out[0]  # dummy pointer when HAS_MASK is False
    table = bias if bias is not None else out[0]  # dummy pointers without a bias or positions
    pos = positions if positions is not None else mask
    pdl = not traceable and use_pdl(q)
    kernel = wrap_triton(_head_logits_kernel) if traceable else _head_logits_kernel
    kernel[(H, triton.cdiv(T, block_t), B)](
        q, k, v, mask, table, pos, *out,  # a (2, B, H, T) buffer, or two (B, H, T) tensors
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        mask.stride(0), mask.stride(-1),
        0 if table.shape[0] == 1 else table.stride(0), table.stride(-2), table.stride(-1),
        pos.stride(0), pos.stride(-1),
        T, H, D, float(scale),
        HAS_MASK=key_mask is not None, HAS_BIAS=bias is not None, HAS_POS=bias is not None and positions is not None,
        USE_VNORM=score == "attn_vnorm",
        BLOCK_T=block_t, BLOCK_D=block_d, LAST_IMAGE_FIRST=LAST_IMAGE_FIRST, PDL=pdl,
        num_warps=NUM_WARPS, **launch_options(pdl),
    )
    return out


def class_token_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    num_prefix: int,
    scale: float,
    score: str = "attn_vnorm",
    bias: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores S (B, T) float32 and a per-image flag (B,) int8, 1 for rows that fell back to uniform:
    ``head_scores`` then ``combine_heads`` (two launches; the library folds the second into the
    sampling kernel). ``bias``, ``positions``: a position bias table, as ``head_scores``."""
    return normalise(head_scores(q, k, v, key_mask, scale, score, bias=bias, positions=positions), key_mask,
                     num_prefix)


def normalise(heads: torch.Tensor, key_mask: Optional[torch.Tensor], num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``combine_heads`` of per-head logits and value norms (2, B, H, T) in a launch of its own: the
    scores S (B, T) float32 over the real tokens after the prefix, and the uniform-fallback flags
    (B,) int8."""
    _, B, H, T = heads.shape
    scores = torch.empty(B, T, device=heads.device, dtype=torch.float32)
    bad = torch.empty(B, device=heads.device, dtype=torch.int8)
    mask = key_mask if key_mask is not None else scores
    block_t = triton.next_power_of_2(T)
    _normalise_kernel[(B,)](heads[0], heads[1], mask, scores, bad, mask.stride(0), mask.stride(-1), T, H, num_prefix,
                            HAS_MASK=key_mask is not None, BLOCK_T=block_t,
                            BLOCK_H=triton.next_power_of_2(H), num_warps=4 if block_t <= 256 else 8)
    return scores, bad
