"""The rewrite: chosen attention sites become ATS stages; everything downstream follows.

One forward walk over the captured graph labels token axes (passes/tokens.py). Downstream of
an ATS stage a tensor's token set is newer ("active"), and each op is patched:
- reshapes get ``-1`` where the token count used to be a constant;
- an older token set meeting a newer one (the residual stream) is gathered with the kept rows;
- later attention masks padded keys; token pooling (mean/sum/max) ignores padding;
- anything whose meaning on a variable token count is unknown raises ATSUnsupportedModel
  naming the op and its module, so a wrong model is never returned silently.
Run without a plan the walk only analyses: which sites attend over tokens, where the class
token is, and how the model pools.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.fx as fx

from .. import ops
from ..config import ATSOptions, StageOptions
from ..errors import ATSUnsupportedModel
from .graph import BATCH_PROBE, DataFlow, batch_dim, concrete_shape, describe
from .match import AttentionSite, unmatched_softmaxes
from .rules import NORMS, OpRules, rule_for
from .tokens import Label, TokenAxis, TokenSet, Unsupported, norm_dim

log = logging.getLogger(__name__)
aten = torch.ops.aten
IGNORED = {aten._assert_tensor_metadata.default, aten.sym_size.int}  # never carry the token axis


@dataclass
class Analysis:
    """What the analysis walk found."""

    sites: list  # every syntactic site
    token_sites: list  # sites attending over tokens, in execution order (stage numbering)
    not_token: dict  # site -> why it is not token attention
    seed: Optional[fx.Node] = None
    prefix: int = 0
    seed_problem: Optional[str] = None
    pooling: list = field(default_factory=list)  # how tokens leave: "token", "avg", ...
    lost: dict = field(default_factory=dict)  # node -> why its token axis could not be followed
    unmatched: list = field(default_factory=list)  # (module, why) of softmax attention no spelling matched
    class_attention: list = field(default_factory=list)  # queries without a token axis (CaiT, attention pooling)
    late_class_token: Optional[fx.Node] = None  # the cat that prepends a class token after the stages
    # The first prefix token is a class token (scores come from its attention row). False for models
    # without one: average pool, registers only, attention pooling (SigLIP), CaiT's early blocks.
    class_token: bool = False


class TokenWalk(OpRules):
    def __init__(
        self,
        gm: fx.GraphModule,
        sites: list[AttentionSite],
        plan: Optional[dict[int, StageOptions]] = None,
        options: Optional[ATSOptions] = None,
        neutral: Optional[Callable[[fx.Node], bool]] = None,
        no_class_token: bool = False,
    ):
        """``no_class_token``: the model says its learned prefix tokens are registers, not a class
        token (timm ``cls_token is None``)."""
        self.gm, self.graph = gm, gm.graph
        self.no_class_token = no_class_token
        self.sites = {s.out: s for s in sites}
        self.interior = set().union(*(s.interior for s in sites)) if sites else set()
        self.plan = plan
        self.options = options
        self.neutral = neutral or (lambda node: False)
        self.flow = DataFlow(self.graph)
        self.labels: dict[fx.Node, Label] = {}
        self.sets: list[Optional[TokenSet]] = [None]
        self.gathers: dict = {}
        self.prefix_slices: dict[fx.Node, TokenAxis] = {}
        self.replaced: list[AttentionSite] = []
        # version u -> the residual stream entering the stage that made token set u (at version u-1):
        # the value a token dropped there keeps (token_output="full").
        self.residuals: dict[int, fx.Node] = {}
        self.analysis = Analysis(sites=sites, token_sites=[], not_token={},
                                 unmatched=unmatched_softmaxes(gm.graph, sites))
        self.node: Optional[fx.Node] = None
        self.free_seed = self._class_free_seed(sites)

    # ---------------------------------------------------------------- driving
    def run(self) -> Analysis:
        for node in list(self.graph.nodes):
            self.node = node
            try:
                self.labels[node] = self.visit(node)
            except Unsupported as err:
                raise ATSUnsupportedModel(self._context(str(err))) from None
        return self.analysis

    def _context(self, reason: str) -> str:
        last = self.sets[-1]
        after = f"after the ATS stage at attention layer {last.layer} ({last.module}), " if last else ""
        return f"{after}{describe(self.node)} {reason}"

    def label(self, arg) -> Label:
        return self.labels.get(arg) if isinstance(arg, fx.Node) else None

    def active(self, node: fx.Node) -> bool:
        def newer(lab) -> bool:
            if isinstance(lab, tuple):
                return any(newer(x) for x in lab)
            return isinstance(lab, TokenAxis) and lab.version > 0

        return any(newer(self.label(a)) for a in node.all_input_nodes)

    def fail(self, node: fx.Node, reason: str) -> None:
        """Unknown territory: fatal when active, otherwise the token axis is just lost."""
        if self.active(node):
            raise Unsupported(reason)
        if any(isinstance(self.label(a), TokenAxis) for a in node.all_input_nodes):
            self.analysis.lost[node] = reason

    # ---------------------------------------------------------------- dispatch
    def visit(self, node: fx.Node) -> Label:
        if node.op == "output":
            return self.visit_output(node)
        if node.op != "call_function" or node in self.interior:
            return None
        if node is self.free_seed:
            self.analysis.seed, self.analysis.prefix = node, 0
            return TokenAxis(dim=1, version=0, prefix=0)
        if node in self.sites:
            return self.visit_site(self.sites[node])
        target = node.target
        if target in IGNORED:
            return None
        if target is operator.getitem:
            lab = self.label(node.args[0])
            return lab[node.args[1]] if isinstance(lab, tuple) and node.args[1] < len(lab) else None
        if not any(isinstance(self.label(a), (TokenAxis, tuple)) for a in node.all_input_nodes):
            return self.visit_cat_seed(node) if target is aten.cat.default else None
        handler = rule_for(target)
        if handler is None:
            self.fail(node, "receives the token axis, and ats_fx has no rule for how it treats a varying number of tokens")
            return None
        return handler(self, node)

    # ---------------------------------------------------------------- token sequence start
    def visit_cat_seed(self, node: fx.Node) -> Label:
        """``cat([cls.expand(B,-1,-1), (dist/registers,) patches], dim)`` starts the sequence."""
        if self.analysis.seed is not None:
            return None
        tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        out_shape = concrete_shape(node)
        if out_shape is None or len(tensors) < 2:
            return None
        dim = norm_dim(dim, len(out_shape))
        data = [self.flow.depends_on_input(t) for t in tensors]
        if batch_dim(node) is None and not data[0] and any(d % BATCH_PROBE == 0 and d > BATCH_PROBE for d in out_shape):
            self.analysis.seed_problem = (
                f"{describe(node)} puts a class token in front of each frame's patches, with the batch "
                "merged with the frames (divided space-time attention, as in TimeSformer): each frame's "
                "attention would sample its own tokens, but the temporal attention between frames needs the "
                "same patch positions in every frame. ats_fx does not sample positions shared by all frames; "
                "use a joint space-time model such as ViViT"
            )
            return None
        if out_shape[dim] == BATCH_PROBE or batch_dim(node) is None:
            return None
        if not any(data) or all(data):
            return None
        if not data[-1] or data[0]:
            self.analysis.seed_problem = (
                f"{describe(node)} concatenates learned tokens after the patch tokens; ATS needs the "
                "class token first (index 0)"
            )
            return None
        first_data = data.index(True)
        if not all(data[first_data:]):
            return None
        prefix = sum(concrete_shape(t)[dim] for t in tensors[:first_data])
        self.analysis.seed, self.analysis.prefix = node, prefix
        self.analysis.class_token = not self.no_class_token
        return TokenAxis(dim=dim, version=0, prefix=prefix)

    def _class_free_seed(self, sites: list[AttentionSite]) -> Optional[fx.Node]:
        """Where the token sequence starts in a model with no learned token in front of its patches:
        the earliest tensor of the first attention's token shape (batch, tokens, channels) on the
        path from the input. That is the patch embedding (average-pool and SigLIP models), or, in
        CaiT, the patch tokens that self-attention runs on before a class token is prepended
        (``cat([cls, x], 1)`` after the first attention). None when a learned token is concatenated
        in front before the first attention (``visit_cat_seed`` starts the sequence there), or when
        the first attention's batch axis is merged with another (windowed attention: refused with
        ``seed_problem``)."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        if not sites:
            return None
        first = min(sites, key=lambda s: order[s.out])
        for node in self.graph.nodes:
            if order[node] >= order[first.out]:
                break
            if node.target is aten.cat.default and self._prepends_learned_tokens(node):
                return None
        q_shape = concrete_shape(first.q)
        if q_shape is None or len(q_shape) != 4:
            return None
        if batch_dim(first.q) != 0:
            self.analysis.seed_problem = (
                f"{describe(first.out)} attends within windows of {q_shape[-2]} tokens, with the batch merged "
                "with the windows (windowed attention, as in Swin): each window needs its full grid of "
                "tokens, and a sampled token set cannot be cut into windows"
            )
            return None
        tokens = q_shape[-2]
        path = {n for n in self.flow.ancestors(first.q)
                if (shape := concrete_shape(n)) is not None and len(shape) == 3 and shape[1] == tokens
                and batch_dim(n) == 0 and n.op == "call_function" and self.flow.depends_on_input(n)}
        # (B, C, T) with C == T also matches: a tensor that is only transposed into (B, T, C) holds
        # its channels in dim 1 (the patch embedding's ``flatten(2).transpose(1, 2)``).
        path -= {n.args[0] for n in path if n.target is aten.transpose.int and n.args[0] in path
                 and sorted(norm_dim(d, 3) for d in n.args[1:3]) == [1, 2]}
        return min(path, key=order.get) if path else None

    def _prepends_learned_tokens(self, node: fx.Node) -> bool:
        """``cat([learned..., x], 1)`` on (batch, tokens, channels): a class token or registers."""
        shape = concrete_shape(node)
        if shape is None or len(shape) != 3 or batch_dim(node) != 0 or len(node.args[0]) < 2:
            return False
        if norm_dim(node.args[1] if len(node.args) > 1 else 0, 3) != 1:
            return False
        data = [isinstance(t, fx.Node) and self.flow.depends_on_input(t) for t in node.args[0]]
        return not data[0] and data[-1]

    # ---------------------------------------------------------------- attention sites
    def visit_site(self, site: AttentionSite) -> Label:
        q, k, v = self.label(site.q), self.label(site.k if site.k is not None else site.k_t), self.label(site.v)
        nd = len(concrete_shape(site.q))
        k_dim = nd - 2 if site.k is not None else nd - 1
        ok = (
            all(isinstance(x, TokenAxis) for x in (q, k, v))
            and q.dim == nd - 2 and k.dim == k_dim and v.dim == nd - 2
            and q.plain and k.plain and v.plain
            and q.version == k.version == v.version
        )
        if q is None and isinstance(k, TokenAxis) and isinstance(v, TokenAxis) and k.dim == k_dim \
                and v.dim == nd - 2 and k.outer == k.inner == v.outer == v.inner == 1 \
                and k.start == v.start <= k.prefix and k.version == v.version:
            # Keys from token 0, or from after the prefix (a pooling head that skips registers).
            return self._class_attention(site, k, nd)
        if not ok:
            why = self._why_not_tokens(site, q, k, v, nd)
            self.analysis.not_token[site] = why
            if self.active(site.out):
                raise Unsupported(f"is an attention whose tokens ats_fx cannot follow: {why}")
            return None
        site.index = len(self.analysis.token_sites)
        self.analysis.token_sites.append(site)
        out = TokenAxis(dim=nd - 2, version=q.version, prefix=q.prefix)
        stage = self.plan.get(site.index) if self.plan else None
        if stage is None and q.version == 0:
            return out
        self._check_site(site, nd)
        if stage is not None:
            return self._insert_stage(site, stage, q)
        return self._insert_masked_attention(site, q)

    def _class_attention(self, site: AttentionSite, k: TokenAxis, nd: int) -> Label:
        """Queries without a token axis, keys and values over the token set: CaiT's class attention
        (``q = W x[:, 0]``, a prefix token) or an attention-pooling head (a learned query, timm's
        ``attn_pool``). Each query averages over the keys, so after a stage it is the same
        attention over the kept tokens with padded keys masked; never a stage itself."""
        self.analysis.class_attention.append(site)
        if k.version == 0:
            return None
        q_shape = concrete_shape(site.q)
        if nd == 3 and q_shape[0] % BATCH_PROBE == 0 and site.mask is None and site.mix is None and not k.start:
            # nn.MultiheadAttention asked for its weights (HF SigLIP's pooling head): (B·H, Tq, d),
            # the batch outer. Same attention over the kept keys, per image.
            heads = q_shape[0] // BATCH_PROBE
            with self.graph.inserting_before(site.out):
                out = self.graph.call_function(
                    ops.merged_heads_attention,
                    (site.q, self._key(site), site.v, self.sets[k.version].mask, heads, site.resolved_scale(q_shape[-1]),
                     site.dropout_p))
            out.meta = dict(site.out.meta)
            site.out.replace_all_uses_with(out)
            self.replaced.append(site)
            self.labels[out] = None
            return None
        self._check_site(site, nd)
        return self._insert_masked_attention(site, k, out_label=None)

    def _why_not_tokens(self, site, q, k, v, nd) -> str:
        if self.analysis.seed is None:
            return self.analysis.seed_problem or "no token sequence found before it"
        labs = [x for x in (q, k, v) if isinstance(x, TokenAxis)]
        if len(labs) < 3:
            return "its queries, keys or values do not come from the token sequence"
        if q.dim != nd - 2:
            return "it attends over channels, not tokens (softmax over the channel axis, as in XCiT)"
        return "its token axis is merged or sliced"

    def _check_site(self, site: AttentionSite, nd: int) -> None:
        if site.is_causal:
            raise Unsupported("is causal attention; ATS applies to bidirectional vision attention only")
        if site.mask is not None and not self.neutral(site.mask) and self._position_bias(site) is None:
            raise Unsupported(
                "adds a mask or bias to the attention logits that depends on the input or does not "
                "have one row and column per token; ats_fx cannot keep it aligned with the sampled tokens"
            )
        if nd != 4 or batch_dim(site.q) != 0:
            raise Unsupported(f"computes attention on tensors of shape {concrete_shape(site.q)}; ats_fx "
                              "needs (batch, heads, tokens, head_dim)")

    def _position_bias(self, site: AttentionSite) -> Optional[fx.Node]:
        """The site's additive bias when it is a position bias: a float tensor ``(..., T, T)``
        over the captured tokens that does not depend on the input (relative position bias).
        Its rows and columns are gathered with the kept tokens' original positions."""
        bias = site.mask
        if bias is None or self.neutral(bias) or self.flow.depends_on_input(bias):
            return None
        val = bias.meta.get("val")
        shape = concrete_shape(bias)
        tokens = concrete_shape(site.q)[-2]
        if val is None or not val.is_floating_point() or shape is None or len(shape) < 2:
            return None
        # Leading dims: 1, or the batch (HF expands the bias to it; not input-dependent, so every
        # image's copy is the same).
        if shape[-2:] != (tokens, tokens) or any(d not in (1, BATCH_PROBE) for d in shape[:-3]):
            return None
        return bias

    def _bias_table(self, site: AttentionSite) -> Optional[fx.Node]:
        """The site's position bias as an (L, N, N) table over the captured tokens (``ops.bias_table``),
        read at each token set's original positions; None without a position bias."""
        bias = self._position_bias(site)
        if bias is None:
            return None
        with self.graph.inserting_before(site.out):
            return self.graph.call_function(ops.bias_table, (bias, BATCH_PROBE in concrete_shape(bias)[:-2]))

    def _key(self, site: AttentionSite) -> fx.Node:
        if site.k is not None:
            return site.k
        return self.graph.call_function(aten.transpose.int, (site.k_t, -2, -1))

    def _insert_stage(self, site: AttentionSite, stage: StageOptions, q: TokenAxis) -> Label:
        prev = self.sets[q.version]  # None before the first stage
        head_dim = concrete_shape(site.q)[-1]
        name = f"ats_stage_{stage.layer}"
        module = ops.ATSStage(
            layer=stage.layer, module=site.module, num_prefix=q.prefix, scale=site.resolved_scale(head_dim),
            ratio=stage.ratio, k=stage.k, score=self.options.score, padding=self.options.padding,
            dropout_p=site.dropout_p, kernels=self.options.kernels, selection=self.options.selection,
            class_token=self.analysis.class_token,
        )
        self.gm.add_submodule(name, module)
        with self.graph.inserting_before(site.out):
            key = self._key(site)
            args = (site.q, key, site.v, prev.mask if prev else None, prev.positions if prev else None,
                    self._bias_table(site), site.mix)
            call = self.graph.call_module(name, args)
            out, index, mask, positions = (self.graph.call_function(operator.getitem, (call, i)) for i in range(4))
        out.meta = dict(site.out.meta)  # rules reason on captured shapes; only T changes
        site.out.replace_all_uses_with(out)
        self.replaced.append(site)
        self.sets.append(TokenSet(index, mask, positions, stage.layer, site.module))
        label = TokenAxis(dim=q.dim, version=len(self.sets) - 1, prefix=q.prefix)
        self.labels[out] = label
        return None

    def _insert_masked_attention(self, site: AttentionSite, q: TokenAxis, out_label: Label = ...) -> Label:
        """The site over the key-padding mask of token set ``q.version``; its output is labelled
        like ``q`` (``out_label`` for class attention, whose output has no token axis)."""
        head_dim = concrete_shape(site.q)[-1]
        token_set, scale, bias = self.sets[q.version], site.resolved_scale(head_dim), self._bias_table(site)
        mask, positions = token_set.mask, None if bias is None else token_set.positions
        with self.graph.inserting_before(site.out):
            if q.start:  # keys sliced past the prefix: so is their mask
                if bias is not None:
                    raise Unsupported("adds a position bias to attention over keys sliced past the prefix")
                mask = self.graph.call_function(ops.mask_from, (mask, q.start))
            key = self._key(site)
            if site.mix is not None:
                out = self.graph.call_function(
                    ops.talking_heads_attention,
                    (site.q, key, site.v, mask, scale, site.mix, site.dropout_p, bias, positions))
            else:
                out = self.graph.call_function(
                    ops.masked_attention,
                    (site.q, key, site.v, mask, 0, scale, site.dropout_p, bias, self.options.kernels, positions),
                )
        out.meta = dict(site.out.meta)
        site.out.replace_all_uses_with(out)
        self.replaced.append(site)
        self.labels[out] = replace(q, dim=q.dim) if out_label is ... else out_label
        return None

    # ---------------------------------------------------------------- gathers
    def to_version(self, arg: fx.Node, lab: TokenAxis, version: int, at: fx.Node) -> fx.Node:
        """Bring an older token set (the residual stream) to ``version`` by gathering kept rows."""
        key = (arg, version)
        if key in self.gathers:
            return self.gathers[key]
        if not lab.plain:
            raise Unsupported("mixes token sets of different ATS stages on a sliced or merged token axis")
        bdim = batch_dim(arg)
        if bdim is None:
            raise Unsupported("needs a gather of the residual stream, but its batch axis is merged with another axis")
        if any(self.sets[u].index is None for u in range(lab.version + 1, version + 1)):
            raise Unsupported("combines tokens from before and after a class token was prepended to a sampled "
                              "token set; ats_fx cannot line them up")
        node = arg
        with self.graph.inserting_before(at):
            for u in range(lab.version + 1, version + 1):
                if bdim == 0 and lab.dim == 1 and len(concrete_shape(arg)) == 3:
                    self.residuals.setdefault(u, node)
                node = self.graph.call_function(ops.token_gather, (node, self.sets[u].index, bdim, lab.dim))
                node.meta = dict(arg.meta)
        self.gathers[key] = node
        return node


    def visit_output(self, node: fx.Node) -> Label:
        """A returned tensor that still has a token axis after ATS (a feature extractor's sequence,
        HF ``last_hidden_state``) becomes what ``token_output`` says: the original length, or the kept
        tokens with their positions and mask."""
        for arg in node.all_input_nodes:
            lab = self.label(arg)
            if not (isinstance(lab, TokenAxis) and lab.version > 0):
                continue
            with self.graph.inserting_before(node):
                if self.options.token_output == "kept":
                    new = self._kept_output(arg, lab)
                else:
                    new = self._full_output(arg, lab)
            node.replace_input_with(arg, new)
        return None

    def _kept_output(self, arg: fx.Node, lab: TokenAxis) -> fx.Node:
        if lab.outer != 1 or lab.inner != 1:
            raise Unsupported(f"returns {arg.name} with its token axis merged with another axis; "
                              "token_output='kept' needs the tokens on an axis of their own")
        return self.graph.call_function(ops.kept_output, (arg, self.sets[lab.version].positions, lab.start))

    def _full_output(self, arg: fx.Node, lab: TokenAxis) -> fx.Node:
        """Scatter the last token set back into the original sequence, over the values each dropped
        token had when its stage dropped it (the residual stream entering that block). The row-wise
        ops between the residual stream and the output (a final norm) then run on every token, so
        dropped tokens come out as the kept ones do."""
        if not (lab.plain and lab.dim == 1 and batch_dim(arg) == 0 and len(concrete_shape(arg)) == 3):
            raise Unsupported(
                f"returns {arg.name}, a token sequence not laid out as (batch, tokens, channels) from token 0; "
                "token_output='full' cannot put the dropped tokens back. Use token_output='kept'")
        tail, start = [], arg
        while start.op == "call_function" and self._row_wise(start, lab.version):
            tail.append(start)
            start = next(a for a in start.all_input_nodes if isinstance(self.label(a), TokenAxis))
        missing = [u for u in range(1, lab.version + 1) if u not in self.residuals]
        if missing:
            raise Unsupported(
                f"returns {arg.name}, a token sequence, but ats_fx found no residual stream entering the stage of "
                f"token set {missing[0]} to take the dropped tokens' values from; use token_output='kept'")
        full = self.residuals[1]
        for u in range(2, lab.version + 1):
            full = self.graph.call_function(ops.token_scatter, (full, self.sets[u - 1].positions, self.residuals[u]))
        out = self.graph.call_function(ops.token_scatter, (full, self.sets[lab.version].positions, start))
        copies = {start: out}
        for n in reversed(tail):
            copies[n] = self.graph.node_copy(n, lambda a: copies.get(a, a))
        return copies[arg]

    def _row_wise(self, node: fx.Node, version: int) -> bool:
        """One token-indexed input of the same token set, transformed token by token (a final norm,
        a linear projection, a pointwise op with constants): it may run on the original sequence."""
        tokens = [a for a in node.all_input_nodes if isinstance(self.label(a), TokenAxis)]
        if len(tokens) != 1 or self.label(tokens[0]).version != version or self.label(tokens[0]) != self.label(node):
            return False
        t = node.target
        if t in NORMS or t is aten.linear.default:
            return True
        return isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags




def remove_replaced(gm: fx.GraphModule, replaced: list[AttentionSite]) -> None:
    """Erase the dead cores of replaced sites (and asserts that would keep them alive), then DCE."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    dead = set()
    for site in replaced:
        dead |= site.interior | {site.out}
    for node in sorted(dead, key=order.get, reverse=True):
        for user in list(node.users):
            if user.target is aten._assert_tensor_metadata.default:
                gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)
    # Keep export's input guards (an impure-free call_module would otherwise count as dead).
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or n.op == "call_module")
    gm.recompile()
