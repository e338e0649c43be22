"""Small graph queries on torch.fx graphs, answered with networkx."""
from __future__ import annotations

import operator
from functools import cached_property
from typing import Optional

import networkx as nx
import sympy
import torch
import torch.fx as fx

# A batch size no real tensor dimension equals, substituted for the symbolic batch so that
# shape arithmetic (cumulative products of dims) is exact integer arithmetic.
BATCH_PROBE = 1_000_003


def is_shape_only(node: fx.Node) -> bool:
    """Nodes that compute sizes (sym_size, SymInt arithmetic), not tensor data."""
    if node.op != "call_function":
        return False
    if node.target is torch.ops.aten.sym_size.int:
        return True
    val = node.meta.get("val")
    return isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool)


class DataFlow:
    """Data dependences of a graph, ignoring paths that carry only shapes.

    ``cls_token.expand(x.size(0), -1, -1)`` reads x's size, not its values: it is a learned
    token, not data. networkx answers the reachability queries.
    """

    def __init__(self, graph: fx.Graph):
        g = nx.DiGraph()
        for node in graph.nodes:
            g.add_node(node)
            if is_shape_only(node):
                continue
            for src in node.all_input_nodes:
                if not is_shape_only(src):
                    g.add_edge(src, node)
        self.graph = g
        self.inputs = [n for n in graph.nodes if n.op == "placeholder"]

    @cached_property
    def _from_inputs(self) -> set:
        reached: set = set()
        for node in self.inputs:
            reached |= nx.descendants(self.graph, node) | {node}
        return reached

    def depends_on_input(self, node: fx.Node) -> bool:
        return node in self._from_inputs

    def descendants(self, node: fx.Node) -> set:
        return nx.descendants(self.graph, node)

    def ancestors(self, node: fx.Node) -> set:
        return nx.ancestors(self.graph, node)


def shape_of(node: fx.Node) -> Optional[tuple]:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def concrete(dims) -> tuple[int, ...]:
    """Dims as ints, the symbolic batch replaced by BATCH_PROBE."""
    out = []
    for d in dims:
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            d = int(expr.subs({s: BATCH_PROBE for s in expr.free_symbols}))
        out.append(int(d))
    return tuple(out)


def concrete_shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    shape = shape_of(node)
    return None if shape is None else concrete(shape)


def is_symbolic(dim) -> bool:
    return isinstance(dim, torch.SymInt) and not isinstance(dim.node.expr, sympy.Integer)


def batch_dim(node: fx.Node) -> Optional[int]:
    """The dim of ``node`` that is exactly the (symbolic) batch size, if any."""
    shape = concrete_shape(node)
    if shape is None:
        return None
    hits = [i for i, d in enumerate(shape) if d == BATCH_PROBE]
    return hits[0] if len(hits) == 1 else None


def module_path(node: fx.Node) -> str:
    """The nn.Module that produced ``node`` (from export's nn_module_stack), for messages."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top level>"
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "L['self']"):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path or "<top level>"


def describe(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target} (node {node.name!r} in {module_path(node)})"


# Views that take part of a tensor along one axis, and the position of that axis among their
# arguments (default 0). A getitem of a chunk or split, or a slice, is such a part.
_PART_AXIS = {torch.ops.aten.chunk.default: 2, torch.ops.aten.split.Tensor: 2,
              torch.ops.aten.split_with_sizes.default: 2, torch.ops.aten.tensor_split.sections: 2,
              torch.ops.aten.tensor_split.indices: 2, torch.ops.aten.slice.Tensor: 1,
              torch.ops.aten.narrow.default: 1}


def _part_axis(node: fx.Node) -> Optional[int]:
    """The axis a part-taking view of ``node`` cuts, counted from the end (-1: the last)."""
    i = _PART_AXIS[node.target]
    axis = node.args[i] if len(node.args) > i else node.kwargs.get("dim", 0)
    shape = shape_of(node.args[0])
    if not isinstance(axis, int) or shape is None:
        return None
    return axis - len(shape) if axis >= 0 else axis


def feature_parts(node: fx.Node) -> tuple[fx.Node, list[tuple[fx.Node, Optional[int]]]]:
    """``(root, parts)``: ``node`` is ``root`` with each of ``parts`` applied in turn. Each part is
    a view node with its cut axis counted from the end, or a getitem with None. Empty parts: ``node``
    is not such a part, or an axis is unknown."""
    parts: list = []
    while node.op == "call_function":
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and node.args[0].op == "call_function" and node.args[0].target in _PART_AXIS:
            parts.append((node, None))
            node = node.args[0]
        elif node.target in _PART_AXIS:
            axis = _part_axis(node)
            if axis is None:
                return node, []
            parts.append((node, axis))
            node = node.args[0]
        else:
            break
    return node, parts[::-1]


def replay_parts(graph: fx.Graph, parts: list[tuple[fx.Node, Optional[int]]], value: fx.Node) -> fx.Node:
    """``feature_parts``' views taken again of ``value``, which may have more leading axes (each
    axis is counted from the end). Inserts at the graph's insertion point."""
    for node, axis in parts:
        args, kwargs = [value, *node.args[1:]], dict(node.kwargs)
        if axis is not None:
            i = _PART_AXIS[node.target]
            if len(args) > i:
                args[i] = axis
            else:
                kwargs["dim"] = axis
        value = graph.call_function(node.target, tuple(args), kwargs)
    return value
