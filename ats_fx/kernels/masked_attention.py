"""Triton kernel 5: attention of the layers after an ATS stage, over a key-padding mask.

After a stage every image keeps K'+p real tokens, laid out first, with padding after them
(ATS-NOTES §2 and §5). ``scaled_dot_product_attention`` with a mask cannot use the flash kernel
and its masked kernels read the whole padded key set; this one is a flash-attention forward that

- reads each image's key-padding mask once per program and stops the key loop after the image's
  last real key (so the padding costs neither reads nor FLOPs; masks that are not a suffix are
  still honoured column by column),
- skips query tiles that hold only padding rows (self-attention, ``Tq == Tk``) and writes zeros
  there: padded rows are never read by a real token,
- writes its output as ``(B, T, H, dh)`` memory viewed as ``(B, H, T, dh)``, the layout the
  following ``transpose(1, 2).reshape(B, T, C)`` turns into a free view.

It is ``attention_rows.py``'s kernel run without a row index. Reference:
``reference.masked_attention`` (SDPA with the mask).
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention_rows import launch_attention


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + bias) v over the real keys, for (B, H, T, dh) inputs and a (B, Tk) bool
    mask whose first key is real. Returns (B, H, Tq, dh); rows of a self-attention's padded tokens
    are 0. ``bias`` (L, N, N) and ``positions`` (B, T): a position bias table, as ``launch_attention``."""
    return launch_attention(q, k, v, None, key_mask, scale, q.shape[2], bias=bias, positions=positions)
