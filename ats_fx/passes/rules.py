"""How each aten op carries the token axis, and how it is patched once the tokens are sampled.

``OpRules`` holds one rule per op family (reshapes, slices, concatenation, pooling, pointwise ops
with per-position constants, matmuls), mixed into ``TokenWalk`` (passes/rewrite.py), which
decides where stages go and calls ``rule_for(node.target)`` for every op that receives a token axis.
A rule returns the op's output ``Label``; on a sampled token set ("active") it also patches the
op: ``-1`` for the token count, gathers of older token sets and of per-position constants, masked
pooling. What it cannot follow it hands to ``fail``, which raises when the op is active.
"""
from __future__ import annotations

import operator
from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.fx as fx

from .. import ops
from .graph import BATCH_PROBE, batch_dim, concrete_shape, feature_parts, replay_parts
from .match import PASS_THROUGH
from .tokens import Label, TokenAxis, TokenSet, Unsupported, map_reshape, norm_dim

aten = torch.ops.aten
INT_MAX = 9223372036854775807

VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
SIZE_FREE_RESHAPES = {
    aten.flatten.using_ints, aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
}
REDUCTIONS = {
    aten.mean.dim: ops.masked_mean,
    aten.sum.dim_IntList: ops.masked_sum,
    aten.amax.default: ops.masked_amax,
    aten.amin.default: ops.masked_amin,
}
SOFTMAXES = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default}
NORMS = {aten.layer_norm.default, aten.rms_norm.default}
EXTRA_POINTWISE = PASS_THROUGH | {aten.detach.default, aten.lift_fresh_copy.default, aten.where.self}
GRID_RESHAPE = ("splits the token axis into several axes, a reshape back to a 2-D grid (PiT's and LeViT's "
                "pooling, a dense-prediction head): a sampled token set no longer fills the grid. Put the "
                "stages after the last grid reshape, or transform a model that stays on token sequences")


class OpRules:
    """The rules of ``TokenWalk``. They use its state: ``graph``, ``flow`` (DataFlow), ``analysis``,
    ``sets`` (token sets by version), ``gathers`` (memoised gathers), ``prefix_slices``, and its
    methods ``label``, ``fail`` and ``to_version``."""

    def rule_pointwise(self, node: fx.Node) -> Label:
        out_nd = len(concrete_shape(node) or ())
        tensors = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node) and concrete_shape(a) is not None]
        labeled = [(a, self.label(a)) for a in tensors if isinstance(self.label(a), TokenAxis)]
        if not labeled:
            self.fail(node, "receives several token axes at once")
            return None
        dims = {lab.dim + out_nd - len(concrete_shape(a)) for a, lab in labeled}
        shapes = {(lab.start, lab.outer, lab.inner) for _, lab in labeled}
        if len(dims) != 1 or len(shapes) != 1:
            self.fail(node, "combines tensors whose token axes do not line up")
            return None
        dim = dims.pop()
        top = max(labeled, key=lambda p: p[1].version)[1]
        if top.version > 0:
            for a in tensors:
                lab = self.label(a)
                shape = concrete_shape(a)
                pos = dim - (out_nd - len(shape))
                if not isinstance(lab, TokenAxis) and pos >= 0 and shape[pos] != 1:
                    node.replace_input_with(a, self._gather_constant(node, a, top, dim, out_nd))
            for a, lab in labeled:
                if lab.version < top.version:
                    node.replace_input_with(a, self.to_version(a, lab, top.version, node))
        return replace(top, dim=dim)

    def _gather_constant(self, node: fx.Node, a: fx.Node, top: TokenAxis, dim: int, out_nd: int) -> fx.Node:
        """A per-position constant meeting sampled tokens (RoPE sin/cos, a position embedding
        added late): gather it with the kept tokens' original positions.

        Where ``a`` is a part of a larger constant along a feature axis (EVA's RoPE table, chunked
        into sin and cos for q and again for k in every block), the whole constant is gathered
        once per token set and the same parts are taken of it: one gather a stage instead of four."""
        root, parts = feature_parts(a)
        # Every cut must lie right of the token and batch axes, counted from the end: the gathered
        # constant has the batch and the tokens where the output has them, and the cut axes last.
        bdim = batch_dim(node)
        edge = max(dim, -1 if bdim is None else bdim) - out_nd
        root_shape = concrete_shape(root)
        if (parts and all(axis is None or axis > edge for _, axis in parts)
                and root_shape is not None and len(root_shape) == len(concrete_shape(a))
                and not self._gather_problem(node, root, top, dim, out_nd)):
            value = self._gather_whole(node, root, top, dim, out_nd)
            with self.graph.inserting_before(node):
                return replay_parts(self.graph, parts, value)
        problem = self._gather_problem(node, a, top, dim, out_nd)
        if problem:
            raise Unsupported(
                f"adds or multiplies a tensor ({a.name}) with one entry per token position that {problem}; "
                "ats_fx cannot keep it aligned with the sampled tokens"
            )
        return self._gather_whole(node, a, top, dim, out_nd)

    def _gather_problem(self, node: fx.Node, a: fx.Node, top: TokenAxis, dim: int, out_nd: int) -> Optional[str]:
        """Why the constant ``a`` cannot be gathered with the tokens of ``node``'s axis ``dim``."""
        shape = concrete_shape(a)
        pos = dim - (out_nd - len(shape))
        tokens = concrete_shape(node)[dim]
        bdim = batch_dim(node)
        if self.flow.depends_on_input(a):
            return "comes from the input by a path ats_fx lost track of"
        if shape[pos] != tokens or not (top.outer == 1 and top.inner == 1):
            return "does not line up one entry per token"
        if bdim is None or (bdim - (out_nd - len(shape)) >= 0 and shape[bdim - (out_nd - len(shape))] != 1):
            return "has no batch axis of size 1 to gather into"
        return None

    def _gather_whole(self, node: fx.Node, a: fx.Node, top: TokenAxis, dim: int, out_nd: int) -> fx.Node:
        """``position_gather`` of ``a``, one node per (constant, token set, layout)."""
        bdim = batch_dim(node)
        key = (a, top.version, top.start, bdim, dim, out_nd)
        if key not in self.gathers:
            with self.graph.inserting_before(node):
                self.gathers[key] = self.graph.call_function(
                    ops.position_gather, (a, self.sets[top.version].positions, top.start, bdim, dim, out_nd))
        return self.gathers[key]

    def rule_view(self, node: fx.Node) -> Label:
        lab = self.label(node.args[0])
        new = map_reshape(concrete_shape(node.args[0]), concrete_shape(node), lab)
        if new is None:
            self.fail(node, GRID_RESHAPE)
            return None
        if lab.version > 0:
            self._patch_sizes(node, 1, new.dim, node.args[0])
            if node.target is aten.view.default:
                # The captured strides made this a view; the rewritten producer's may not (torch
                # 2.11's export drops MHA's `.contiguous()` before `.view(B*T, E)` when SDPA's output
                # was already laid out that way, and the ATS attention's is not). reshape views
                # whenever view would, and copies otherwise.
                node.target = aten.reshape.default
        return new

    def _patch_sizes(self, node: fx.Node, arg_index: int, token_pos: int, source: fx.Node, offset: int = 0) -> None:
        """Replace the size that held the old token count by -1; pin every other -1."""
        sizes = list(node.args[arg_index])
        out_shape = concrete_shape(node)
        for i, s in enumerate(sizes):
            if i == token_pos:
                sizes[i] = -1
            elif isinstance(s, int) and s == -1:
                d = out_shape[i + offset]
                if d == BATCH_PROBE and batch_dim(source) is not None:
                    with self.graph.inserting_before(node):
                        sizes[i] = self.graph.call_function(aten.sym_size.int, (source, batch_dim(source)))
                elif BATCH_PROBE > d:
                    sizes[i] = d
                else:
                    raise Unsupported("infers a size merged with the batch; ats_fx cannot pin it")
        args = list(node.args)
        args[arg_index] = sizes
        node.args = tuple(args)

    def rule_size_free_reshape(self, node: fx.Node) -> Label:
        lab = self.label(node.args[0])
        new = map_reshape(concrete_shape(node.args[0]), concrete_shape(node), lab)
        if new is None:
            self.fail(node, GRID_RESHAPE)
            return None
        if lab.version > 0 and node.target is aten.unflatten.int:
            in_nd = len(concrete_shape(node.args[0]))
            if norm_dim(node.args[1], in_nd) == lab.dim:
                self._patch_sizes(node, 2, new.dim - lab.dim, node.args[0], offset=lab.dim)
        if lab.version > 0 and node.target is aten.squeeze.dims and lab.dim in [norm_dim(d, len(concrete_shape(node.args[0]))) for d in node.args[1]]:
            raise Unsupported("squeezes the token axis, which may hold one token after sampling")
        return new

    def rule_expand(self, node: fx.Node) -> Label:
        lab = self.label(node.args[0])
        sizes = list(node.args[1])
        dim = lab.dim + len(sizes) - len(concrete_shape(node.args[0]))
        if lab.version > 0:
            sizes[dim] = -1
            node.args = (node.args[0], sizes) + tuple(node.args[2:])
        return replace(lab, dim=dim)

    def rule_new_tensor(self, node: fx.Node) -> Label:
        """``x.new_empty(sizes)`` and kin take only dtype and device from ``x``. Without the token count
        in ``sizes`` the result has no token axis: timm's drop path draws a (B, 1, 1) keep mask this way,
        which broadcasts over any number of tokens."""
        lab = self.label(node.args[0])
        tokens = concrete_shape(node.args[0])[lab.dim]
        sizes = [int(s) if isinstance(s, int) else None for s in node.args[1]]
        if tokens in sizes[1:]:
            self.fail(node, f"makes a tensor of sizes {sizes}, which holds the token count {tokens}")
        return None

    def rule_permute(self, node: fx.Node) -> Label:
        lab = self.label(node.args[0])
        nd = len(concrete_shape(node.args[0]))
        dims = [norm_dim(d, nd) for d in node.args[1]]
        return replace(lab, dim=dims.index(lab.dim))

    def rule_transpose(self, node: fx.Node) -> Label:
        lab = self.label(node.args[0])
        nd = len(concrete_shape(node.args[0]))
        if node.target is aten.t.default:
            a, b = 0, nd - 1
        else:
            a, b = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
        dim = b if lab.dim == a else a if lab.dim == b else lab.dim
        return replace(lab, dim=dim)

    def rule_select(self, node: fx.Node) -> Label:
        lab = self.label(node.args[0])
        shape = concrete_shape(node.args[0])
        dim, index = norm_dim(node.args[1], len(shape)), node.args[2]
        if dim != lab.dim:
            return replace(lab, dim=lab.dim - (dim < lab.dim))
        if not lab.plain or not isinstance(index, int):
            self.fail(node, "selects from a sliced or merged token axis")
            return None
        if index < 0 and lab.version > 0:
            raise Unsupported("selects a token counted from the end, which moves when tokens are dropped")
        index = index % shape[dim]
        if index < lab.prefix:
            self.analysis.pooling.append(("token", index))
            return None
        self.fail(node, f"reads token {index}, which ATS may drop; only the {lab.prefix} prefix token(s) are kept")
        return None

    def rule_slice(self, node: fx.Node) -> Label:
        lab = self.label(node.args[0])
        shape = concrete_shape(node.args[0])
        args = list(node.args) + [None] * (5 - len(node.args))
        dim = norm_dim(args[1] if args[1] is not None else 0, len(shape))
        if dim != lab.dim:
            return lab
        start, end, step = args[2] or 0, args[3], args[4] or 1
        size = shape[dim]
        end = size if end is None else end
        if lab.outer != 1 or lab.inner != 1 or step != 1 or start < 0 or end < 0:
            self.fail(node, "slices the token axis with a step, from the end, or while it is merged")
            return None
        first = lab.start + start
        if end >= size and first <= lab.prefix:
            if lab.version > 0 and args[3] is not None:
                args[3] = INT_MAX
                node.args = tuple(args[: max(len(node.args), 4)])
            return replace(lab, start=first)
        if lab.start + end <= lab.prefix:
            if first == 0 and end == lab.prefix:
                self.prefix_slices[node] = replace(lab, start=0)  # may be concatenated back (RoPE)
            return None  # prefix tokens only: never dropped, fixed size
        self.fail(node, f"slices tokens [{start}:{end}], a range ATS changes")
        return None

    def rule_split(self, node: fx.Node) -> Label:
        lab = self.label(node.args[0])
        nd = len(concrete_shape(node.args[0]))
        dim = norm_dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), nd)
        if node.target is aten.unbind.int:
            dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
            if dim == lab.dim:
                self.fail(node, "unbinds the token axis")
                return None
            return tuple(replace(lab, dim=lab.dim - (dim < lab.dim)) for _ in node.meta["val"])
        if dim == lab.dim:
            self.fail(node, "splits the token axis")
            return None
        return tuple(lab for _ in node.meta["val"])

    def rule_cat(self, node: fx.Node) -> Label:
        tensors = node.args[0]
        nd = len(concrete_shape(node))
        dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
        labs = [self.label(t) for t in tensors]
        token_labs = [x for x in labs if isinstance(x, TokenAxis)]
        rejoined = self._rejoin_prefix(tensors, labs, dim)
        if rejoined is not None:
            return rejoined
        prepended = self._prepend_tokens(node, tensors, labs, dim)
        if prepended is not None:
            return prepended
        if any(x.dim == dim for x in token_labs):
            self.fail(node, "concatenates tokens along the token axis after ATS (e.g. a class-attention block's class token)")
            return None
        if len({(x.dim, x.version, x.start) for x in token_labs}) != 1 or len(token_labs) != len(labs):
            self.fail(node, "concatenates tensors whose token axes differ")
            return None
        return token_labs[0]

    def _prepend_tokens(self, node: fx.Node, tensors, labs, dim: int) -> Label:
        """``cat([cls, x], token_dim)`` with ``cls`` not token-indexed (CaiT prepends its class
        token after the self-attention blocks): the new tokens join the prefix. After a stage the
        result is a token set of its own whose mask and positions have the prefix in front."""
        if len(tensors) != 2 or labs[0] is not None or not isinstance(labs[1], TokenAxis):
            return None
        tail = labs[1]
        if set(self.analysis.lost) & (self.flow.ancestors(tensors[0]) | {tensors[0]}):
            return None  # tokens whose axis was lost on the way, not learned tokens
        head_shape = concrete_shape(tensors[0])
        if tail.dim != dim or not tail.plain or head_shape is None or batch_dim(tensors[0]) != batch_dim(node):
            return None
        extra = head_shape[dim]
        if extra >= concrete_shape(tensors[1])[dim]:
            return None
        if tail.version == 0:
            if self.analysis.late_class_token is None:
                self.analysis.late_class_token = node
            return replace(tail, prefix=tail.prefix + extra)
        key = ("prepend", tail.version, extra)
        if key not in self.gathers:
            base = self.sets[tail.version]
            with self.graph.inserting_before(node):
                both = self.graph.call_function(ops.prepend_tokens, (base.mask, base.positions, extra))
                mask, positions = (self.graph.call_function(operator.getitem, (both, i)) for i in range(2))
            self.sets.append(TokenSet(None, mask, positions, base.layer, base.module))
            self.gathers[key] = len(self.sets) - 1
        return replace(tail, version=self.gathers[key], prefix=tail.prefix + extra)

    def _rejoin_prefix(self, tensors, labs, dim: int) -> Label:
        """``cat([x[..., :p, :], f(x[..., p:, :])], token_dim)``: prefix tokens set aside and put
        back (EVA's RoPE skips the class token). The result is the whole token set again."""
        if len(tensors) < 2 or tensors[0] not in self.prefix_slices or not isinstance(labs[-1], TokenAxis):
            return None
        head, tail = self.prefix_slices[tensors[0]], labs[-1]
        if not (tail.dim == dim and tail.start == tail.prefix == head.prefix and tail.version == head.version
                and tail.outer == tail.inner == 1):
            return None
        inserted = tensors[1:-1]
        if not inserted:
            return replace(tail, start=0)
        # ``cat([x[:, :1], registers, x[:, 1:]])`` (HF DINOv2 with registers): learned tokens
        # inserted after the class token, before any stage, join the prefix.
        if tail.version > 0 or any(self.label(t) is not None or self.flow.depends_on_input(t) for t in inserted):
            return None
        extra = sum(concrete_shape(t)[dim] for t in inserted)
        self.analysis.prefix = tail.prefix + extra
        return TokenAxis(dim=dim, version=0, prefix=tail.prefix + extra)

    def rule_stack(self, node: fx.Node) -> Label:
        tensors = node.args[0]
        nd = len(concrete_shape(node))
        dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
        labs = [self.label(t) for t in tensors]
        if not all(isinstance(x, TokenAxis) for x in labs) or len({(x.dim, x.version, x.start) for x in labs}) != 1:
            self.fail(node, "stacks tensors whose token axes differ")
            return None
        lab = labs[0]
        return replace(lab, dim=lab.dim + (dim <= lab.dim))

    def rule_reduce(self, node: fx.Node) -> Label:
        lab = self.label(node.args[0])
        nd = len(concrete_shape(node.args[0]))
        dims = node.args[1] if len(node.args) > 1 else None
        dims = list(range(nd)) if dims is None or dims == [] else [norm_dim(d, nd) for d in ([dims] if isinstance(dims, int) else dims)]
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        if lab.dim not in dims:
            return replace(lab, dim=lab.dim if keepdim else lab.dim - sum(d < lab.dim for d in dims))
        kind = "avg" if node.target is aten.mean.dim else str(node.target).split(".")[1]
        self.analysis.pooling.append((kind, lab.start))
        if lab.version == 0:
            return None
        if lab.outer != 1 or lab.inner != 1 or batch_dim(node.args[0]) is None:
            raise Unsupported("pools over a token axis merged with another axis")
        token_set = self.sets[lab.version]
        extra = {"dtype": node.kwargs["dtype"]} if node.kwargs.get("dtype") is not None else {}
        with self.graph.inserting_before(node):
            new = self.graph.call_function(
                REDUCTIONS[node.target],
                (node.args[0], token_set.mask, batch_dim(node.args[0]), lab.dim, lab.start, dims, keepdim),
                extra,
            )
        node.replace_all_uses_with(new)
        new.meta = dict(node.meta)
        return None

    def rule_along_last(self, node: fx.Node) -> Label:
        """Ops that act on trailing dims only: layer norm, linear, softmax over channels."""
        lab = self.label(node.args[0])
        nd = len(concrete_shape(node.args[0]))
        if node.target in NORMS:
            acts_on = range(nd - len(node.args[1]), nd)
        elif node.target in SOFTMAXES:
            acts_on = [norm_dim(node.args[1], nd)]
        else:
            acts_on = [nd - 1]
        if lab.dim in acts_on:
            self.fail(node, "mixes values across tokens")
            return None
        if any(isinstance(self.label(a), TokenAxis) for a in node.args[1:] if isinstance(a, fx.Node)):
            self.fail(node, "takes a second token-indexed operand")
            return None
        return lab

    def rule_matmul(self, node: fx.Node) -> Label:
        a, b = self.label(node.args[0]), self.label(node.args[1])
        a_nd, out_nd = len(concrete_shape(node.args[0])), len(concrete_shape(node))
        if isinstance(a, TokenAxis) and b is None and a.dim < a_nd - 1:
            return replace(a, dim=a.dim + out_nd - a_nd)
        self.fail(node, "multiplies token-indexed tensors together outside a recognised attention "
                        "(an attention spelling ats_fx cannot match)")
        return None


RULES = {
    **{t: OpRules.rule_view for t in VIEWS},
    **{t: OpRules.rule_size_free_reshape for t in SIZE_FREE_RESHAPES},
    aten.expand.default: OpRules.rule_expand,
    **{t: OpRules.rule_new_tensor for t in (aten.new_empty.default, aten.new_zeros.default,
                                              aten.new_ones.default, aten.new_full.default)},
    aten.permute.default: OpRules.rule_permute,
    aten.transpose.int: OpRules.rule_transpose,
    aten.t.default: OpRules.rule_transpose,
    aten.select.int: OpRules.rule_select,
    aten.slice.Tensor: OpRules.rule_slice,
    aten.unbind.int: OpRules.rule_split,
    aten.split.Tensor: OpRules.rule_split,
    aten.split_with_sizes.default: OpRules.rule_split,
    aten.chunk.default: OpRules.rule_split,
    aten.cat.default: OpRules.rule_cat,
    aten.stack.default: OpRules.rule_stack,
    **{t: OpRules.rule_reduce for t in REDUCTIONS},
    **{t: OpRules.rule_along_last for t in NORMS | SOFTMAXES | {aten.linear.default}},
    aten.matmul.default: OpRules.rule_matmul,
    aten.bmm.default: OpRules.rule_matmul,
    aten.mm.default: OpRules.rule_matmul,
}


def rule_for(target) -> Optional[Callable[[OpRules, fx.Node], Label]]:
    """The rule of an op that receives a token axis: its entry in ``RULES``, else the pointwise rule
    for ops torch tags pointwise (and ``EXTRA_POINTWISE``); None when ats_fx has none."""
    rule = RULES.get(target)
    if rule is None and isinstance(target, torch._ops.OpOverload) and (
            torch.Tag.pointwise in target.tags or target in EXTRA_POINTWISE):
        rule = OpRules.rule_pointwise
    return rule
