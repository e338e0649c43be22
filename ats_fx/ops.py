"""Run-time pieces the rewritten graph calls: the ATS stage, masked attention, masked pooling,
and the gather that brings an older token set (the residual stream) to a newer one."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from . import dispatch, library
from .kernels import reference
from .overlap import project_rows

log = logging.getLogger(__name__)


@dataclass
class StageTrace:
    """What one ATS stage did in the last forward pass (tensors are detached, on the model's device).

    ``positions[b, t]`` is the original token position (in the input token sequence, prefix
    included) of row ``t`` for image ``b``, or -1 for padding. ``kept[b]`` is K' and ``budget[b]``
    is K; ``tokens_in[b]`` counts the image's real input tokens (prefix included).
    """

    layer: int
    module: str
    positions: torch.Tensor
    kept: torch.Tensor
    budget: torch.Tensor
    width_in: int
    mask_in: Optional[torch.Tensor]

    @property
    def tokens_in(self) -> torch.Tensor:
        if self.mask_in is None:
            return torch.full_like(self.kept, self.width_in)
        return self.mask_in.sum(dim=1)

    @property
    def tokens_out(self) -> torch.Tensor:
        return (self.positions >= 0).sum(dim=1)


class ATSStage(nn.Module):
    """One ATS layer core inside a rewritten graph; holds no parameters (state_dict unchanged)."""

    def __init__(
        self,
        layer: int,
        module: str,
        num_prefix: int,
        scale: float,
        ratio: Optional[float],
        k: Optional[int],
        score: str,
        padding: str,
        dropout_p: float = 0.0,
        kernels: str = "auto",
        selection: str = "ats",
        class_token: bool = True,
    ):
        super().__init__()
        self.layer, self.module_name, self.num_prefix, self.scale = layer, module, num_prefix, scale
        self.ratio, self.k, self.score, self.padding, self.dropout_p = ratio, k, score, padding, dropout_p
        self.kernels, self.selection = kernels, selection
        # The first prefix token is a class token whose attention row scores the others; without one
        # (no prefix, or registers only) a stage scores by the mean query row (docs/ats-semantics.md).
        self.class_token = class_token and num_prefix > 0
        self.compiled = False  # set by the "ats" torch.compile backend
        # Set by passes/defer.py when only row-wise ops (the output projection) lie between this
        # stage's output and the residual add: an overlapped stage then returns every row and the
        # add gathers the kept rows of both sides (its 5th output says which rows ``out`` holds).
        self.defer_gather = False
        self.last: Optional[StageTrace] = None

    def extra_repr(self) -> str:
        budget = f"ratio={self.ratio}" if self.k is None else f"k={self.k}"
        return (f"layer={self.layer}, {budget}, prefix={self.num_prefix}, score={self.score}, "
                f"padding={self.padding}, kernels={self.kernels}"
                + ("" if self.selection == "ats" else f", selection={self.selection}")
                + ("" if self.class_token else ", scores=mean query row"))

    def forward(self, q, k, v, key_mask: Optional[torch.Tensor], positions: Optional[torch.Tensor],
                bias: Optional[torch.Tensor] = None, mix: Optional[tuple] = None,
                proj_weight: Optional[torch.Tensor] = None, proj_bias: Optional[torch.Tensor] = None):
        # ``proj_weight``/``proj_bias``: the layer's output projection, handed over by passes/defer.py
        # (the graph no longer runs it): ``out`` is then projected, (B, rows, out features).
        tracing = dispatch.tracing(q)
        # batch_max reads the batch width back to the host anyway, and raises on NaN scores with it.
        # static never synchronises (CUDA graphs; eager GPU time overlaps the host's): it falls back
        # to uniform scores and the NaN reaches the logits (ATS-NOTES §1).
        padding, static_width = "batch_max", -1  # after a batch_max stage the token count is data-dependent
        if self.padding != "batch_max":
            static_width = reference.static_budget(q.shape[2], self.num_prefix, self.ratio, self.k) + self.num_prefix
            padding = dispatch.padding_for(self.padding, q, static_width)
        strict = padding == "batch_max"
        width = static_width if padding == "static" else -1  # -1: data-dependent (batch_max)
        # ``bias``: a position bias table (L, N, N) over the original tokens (``bias_table``); the
        # kernels read it at ``positions``, the PyTorch paths materialise it per image.
        dropout_p = self.dropout_p if self.training else 0.0
        every_row = False  # out holds the kept rows (True: every input row, for a deferred gather)
        path = dispatch.stage_path(q, k, v, key_mask, class_token=self.class_token, width=width, kernels=self.kernels,
                                   selection=self.selection, dropout_p=dropout_p, bias=bias, mix=mix)
        if path == "weights":
            # Talking heads (CaiT) or no class token: the whole attention matrix, scored from its rows.
            out, index, mask, kept, budget, padded = self._from_weights(
                q, k, v, key_mask, width, strict, _per_image(bias, positions, q.shape[0]), mix, dropout_p)
        elif path == "overlapped":
            # A small static batch: sampling on a side stream beside every row's attention.
            inside = self.defer_gather and proj_weight is not None  # project every row, beside the sampling
            out, index, mask, kept, budget, new_positions = library.overlapped_stage(
                q, k, v, key_mask, self.num_prefix, self.scale, self.ratio, self.k, self.score, width,
                not self.defer_gather, bias, positions, proj_weight if inside else None, proj_bias if inside else None)
            padded = None
            every_row = self.defer_gather
            if inside:
                proj_weight = None
        else:
            if path == "sampled":
                index, mask, kept, budget, padded = library.sample(
                    q, k, v, key_mask, self.num_prefix, self.scale, self.ratio, self.k, self.score, width, strict,
                    self.kernels, bias, positions,
                )
            elif path == "received":  # no class token, on the Triton path: A is never materialised
                index, mask, kept, budget, padded = library.received_sample(
                    q, k, v, key_mask, self.num_prefix, self.scale, self.ratio, self.k, self.score, width, strict,
                    self.kernels, bias, positions)
            else:
                index, mask, kept, budget, padded = self._reference_select(
                    q, k, v, key_mask, width, None if bias is None else reference.position_bias(bias, positions,
                                                                                                q.shape[0], rows=1))
            out = library.attention(q, k, v, index, key_mask, self.scale, dropout_p, self.kernels, bias, positions)
        if proj_weight is not None:
            out = project_rows(out, proj_weight, proj_bias)
        if path != "overlapped":  # the overlapped stage's sampling kernel wrote them
            # Original positions of the kept rows; at the first stage the rows' positions are the index.
            source = index if positions is None else positions.gather(1, index)
            new_positions = source if padded is False else torch.where(mask, source, -1)
        if not tracing:  # the trace API is eager-only: a compiled graph keeps no Python state
            self.last = StageTrace(
                self.layer, self.module_name, new_positions.detach(), kept.detach(), budget.detach(),
                q.shape[2], None if key_mask is None else key_mask.detach(),
            )
        if padded is False:
            # Eager, and no image of this batch is padded: later layers need no key mask, which
            # keeps their attention on the flash kernels (a masked SDPA measured ~3x slower).
            mask = None
        return out, index, mask, new_positions, every_row

    def _from_weights(self, q, k, v, key_mask, width: int, strict: bool, bias, mix, dropout_p: float):
        """The stage on a materialised attention matrix A: scores from A's class row, or its mean
        row without a class token (``reference.weight_scores``), then O = A[kept] V."""
        attn = reference.attention_weights(q, k, key_mask, self.scale, bias, mix)
        s, bad = reference.weight_scores(attn.detach(), v.detach(), key_mask, self.num_prefix, self.score, False,
                                         class_token=self.class_token)
        if self.selection != "ats":
            index, mask, kept, budget, padded = self._baseline_select(s, bad, key_mask, q.shape[0], q.device, width)
        else:
            index, mask, kept, budget, padded = library.sample_from_scores(
                s, bad, key_mask, self.num_prefix, self.ratio, self.k, width, strict, self.kernels)
        B, H, _, T = attn.shape
        rows = attn.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], T))
        out = torch.nn.functional.dropout(rows, dropout_p, True) @ v if dropout_p else rows @ v
        return out, index, mask, kept, budget, padded

    def _reference_select(self, q, k, v, key_mask, width: int, bias):
        """The paper's baselines (top-K by score, random K) on the class token's scores."""
        scores, bad = reference.class_token_scores(q, k, v, key_mask, self.num_prefix, self.scale, self.score,
                                                   False, bias=bias, with_bad=True)
        return self._baseline_select(scores, bad, key_mask, q.shape[0], q.device, width)

    def _baseline_select(self, scores, bad, key_mask, B: int, device, width: int):
        """Top-K by score, or K uniformly at random, on the PyTorch reference path (eager only)."""
        if torch.compiler.is_compiling() or type(scores) is not torch.Tensor:  # FlopCounterMode is fine
            from .errors import ATSConfigError

            raise ATSConfigError(f"selection={self.selection!r} is an eager-only ablation baseline: "
                                 "compile or export the model with selection='ats'")
        T = scores.shape[1]
        p = self.num_prefix
        budget = reference.token_budget(key_mask, B, T, p, self.ratio, self.k, device)
        if self.selection == "random":
            scores = torch.rand_like(scores)  # top_k_select ranks the prefix and padding last
        keep, real = reference.top_k_select(scores, key_mask, budget, p, -1)
        # One host read per stage: the widest and narrowest K' and the NaN flag.
        counts = ((keep | (torch.arange(T, device=device) < p)) & real).sum(dim=1) - p
        widest, narrowest, any_bad = torch.stack([counts.max(), counts.min(), bad.any().long()]).tolist()
        if any_bad:
            library.raise_bad(bad)
        out_tokens = widest + p if width < 0 else width
        index, mask, kept = reference.compact(keep, real, p, out_tokens)
        return index, mask, kept, budget, narrowest + p != out_tokens


def _index_view(index: torch.Tensor, x: torch.Tensor, batch_dim: int, token_dim: int) -> torch.Tensor:
    B, tokens = index.shape
    shape = [1] * x.dim()
    shape[batch_dim], shape[token_dim] = B, tokens
    if batch_dim > token_dim:
        index = index.t()
    size = list(x.shape)
    size[token_dim] = tokens
    return index.reshape(shape).expand(size)


def token_gather(x: torch.Tensor, index: torch.Tensor, batch_dim: int, token_dim: int) -> torch.Tensor:
    """Rows ``index`` (B, T') of x's token axis, per image: the residual gather of ATS-NOTES §4."""
    if batch_dim == 0 and token_dim == 1 and x.is_contiguous():
        # A row gather with one index per row: ``gather`` would read an expanded int64 index for
        # every element, four times the bytes of the fp16 data it moves.
        B, T = x.shape[:2]
        rows = (index + torch.arange(B, device=index.device)[:, None] * T).reshape(-1)
        return x.reshape(B * T, *x.shape[2:]).index_select(0, rows).reshape(B, index.shape[1], *x.shape[2:])
    return x.gather(token_dim, _index_view(index, x, batch_dim, token_dim))


def gather_add(x: torch.Tensor, index: torch.Tensor, y: torch.Tensor, batch_dim: int, token_dim: int,
               kernels: str = "auto", every_row: bool = False) -> torch.Tensor:
    """``token_gather(x, index) + y``: the residual add after a stage (``passes/fuse.py`` puts it
    in). With ``every_row`` (a deferred gather, ``passes/defer.py``) ``y`` has the rows of ``x``
    and is gathered too: ``token_gather(x + y, index)``. On CUDA at inference one Triton pass over
    memory; under ``torch.compile`` the ops, which Inductor fuses itself."""
    rows = x.shape[1] if every_row else index.shape[1]
    if (
        batch_dim == 0 and token_dim == 1 and x.dim() == 3 and x.dtype == y.dtype
        and tuple(y.shape) == (x.shape[0], rows, x.shape[2])
        and x.is_contiguous() and y.is_contiguous()
        and not dispatch.tracing(x) and dispatch.use_triton(x, kernels) and not dispatch.needs_grad(x, y)
    ):
        from .kernels.gather_add import gather_add as triton_gather_add

        return triton_gather_add(x, index, y, every_row)
    if every_row:
        y = token_gather(y, index, batch_dim, token_dim)
    return token_gather(x, index, batch_dim, token_dim) + y


def _mask_view(mask: torch.Tensor, x: torch.Tensor, batch_dim: int, token_dim: int, start: int) -> torch.Tensor:
    mask = mask[:, start:]
    shape = [1] * x.dim()
    shape[batch_dim], shape[token_dim] = mask.shape[0], mask.shape[1]
    if batch_dim > token_dim:
        mask = mask.transpose(0, 1)
    return mask.reshape(shape)


def masked_mean(x, mask, batch_dim: int, token_dim: int, start: int, dims, keepdim: bool = False, dtype=None):
    """Mean over ``dims`` (which include the token axis) counting real tokens only."""
    if mask is None:  # no padding in this batch
        return x.mean(dim=dims, keepdim=keepdim, dtype=dtype)
    m = _mask_view(mask, x, batch_dim, token_dim, start).to(x.dtype)
    total = (x * m).sum(dim=dims, keepdim=keepdim, dtype=dtype)
    count = m.expand_as(x).sum(dim=dims, keepdim=keepdim)
    return total / count.to(total.dtype)


def masked_sum(x, mask, batch_dim: int, token_dim: int, start: int, dims, keepdim: bool = False, dtype=None):
    if mask is None:
        return x.sum(dim=dims, keepdim=keepdim, dtype=dtype)
    m = _mask_view(mask, x, batch_dim, token_dim, start)
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=dims, keepdim=keepdim, dtype=dtype)


def masked_amax(x, mask, batch_dim: int, token_dim: int, start: int, dims, keepdim: bool = False):
    if mask is None:
        return x.amax(dim=dims, keepdim=keepdim)
    m = _mask_view(mask, x, batch_dim, token_dim, start)
    return torch.where(m, x, torch.full((), float("-inf"), dtype=x.dtype, device=x.device)).amax(dim=dims, keepdim=keepdim)


def masked_amin(x, mask, batch_dim: int, token_dim: int, start: int, dims, keepdim: bool = False):
    if mask is None:
        return x.amin(dim=dims, keepdim=keepdim)
    m = _mask_view(mask, x, batch_dim, token_dim, start)
    return torch.where(m, x, torch.full((), float("inf"), dtype=x.dtype, device=x.device)).amin(dim=dims, keepdim=keepdim)


def masked_attention(q, k, v, key_mask, batch_dim: int, scale: float, dropout_p: float = 0.0, bias=None,
                     kernels: str = "auto", positions=None):
    """Attention of a layer after an ATS stage: padded keys get zero weight (ATS-NOTES §4).
    ``bias`` is a position bias table (L, N, N) over the original tokens (``bias_table``), read at
    the kept tokens' original ``positions``. The Triton kernel on CUDA at inference, the bias read
    inside it; SDPA elsewhere (``library.attention``)."""
    if batch_dim == 0 and q.dim() == 4:
        return library.attention(q, k, v, None, key_mask, scale, dropout_p, kernels, bias, positions)
    attn_mask = None if bias is None else reference.position_bias(bias, positions, q.shape[batch_dim]).to(q.dtype)
    if key_mask is not None:
        shape = [1] * q.dim()
        shape[batch_dim], shape[-1] = key_mask.shape[0], key_mask.shape[1]
        keys = key_mask.reshape(shape)
        attn_mask = keys if attn_mask is None else attn_mask.masked_fill(~keys, float("-inf"))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def merged_heads_attention(q, k, v, key_mask, heads: int, scale: float, dropout_p: float = 0.0):
    """Attention on (B·H, T, d) tensors, batch outer (nn.MultiheadAttention's layout), with padded
    keys at weight 0."""
    def split(t):
        return t.reshape(-1, heads, *t.shape[1:])

    out = masked_attention(split(q), split(k), split(v), key_mask, 0, scale, dropout_p)
    return out.reshape(-1, *out.shape[2:])


def mask_from(mask: Optional[torch.Tensor], start: int) -> Optional[torch.Tensor]:
    """The key mask of tokens ``start`` onwards (a pooling head that skips the prefix); None stays None."""
    return None if mask is None else mask[:, start:]


def talking_heads_attention(q, k, v, key_mask, scale: float, mix: tuple, dropout_p: float = 0.0, bias=None,
                            positions=None):
    """Talking-heads attention (CaiT) of a layer after an ATS stage: heads mixed by ``mix = (w_l,
    b_l, w_w, b_w)`` around the softmax, padded keys at weight 0 (``reference.attention_weights``).
    ``bias``, ``positions``: a position bias table, as ``masked_attention``."""
    attn = reference.attention_weights(q, k, key_mask, scale, _per_image(bias, positions, q.shape[0]), mix)
    if dropout_p:
        attn = torch.nn.functional.dropout(attn, dropout_p, True)
    return attn @ v


def prepend_tokens(mask: Optional[torch.Tensor], positions: torch.Tensor, extra: int):
    """Mask and positions of a token set with ``extra`` tokens put in front (``cat([cls, x])``
    after a stage, CaiT): the new tokens are real and take positions 0..extra-1; the others
    shift by ``extra`` (padding stays -1)."""
    B = positions.shape[0]
    front = torch.arange(extra, device=positions.device, dtype=positions.dtype).expand(B, extra)
    shifted = torch.where(positions >= 0, positions + extra, positions)
    if mask is not None:
        mask = torch.cat([torch.ones(B, extra, dtype=torch.bool, device=mask.device), mask], dim=1)
    return mask, torch.cat([front, shifted], dim=1)


def bias_table(bias: torch.Tensor, batched: bool = False) -> torch.Tensor:
    """An attention bias over the captured tokens, ``(..., N, N)`` with no batch dependence
    (relative position bias), as the (L, N, N) table (L = heads, or 1) the stages and kernels read
    at the kept tokens' original positions (``reference.position_bias`` materialises it per image).
    ``batched``: (B, ..., N, N) with the same values for every image (HF expands it): the first."""
    if batched:
        bias = bias[0]
    return bias.reshape(-1, *bias.shape[-2:])


def _per_image(table: Optional[torch.Tensor], positions: Optional[torch.Tensor], batch: int):
    """The position bias (B, L, T, T) of a token set, for the paths that materialise it; None stays None."""
    return None if table is None else reference.position_bias(table, positions, batch)


def position_gather(const: torch.Tensor, positions: torch.Tensor, start: int, batch_dim: int, token_dim: int,
                    out_ndim: int) -> torch.Tensor:
    """A per-position constant (RoPE sin/cos, a position embedding added after a stage) brought
    to each image's kept tokens. ``const`` broadcasts against an ``out_ndim`` tensor whose
    ``token_dim`` holds the tokens from position ``start`` on; the result has the batch at
    ``batch_dim`` and the kept tokens at ``token_dim``."""
    c = const.reshape((1,) * (out_ndim - const.dim()) + tuple(const.shape)).squeeze(batch_dim)
    dim = token_dim - (batch_dim < token_dim)
    idx = (positions[:, start:] - start).clamp_min(0)  # padding reads row 0; it stays masked
    B, n = idx.shape
    g = c.index_select(dim, idx.reshape(-1)).unflatten(dim, (B, n))
    return g.movedim(dim, batch_dim)


class KeptTokens(NamedTuple):
    """A token sequence returned with ``token_output="kept"``: the tokens the last stage kept.

    ``tokens`` (B, T', ...) padded across the batch; ``positions`` (B, T') each row's position in
    the model's original token sequence (prefix included), -1 for padding; ``mask`` (B, T') True for
    a real token. What a projector into a language model or a retrieval head consumes."""

    tokens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor


def kept_output(x: torch.Tensor, positions: torch.Tensor, start: int = 0) -> KeptTokens:
    """``x``, whose token axis holds a token set's rows from ``start`` on, with its positions and mask."""
    positions = positions[:, start:]
    return KeptTokens(x, positions, positions >= 0)


def token_scatter(full: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``full`` (B, T, ...) with ``rows`` (B, T', ...) written at their original ``positions`` (B, T');
    padding rows (-1) write nowhere. Brings a token set back to the original sequence."""
    B, T = full.shape[:2]
    idx = torch.where(positions >= 0, positions, T)  # padding goes to a spare row, dropped below
    idx = idx.reshape(B, -1, *([1] * (rows.dim() - 2))).expand(rows.shape)
    spare = full.new_zeros((B, 1, *full.shape[2:]))
    return torch.cat([full, spare], dim=1).scatter(1, idx, rows.to(full.dtype))[:, :T]


def check_finite(x: torch.Tensor) -> torch.Tensor:
    """Refuse NaN/inf inputs before they turn into a silent wrong answer."""
    # One reduction and one host read: max |x| is NaN or inf exactly when some element is. (isfinite
    # then all: five kernels, ~260 us of host time a call at batch 1 on the H100; this: ~30 us.)
    # Detached: the check is not part of the function, and autograd need not record it.
    if x.is_floating_point() and x.numel() and not math.isfinite(torch.linalg.vector_norm(x.detach(), float("inf"))):
        from .errors import ATSInputError

        bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(dim=1).nonzero().flatten().tolist() if x.dim() else []
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ATSInputError(
            f"image(s) {shown} of the batch hold NaN or inf values: ATS would sample their tokens from "
            "meaningless scores. Clean the input (torch.nan_to_num), drop those images, or find where the NaN "
            "comes from; images without NaN or inf can run without them."
        )
    return x
