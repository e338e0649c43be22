"""The ATS operators as ``torch.library`` custom ops, so Dynamo, AOTAutograd, Inductor and
``torch.export`` see one opaque node each instead of a graph break.

``ats_fx::sample_tokens`` scores and samples (ATS-NOTES §1-§3, §5): CPU and float64 run the
PyTorch reference, CUDA runs the Triton kernels. Its fake implementation gives a static width
for ``padding="static"`` and a data-dependent width (an unbacked SymInt) for ``"batch_max"``.
Its outputs are indices and masks: constants for autograd (ATS-NOTES §6), so it takes detached
inputs and needs no backward.

``ats_fx::attention_rows`` is the Triton attention kernel, for the kept query rows of a stage and
(without an index) for the layers after it, over the key-padding mask; it is used only when
nothing needs its gradient (inference), otherwise ``scaled_dot_product_attention`` does that step
and autograd goes through it.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from . import overlap, packaged_ops  # noqa: F401  (packaged_ops registers ats_fx::packaged_*)
from .dispatch import needs_grad, packaged, tracing, use_triton
from .kernels import reference

log = logging.getLogger(__name__)

# The fewest rows a batch_max stage returns: the prefix and one sampled token, and at least 2 so
# the compiler knows the token axis never broadcasts (with no prefix, CaiT, a stage can keep one
# token; it then gets a padding row).
MIN_WIDTH = 2


def raise_bad(bad: Tensor) -> None:
    raise reference.bad_scores_error(bad.nonzero().flatten().tolist())


def _budget(key_mask: Optional[Tensor], B: int, T: int, num_prefix: int, ratio, k_tokens, device) -> Tensor:
    if key_mask is None:  # every image has T tokens: K is one number, computed on the host
        K = reference.static_budget(T, num_prefix, ratio, k_tokens)
        return torch.full((B,), K, dtype=torch.int64, device=device)
    return reference.token_budget(key_mask, B, T, num_prefix, ratio, k_tokens, device)


def sample_tokens_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Optional[Tensor],
    num_prefix: int,
    scale: float,
    ratio: Optional[float],
    k_tokens: Optional[int],
    score: str,
    width: int,
    strict: bool,
    kernels: str,
    bias: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Score and sample one ATS stage: ``(index, mask, kept, budget)``.

    ``index``/``mask`` are (B, W): kept rows (prefix first, ascending positions, padding last).
    ``width`` is K + p for static padding, or -1 for batch_max (W = max_b K'_b + p). ``bias``
    (L, N, N) is a position bias table of the logits (BEiT) over the original tokens, read at the
    tokens' original ``positions`` (B, T) (None: they are the original tokens): its class row
    enters the scores.
    """
    index, mask, kept, budget, _ = _sample(q, k, v, key_mask, num_prefix, scale, ratio, k_tokens, score, width,
                                           strict, kernels, bias, positions)
    # The operator's outputs are contiguous, as its fake implementation declares (batch_max slices).
    return index.contiguous(), mask.contiguous(), kept, budget


def _sample(q, k, v, key_mask, num_prefix, scale, ratio, k_tokens, score, width, strict, kernels, bias=None,
            positions=None):
    """``sample_tokens_impl`` plus ``padded``: False when the host already knows that no image has
    padding rows (batch_max on the Triton path), None when it does not know."""
    if use_triton(q, kernels):
        # Per-head scores; the sampling kernel sums and normalises them (two launches a stage).
        from .kernels.scores import head_scores

        heads = head_scores(q, k, v, key_mask, scale, score, bias=bias, positions=positions)
        return _sample_scores(heads, None, key_mask, num_prefix, ratio, k_tokens, width, strict, kernels)
    if bias is not None:  # only the class row of the bias enters the scores
        bias = reference.position_bias(bias, positions, q.shape[0], rows=1)
    s, bad = reference.class_token_scores(q, k, v, key_mask, num_prefix, scale, score, False, bias=bias,
                                          with_bad=True)
    return _sample_scores(s, bad, key_mask, num_prefix, ratio, k_tokens, width, strict, kernels)


def _sample_scores(s, bad, key_mask, num_prefix, ratio, k_tokens, width, strict, kernels):
    """Inverse-transform sampling of given scores: ``(index, mask, kept, budget, padded)``. ``s`` is
    S (B, T) with its fallback flags ``bad``, or, on the Triton path only, the per-head logits
    and value norms (2, B, H, T) of ``kernels.scores.head_scores`` with ``bad=None``."""
    B, T = s.shape[-3 if s.dim() == 4 else 0], s.shape[-1]
    if not use_triton(s, kernels):
        if strict and bool(bad.any()):
            raise_bad(bad)
        budget = _budget(key_mask, B, T, num_prefix, ratio, k_tokens, s.device)
        index, mask, kept = reference.inverse_transform_sample(
            s, key_mask, budget, num_prefix, None if width < 0 else width
        )
        if index.shape[1] < min(MIN_WIDTH, T):  # one kept token, no prefix: add a padding row
            index = torch.cat([index, index.new_zeros(B, 1)], dim=1)
            mask = torch.cat([mask, mask.new_zeros(B, 1)], dim=1)
        return index, mask, kept, budget, None
    from .kernels.sample import sample_with_budget

    read = width < 0 or strict  # static and lenient: nothing to read on the host
    index, mask, kept, budget, stats, bad = sample_with_budget(
        s.float(), key_mask, num_prefix, ratio, k_tokens, None if width < 0 else width,
        None if bad is None else bad.to(torch.int8), stats=read,
    )
    padded = None
    if read:
        # One host read: the batch width, the NaN check, and whether any image is padded.
        widest, any_bad, neg_narrowest = stats.tolist()
        widest = max(widest, min(MIN_WIDTH, T))
        if strict and any_bad:
            raise_bad(bad.bool())
        if width < 0:
            index, mask = index[:, :widest], mask[:, :widest]
            padded = widest != -neg_narrowest
    return index, mask, kept, budget, padded


def sample_scores_impl(
    scores: Tensor,
    bad: Tensor,
    key_mask: Optional[Tensor],
    num_prefix: int,
    ratio: Optional[float],
    k_tokens: Optional[int],
    width: int,
    strict: bool,
    kernels: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sample one ATS stage from scores computed outside (``reference.weight_scores``: talking
    heads, stages without a class token): ``(index, mask, kept, budget)`` as ``sample_tokens``."""
    index, mask, kept, budget, _ = _sample_scores(scores, bad, key_mask, num_prefix, ratio, k_tokens, width,
                                                  strict, kernels)
    return index.contiguous(), mask.contiguous(), kept, budget


# The registered operator: what Dynamo, AOTAutograd, Inductor and torch.export see.
sample_tokens = torch.library.custom_op("ats_fx::sample_tokens", mutates_args=())(sample_tokens_impl)


@sample_tokens.register_fake
def _sample_tokens_fake(q, k, v, key_mask, num_prefix, scale, ratio, k_tokens, score, width, strict, kernels,
                        bias=None, positions=None):
    B, T = q.shape[0], q.shape[2]
    if width < 0:
        ctx = torch.library.get_ctx()
        width = ctx.new_dynamic_size(min=max(num_prefix + 1, MIN_WIDTH), max=T if isinstance(T, int) else None)
        torch._check(width <= T)
    index = q.new_empty((B, width), dtype=torch.int64)
    return index, q.new_empty((B, width), dtype=torch.bool), q.new_empty((B,), dtype=torch.int64), q.new_empty(
        (B,), dtype=torch.int64
    )


sample_scores = torch.library.custom_op("ats_fx::sample_scores", mutates_args=())(sample_scores_impl)


@sample_scores.register_fake
def _sample_scores_fake(scores, bad, key_mask, num_prefix, ratio, k_tokens, width, strict, kernels):
    B, T = scores.shape
    probe = scores.new_empty((B, 1, T, 1))
    return _sample_tokens_fake(probe, probe, probe, key_mask, num_prefix, 1.0, ratio, k_tokens, "attn", width,
                               strict, kernels)


@torch.library.custom_op("ats_fx::received_scores", mutates_args=())
def received_scores_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], num_prefix: int, scale: float,
                       score: str, bias: Optional[Tensor] = None,
                       positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Scores (B, T) float32 and uniform-fallback flags (B,) int8 of a stage without a class token, from
    the attention each token receives (``kernels/received.py``), with a position bias table read at
    original positions; Triton only."""
    from .kernels.received import received_scores

    return received_scores(q, k, v, key_mask, num_prefix, scale, score, bias, positions)


@received_scores_op.register_fake
def _received_scores_fake(q, k, v, key_mask, num_prefix, scale, score, bias=None, positions=None):
    return q.new_empty((q.shape[0], q.shape[2]), dtype=torch.float32), q.new_empty((q.shape[0],), dtype=torch.int8)


def received_sample(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], num_prefix: int, scale: float,
                    ratio: Optional[float], k_tokens: Optional[int], score: str, width: int, strict: bool,
                    kernels: str, bias: Optional[Tensor] = None, positions: Optional[Tensor] = None) -> tuple:
    """Score and sample a stage without a class token on the Triton path: ``(index, mask, kept,
    budget, padded)`` as ``sample``. Eager, the sampling kernel combines the heads itself (three
    launches); traced, ``ats_fx::received_scores`` then ``ats_fx::sample_scores``; exported for CUDA,
    ``ats_fx::packaged_sample`` (``packaged_ops.py``). ``bias``,
    ``positions``: a position bias table read at original positions (``attention``)."""
    q, k, v = q.detach(), k.detach(), v.detach()
    bias = None if bias is None else bias.detach()
    if width >= 0 and not strict and packaged(q, kernels):  # exported on CUDA: the kernels, packageable
        return (*torch.ops.ats_fx.packaged_sample(q, k, v, key_mask, num_prefix, scale, ratio, k_tokens, score, width,
                                                  bias, positions, False), None)
    if tracing(q):
        scores, bad = torch.ops.ats_fx.received_scores(q, k, v, key_mask, num_prefix, scale, score, bias, positions)
        return sample_from_scores(scores, bad, key_mask, num_prefix, ratio, k_tokens, width, strict, kernels)
    from .kernels.received import received_head_scores

    heads = received_head_scores(q, k, v, key_mask, scale, score, bias, positions)
    return _sample_scores(heads, None, key_mask, num_prefix, ratio, k_tokens, width, strict, kernels)


@torch.library.custom_op("ats_fx::attention_rows", mutates_args=())
def attention_rows_op(q: Tensor, k: Tensor, v: Tensor, index: Optional[Tensor], key_mask: Optional[Tensor],
                      scale: float, bias: Optional[Tensor] = None, positions: Optional[Tensor] = None) -> Tensor:
    """Triton attention (B, H, R, dh) of the query rows ``index`` (all rows without one) over the
    real keys, plus a position bias table read at original positions; forward only."""
    return _launch(q, k, v, index, key_mask, scale, bias, positions)


@attention_rows_op.register_fake
def _attention_rows_fake(q, k, v, index, key_mask, scale, bias=None, positions=None):
    B, H, T, D = q.shape
    return q.new_empty((B, T if index is None else index.shape[1], H, v.shape[-1])).transpose(1, 2)


@torch.library.custom_op("ats_fx::overlapped_stage", mutates_args=())
def overlapped_stage_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], num_prefix: int, scale: float,
                        ratio: Optional[float], k_tokens: Optional[int], score: str,
                        width: int, gather: bool = True, bias: Optional[Tensor] = None,
                        positions: Optional[Tensor] = None, proj_weight: Optional[Tensor] = None,
                        proj_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A static-width stage with the sampling beside the attention (``overlap.py``): ``(out, index,
    mask, kept, budget, new_positions)``, the outputs of ``sample_tokens`` then ``attention_rows``,
    and the kept rows' original positions (-1 for padding); forward only.
    With ``gather=False`` ``out`` holds every query row (B, H, T, dh), not the kept ones; with
    ``proj_weight`` too, every row through the output projection (B, T, out features)."""
    return _overlapped_direct(q, k, v, key_mask, num_prefix, scale, ratio, k_tokens, score, width, gather, bias,
                              positions, proj_weight, proj_bias)


@overlapped_stage_op.register_fake
def _overlapped_stage_fake(q, k, v, key_mask, num_prefix, scale, ratio, k_tokens, score, width, gather=True,
                           bias=None, positions=None, proj_weight=None, proj_bias=None):
    index, mask, kept, budget = _sample_tokens_fake(q, k, v, key_mask, num_prefix, scale, ratio, k_tokens, score,
                                                    width, False, "triton")
    rows = width if gather else q.shape[2]
    if proj_weight is not None:
        out = q.new_empty((q.shape[0], rows, proj_weight.shape[0]))
    else:
        out = q.new_empty((q.shape[0], rows, q.shape[1], v.shape[-1])).transpose(1, 2)
    return out, index, mask, kept, budget, torch.empty_like(index)


def overlapped_stage(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], num_prefix: int, scale: float,
                     ratio: Optional[float], k_tokens: Optional[int], score: str, width: int,
                     gather: bool = True, bias: Optional[Tensor] = None, positions: Optional[Tensor] = None,
                     proj_weight: Optional[Tensor] = None, proj_bias: Optional[Tensor] = None) -> tuple:
    """``ats_fx::overlapped_stage`` (the registered op when tracing, else a direct call):
    ``(out, index, mask, kept, budget, new_positions)``; ``gather=False``: ``out`` is every row's attention, or
    with ``proj_weight`` (and ``proj_bias``) every row projected. ``bias``, ``positions``: a
    position bias table read inside the kernels (``attention``)."""
    bias, proj_weight, proj_bias = (None if t is None else t.detach() for t in (bias, proj_weight, proj_bias))
    args = (q.detach(), k.detach(), v.detach(), key_mask, num_prefix, scale, ratio, k_tokens, score, width, gather,
            bias, positions, proj_weight, proj_bias)
    if tracing(q):
        return torch.ops.ats_fx.overlapped_stage(*args)
    return _overlapped_direct(*args)  # eager: no dispatcher overhead


def _overlapped_direct(*args) -> tuple:
    *args, proj_weight, proj_bias = args
    proj = None if proj_weight is None else (proj_weight, proj_bias)
    out, index, mask, kept, budget, positions = overlap.overlapped_stage_attention(*args, proj=proj)
    return out, index, mask.view(torch.bool), kept, budget, positions


def _attention_rows_flops(q_shape, k_shape, v_shape, index_shape, mask_shape, scale, bias_shape=None,
                          positions_shape=None, *, out_shape, **kwargs) -> int:
    """FlopCounterMode's count for ``ats_fx::attention_rows``: what it counts for SDPA on the
    gathered query rows, the reference path (padded keys included, as SDPA with a mask counts
    them). Without it ``ats_fx.count_flops`` counted no attention on CUDA, where this op runs, and
    GPU FLOPs ratios came out high (DeiT-S rho=0.87: 1.549 against 1.496 counted on the CPU)."""
    from torch.utils.flop_counter import sdpa_flop_count

    B, H, _, D = q_shape
    return sdpa_flop_count((B, H, out_shape[2], D), k_shape, v_shape)


def _received_scores_flops(q_shape, k_shape, v_shape, mask_shape, num_prefix, scale, score, bias_shape=None,
                           positions_shape=None, *, out_shape, **kwargs) -> int:
    """FlopCounterMode's count for ``ats_fx::received_scores``: one QKᵀ over every query row, what the
    PyTorch path counts for the whole attention matrix. (The kernels compute it twice, once for each
    row's normaliser and once for the column sums: the FLOPs ratio stays the method's.)"""
    B, H, T, D = q_shape
    return 2 * B * H * T * k_shape[2] * D


def _overlapped_stage_flops(q_shape, k_shape, v_shape, mask_shape, num_prefix, scale, ratio, k_tokens, score, width,
                            gather=True, bias_shape=None, positions_shape=None, proj_weight_shape=None,
                            proj_bias_shape=None, *, out_shape, **kwargs) -> int:
    """FlopCounterMode's count for ``ats_fx::overlapped_stage``: the kept rows' attention (``width``
    of them), as for ``attention_rows``, and their output projection where the stage runs it. (It
    computes every row's, where that costs no more time than the kept rows': the FLOPs ratio stays
    the method's, not this schedule's.)"""
    B, H, _, D = q_shape
    flops = _attention_rows_flops(q_shape, k_shape, v_shape, None, mask_shape, scale, out_shape=(B, H, width, D))
    if proj_weight_shape is not None:
        flops += 2 * B * width * proj_weight_shape[0] * proj_weight_shape[1]
    return flops


def _register_flop_formula() -> None:
    from torch.utils import flop_counter

    if torch.ops.ats_fx.attention_rows not in flop_counter.flop_registry:  # a re-import registers once
        flop_counter.register_flop_formula(torch.ops.ats_fx.attention_rows)(_attention_rows_flops)
    if torch.ops.ats_fx.overlapped_stage not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(torch.ops.ats_fx.overlapped_stage)(_overlapped_stage_flops)
    if torch.ops.ats_fx.received_scores not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(torch.ops.ats_fx.received_scores)(_received_scores_flops)


_register_flop_formula()


def attention(
    q: Tensor, k: Tensor, v: Tensor, index: Optional[Tensor], key_mask: Optional[Tensor], scale: float,
    dropout_p: float, kernels: str, bias: Optional[Tensor] = None, positions: Optional[Tensor] = None,
) -> Tensor:
    """Attention of the query rows ``index`` (eq. 6, the stage's kept rows) or, with ``index=None``,
    of a layer after a stage, over the key-padding mask. ``bias`` (L, N, N) is a position bias
    table over the original tokens, read at the tokens' original ``positions`` (B, T) (None: the
    original tokens). On CUDA when no gradient or dropout is needed: the Triton kernel (1.2-4x
    faster than the masked SDPA on H100, docs/performance.md), which reads the bias from the table;
    exported, the same kernel as ``ats_fx::packaged_attention`` (``packaged_ops.py``). Elsewhere SDPA
    (on gathered queries, the bias materialised per image), which has a backward.
    Without an index, a mask or a bias nothing is padded: plain SDPA (flash)."""
    triton_ok = index is not None or key_mask is not None or bias is not None
    grads = needs_grad(q, k, v) or (bias is not None and needs_grad(bias))
    if triton_ok and dropout_p == 0.0 and use_triton(q, kernels) and not grads:
        if tracing(q):
            return torch.ops.ats_fx.attention_rows(q, k, v, index, key_mask, scale, bias, positions)
        return _launch(q, k, v, index, key_mask, scale, bias, positions)
    if triton_ok and dropout_p == 0.0 and packaged(q, kernels):  # exported: for inference, see ``packaged``
        return torch.ops.ats_fx.packaged_attention(q, k, v, index, key_mask, scale, bias, positions)
    if bias is not None:
        bias = reference.position_bias(bias, positions, q.shape[0])
    if index is None:
        return reference.masked_attention(q, k, v, key_mask, scale, dropout_p, bias)
    return reference.attention_rows(q, k, v, index, key_mask, scale, dropout_p, bias)


def _launch(q, k, v, index, key_mask, scale, bias=None, positions=None):
    from .kernels.attention_rows import launch_attention

    rows = q.shape[2] if index is None else index.shape[1]
    return launch_attention(q, k, v, index, key_mask, scale, rows, bias=bias, positions=positions)


def sample(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], *args) -> tuple:
    """``ats_fx::sample_tokens`` on detached inputs (the indices are constants for autograd), and
    ``padded`` (see ``_sample``; always None when tracing)."""
    q, k, v = q.detach(), k.detach(), v.detach()
    if len(args) > 8 and args[8] is not None:  # the position bias table
        args = (*args[:8], args[8].detach(), *args[9:])
    width, strict, kernels = args[5], args[6], args[7]
    if width >= 0 and not strict and packaged(q, kernels):  # exported on CUDA: the kernels, packageable
        return (*torch.ops.ats_fx.packaged_sample(q, k, v, key_mask, *args[:6], *args[8:]), None)
    if tracing(q) and not _inline(q, width, kernels):
        return (*torch.ops.ats_fx.sample_tokens(q, k, v, key_mask, *args), None)
    return _sample(q, k, v, key_mask, *args)


def _inline(x: Tensor, width: int, kernels: str) -> bool:
    """Traced with a static width on the PyTorch path: the graph gets the reference's aten ops, not
    the custom op. An exported CPU model then needs no ats_fx to run (an AOTInductor package loads
    in a process that never imports it), and Inductor fuses the sampling with what surrounds it."""
    # Only when compiled or exported: FlopCounterMode (a dispatch mode on real tensors) keeps the op,
    # so count_flops counts the same rows whatever the kernels.
    return width >= 0 and not use_triton(x, kernels) and (torch.compiler.is_compiling() or type(x) is not Tensor)


def sample_from_scores(scores: Tensor, bad: Tensor, key_mask: Optional[Tensor], *args) -> tuple:
    """``ats_fx::sample_scores`` on detached scores, and ``padded`` (see ``_sample``)."""
    scores, bad = scores.detach(), bad.detach()
    if tracing(scores) and not _inline(scores, args[3], args[5]):
        return (*torch.ops.ats_fx.sample_scores(scores, bad, key_mask, *args), None)
    return _sample_scores(scores, bad, key_mask, *args)
