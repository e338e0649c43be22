"""Triton kernel 5: attention of the layers after an ATS stage, over a key-padding mask.

After a stage every image keeps K'+p real tokens, laid out first, with padding after them
(ATS-NOTES §2 and §5). ``scaled_dot_product_attention`` with a mask cannot use the flash kernel
and its masked kernels read the whole padded key set; this one is a flash-attention forward that

- reads each image's key-padding mask once per program and stops the key loop after the image's
  last real key (so the padding costs neither reads nor FLOPs; masks that are not a suffix are
  still honoured column by column),
- skips query tiles that hold only padding rows (self-attention, ``Tq == Tk``) and writes zeros
  there: padded rows are never read by a real token,
- writes its output as ``(B, T, H, dh)`` memory viewed as ``(B, H, T, dh)``, the layout the
  following ``transpose(1, 2).reshape(B, T, C)`` turns into a free view.

Online softmax in float32 with exp2. Reference: ``reference.masked_attention`` (SDPA with the mask).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _masked_attention_kernel(
    Q, K, V, MASK, O,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    smb, smt,
    sob, soh, sot, sod,
    H, TQ, TK, D, qk_scale,
    SELF: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    # The image's key length: one past its last real key.
    t = tl.arange(0, BLOCK_T)
    real = tl.load(MASK + b * smb + t * smt, mask=t < TK, other=0) != 0
    kv_len = tl.max(tl.where(real, t + 1, 0), axis=0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    in_rows, in_d = rows < TQ, d < D
    n_end = kv_len
    if SELF:  # a tile of padding rows only: no keys to visit, zeros out
        n_end = tl.where(pid_m * BLOCK_M < kv_len, kv_len, 0)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqt + d[None, :] * sqd,
                mask=in_rows[:, None] & in_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        valid = tl.load(MASK + b * smb + cols * smt, mask=cols < n_end, other=0) != 0
        k = tl.load(K + b * skb + h * skh + cols[None, :] * skt + d[:, None] * skd,
                    mask=valid[None, :] & in_d[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # the first key (class token) is always real
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
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
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * sot + d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=in_rows[:, None] & in_d[None, :])


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v over the real keys, for (B, H, T, dh) inputs and a (B, Tk) bool mask
    whose first key is real. Returns (B, H, Tq, dh); rows of a self-attention's padded tokens are 0."""
    B, H, TQ, D = q.shape
    TK = k.shape[2]
    out = torch.empty(B, TQ, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    block_d = max(16, triton.next_power_of_2(D))
    block_m = 64 if TQ > 32 else 16
    block_n = 64 if block_d <= 64 else 32
    mask = key_mask if key_mask.dtype != torch.bool else key_mask.view(torch.int8)
    grid = (triton.cdiv(TQ, block_m), B * H)
    _masked_attention_kernel[grid](
        q, k, v, mask, out,
        *q.stride(), *k.stride(), *v.stride(),
        mask.stride(0), mask.stride(1),
        *out.stride(),
        H, TQ, TK, D, float(scale) * math.log2(math.e),
        SELF=TQ == TK, IEEE=q.dtype == torch.float32,
        # Triton's CPU interpreter (3.8) multiplies bfloat16 bit patterns in tl.dot: upcast there.
        UPCAST=q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_T=triton.next_power_of_2(TK),
        num_warps=4, num_stages=2,
    )
    return out
