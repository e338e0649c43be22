"""The deferred gather (``passes/defer.py``): an overlapped stage returns every row, the output
projection runs on all of them, and the residual add gathers the kept rows of both operands. The
model must give what the sequential stage gives; a chain that is not row-wise keeps the gather
in the stage. On the CPU the overlapped stage runs on Triton's interpreter (``dispatch.OVERLAP="on"``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import ats_fx
from ats_fx import dispatch, ops
from ats_fx.kernels.gather_add import gather_add
from conftest import MODELS, logits
from test_kernels import DEVICE


def _stages(model) -> list:
    return sorted((m for m in model.modules() if isinstance(m, ops.ATSStage)), key=lambda m: m.layer)


def _by_mode(model, x, overlap_mode) -> dict:
    """The model's output with the sequential stage ("off") and the overlapped one ("on")."""
    outs = {}
    for mode in ("off", "on"):
        overlap_mode(mode)
        with torch.no_grad():
            outs[mode] = logits(model(x))
    return outs


# The whole-model comparison over seven families (BEiT with its position bias too), deferred and not, is
# test_overlap.py::test_model_overlapped_equals_sequential.


def test_rho_one_deferred_equals_sequential(overlap_mode):
    """rho = 1: every stage keeps its width, so full and kept outputs have the same shape; the add
    must still gather (the fifth output, not the shape, says which rows it got)."""
    factory, _, chw = MODELS["timm_vit_tiny"]
    model = factory().to(DEVICE)
    x = torch.randn(2, *chw).to(DEVICE)
    ats = ats_fx.transform(model, "1-3", ratio=1.0, padding="static", kernels="triton")
    assert all(s.defer_gather for s in _stages(ats))
    outs = _by_mode(ats, x, overlap_mode)
    torch.testing.assert_close(outs["on"], outs["off"], atol=1e-5, rtol=1e-5)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mix_tokens: bool, gain_before_proj: bool = False):
        super().__init__()
        self.heads, self.mix_tokens = heads, mix_tokens
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        # A per-channel gain between the heads' merge and the projection: row-wise, so the gather
        # still defers, but not a view, so the projection stays in the graph.
        self.gain = nn.Parameter(torch.rand(dim) + 0.5) if gain_before_proj else None
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        B, T, C = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        y = self.proj(o if self.gain is None else o * self.gain)
        if self.mix_tokens:
            y = y * torch.sigmoid(h)  # a gate by the block's own (token-indexed) input: not row-wise alone
        x = x + y
        return x + self.mlp(self.norm2(x))


class _TinyViT(nn.Module):
    def __init__(self, mix_tokens: bool, dim: int = 32, depth: int = 4, gain_before_proj: bool = False):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.blocks = nn.ModuleList(_Block(dim, 4, mix_tokens, gain_before_proj) for _ in range(depth))
        self.head = nn.Linear(dim, 5)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0])


@pytest.mark.parametrize("mix_tokens", [False, True], ids=["row-wise", "gated-by-tokens"])
def test_only_row_wise_chains_defer(mix_tokens, overlap_mode):
    torch.manual_seed(0)
    model = _TinyViT(mix_tokens).to(DEVICE).eval()
    ats = ats_fx.transform(model, "1-2", ratio=0.6, padding="static", kernels="triton",
                           example_inputs=torch.randn(2, 3, 32, 32).to(DEVICE))
    assert [s.defer_gather for s in _stages(ats)] == [not mix_tokens] * 2
    outs = _by_mode(ats, torch.randn(3, 3, 32, 32).to(DEVICE), overlap_mode)
    torch.testing.assert_close(outs["on"], outs["off"], atol=1e-5, rtol=1e-5)


def test_flops_are_the_methods_with_a_deferred_gather(overlap_mode):
    """``count_flops`` counts the sequential stage (the projection of the kept rows only), and the
    overlapped op's formula counts its kept rows whatever it computes: with the deferred gather it
    projects every row itself, and counts the kept rows' projection."""
    factory, _, chw = MODELS["timm_deit_small"]
    model = factory().to(DEVICE)
    x = torch.randn(2, *chw).to(DEVICE)
    ats = ats_fx.transform(model, "1-3", ratio=0.6, padding="static", kernels="triton")
    overlap_mode("off")
    want = ats_fx.count_flops(ats, x, per_image=False)
    overlap_mode("on")
    assert torch.equal(ats_fx.count_flops(ats, x, per_image=False), want)
    assert dispatch.OVERLAP == "on"  # count_flops restored it
    counted = {}
    for defer in (False, True):
        for stage in _stages(ats):
            stage.defer_gather = defer
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            ats(x)
        counted[defer] = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention = "ats_fx.overlapped_stage"
    assert counted[False][attention] > 0
    # deferred, the stage runs the output projection (passes/defer.py folds it in): the graph's
    # addmm count drops by what the op's count gains, the kept rows' projection
    assert counted[True][attention] > counted[False][attention]
    assert counted[True]["aten.addmm"] < counted[False]["aten.addmm"]
    assert (counted[True][attention] + counted[True]["aten.addmm"]
            == counted[False][attention] + counted[False]["aten.addmm"])


@pytest.mark.parametrize("B,T,W,C", [(2, 197, 150, 64), (3, 50, 50, 24), (1, 9, 3, 1100)])
def test_gather_add_kernel_every_row(B, T, W, C):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(B, T, C, generator=g).to(DEVICE)
    y = torch.randn(B, T, C, generator=g).to(DEVICE)
    index = torch.stack([torch.randperm(T, generator=g)[:W] for _ in range(B)]).to(DEVICE)
    want = ops.token_gather(x, index, 0, 1) + ops.token_gather(y, index, 0, 1)
    assert torch.equal(gather_add(x, index, y, every_row=True), want)
    with torch.no_grad():
        assert torch.equal(ops.gather_add(x, index, y, 0, 1, "triton", every_row=True), want)
        assert torch.equal(ops.gather_add(x, index, y, 0, 1, "reference", every_row=True), want)


def test_export_takes_the_reference_path_even_with_overlap_and_triton(overlap_mode):
    """An export holds aten ops only (it must run without ats_fx), whatever OVERLAP and kernels say;
    the program equals the sequential eager model. (The overlapped op under tracing is
    test_overlap.py's compiled test.)"""
    overlap_mode("on")
    factory, _, chw = MODELS["timm_deit_small"]
    model = factory().to(DEVICE)
    ats = ats_fx.transform(model, "1-3", ratio=0.6, padding="static", kernels="triton", check_inputs=False)
    x = torch.randn(2, *chw).to(DEVICE)
    with torch.no_grad():
        program = torch.export.export(ats, (x,), strict=False)
        assert not [n for n in program.graph.nodes if "ats_fx" in str(n.target)]
        got = logits(program.module()(x))
        overlap_mode("off")
        want = logits(ats(x))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _stage_nodes(ats) -> list:
    return [n for n in ats.graph.nodes if n.op == "call_module" and isinstance(ats.get_submodule(n.target), ops.ATSStage)]


def _linear_before_add(stage) -> bool:
    """A ``linear`` lies between ``stage``'s attention output and its residual add."""
    node = next(u for u in stage.users if u.args[1] == 0)
    while node.target is not ops.gather_add:
        if node.target is torch.ops.aten.linear.default:
            return True
        node = next(iter(node.users))
    return False


@pytest.mark.parametrize("name, folds", [("timm_deit_small", True), ("timm_beitv2", True), ("timm_eva02", True),
                                         ("hf_vit_sdpa", True), ("hf_dinov2", True), ("torchvision_vit", False)])
def test_the_output_projection_moves_into_the_deferred_stage(name, folds, overlap_mode):
    """The stage gets the projection's weights and the graph loses the linear, where the heads' merge
    leads to it (timm's transpose, HF's reshape then transpose); torchvision's sequence-first merge
    (permute(2, 0, 1, 3)) keeps it in the graph. The state dict and the outputs do not change."""
    factory, _, chw = MODELS[name]
    model = factory().to(DEVICE)
    ats = ats_fx.transform(model, "1-3", ratio=0.6, padding="static", kernels="triton")
    stages = _stage_nodes(ats)
    assert [s.kwargs.get("proj_weight") is not None for s in stages] == [folds] * 3
    assert [_linear_before_add(s) for s in stages] == [not folds] * 3
    assert set(ats.state_dict()) == set(model.state_dict())
    x = torch.randn(2, *chw).to(DEVICE)
    outs = _by_mode(ats, x, overlap_mode)
    torch.testing.assert_close(outs["on"], outs["off"], atol=1e-5, rtol=1e-5)


def test_an_op_between_the_heads_merge_and_the_projection_keeps_the_projection_in_the_graph(overlap_mode):
    torch.manual_seed(0)
    model = _TinyViT(False, gain_before_proj=True).to(DEVICE).eval()
    ats = ats_fx.transform(model, "1-2", ratio=0.6, padding="static", kernels="triton",
                           example_inputs=torch.randn(2, 3, 32, 32).to(DEVICE))
    assert [s.defer_gather for s in _stages(ats)] == [True, True]
    assert [s.kwargs.get("proj_weight") for s in _stage_nodes(ats)] == [None, None]
    outs = _by_mode(ats, torch.randn(3, 3, 32, 32).to(DEVICE), overlap_mode)
    torch.testing.assert_close(outs["on"], outs["off"], atol=1e-5, rtol=1e-5)
