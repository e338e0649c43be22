"""Patchify: a 2-D convolution whose kernel equals its stride (a ViT's patch embedding) becomes one GEMM.

Why: ATS shrinks every layer after the patch embedding but not the embedding itself, so its cost
caps the speed-up. On an H100 (torch 2.11, fp16, ``cudnn.benchmark``) cuDNN runs DeiT-S's 16x16
stride-16 conv in 1.0 ms at batch 256 (ViT-B: 2.0 ms), against 0.16 ms for the same math as
``(B*patches, C*16*16) @ (C*16*16, D)`` (docs/performance.md): 11% of the compiled
dense forward. The patches do not overlap, so each output pixel is one row of that GEMM; the
result is returned as the conv's NCHW shape (a channels-last view, so ``flatten(2).transpose(1, 2)``
downstream costs nothing).

Works on Dynamo's graphs (``torch.conv2d``) and on ATen graphs (``aten.conv2d`` /
``aten.convolution``). ``transform`` (and through it ``backend="ats"``) applies it unless
``patch_gemm=False``. The benchmarks time the dense model as a user runs it, conv included, so their
speed-ups hold this rewrite's share too (docs/performance.md, "Where the time goes", has the conv's time).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten
log = logging.getLogger(__name__)

CONV2D = {torch.conv2d, F.conv2d, aten.conv2d.default}
# Measured on 16x16 patches of RGB (a GEMM depth of 768): 5-12x faster than cuDNN. Much smaller patches
# (Swin's 4x4: depth 48, or 2x2 downsampling convs) make a shallow GEMM over a permuted copy of the
# input, not measured: they keep the conv.
MIN_GEMM_DEPTH = 128


def conv_as_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride=weight's kernel size)`` as one matrix product (same NCHW result)."""
    b, c, h, w = x.shape
    d, _, ph, pw = weight.shape
    gh, gw = h // ph, w // pw
    if h != gh * ph or w != gw * pw:  # the conv never reads the last partial patch row/column
        x = x[:, :, : gh * ph, : gw * pw]
    patches = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c * ph * pw)
    kernel = weight.reshape(d, c * ph * pw).t()
    out = patches @ kernel if bias is None else torch.addmm(bias, patches, kernel)
    return out.view(b, gh, gw, d).permute(0, 3, 1, 2)


def _value(node, gm: fx.GraphModule):
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        target = gm
        for part in node.target.split("."):
            target = getattr(target, part, None)
        return target
    return node.meta.get("val", node.meta.get("example_value"))


def _conv_args(node: fx.Node) -> Optional[tuple]:
    """(x, weight, bias, stride, padding, dilation, groups) of a conv2d node, or None for other nodes."""
    if node.op != "call_function":
        return None
    if node.target in CONV2D:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, 0, 1, 1)
    elif node.target is aten.convolution.default:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
        defaults = (None,) * 9
    else:
        return None
    values = dict(zip(names, defaults))
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    if values.get("transposed"):
        return None
    return tuple(values[k] for k in ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))


def _pair(v) -> tuple:
    if isinstance(v, int):
        return (v, v)
    return tuple(v) * 2 if len(v) == 1 else tuple(v)


def is_patch_conv(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A conv2d with stride == kernel size, no padding, no dilation, one group, on a 4-D input, whose
    GEMM would be at least ``MIN_GEMM_DEPTH`` deep (in_channels x kernel area)."""
    args = _conv_args(node)
    if args is None:
        return False
    x, weight, bias, stride, padding, dilation, groups = args
    x_val, w_val = _value(x, gm), _value(weight, gm)
    if not isinstance(x_val, torch.Tensor) or not isinstance(w_val, torch.Tensor) or x_val.dim() != 4:
        return False
    if isinstance(padding, str):
        padding = 0 if padding == "valid" else None
    if padding is None or groups != 1 or _pair(dilation) != (1, 1) or _pair(padding) != (0, 0):
        return False
    kernel = tuple(w_val.shape[2:])
    return _pair(stride) == kernel and w_val.shape[1] * kernel[0] * kernel[1] >= MIN_GEMM_DEPTH


def patchify_convs(gm: fx.GraphModule) -> int:
    """Rewrite every patch conv of ``gm`` in place into :func:`conv_as_gemm`; returns the count."""
    count = 0
    for node in list(gm.graph.nodes):
        if not is_patch_conv(node, gm):
            continue
        x, weight, bias = _conv_args(node)[:3]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(conv_as_gemm, (x, weight, bias))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
        log.info("patchify: %d patch-embedding conv(s) rewritten as GEMMs", count)
    return count
