"""The ATS kernels as ``torch.library.triton_op``s: what an exported CUDA model calls.

``torch.export`` keeps each op as one node (``ats_fx::packaged_sample``, ``ats_fx::packaged_attention``);
``aoti_compile_and_package`` sees through it to the ``wrap_triton`` launches and compiles ats_fx's
own kernels into the package, which then runs them in a process that never imports ats_fx. (A
``custom_op`` stays opaque to AOTInductor: its package needs the Python op to load.) The eager and
``torch.compile`` paths keep the ops of ``library.py``, whose launches use PDL.

Three differences from the eager launches, each because a traced launch cannot do otherwise:

- no programmatic dependent launch: Inductor's launcher passes no ``launch_pdl``;
- the attention's tile config does not depend on the batch (the small-grid config is picked from
  batch x heads against the SM count, which would guard an exported dynamic batch);
- K is computed by torch ops (``reference.token_budget``), not in the sampling kernel, whose K
  arithmetic needs fp fusion off, a launch option Inductor does not pass.

``dispatch.packaged`` decides when these ops are used: under ``torch.export``, on CUDA, at
inference, for static padding.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op

from .kernels import reference


@triton_op("ats_fx::packaged_sample", mutates_args=())
def packaged_sample(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], num_prefix: int, scale: float,
                    ratio: Optional[float], k_tokens: Optional[int], score: str, width: int,
                    bias: Optional[Tensor] = None, positions: Optional[Tensor] = None, class_token: bool = True
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Score and sample one stage at a static ``width`` (K + p): ``(index, mask, kept, budget)``, as
    ``ats_fx::sample_tokens`` with ``strict=False`` (a row of NaN scores falls back to uniform).
    The head-logits kernel (without ``class_token``: the received-attention kernels), then the
    sampling kernel, which combines the heads."""
    from .kernels.received import received_head_scores
    from .kernels.sample import inverse_transform_sample
    from .kernels.scores import head_scores

    B, H, T, _ = k.shape
    # Logits and value norms in two tensors, not views of one: each kernel argument Inductor sees
    # mutated is then a whole buffer.
    heads = tuple(q.new_empty((B, H, T), dtype=torch.float32) for _ in range(2))
    if class_token:
        head_scores(q, k, v, key_mask, scale, score, out=heads, bias=bias, positions=positions, traceable=True)
    else:
        received_head_scores(q, k, v, key_mask, scale, score, bias, positions, out=heads, traceable=True)
    budget = reference.token_budget(key_mask, B, T, num_prefix, ratio, k_tokens, q.device)
    index, mask, kept = inverse_transform_sample(heads, key_mask, budget, num_prefix, width, traceable=True)
    return index, mask, kept, budget


@triton_op("ats_fx::packaged_attention", mutates_args=())
def packaged_attention(q: Tensor, k: Tensor, v: Tensor, index: Optional[Tensor], key_mask: Optional[Tensor],
                       scale: float, bias: Optional[Tensor] = None, positions: Optional[Tensor] = None) -> Tensor:
    """The attention kernel (B, H, R, dh) of the query rows ``index`` (every row without one) over
    the real keys, plus a position bias table read at original positions, as ``ats_fx::attention_rows``."""
    from .kernels.attention_rows import launch_attention

    rows = q.shape[2] if index is None else index.shape[1]
    return launch_attention(q, k, v, index, key_mask, scale, rows, bias=bias, positions=positions, traceable=True)


# Shapes only. triton_op's own fake runs the function itself, whose launches Triton's interpreter
# (TRITON_INTERPRET=1, the CPU tests) would run on fake tensors.
@packaged_sample.register_fake
def _packaged_sample_fake(q, k, v, key_mask, num_prefix, scale, ratio, k_tokens, score, width, bias=None,
                          positions=None, class_token=True):
    B = q.shape[0]
    return (q.new_empty((B, width), dtype=torch.int64), q.new_empty((B, width), dtype=torch.bool),
            q.new_empty((B,), dtype=torch.int64), q.new_empty((B,), dtype=torch.int64))


@packaged_attention.register_fake
def _packaged_attention_fake(q, k, v, index, key_mask, scale, bias=None, positions=None):
    B, H, T, _ = q.shape
    rows = T if index is None else index.shape[1]
    return q.new_empty((B, rows, H, v.shape[-1])).transpose(1, 2)  # launch_attention's layout
