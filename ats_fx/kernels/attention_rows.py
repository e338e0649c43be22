"""Triton kernel 3: attention for the kept query rows only (ATS-NOTES §4, paper eq. 6).

A flash-attention forward whose query tile is gathered through the kept-index tensor, so the
gathered queries are never written to memory and the T×T matrix never exists; padded keys (the
key-padding mask of an earlier stage) get zero weight. Online softmax in float32.

The key loop stops after each image's last real key (padding is kept last), so padded keys cost
nothing. Reference: ``reference.attention_rows`` (SDPA on gathered queries with the mask), which
the library uses when a gradient or dropout is needed: this kernel has no backward. On H100 it
beats the masked SDPA on gathered queries 2-4x (benchmarks/results/masked_attention.md).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _attention_rows_kernel(
    Q, K, V, IDX, MASK, O,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sib, sit,
    smb, smt,
    sob, soh, sot, sod,
    H, T, R, D, scale,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    n_end = T
    if HAS_MASK:  # stop after the image's last real key: padding (kept last) costs nothing
        t = tl.arange(0, BLOCK_T)
        real = tl.load(MASK + b * smb + t * smt, mask=t < T, other=0) != 0
        n_end = tl.max(tl.where(real, t + 1, 0), axis=0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    in_rows, in_d = rows < R, d < D
    src = tl.load(IDX + b * sib + rows * sit, mask=in_rows, other=0)
    q = tl.load(Q + b * sqb + h * sqh + src[:, None] * sqt + d[None, :] * sqd,
                mask=in_rows[:, None] & in_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        valid = cols < n_end
        if HAS_MASK:
            valid &= tl.load(MASK + b * smb + cols * smt, mask=valid, other=0) != 0
        k = tl.load(K + b * skb + h * skh + cols[None, :] * skt + d[:, None] * skd,
                    mask=valid[None, :] & in_d[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # column 0 (class token) is always real
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svt + d[None, :] * svd,
                    mask=valid[:, None] & in_d[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * sot + d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=in_rows[:, None] & in_d[None, :])


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """softmax(q[index] kᵀ · scale) v over the real keys, for (B, H, T, dh) inputs: (B, H, T', dh)."""
    B, H, T, D = q.shape
    R = index.shape[1]
    # (B, R, H, dh) memory: the model's following transpose(1, 2).reshape(B, R, C) is then a view.
    out = torch.empty(B, R, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    block_d = max(16, triton.next_power_of_2(D))
    block_m = 64 if R > 32 else 16
    block_n = 64 if block_d <= 64 else 32
    mask = index if key_mask is None else key_mask.view(torch.int8) if key_mask.dtype == torch.bool else key_mask
    grid = (triton.cdiv(R, block_m), B * H)
    _attention_rows_kernel[grid](
        q, k, v, index, mask, out,
        *q.stride(), *k.stride(), *v.stride(),
        index.stride(0), index.stride(1),
        mask.stride(0), mask.stride(1),
        *out.stride(),
        H, T, R, D, float(scale),
        HAS_MASK=key_mask is not None, IEEE=q.dtype == torch.float32,
        # Triton's CPU interpreter (3.8) multiplies bfloat16 bit patterns in tl.dot: upcast there.
        UPCAST=q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_T=triton.next_power_of_2(T),
        num_warps=4, num_stages=2,
    )
    return out
