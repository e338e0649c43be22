"""Triton kernel 3: attention for the kept query rows only (ATS-NOTES §4, paper eq. 6).

A flash-attention forward whose query tile is gathered through the kept-index tensor, so the
gathered queries are never written to memory and the T×T matrix never exists; padded keys (the
key-padding mask of an earlier stage) get zero weight. Online softmax in float32 with exp2.
The same kernel, without an index, is the attention of the layers after a stage
(``masked_attention.py``). A relative position bias (BEiT) is read inside the key loop from the
model's (heads, N, N) table at each row's and key's original position, so the per-image
(B, heads, T', T') bias the PyTorch path gathers, and the float-masked SDPA it forces, never exist.

The key loop stops after each image's last real key (padding is kept last), so padded keys cost
nothing; when an image's real keys are one run (every mask ATS makes) it reads no mask in the loop.
Reference: ``reference.attention_rows`` (SDPA on gathered queries with the mask), which
the library uses when a gradient or dropout is needed: this kernel has no backward. On H100 it
beats the masked SDPA on gathered queries 1.2-4x (docs/performance.md).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .pdl import launch_options, use_pdl, wait_for_previous_kernel


@triton.jit
def _attend(q, K, V, MASK, BIAS, POS, k_base, v_base, m_base, bias_rows, p_base, skt, skd, svt, svd, smt, sbj, spt,
            n_end, qk_scale, d, in_d,
            CHECK_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, IEEE: tl.constexpr,
            UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online softmax of the q tile over keys [0, n_end), also reading the key mask column by column
    with ``CHECK_MASK`` (a mask that is not one run of real keys followed by padding). ``HAS_BIAS``:
    adds the position bias ``BIAS[bias_rows + position(key) * sbj]`` (``bias_rows``: each query
    row's offset into the table), the key's original position read from ``POS`` with ``HAS_POS``."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        valid = cols < n_end
        if CHECK_MASK:
            valid &= tl.load(MASK + m_base + cols * smt, mask=valid, other=0) != 0
        k = tl.load(K + k_base + cols[None, :] * skt + d[:, None] * skd,
                    mask=valid[None, :] & in_d[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * qk_scale  # log2 units
        if HAS_BIAS:
            key_pos = cols
            if HAS_POS:  # padding (-1) reads position 0; its column is masked below
                key_pos = tl.maximum(tl.load(POS + p_base + cols * spt, mask=valid, other=0), 0)
            b_tile = tl.load(BIAS + bias_rows[:, None] + key_pos[None, :].to(tl.int64) * sbj, mask=valid[None, :],
                             other=0.0)
            s += b_tile.to(tl.float32) * 1.4426950408889634  # log2(e): the bias is in natural units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # the first key (kept first) is always real
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + v_base + cols[:, None] * svt + d[None, :] * svd,
                    mask=valid[:, None] & in_d[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc / tl.where(l_i > 0, l_i, 1.0)[:, None]


@triton.jit
def _attention_kernel(
    Q, K, V, IDX, MASK, BIAS, POS, O,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sib, sit,
    smb, smt,
    sbl, sbi, sbj,
    spb, spt,
    sob, soh, sot, sod,
    H, T, R, D, qk_scale,
    HAS_INDEX: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    SELF: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr, ONE_RUN_LOOP: tl.constexpr,
    Q_FIRST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Rows ``IDX[b]`` of q (or the first R rows without an index) over T keys. ``SELF``: the
    queries are the key tokens themselves, so a tile past the last real key holds padding only.
    ``HAS_BIAS``: a position bias table ``BIAS`` (L, N, N) over the original tokens (L = heads, or
    1 with ``sbl`` = 0), read at the rows' and keys' original positions ``POS[b]`` (their own
    indices without ``HAS_POS``): the per-image bias is never materialised."""
    wait_for_previous_kernel(PDL)
    # Inductor passes a user kernel's Python floats as fp64; Triton's launcher as fp32. Pin fp32 so the
    # online-softmax state keeps one type either way (docs/performance.md, "Host time").
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    in_rows, in_d = rows < R, d < D
    src = rows  # the query rows read from q
    if HAS_INDEX:
        src = tl.load(IDX + b * sib + rows * sit, mask=in_rows, other=0)
    if Q_FIRST:  # the index and query loads in flight while the mask is reduced (see Q_FIRST below)
        q = _load_queries(Q, src, b, h, d, in_rows, in_d, sqb, sqh, sqt, sqd, UPCAST)
    n_end = T
    one_run = True  # the real keys are exactly [0, n_end)
    if HAS_MASK:  # stop after the image's last real key: padding (kept last) costs nothing
        t = tl.arange(0, BLOCK_T)
        real = tl.load(MASK + b * smb + t * smt, mask=t < T, other=0) != 0
        n_end = tl.max(tl.where(real, t + 1, 0), axis=0)
        # Every mask ATS makes is one run (kept tokens first); the key loop then needs no mask loads:
        # 73.0 vs 77.9 us at batch 256 x 172 keys on H100 (docs/performance.md).
        one_run = tl.sum(real.to(tl.int32), axis=0) == n_end
        if SELF:  # a tile of padding rows only: no keys to visit, zeros out
            n_end = tl.where(pid_m * BLOCK_M < n_end, n_end, 0)
    if not Q_FIRST:
        q = _load_queries(Q, src, b, h, d, in_rows, in_d, sqb, sqh, sqt, sqd, UPCAST)
    k_base, v_base, m_base, p_base = b * skb + h * skh, b * svb + h * svh, b * smb, b * spb
    bias_rows = src.to(tl.int64)  # each query row's offset into the bias table (its original position)
    if HAS_BIAS:
        if HAS_POS:
            bias_rows = tl.maximum(tl.load(POS + p_base + src * spt, mask=in_rows, other=0), 0).to(tl.int64)
        bias_rows = h * sbl + bias_rows * sbi
    if ONE_RUN_LOOP and one_run:
        out = _attend(q, K, V, MASK, BIAS, POS, k_base, v_base, m_base, bias_rows, p_base, skt, skd, svt, svd, smt,
                      sbj, spt, n_end, qk_scale, d, in_d,
                      False, HAS_BIAS, HAS_POS, IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        out = _attend(q, K, V, MASK, BIAS, POS, k_base, v_base, m_base, bias_rows, p_base, skt, skd, svt, svd, smt,
                      sbj, spt, n_end, qk_scale, d, in_d,
                      HAS_MASK, HAS_BIAS, HAS_POS, IEEE, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
    tl.store(O + b * sob + h * soh + rows[:, None] * sot + d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=in_rows[:, None] & in_d[None, :])


@triton.jit
def _load_queries(Q, src, b, h, d, in_rows, in_d, sqb, sqh, sqt, sqd, UPCAST: tl.constexpr):
    """The program's query tile: rows ``src`` of image ``b``, head ``h``."""
    q = tl.load(Q + b * sqb + h * sqh + src[:, None] * sqt + d[None, :] * sqd,
                mask=in_rows[:, None] & in_d[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q


def default_config(rows: int, D: int, programs: int = 0, multiprocessors: int = 0) -> dict:
    """Tile sizes and launch settings of ``_attention_kernel`` for ``rows`` query rows of head size D,
    over ``programs`` (batch x heads) attention problems on a GPU with ``multiprocessors`` SMs."""
    if programs * triton.cdiv(rows, 64) < multiprocessors:
        # Fewer 64-row tiles than SMs (batch 1): latency-bound, so more, thinner tiles and fewer key
        # steps. 16 x 128 tiles, 2 stages took 0.4-1.1 us less than 64 x 32 at 8 of the 9 stage
        # shapes of DeiT-S rho=0.87 at batch 1 on H100, 4 us a forward (docs/performance.md).
        return dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=2)
    # Swept on H100 (docs/performance.md): 64 x 32 tiles, 3 stages won at
    # every batch-256 shape ATS makes, 10-20% faster than the 64 x 64, 2-stage first guess. Again
    # in CUDA graphs at the nine stage shapes of DeiT-S rho=0.87 (and against 64/32/16 x 128 tiles;
    # docs/performance.md): it won every batch-256 shape. `python -m benchmarks.attention_tiles` (H100)
    # finds it the fastest of eight configurations at ViT-B/16's and EVA02-S's nine batch-256 stages.
    return dict(BLOCK_M=64 if rows > 32 else 16, BLOCK_N=32, num_warps=4, num_stages=3)


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device; 0 elsewhere (Triton's interpreter), which keeps the batch config."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


# The key loop without mask loads for masks that are one run of real keys (all ATS makes).
ONE_RUN_LOOP = True
# The index and query loads issued before the mask reduction, so their memory latencies overlap it
# (the kernel used to reduce the mask first: three latencies in a row at each program's start).
# Masked stages of DeiT-S rho=0.87, H200, in CUDA graphs: 0.7-2.4 us faster at each batch-256 shape
# (336 vs 351 us over the eight), 0.16-0.18 us at batch 1; ViT-B alike (docs/performance.md).
# (One key loop with predicated mask loads instead of the two loops behind the branch below was
# 0.9-7 us slower at every batch-256 masked shape, and 0.5-0.8 us at batch 1: not adopted.)
Q_FIRST = True


def launch_attention(q, k, v, index: Optional[torch.Tensor], key_mask: Optional[torch.Tensor], scale: float,
                     rows: int, config: Optional[dict] = None, bias: Optional[torch.Tensor] = None,
                     positions: Optional[torch.Tensor] = None, traceable: bool = False) -> torch.Tensor:
    """Run ``_attention_kernel`` for ``rows`` query rows (gathered through ``index`` if given);
    ``config`` overrides ``default_config`` (its sweeps: docs/performance.md, "Kernels").
    ``traceable``: launched through ``wrap_triton`` inside a ``triton_op`` (``packaged_ops.py``),
    without PDL and with a tile config that does not depend on the batch.
    ``bias``: a position bias table (L, N, N), L = heads or 1, over the original tokens, added at
    ``bias[h, positions[b, row], positions[b, key]]``; ``positions`` (B, T) maps the key set's
    rows to original positions (-1: padding), or None when they are the original tokens."""
    B, H, _, D = q.shape
    T = k.shape[2]
    # (B, R, H, dh) memory: the model's following transpose(1, 2).reshape(B, R, C) is then a view.
    out = torch.empty(B, rows, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    if config is None:  # traced: the batch config, since the small-grid choice would guard the batch
        config = default_config(rows, D) if traceable else default_config(rows, D, B * H, multiprocessors(q.device))
    mask = out if key_mask is None else key_mask
    if mask.dtype == torch.bool and not traceable:  # (Inductor cannot lower a view from bool to int8)
        mask = mask.view(torch.int8)
    idx = index if index is not None else mask  # a dummy pointer without an index
    if bias is not None and (bias.dim() != 3 or bias.shape[0] not in (1, H)):
        raise ValueError(f"a position bias table must be (heads or 1, N, N), got {tuple(bias.shape)} for {H} heads")
    table = bias if bias is not None else out  # dummy pointers without a bias or positions
    pos = positions if positions is not None else idx
    bias_strides = (0 if table.shape[0] == 1 else table.stride(0), table.stride(1), table.stride(2))
    grid = (triton.cdiv(rows, config["BLOCK_M"]), B * H)
    pdl = not traceable and use_pdl(q)
    kernel = wrap_triton(_attention_kernel) if traceable else _attention_kernel
    kernel[grid](
        q, k, v, idx, mask, table, pos, out,
        *q.stride(), *k.stride(), *v.stride(),
        idx.stride(0), idx.stride(1),
        mask.stride(0), mask.stride(1),
        *bias_strides,
        pos.stride(0), pos.stride(1),
        *out.stride(),
        H, T, rows, D, float(scale) * math.log2(math.e),
        HAS_INDEX=index is not None, HAS_MASK=key_mask is not None, HAS_BIAS=bias is not None,
        HAS_POS=bias is not None and positions is not None,
        SELF=index is None and q.shape[2] == T,
        IEEE=q.dtype == torch.float32,
        # Triton's CPU interpreter (3.8) multiplies bfloat16 bit patterns in tl.dot: upcast there.
        UPCAST=q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        PDL=pdl, ONE_RUN_LOOP=ONE_RUN_LOOP, Q_FIRST=Q_FIRST, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_T=triton.next_power_of_2(T), **launch_options(pdl), **config,
    )
    return out


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    scale: float,
    bias: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(q[index] kᵀ · scale + bias) v over the real keys, for (B, H, T, dh) inputs: (B, H, T', dh).
    ``bias`` (L, N, N) and ``positions`` (B, T) as ``launch_attention``."""
    return launch_attention(q, k, v, index, key_mask, scale, index.shape[1], bias=bias, positions=positions)
