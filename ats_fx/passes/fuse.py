"""Fuse: the residual gather and the add that consumes it become one ``ops.gather_add`` node.

The rewrite brings the residual stream to a stage's kept tokens with ``ops.token_gather`` right
before the block's residual ``add``; when the add is the gather's only user, one node does both
(the gathered rows are never written and read back).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import ops

aten = torch.ops.aten


def fuse_gather_add(gm: fx.GraphModule, kernels: str) -> int:
    """Rewrite ``add(token_gather(x, index, b, t), y)`` (either order) in place; returns the count."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not ops.token_gather or len(node.users) != 1:
            continue
        (add,) = node.users
        if add.target is not aten.add.Tensor or add.kwargs or len(add.args) != 2:
            continue
        other = add.args[1] if add.args[0] is node else add.args[0]
        if not isinstance(other, fx.Node) or other is node:
            continue
        x, index, batch_dim, token_dim = node.args
        with gm.graph.inserting_before(add):
            new = gm.graph.call_function(ops.gather_add, (x, index, other, batch_dim, token_dim, kernels))
        new.meta = dict(add.meta)
        add.replace_all_uses_with(new)
        gm.graph.erase_node(add)
        gm.graph.erase_node(node)
        fused += 1
    if fused:
        gm.recompile()
    return fused
