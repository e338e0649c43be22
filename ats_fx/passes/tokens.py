"""Token axes: which dimension of each tensor in the graph holds the tokens.

A forward walk labels every tensor derived from the token sequence with a ``TokenAxis``. The
sequence starts at the ``cat`` that puts learned prefix tokens (class, distillation, registers)
in front of the patch tokens. Each op has a rule for where the axis goes (a reshape may merge it
with the batch, as torchvision's attention does, and split it again; passes/rules.py). The same rules
drive the rewrite in passes/rewrite.py: a tensor whose token set is newer than the captured one is
"active", and its ops are patched to run on the smaller, padded set.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
import torch.fx as fx

aten = torch.ops.aten


@dataclass(frozen=True)
class TokenAxis:
    """The token axis of one tensor.

    ``dim`` holds ``outer * T * inner`` elements (``outer = inner = 1`` unless a reshape merged
    the token axis with neighbours). ``version`` is the token set: 0 as captured, n after the
    n-th ATS stage. ``prefix`` tokens sit first; ``start`` tokens were sliced off the front.
    """

    dim: int
    version: int = 0
    prefix: int = 1
    start: int = 0
    outer: int = 1
    inner: int = 1

    @property
    def plain(self) -> bool:
        return self.outer == 1 and self.inner == 1 and self.start == 0


Label = Union[None, TokenAxis, tuple]


class Unsupported(Exception):
    """Raised by a rule; turned into ATSUnsupportedModel with the node's context."""


@dataclass
class TokenSet:
    """A token set made by an ATS stage: rows of the previous set, padding mask, positions.
    ``index`` is None for a set made by prepending tokens (``cat([cls, x])``, CaiT)."""

    index: Optional[fx.Node]
    mask: fx.Node
    positions: fx.Node
    layer: int
    module: str


def cumprod(shape) -> list[int]:
    out = [1]
    for d in shape:
        out.append(out[-1] * d)
    return out


def map_reshape(in_shape, out_shape, axis: TokenAxis) -> Optional[TokenAxis]:
    """Where the token axis lands after a reshape that keeps the element order.

    The tokens occupy flat strides [left, left*T) of the input; the output dim whose cumulative
    product brackets that span holds them. None when the reshape splits the token axis.
    """
    size = in_shape[axis.dim]
    tokens = size // (axis.outer * axis.inner)
    left = cumprod(in_shape[: axis.dim])[-1] * axis.outer
    right = left * tokens
    c = cumprod(out_shape)
    for j in range(len(out_shape)):
        if c[j] <= left and left % c[j] == 0 and c[j + 1] >= right and c[j + 1] % right == 0:
            return replace(axis, dim=j, outer=left // c[j], inner=c[j + 1] // right)
    return None


def norm_dim(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else 0
