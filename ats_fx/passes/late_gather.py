"""Late gather: a stage's kept rows are gathered after the block's output projection.

A stage outputs O = A[kept] V (eq. 6), which goes through row-wise ops (head merge, output
projection, layer scale) to the residual add, where the rewrite gathers the residual stream to
the kept rows (``ops.gather_add``). Row-wise ops commute with a row gather, so the stage may
instead output the attention of every query row and the gather move to the add, which then
gathers both operands in one fused pass:

    gather_add(x, index, proj(O[kept]))  ==  gather_add(x, index, gather(proj(O), index))

The point is the scores: the attention kernel that computes every row also writes the class
row's logits and value norms from the K and V tiles it loads (``attention_rows.WRITE_SCORES``),
so a stage reads K and V once instead of twice and launches one kernel less. It costs the
dropped rows' attention and projection. Used by the ``"ats"`` compile backend (option
``late_gather``), where Inductor fuses both gathers into the add and layer norm that follow.

A stage is left alone unless every op between its output and that add is one of the row-wise
ops below with no other user: anything else (a bias on the logits, talking heads, a second
consumer of the attention output) keeps the early gather.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx as fx

from .. import ops
from .graph import concrete_shape
from .tokens import norm_dim

log = logging.getLogger(__name__)
aten = torch.ops.aten

VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
SAME_LAYOUT = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten._to_copy.default}
CONSTANT_OPERAND = {aten.mul.Tensor, aten.add.Tensor, aten.div.Tensor}


def late_gather(gm: fx.GraphModule) -> int:
    """Move the kept-row gather of every eligible stage after its projection; returns the count."""
    moved = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        stage = gm.get_submodule(node.target)
        if not isinstance(stage, ops.ATSStage) or not _plain_stage(node, stage):
            continue
        outputs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        if 0 not in outputs or 1 not in outputs:
            continue
        found = _row_wise_chain(outputs[0], outputs[1])
        if found is None:
            continue
        end, add = found
        with gm.graph.inserting_before(add):
            gathered = gm.graph.call_function(ops.token_gather, (end, outputs[1], add.args[3], add.args[4]))
        gathered.meta = dict(add.meta)
        add.replace_input_with(end, gathered)
        stage.full_rows = True
        moved += 1
    if moved:
        gm.recompile()
        log.info("late gather: %d stage(s) gather their kept rows after the projection", moved)
    return moved


def _plain_stage(node: fx.Node, stage: ops.ATSStage) -> bool:
    # args: q, k, v, key mask, positions, position bias, talking-heads weights
    bias = node.args[5] if len(node.args) > 5 else None
    mix = node.args[6] if len(node.args) > 6 else None
    return bias is None and mix is None and stage.num_prefix > 0 and stage.selection == "ats"


def _row_wise_chain(out: fx.Node, index: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """From the stage output (B, H, T, dh) along single-user row-wise ops to the ``gather_add``
    with the stage's index: ``(last node of the chain, the gather_add)``, or None."""
    node, batch, token = out, 0, 2
    while True:
        if len(node.users) != 1:
            return None
        (user,) = node.users
        if user.op != "call_function":
            return None
        if user.target is ops.gather_add:
            ok = user.args[2] is node and user.args[1] is index and user.args[0] is not node
            return (node, user) if ok and tuple(user.args[3:5]) == (batch, token) else None
        step = _follow(user, node, batch, token)
        if step is None:
            return None
        batch, token = step
        node = user


def _follow(user: fx.Node, arg: fx.Node, batch: int, token: int) -> Optional[tuple[int, int]]:
    """Where the batch and token axes of ``arg`` are in ``user``'s output, if ``user`` treats each
    token row on its own; None otherwise."""
    shape = concrete_shape(arg)
    if shape is None or user.args[0] is not arg:
        return None
    nd = len(shape)
    target = user.target
    if target is aten.transpose.int:
        a, b = norm_dim(user.args[1], nd), norm_dim(user.args[2], nd)
        where = {a: b, b: a}
        return where.get(batch, batch), where.get(token, token)
    if target is aten.permute.default:
        dims = [norm_dim(d, nd) for d in user.args[1]]
        return dims.index(batch), dims.index(token)
    if target in VIEWS:
        out_shape = concrete_shape(user)
        sizes = user.args[1]
        # Only the axes after the token axis may be merged or split; the token size must be
        # inferred (-1, as the rewrite left it), so the same view serves all T rows.
        lead = max(batch, token)
        if out_shape is None or out_shape[:lead + 1] != shape[:lead + 1] or sizes[token] != -1:
            return None
        return batch, token
    if target is aten.linear.default:
        return (batch, token) if max(batch, token) < nd - 1 else None
    if target is aten.dropout.default:
        p, train = user.args[1], user.args[2]
        return (batch, token) if p == 0 or not train else None
    if target in SAME_LAYOUT:
        return (batch, token) if not user.kwargs.get("memory_format") else None
    if target in CONSTANT_OPERAND and len(user.args) == 2 and not user.kwargs:
        other = user.args[1]
        if isinstance(other, (int, float)):
            return batch, token
        if not isinstance(other, fx.Node) or other.op != "get_attr":
            return None
        other_shape = concrete_shape(other)
        if other_shape is None or len(other_shape) > nd:
            return None
        padded = (1,) * (nd - len(other_shape)) + tuple(other_shape)
        # A per-channel constant (layer scale): nothing that varies along the batch or the tokens.
        return (batch, token) if padded[batch] == 1 and padded[token] == 1 else None
    return None
