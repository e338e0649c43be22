"""Find softmax(Q Kᵀ · scale) V in an exported graph, in every spelling real models use.

Spellings (each has a tiny model in tests/test_match.py written the way it appears in the wild):
- ``sdpa``: ``F.scaled_dot_product_attention`` (timm fused_attn, HF sdpa, and
  ``nn.MultiheadAttention``, which torch.export lowers to it);
- ``matmul``: ``softmax(q @ k.transpose(-2, -1) * scale) @ v`` with the scale as a multiply or a
  divide, on q, on kᵀ or on the product, an optional additive mask, dropout and dtype casts
  between softmax and the second matmul (timm with fused_attn off, HF eager);
- ``talking_heads``: the ``matmul`` spelling with ``Linear(H, H)`` layers mixing the heads before
  and after the softmax, each between ``permute(0, 2, 3, 1)`` and ``permute(0, 3, 1, 2)`` (CaiT).
Matching is syntactic; whether the rows and columns are *tokens* (not channels, as in XCiT's
cross-covariance attention) is checked later by token-axis propagation (passes/tokens.py).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from .graph import module_path

aten = torch.ops.aten

SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default}
SDPA = aten.scaled_dot_product_attention.default
# Ops between softmax and the value product that do not change the attention weights' meaning.
PASS_THROUGH = {
    aten.dropout.default,
    aten.to.dtype,
    aten._to_copy.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.type_as.default,
    aten.alias.default,
}
TRANSPOSE = {aten.transpose.int}
SCALAR_MUL = {aten.mul.Tensor, aten.mul.Scalar}
SCALAR_DIV = {aten.div.Tensor, aten.div.Scalar}


@dataclass(eq=False)  # identity: sites are dict keys
class AttentionSite:
    """One matched attention: ``out = softmax(q kᵀ * scale + mask) v``."""

    spelling: str
    q: fx.Node
    k: Optional[fx.Node]  # (..., T, dh); None when only kᵀ exists in the graph
    k_t: Optional[fx.Node]  # (..., dh, T) when the graph transposes k itself
    v: fx.Node
    out: fx.Node
    scale: Optional[float]  # None: 1/sqrt(dh), the SDPA default
    mask: Optional[fx.Node] = None  # boolean attn_mask or additive bias
    dropout_p: float = 0.0
    is_causal: bool = False
    interior: set = field(default_factory=set)  # nodes that die when the site is replaced
    index: int = -1  # position among token-attention sites, in execution order
    # Talking heads (CaiT): (w_l, b_l, w_w, b_w) of the Linear(H, H) layers mixing the heads
    # before and after the softmax; b_* may be None.
    mix: Optional[tuple] = None

    @property
    def module(self) -> str:
        return module_path(self.out)

    def resolved_scale(self, head_dim: int) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(head_dim)


def _scalar(arg) -> Optional[float]:
    return float(arg) if isinstance(arg, (int, float)) and not isinstance(arg, bool) else None


def _peel_scale(node: fx.Node, interior: set) -> tuple[fx.Node, float]:
    """Strip multiplies/divides by Python scalars off ``node``; return (base, factor)."""
    factor = 1.0
    while node.op == "call_function":
        if node.target in SCALAR_MUL:
            a, b = node.args[0], node.args[1]
            if _scalar(b) is not None and isinstance(a, fx.Node):
                factor *= _scalar(b)
                interior.add(node)
                node = a
                continue
            if _scalar(a) is not None and isinstance(b, fx.Node):
                factor *= _scalar(a)
                interior.add(node)
                node = b
                continue
        if node.target in SCALAR_DIV and _scalar(node.args[1]) is not None:
            factor /= _scalar(node.args[1])
            interior.add(node)
            node = node.args[0]
            continue
        break
    return node, factor


def _is_last_two_transpose(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in TRANSPOSE:
        return False
    nd = node.args[0].meta["val"].dim()
    dims = {d % nd for d in node.args[1:3]}
    return dims == {nd - 2, nd - 1}


def _sdpa_site(node: fx.Node) -> AttentionSite:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return AttentionSite(
        spelling="sdpa",
        q=bound["query"],
        k=bound["key"],
        k_t=None,
        v=bound["value"],
        out=node,
        scale=bound.get("scale"),
        mask=bound.get("attn_mask"),
        dropout_p=float(bound.get("dropout_p", 0.0) or 0.0),
        is_causal=bool(bound.get("is_causal", False)),
    )


HEADS_LAST, HEADS_BACK = [0, 2, 3, 1], [0, 3, 1, 2]


def _is_permute(node, dims) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.permute.default
            and list(node.args[1]) == dims)


def _head_mix_before(node: fx.Node, interior: set):
    """``proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)`` ending at ``node``: (x, weight, bias)."""
    if not _is_permute(node, HEADS_BACK):
        return None
    lin = node.args[0]
    if not (isinstance(lin, fx.Node) and lin.target is aten.linear.default and _is_permute(lin.args[0], HEADS_LAST)):
        return None
    if len(lin.users) != 1 or len(lin.args[0].users) != 1:
        return None
    interior |= {node, lin, lin.args[0]}
    return lin.args[0].args[0], lin.args[1], lin.args[2] if len(lin.args) > 2 else None


def _head_mix_after(node: fx.Node, interior: set):
    """The same head mixing applied to ``node`` (its only use): (mixed output, weight, bias)."""
    users = list(node.users)
    if len(users) != 1 or not _is_permute(users[0], HEADS_LAST):
        return None
    lin = [u for u in users[0].users]
    if len(lin) != 1 or lin[0].target is not aten.linear.default:
        return None
    back = list(lin[0].users)
    if len(back) != 1 or not _is_permute(back[0], HEADS_BACK):
        return None
    interior |= {users[0], lin[0], back[0]}
    return back[0], lin[0].args[1], lin[0].args[2] if len(lin[0].args) > 2 else None


def _matmul_site(softmax: fx.Node) -> Optional[AttentionSite]:
    nd = softmax.meta["val"].dim()
    if softmax.args[1] % nd != nd - 1:
        return None
    interior = {softmax}
    # Backwards from softmax: casts, additive mask, scale, then the score product.
    node, mask, scale = softmax.args[0], None, 1.0
    mix_l = _head_mix_before(node, interior)  # talking heads: logits mixed across heads
    if mix_l is not None:
        node = mix_l[0]
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in PASS_THROUGH - {aten.dropout.default}:
            interior.add(node)
            node = node.args[0]
        elif node.target is aten.add.Tensor and mask is None and all(isinstance(a, fx.Node) for a in node.args[:2]):
            a, b = node.args[0], node.args[1]
            # The score product is the operand that comes from a matmul (through scalings).
            a_base, _ = _peel_scale(a, set())
            score, mask = (a, b) if a_base.target in MATMUL else (b, a)
            interior.add(node)
            node = score
        elif node.target in SCALAR_MUL | SCALAR_DIV:
            peeled, factor = _peel_scale(node, interior)
            if peeled is node:  # a multiply by a tensor (XCiT's learned temperature): not a scale
                break
            node, scale = peeled, scale * factor
        else:
            break
    if not isinstance(node, fx.Node) or node.target not in MATMUL:
        return None
    scores = node
    interior.add(scores)
    q, q_factor = _peel_scale(scores.args[0], interior)
    k_t, k_factor = _peel_scale(scores.args[1], interior)
    scale *= q_factor * k_factor
    if mix_l is not None and mask is not None:
        return None  # a bias around head mixing: no model does this; left unmatched (and named)
    # Forwards from softmax: dropout and casts, then the product with the values.
    node, dropout_p = softmax, 0.0
    mix_w = None
    if mix_l is not None:
        mix_w = _head_mix_after(softmax, interior)
        if mix_w is None:
            return None
        node = mix_w[0]
    while True:
        users = [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]
        interior |= set(node.users) - set(users)
        if len(users) != 1:
            return None  # the attention weights are used elsewhere (e.g. returned): not a pure site
        user = users[0]
        if user.target in PASS_THROUGH:
            if user.target is aten.dropout.default and len(user.args) > 2 and user.args[2]:
                dropout_p = float(user.args[1])
            interior.add(user)
            node = user
            continue
        if user.target in MATMUL and user.args[0] is node:
            out = user
            break
        return None
    k = k_t.args[0] if _is_last_two_transpose(k_t) else None
    if k is not None:
        interior.add(k_t)
    return AttentionSite(
        spelling="matmul" if mix_l is None else "talking_heads",
        q=q,
        k=k,
        k_t=None if k is not None else k_t,
        v=out.args[1],
        out=out,
        scale=scale,
        mask=mask,
        dropout_p=dropout_p,
        interior=interior,
        mix=None if mix_l is None else (mix_l[1], mix_l[2], mix_w[1], mix_w[2]),
    )


def find_attention(graph: fx.Graph) -> list[AttentionSite]:
    """All syntactic attention sites in execution order."""
    sites = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is SDPA:
            sites.append(_sdpa_site(node))
        elif node.target in SOFTMAX:
            site = _matmul_site(node)
            if site is not None:
                sites.append(site)
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites.sort(key=lambda s: order[s.out])
    return sites


def _path_to_matmul(node, depth: int) -> Optional[list]:
    """Nodes from ``node`` back to a MATMUL (inclusive), along first-found tensor arguments."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or depth < 0:
        return None
    if node.target in MATMUL:
        return [node]
    for arg in node.args:
        rest = _path_to_matmul(arg, depth - 1)
        if rest is not None:
            return [node, *rest]
    return None


def unmatched_softmaxes(graph: fx.Graph, sites: list[AttentionSite]) -> list[tuple[str, str]]:
    """``(module, why)`` for each softmax over a q·kᵀ product that no spelling matched, so a
    refusal can say what the attention does that ats_fx does not follow."""
    matched = {n for s in sites for n in s.interior | {s.out}}
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in SOFTMAX or node in matched:
            continue
        path = _path_to_matmul(node.args[0], 6)
        if path is None:
            continue
        between = path[:-1]
        if any(n.target is aten.mul.Tensor and all(isinstance(a, fx.Node) for a in n.args[:2]) for n in between):
            why = ("its logits are multiplied by a learned tensor (a logit scale or temperature, as in "
                   "SwinV2's cosine attention): only constant scales are matched")
        elif any(n.target in (aten.linear.default, aten.addmm.default, aten.mm.default) for n in between):
            why = ("its logits are mixed across heads by a linear layer before the softmax in a layout ats_fx "
                   "does not match (talking heads are matched as Linear(H, H) between permute(0, 2, 3, 1) and "
                   "permute(0, 3, 1, 2) on both sides of the softmax, as timm's CaiT writes them)")
        else:
            ops = ", ".join(sorted({str(n.target).split(".")[-2] if "." in str(n.target) else str(n.target)
                                    for n in between}))
            why = f"its logits pass through {ops} between q·kᵀ and the softmax"
        found.append((module_path(node), why))
    return found


def getitem_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target is operator.getitem]
