"""Defer: a stage's row gather moves past the output projection to the residual add.

An overlapped stage (``overlap.py``) computes every query row's attention and then copies out the
kept rows, one more kernel per stage. At small batches the output projection costs the same for
every row as for the kept ones (its GEMM is latency-bound), so the copy can go instead: project
every row, then let the residual add read both of its operands at the kept rows
(``ops.gather_add(..., every_row=True)``, one kernel either way). Exact, because every op between
the stage and the add acts on each token row alone.

The pass marks a stage ``defer_gather`` when its attention output reaches the ``gather_add`` of
its own token set through single-user, row-wise ops only: views, transposes, the projection
(``linear`` with weights that are parameters), dropout, casts, and pointwise ops whose other
operands are parameters or numbers (layer scale). The stage's fifth output says, per call,
whether it returned every row (only the overlapped path does); the add follows it.

Where that chain starts with the heads' merge and the projection (``transpose(1, 2)``, reshapes,
``linear``), the pass also hands the projection's weights to the stage and takes those nodes out
of the graph (``_fold_projection``): the overlapped stage then projects every row itself, and with
``overlap.JOIN_AFTER_PROJECTION`` before its streams join, beside the sampling, which at batch 1
likely outlasts the attention (docs/performance.md, "Batch 1"). Every other path projects its
output as the graph did.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import ops

aten = torch.ops.aten

# False: every stage gathers its own rows (the benchmarks time that as a variant).
ENABLED = True

# Ops that act on each token row by itself (given operands that do not depend on the tokens),
# so that gathering rows after them equals gathering before. The rewrite has already refused any
# view that splits the token axis and any linear over it.
ROW_WISE = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.flatten.using_ints, aten.unflatten.int, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten._to_copy.default, aten.linear.default,
    aten.dropout.default, aten.mul.Tensor, aten.add.Tensor, aten.div.Tensor,
}


# Row-wise ops whose source may be either operand (BEiT's layer scale is ``gamma * x``).
COMMUTATIVE = {aten.mul.Tensor, aten.add.Tensor}


def _row_wise(node: fx.Node, source: fx.Node) -> bool:
    """``node`` applies a row-wise op to ``source`` (its first operand, or either operand of a
    commutative op); every other operand is a parameter, a buffer or a non-tensor."""
    if node.op != "call_function" or node.target not in ROW_WISE or not node.args:
        return False
    args = list(node.args)
    if args[0] is not source:
        if node.target not in COMMUTATIVE or len(args) < 2 or args[1] is not source:
            return False
        args[0], args[1] = args[1], args[0]
    operands: list = []
    fx.node.map_arg((args[1:], node.kwargs), operands.append)
    # get_attr: weights, biases, layer scales. sym_size: the batch size a reshape pins (the
    # rewrite turned the token count into -1).
    return all(a.op == "get_attr" or a.target is aten.sym_size.int for a in operands)


def _residual_add(out: fx.Node, index: fx.Node):
    """The ``gather_add`` that takes ``out``'s row-wise descendant as its ``y``, or None."""
    node = out
    while len(node.users) == 1:
        (user,) = node.users
        if (user.op == "call_function" and user.target is ops.gather_add and len(user.args) >= 3
                and user.args[2] is node and user.args[1] is index and user.args[0] is not node):
            return user
        if not _row_wise(user, node):
            return None
        node = user
    return None


# Ops that may lie between the heads' merge and the projection: views and copies that keep the
# (B, rows, H * dh) row-major order of the merged heads.
MERGE_VIEWS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.clone.default, aten.contiguous.default, aten.alias.default,
}


def _is_head_merge(node: fx.Node, source: fx.Node) -> bool:
    """``node`` swaps the heads and rows axes of ``source`` (B, H, rows, dh)."""
    if node.op != "call_function" or not node.args or node.args[0] is not source:
        return False
    if node.target is aten.transpose.int:
        return sorted(d % 4 for d in node.args[1:3]) == [1, 2]
    return node.target is aten.permute.default and [d % 4 for d in node.args[1]] == [0, 2, 1, 3]


def _fold_projection(gm: fx.GraphModule, stage: fx.Node, out: fx.Node) -> bool:
    """If ``out`` (B, H, rows, dh) reaches a ``linear`` through the heads' merge and row-major views
    only, each node its only user, give the linear's weight and bias to ``stage`` (keywords
    ``proj_weight``, ``proj_bias``), route the linear's users to ``out`` and erase the chain."""
    val = out.meta.get("val")
    if val is None or val.dim() != 4 or len(out.users) != 1:
        return False
    chain, source = [], out
    node = next(iter(out.users))
    # HF attention reshapes its output to the shape it already has before merging the heads.
    while node.op == "call_function" and node.target in MERGE_VIEWS and node.args and node.args[0] is source:
        same = node.meta.get("val")
        if same is None or same.dim() != 4 or tuple(same.shape[1:]) != tuple(val.shape[1:]) or len(node.users) != 1:
            return False
        chain.append(node)
        source, node = node, next(iter(node.users))
    if not _is_head_merge(node, source):
        return False
    chain.append(node)
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_function" or not user.args or user.args[0] is not node:
            return False
        if user.target is aten.linear.default:
            merged = node.meta.get("val")
            if merged is None or merged.dim() != 3 or merged.shape[-1] != val.shape[1] * val.shape[3]:
                return False
            weight, bias = (list(user.args[1:]) + [user.kwargs.get("bias")])[:2]
            if not all(a is None or (isinstance(a, fx.Node) and a.op == "get_attr") for a in (weight, bias)):
                return False
            if weight is None:
                return False
            for attr in (weight, bias):
                if attr is not None:
                    stage.prepend(attr)  # get_attr nodes take no inputs: defined before the stage
            stage.kwargs = {**stage.kwargs, "proj_weight": weight, "proj_bias": bias}
            user.replace_all_uses_with(out)
            if "val" in user.meta:
                out.meta["val"] = user.meta["val"]
            for dead in [user] + chain[::-1]:
                gm.graph.erase_node(dead)
            return True
        if user.target not in MERGE_VIEWS:
            return False
        chain.append(user)
        node = user
    return False


def defer_stage_gathers(gm: fx.GraphModule) -> int:
    """Mark the stages whose gather can move to the residual add and wire their fifth output into
    that add; returns how many."""
    deferred = 0
    for node in list(gm.graph.nodes) if ENABLED else ():
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), ops.ATSStage):
            continue
        items = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        if 0 not in items or 1 not in items:
            continue
        add = _residual_add(items[0], items[1])
        if add is None:
            continue
        with gm.graph.inserting_after(items[1]):
            every_row = gm.graph.call_function(operator.getitem, (node, 4))
        add.kwargs = {**add.kwargs, "every_row": every_row}
        gm.get_submodule(node.target).defer_gather = True
        _fold_projection(gm, node, items[0])
        deferred += 1
    if deferred:
        gm.graph.lint()
        gm.recompile()
    return deferred
