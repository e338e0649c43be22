"""A static-width ATS stage on two CUDA streams, for batches too small to fill the GPU.

At batch 1 a stage's head logits, sampling and kept-row attention run one after the other, a
chain of ~11 us on ViT-B against ~6 us for dense attention, while the GEMMs around it cost the
same for 172 rows as for 197. Here the attention of *every* query row runs on the current stream
while a side stream scores and samples; the kept rows are then gathered (O = A[kept] V is those
rows of the full attention output, so the result is the same). The stage then costs
max(attention, logits + sampling) + one gather.

Used for ``padding="static"`` at inference on CUDA when ``dispatch.stage_path`` says the batch is small;
inside CUDA graphs (``mode="reduce-overhead"``) the fork and join become graph edges. Every buffer
is allocated on the current stream before the fork, and the join comes before any of them is
returned, so the caching allocator never sees a tensor used on a stream it was not made on.

With ``gather=False`` the copy goes too: ``passes/defer.py`` moves the gather past the output
projection into the residual add, where Inductor (or the ``gather_add`` kernel) reads both operands
at the kept rows in the one pass it makes anyway. Where that pass also hands the stage the output
projection's weights (``proj``), the projection of every row runs here on the current stream, and
with ``JOIN_AFTER_PROJECTION`` before the join, beside the side stream's sampling: at batch 1 the
scoring and sampling took longer than the attention alone (DeiT-S, 6.05 against 3.64 us a stage;
docs/performance.md, "Batch 1").

Measured (H200, reduce-overhead, batch 1, stages 3-11, against dense same-compile): ViT-B
rho=1.0/0.87/0.72 0.947/0.993/1.038x sequential, 1.009/1.026/1.069x overlapped with the deferred
gather; DeiT-S 0.972/1.011/1.052x and 1.038/1.056/1.089x (docs/performance.md, "Small batches").
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor


# With ``proj``: True joins the streams after the output projection, so it runs beside the
# sampling; False joins before it. True measured faster at batch 1 and the same at batch 8 (H200,
# reduce-overhead, rho=0.87: DeiT-S 1.243x against 1.184x dense, ViT-B/16 1.287x against 1.238x;
# docs/performance.md, "Batch 1"; the benchmarks' late_join variant).
JOIN_AFTER_PROJECTION = True


@functools.lru_cache(maxsize=None)
def _side_stream(device: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def overlapped_stage_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], num_prefix: int, scale: float,
    ratio: Optional[float], k_tokens: Optional[int], score: str, width: int, gather: bool = True,
    bias: Optional[Tensor] = None, positions: Optional[Tensor] = None,
    proj: Optional[tuple[Tensor, Optional[Tensor]]] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, index, mask, kept, budget, new_positions)`` of a static-width stage (``width`` = K + p),
    as ``sample_tokens`` followed by ``attention_rows``, with the sampling on a side stream;
    ``new_positions`` (B, width) are the kept rows' original positions, -1 for padding. With
    ``gather=False`` ``out`` is every row's attention (B, H, T, dh), for a graph that gathers the
    kept rows after the output projection instead (``passes/defer.py``); with ``proj`` (weight,
    bias), every row projected, (B, T, out features). ``bias``, ``positions``: a position bias table
    and the tokens' original positions (``library.attention``)."""
    from .kernels.attention_rows import launch_attention
    from .kernels.gather_rows import gather_rows
    from .kernels.sample import empty_outputs, sample_with_budget
    from .kernels.scores import head_scores

    assert proj is None or not gather, "a projected stage leaves its gather to the residual add"
    B, H, T, _ = q.shape
    heads = torch.empty(2, B, H, T, device=q.device, dtype=torch.float32)
    buffers = empty_outputs(B, T, width, q.device)
    # Off CUDA (Triton's interpreter, in the tests) the same steps run in order on one stream.
    main = side = None
    if q.is_cuda:
        main = torch.cuda.current_stream(q.device)
        side = _side_stream(q.device.index if q.device.index is not None else torch.cuda.current_device())
        side.wait_stream(main)
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        head_scores(q, k, v, key_mask, scale, score, out=heads, bias=bias, positions=positions)
        sample_with_budget(heads, key_mask, num_prefix, ratio, k_tokens, width, None, stats=False, out=buffers,
                           positions=positions)
    index, mask, kept, budget, _, new_positions = buffers
    full = launch_attention(q, k, v, None, key_mask, scale, T, bias=bias, positions=positions)
    if side is not None and (proj is None or not JOIN_AFTER_PROJECTION):
        main.wait_stream(side)
        side = None
    if proj is not None:
        full = project_rows(full, *proj)
    if side is not None:
        main.wait_stream(side)
    return (gather_rows(full, index) if gather else full), index, mask, kept, budget, new_positions


def project_rows(out: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``linear(out.transpose(1, 2).reshape(B, rows, H * dh))``: what the graph did after a stage
    whose output projection ``passes/defer.py`` handed to it."""
    B, H, rows, dh = out.shape
    return torch.nn.functional.linear(out.transpose(1, 2).reshape(B, rows, H * dh), weight, bias)
