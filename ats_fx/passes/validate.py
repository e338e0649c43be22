"""Validation of a rewritten graph: run ShapeProp on the example and compare output shapes."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.passes.shape_prop import ShapeProp

from .. import dispatch, ops
from ..errors import ATSUnsupportedModel
from .graph import BATCH_PROBE, concrete


def output_shapes(gm: fx.GraphModule) -> list:
    """Output shapes recorded by export (FakeTensor meta), the batch made concrete."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return [
        concrete(n.meta["val"].shape) if isinstance(n, fx.Node) and isinstance(n.meta.get("val"), torch.Tensor) else None
        for n in pytree.tree_leaves(out.args)
    ]


def validate(gm: fx.GraphModule, example: tuple, expected: list) -> None:
    """Propagate real example tensors through every node (ShapeProp) and check the outputs
    keep the shapes the captured model produced."""
    flat = [x for x in pytree.tree_leaves(example)]
    try:
        with torch.no_grad(), dispatch.reference_kernels():
            result = ShapeProp(gm).propagate(*flat)
    except Exception as err:
        raise ATSUnsupportedModel(f"the rewritten graph failed shape propagation: {type(err).__name__}: {err}") from err
    leaves = pytree.tree_leaves(result, is_leaf=lambda x: isinstance(x, ops.KeptTokens))
    batch = flat[0].shape[0]
    for got, want in zip(leaves, expected):
        if want is None:
            continue
        want = tuple(batch if d == BATCH_PROBE else d for d in want)
        if isinstance(got, ops.KeptTokens):  # token_output="kept": fewer tokens, nothing else changes
            shape = tuple(got.tokens.shape)
            if shape[0] != batch or len(shape) != len(want) or tuple(got.positions.shape) != tuple(got.mask.shape):
                raise ATSUnsupportedModel(f"the rewritten graph returns kept tokens of shape {shape} where the "
                                          f"model returned {want}")
            continue
        if isinstance(got, torch.Tensor) and tuple(got.shape) != want:
            raise ATSUnsupportedModel(
                f"the rewritten graph returns shape {tuple(got.shape)} where the model returned {want}: "
                "a token axis that ats_fx did not follow leaks into the output"
            )
