"""A static-width ATS stage on two CUDA streams, for batches too small to fill the GPU.

At batch 1 a stage's head logits, sampling and kept-row attention run one after the other, a
chain of ~11 us on ViT-B against ~6 us for dense attention, while the GEMMs around it cost the
same for 172 rows as for 197. Here the attention of *every* query row runs on the current stream
while a side stream scores and samples; the kept rows are then gathered (O = A[kept] V is those
rows of the full attention output, so the result is the same). The stage then costs
max(attention, logits + sampling) + one gather.

Used for ``padding="static"`` at inference on CUDA when ``overlap_pays`` says the batch is small;
inside CUDA graphs (``mode="reduce-overhead"``) the fork and join become graph edges. Every buffer
is allocated on the current stream before the fork, and the join comes before any of them is
returned, so the caching allocator never sees a tensor used on a stream it was not made on.

With ``gather=False`` the copy goes too: ``passes/defer.py`` moves the gather past the output
projection into the residual add, where Inductor (or the ``gather_add`` kernel) reads both operands
at the kept rows in the one pass it makes anyway.

Measured (H200, reduce-overhead, batch 1, stages 3-11, against dense same-compile): ViT-B
rho=1.0/0.87/0.72 0.947/0.993/1.038x sequential, 0.981/0.994/1.034x overlapped with the gather in
the stage, 1.009/1.026/1.069x with the deferred gather; DeiT-S 0.972/1.011/1.052x,
1.001/1.020/1.052x, 1.038/1.056/1.089x (interleaved_s26_ro_*.md). At ViT-B batch 8 and DeiT-S
batch 16 all three are within 0.003x (interleaved_s26_mid_*.md).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor

from . import library

# Overlap when batch x heads is at most this share of the GPU's SMs. On the H200 (132 SMs) the
# overlapped stage was 3-12% faster than the sequential one at every masked stage shape up to
# B x H = 96 (ViT-B to batch 8, DeiT-S to 16), mixed at 192 and slower past it
# (benchmarks/results/stage_overlap_s25.md).
SM_SHARE = 0.75
# "auto": by ``SM_SHARE`` on CUDA; "on": always, also off CUDA (the tests, under Triton's
# interpreter); "off": never (the benchmarks time the sequential stage with it).
MODE = "auto"
# Overlap the first stage too (no key mask yet). Its full attention is the Triton kernel's, not
# SDPA's: with cuDNN's flash attention beside the sampling the stage was 7-30% slower than the
# sequential one (stage_overlap_s25.md, first-stage rows), while the Triton kernel made stages
# 3-11 at rho=0.87 0.998 -> 1.000x dense (ViT-B) and 1.016 -> 1.019x (DeiT-S) against overlapping
# the masked stages only (interleaved_s25_overlap2_vit_b.md, interleaved_s25_overlap_deit_*.md).
UNMASKED = True


@functools.lru_cache(maxsize=None)
def _side_stream(device: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def overlap_pays(q: Tensor) -> bool:
    """``MODE`` allows the overlapped stage for ``q`` (B, H, T, dh) of static shape (a dynamic
    batch keeps the sequential stage): on CUDA the batch must be small enough that the two branches
    run side by side (``SM_SHARE``)."""
    if MODE == "off" or not all(type(n) is int for n in q.shape):
        return False
    if MODE == "on":
        return True
    if not q.is_cuda:
        return False
    from .kernels.attention_rows import multiprocessors

    return q.shape[0] * q.shape[1] <= SM_SHARE * multiprocessors(q.device)


def use_overlap(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], width: int, kernels: str,
                dropout_p: float) -> bool:
    """The stage may run overlapped: static width, inference on the Triton kernels, a key mask or
    ``UNMASKED``, and ``overlap_pays``. (The caller has checked: plain ATS selection, a class token,
    no bias.)"""
    return ((key_mask is not None or UNMASKED) and width >= 0 and dropout_p == 0.0 and library.use_triton(q, kernels)
            and not library.needs_grad(q, k, v) and overlap_pays(q))


def overlapped_stage_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], num_prefix: int, scale: float,
    ratio: Optional[float], k_tokens: Optional[int], score: str, width: int, gather: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out, index, mask, kept, budget)`` of a static-width stage (``width`` = K + p), as
    ``sample_tokens`` followed by ``attention_rows``, with the sampling on a side stream. With
    ``gather=False`` ``out`` is every row's attention (B, H, T, dh), for a graph that gathers the
    kept rows after the output projection instead (``passes/defer.py``)."""
    from .kernels.attention_rows import launch_attention
    from .kernels.gather_rows import gather_rows
    from .kernels.sample import empty_outputs, sample_with_budget
    from .kernels.scores import head_scores

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
        head_scores(q, k, v, key_mask, scale, score, out=heads)
        index, mask, kept, budget, _, _ = sample_with_budget(heads, key_mask, num_prefix, ratio, k_tokens, width,
                                                             None, stats=False, out=buffers)
    full = launch_attention(q, k, v, None, key_mask, scale, T)
    if side is not None:
        main.wait_stream(side)
    return (gather_rows(full, index) if gather else full), index, mask, kept, budget


@contextlib.contextmanager
def disabled():
    """Every stage sequential inside the block (``ats_fx.count_flops``: the overlapped stage with a
    deferred gather projects every row, and the count is the method's, not that schedule's)."""
    global MODE
    saved, MODE = MODE, "off"
    try:
        yield
    finally:
        MODE = saved
