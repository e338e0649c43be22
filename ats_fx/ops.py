"""Run-time pieces the rewritten graph calls: the ATS stage, masked attention, masked pooling,
and the gather that brings an older token set (the residual stream) to a newer one."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from . import library
from .kernels import reference

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
    ):
        super().__init__()
        self.layer, self.module_name, self.num_prefix, self.scale = layer, module, num_prefix, scale
        self.ratio, self.k, self.score, self.padding, self.dropout_p = ratio, k, score, padding, dropout_p
        self.kernels, self.selection = kernels, selection
        self.compiled = False  # set by the "ats" torch.compile backend
        self.last: Optional[StageTrace] = None

    def extra_repr(self) -> str:
        budget = f"ratio={self.ratio}" if self.k is None else f"k={self.k}"
        return (f"layer={self.layer}, {budget}, prefix={self.num_prefix}, score={self.score}, "
                f"padding={self.padding}, kernels={self.kernels}"
                + ("" if self.selection == "ats" else f", selection={self.selection}"))

    def forward(self, q, k, v, key_mask: Optional[torch.Tensor], positions: Optional[torch.Tensor]):
        tracing = library.tracing(q)
        # Eager raises on NaN scores; compiled static padding must not sync (CUDA graphs), so it
        # falls back to uniform scores there (ATS-NOTES §1). batch_max reads the width anyway.
        strict = not (self.compiled or tracing) or self.padding == "batch_max"
        width = -1  # batch_max: data-dependent
        if self.padding == "static":  # K + p for this layer's (static) token count
            width = reference.static_budget(q.shape[2], self.num_prefix, self.ratio, self.k) + self.num_prefix
        if self.selection == "ats":
            index, mask, kept, budget, padded = library.sample(
                q, k, v, key_mask, self.num_prefix, self.scale, self.ratio, self.k, self.score, width, strict,
                self.kernels,
            )
        else:
            index, mask, kept, budget, padded = self._baseline(q, k, v, key_mask, width)
        dropout_p = self.dropout_p if self.training else 0.0
        out = library.attention_rows(q, k, v, index, key_mask, self.scale, dropout_p, self.kernels)
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
        return out, index, mask, new_positions


    def _baseline(self, q, k, v, key_mask, width: int):
        """The paper's baselines (top-K by score, random K), on the PyTorch reference path."""
        if torch.compiler.is_compiling() or type(q) is not torch.Tensor:  # FlopCounterMode is fine
            from .errors import ATSConfigError

            raise ATSConfigError(f"selection={self.selection!r} is an eager-only ablation baseline: "
                                 "compile or export the model with selection='ats'")
        B, _, T, _ = q.shape
        scores = reference.class_token_scores(q, k, v, key_mask, self.num_prefix, self.scale, self.score)
        budget = reference.token_budget(key_mask, B, T, self.num_prefix, self.ratio, self.k, q.device)
        if self.selection == "random":
            scores = torch.rand_like(scores)  # top_k_select ranks the prefix and padding last
        index, mask, kept = reference.top_k_select(scores, key_mask, budget, self.num_prefix,
                                                   None if width < 0 else width)
        return index, mask, kept, budget, bool((~mask).any())


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
    return x.gather(token_dim, _index_view(index, x, batch_dim, token_dim))


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


def masked_attention(q, k, v, key_mask, batch_dim: int, scale: float, dropout_p: float = 0.0):
    """Attention of a layer after an ATS stage: padded keys get zero weight (ATS-NOTES §4)."""
    if key_mask is None:  # no padding in this batch
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    attn_mask = key_mask
    shape = [1] * q.dim()
    shape[batch_dim], shape[-1] = attn_mask.shape[0], attn_mask.shape[1]
    attn_mask = attn_mask.reshape(shape)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)


def check_finite(x: torch.Tensor) -> torch.Tensor:
    """Refuse NaN/inf inputs before they turn into a silent wrong answer."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        from .errors import ATSInputError

        raise ATSInputError(
            "the input holds NaN or inf values: ATS would sample tokens from meaningless scores. "
            "Clean the input (torch.nan_to_num) or find where the NaN comes from."
        )
    return x
