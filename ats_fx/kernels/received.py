"""Triton kernels: the scores of a stage without a class token, "attention received".

Without a class token a stage scores token j by the mean over the real queries of
A_h[i, j] = softmax_j(q_i·k_j·scale), times ‖V_h,j‖, summed over the heads and normalised
(docs/ats-semantics.md; ``reference.weight_scores``). The PyTorch path materialises A, (B, H, T, T):
at batch 256 that is 238 MB a ViT-B stage, written and read several times. These two kernels
never hold more than a tile of it:

1. ``_row_lse_kernel``, one program per (query block, head, image): the online softmax of each
   query row over the real keys, written as its log-sum-exp (log2 units).
2. ``_column_kernel``, one program per (key block, head, image): Σ_i exp(q_i·k_j·scale − lse_i)
   over the real queries, written as its natural log, the head's "logits", beside ‖V_j‖: the
   (2, B, H, T) layout of ``scores.head_scores``.

Each row of A sums to 1 over the real keys, so a head's column sums add up to the number of real
queries, the same for every head: softmax over log Σ_i A_h[i, j] is the column mean. The sampling
kernel's ``combine_heads`` (or ``scores.normalise``) therefore turns these logits into the scores
exactly as it turns the class row's. The cost is two QKᵀ products over the stage's tokens.

Reference: ``reference.weight_scores(reference.attention_weights(...), class_token=False)``.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _load_keys(K, k_base, cols, valid, d, in_d, skt, skd, UPCAST: tl.constexpr):
    """Keys ``cols`` as a (BLOCK_D, BLOCK_N) tile, zero where not ``valid``."""
    k = tl.load(K + k_base + cols[None, :] * skt + d[:, None] * skd, mask=valid[None, :] & in_d[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    return k


@triton.jit
def _logits(q, k, qk_scale, IEEE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) logits of a query tile and a key tile, in log2 units."""
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    return s * qk_scale


@triton.jit
def _load_rows(Q, q_base, rows, in_rows, d, in_d, sqt, sqd, UPCAST: tl.constexpr):
    q = tl.load(Q + q_base + rows[:, None] * sqt + d[None, :] * sqd, mask=in_rows[:, None] & in_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit
def _bias_tile(BIAS, POS, h, b, rows, in_rows, cols, in_cols, sbl, sbi, sbj, spb, spt, HAS_POS: tl.constexpr):
    """The position bias of query rows ``rows`` and keys ``cols`` in log2 units, read from a (L, N, N)
    table at their original positions ``POS[b]`` with ``HAS_POS`` (padding, -1, reads position 0 and
    is masked by the caller), at their own indices without."""
    r, c = rows, cols
    if HAS_POS:
        r = tl.maximum(tl.load(POS + b * spb + rows * spt, mask=in_rows, other=0), 0)
        c = tl.maximum(tl.load(POS + b * spb + cols * spt, mask=in_cols, other=0), 0)
    tile = tl.load(BIAS + h * sbl + r[:, None].to(tl.int64) * sbi + c[None, :].to(tl.int64) * sbj,
                   mask=in_rows[:, None] & in_cols[None, :], other=0.0)
    return tile.to(tl.float32) * 1.4426950408889634  # log2(e): the table is in natural units


@triton.jit
def _real(MASK, m_base, idx, inside, smt, HAS_MASK: tl.constexpr):
    """Which of the token indices ``idx`` are real (inside T and not padding)."""
    real = inside
    if HAS_MASK:
        real &= tl.load(MASK + m_base + idx * smt, mask=inside, other=0) != 0
    return real


@triton.jit
def _row_lse_kernel(
    Q, K, MASK, BIAS, POS, LSE,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    smb, smt,
    sbl, sbi, sbj,
    spb, spt,
    T, H, D, qk_scale,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """log2 Σ_j exp2(logits[i, j]) over the real keys j of each query row i of one head and image;
    ``HAS_BIAS``: the logits include a position bias table (``_bias_tile``)."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # Python floats reach Inductor's launcher as fp64
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    in_rows, in_d = rows < T, d < D
    q = _load_rows(Q, b * sqb + h * sqh, rows, in_rows, d, in_d, sqt, sqd, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, T, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        valid = _real(MASK, b * smb, cols, cols < T, smt, HAS_MASK)
        k = _load_keys(K, b * skb + h * skh, cols, valid, d, in_d, skt, skd, UPCAST)
        s = _logits(q, k, qk_scale, IEEE)
        if HAS_BIAS:
            s += _bias_tile(BIAS, POS, h, b, rows, in_rows, cols, cols < T, sbl, sbi, sbj, spb, spt, HAS_POS)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A block of padding only, before any real key: keep the state at (-inf, 0), no NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    tl.store(LSE + (b * H + h) * T + rows, m_i + tl.log2(l_i), mask=in_rows)


@triton.jit
def _column_kernel(
    Q, K, V, MASK, BIAS, POS, LSE, LOGITS, VNORM,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    smb, smt,
    sbl, sbi, sbj,
    spb, spt,
    T, H, D, qk_scale,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, USE_VNORM: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """ln Σ_i A[i, j] over the real queries i (-inf at padded keys) and ‖V_j‖, for one key block."""
    qk_scale = tl.cast(qk_scale, tl.float32)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    inside, in_d = cols < T, d < D
    real = _real(MASK, b * smb, cols, inside, smt, HAS_MASK)
    k = _load_keys(K, b * skb + h * skh, cols, real, d, in_d, skt, skd, UPCAST)  # read once, used by every query tile
    column = tl.zeros([BLOCK_N], dtype=tl.float32)
    for m0 in range(0, T, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        queries = _real(MASK, b * smb, rows, rows < T, smt, HAS_MASK)
        q = _load_rows(Q, b * sqb + h * sqh, rows, rows < T, d, in_d, sqt, sqd, UPCAST)
        s = _logits(q, k, qk_scale, IEEE)
        if HAS_BIAS:
            s += _bias_tile(BIAS, POS, h, b, rows, rows < T, cols, inside, sbl, sbi, sbj, spb, spt, HAS_POS)
        lse = tl.load(LSE + (b * H + h) * T + rows, mask=queries, other=0.0)
        p = tl.exp2(s - lse[:, None])
        column += tl.sum(tl.where(queries[:, None] & real[None, :], p, 0.0), axis=0)
    out = (b * H + h) * T + cols
    tl.store(LOGITS + out, tl.where(real, tl.log(tl.where(real, column, 1.0)), float("-inf")), mask=inside)
    vsq = tl.zeros([BLOCK_N], dtype=tl.float32)
    if USE_VNORM:
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svt + d[None, :] * svd,
                    mask=inside[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        vsq = tl.sum(v * v, axis=1)
    tl.store(VNORM + out, tl.sqrt(vsq) if USE_VNORM else tl.full([BLOCK_N], 1.0, tl.float32), mask=inside)


# Query rows and keys per tile. A first choice, not yet swept on a GPU: 64 x 64 keeps each program's
# tiles as large as the class-row scores' work while a 197-token stage still has 4 programs per head.
BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4


def received_head_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    scale: float,
    score: str = "attn_vnorm",
    bias: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    traceable: bool = False,
) -> torch.Tensor:
    """(2, B, H, T) float32: per head, ln of each key's attention summed over the real queries
    (-inf at padded keys), and ‖V_j‖ (1 with ``score="attn"``): what ``scores.head_scores`` gives
    for the class row, for ``combine_heads``. ``q, k, v`` are (B, H, T, dh) with any strides;
    ``key_mask`` (B, T) bool marks the real tokens (None: all are). ``bias`` (L, N, N), L = heads
    or 1: a position bias table of the logits over the original tokens, read at ``positions``
    (B, T) (original positions, -1 for padding; None: the tokens are the original ones).
    ``out``: a (2, B, H, T) float32 buffer to write instead of a new one, or a pair of (B, H, T) ones.
    ``traceable``: launched through ``wrap_triton`` inside a ``triton_op`` (``packaged_ops.py``)."""
    B, H, T, D = k.shape
    if out is None:
        out = torch.empty(2, B, H, T, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    mask = lse if key_mask is None else key_mask  # a dummy pointer without a mask
    if mask.dtype == torch.bool and not traceable:  # (Inductor cannot lower a view from bool to int8)
        mask = mask.view(torch.int8)
    if bias is not None and (bias.dim() != 3 or bias.shape[0] not in (1, H)):
        raise ValueError(f"a position bias table must be (heads or 1, N, N), got {tuple(bias.shape)} for {H} heads")
    table = bias if bias is not None else lse  # dummy pointers without a bias or positions
    pos = positions if positions is not None else mask
    tables = (table, pos)
    table_strides = (0 if table.shape[0] == 1 else table.stride(0), table.stride(-2), table.stride(-1),
                     pos.stride(0), pos.stride(-1))
    common = dict(
        T=T, H=H, D=D, qk_scale=float(scale) * math.log2(math.e), HAS_MASK=key_mask is not None,
        HAS_BIAS=bias is not None, HAS_POS=bias is not None and positions is not None,
        IEEE=q.dtype == torch.float32,
        # Triton's CPU interpreter (3.8) multiplies bfloat16 bit patterns in tl.dot: upcast there.
        UPCAST=q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=NUM_WARPS,
    )
    strides = (*q.stride(), *k.stride())
    rows_kernel = wrap_triton(_row_lse_kernel) if traceable else _row_lse_kernel
    columns_kernel = wrap_triton(_column_kernel) if traceable else _column_kernel
    rows_kernel[(triton.cdiv(T, BLOCK_M), H, B)](
        q, k, mask, *tables, lse, *strides, mask.stride(0), mask.stride(-1), *table_strides, **common)
    columns_kernel[(triton.cdiv(T, BLOCK_N), H, B)](
        q, k, v, mask, *tables, lse, *out, *strides, *v.stride(), mask.stride(0), mask.stride(-1),
        *table_strides, USE_VNORM=score == "attn_vnorm", **common)
    return out


def received_scores(
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
    """Scores S (B, T) float32 and a per-image flag (B,) int8 (1: fell back to uniform), as
    ``reference.weight_scores`` of the whole attention matrix without a class token. The first
    ``num_prefix`` tokens (registers) are queries but are never scored. ``bias``, ``positions``: a
    position bias table, as ``received_head_scores``."""
    from .scores import normalise

    return normalise(received_head_scores(q, k, v, key_mask, scale, score, bias, positions), key_mask, num_prefix)
