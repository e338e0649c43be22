"""Triton kernel 4: the residual gather fused with the residual add (ATS-NOTES §4).

After a stage the block adds its attention branch to the residual stream at the kept tokens:
``out = x[b, index[b, t]] + y[b, t]``. Done as ``index_select`` then ``add``, the gathered rows
are written to memory and read back once more; this kernel reads each kept row of ``x`` and of
``y`` once and writes the sum, one pass instead of two. With ``every_row`` (a deferred gather,
``passes/defer.py``: ``y`` is the output projection of every row, not of the kept ones) ``y`` is
read at the same gathered rows: ``out = x[b, index[b, t]] + y[b, index[b, t]]``. The sum is formed in float32 and rounded
once, which is bit-identical to PyTorch's add for float16/bfloat16/float32 (on the GPU; Triton's
CPU interpreter truncates float32 to bfloat16 instead of rounding, one ulp off).

Reference: ``ops.token_gather(x, index, 0, 1) + y`` (``+ ops.token_gather(y, index, 0, 1)``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_add_kernel(X, IDX, Y, O, T, W, C, sib, sit, EVERY_ROW: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * W + t
    b, t = row // W, row % W
    src = tl.load(IDX + b * sib + t * sit)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = c < C
    x = tl.load(X + (b * T + src) * C + c, mask=inside, other=0.0)
    y_row = b * T + src if EVERY_ROW else row
    y = tl.load(Y + y_row * C + c, mask=inside, other=0.0)
    tl.store(O + row * C + c, (x.to(tl.float32) + y.to(tl.float32)).to(O.dtype.element_ty), mask=inside)


def gather_add(x: torch.Tensor, index: torch.Tensor, y: torch.Tensor, every_row: bool = False) -> torch.Tensor:
    """``x[b, index[b, t], :] + y[b, t, :]`` for contiguous (B, T, C) ``x`` and (B, T', C) ``y``;
    with ``every_row``, ``+ y[b, index[b, t], :]`` for (B, T, C) ``y``."""
    B, T, C = x.shape
    W = index.shape[1]
    out = torch.empty(B, W, C, device=x.device, dtype=y.dtype)
    block_c = min(1024, triton.next_power_of_2(C))
    grid = (B * W, triton.cdiv(C, block_c))
    _gather_add_kernel[grid](x, index, y, out, T, W, C, index.stride(0), index.stride(1),
                             EVERY_ROW=every_row, BLOCK_C=block_c, num_warps=4 if block_c >= 512 else 2)
    return out
