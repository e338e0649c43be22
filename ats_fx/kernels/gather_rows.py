"""Triton kernel 5: the kept rows of a full attention output (ATS-NOTES §4, the overlapped stage).

``ats_fx/overlap.py`` computes the attention of every query row while the sampling runs on
another stream; the stage's output O = A[kept] V is then rows ``index[b]`` of that result:
``out[b, :, t] = x[b, :, index[b, t]]``. One program per output row moves its H x dh values, read
through any strides (SDPA and the Triton attention lay their outputs out differently) and written
in the (B, W, H, dh) memory order ``attention_rows`` returns, so the following
``transpose(1, 2).reshape`` stays a view.

Reference: ``reference.gather_rows``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(X, IDX, O, sxb, sxh, sxt, sxd, sib, sit, W, H, D,
                        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * W + t
    b, t = row // W, row % W
    src = tl.load(IDX + b * sib + t * sit)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    inside = (h[:, None] < H) & (d[None, :] < D)
    x = tl.load(X + b * sxb + h[:, None] * sxh + src * sxt + d[None, :] * sxd, mask=inside, other=0.0)
    tl.store(O + row * H * D + h[:, None] * D + d[None, :], x, mask=inside)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, W) of ``x`` (B, H, T, dh), any strides: (B, H, W, dh) over (B, W, H, dh) memory."""
    B, H, _, D = x.shape
    W = index.shape[1]
    out = torch.empty(B, W, H, D, device=x.device, dtype=x.dtype)
    block = triton.next_power_of_2(H) * triton.next_power_of_2(D)
    _gather_rows_kernel[(B * W,)](x, index, out, *x.stride(), index.stride(0), index.stride(1), W, H, D,
                                  BLOCK_H=triton.next_power_of_2(H), BLOCK_D=triton.next_power_of_2(D),
                                  num_warps=4 if block >= 512 else 1)
    return out.transpose(1, 2)
