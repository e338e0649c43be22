"""passes/late_gather.py: a stage computes every query row and its kept rows are gathered after
the projection. The same function as the early gather (float64 on the reference path, bit-equal
on the Triton path); stages whose attention output is not a plain row-wise chain are left alone."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import ats_fx
from ats_fx import library, ops
from ats_fx.errors import ATSConfigError
from ats_fx.kernels import reference
from ats_fx.passes.late_gather import late_gather
from conftest import MODELS
from test_patchify import inner_graphs

f64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (conftest)
# The attention output meets a position bias (BEiT), talking heads (CaiT) or goes through
# nn.MultiheadAttention's (tokens x batch, channels) view (torchvision): early gather kept.
LEFT_EARLY = {"timm_beit", "timm_cait", "torchvision_vit"}
CASES = ["timm_deit_small", "timm_deit_distilled", "timm_deit3_layerscale", "timm_eva02", "hf_vit_sdpa",
         "hf_dinov2_registers", "hf_vivit", *sorted(LEFT_EARLY)]


def logits_of(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def stages(model) -> list:
    return [m for m in model.modules() if isinstance(m, ops.ATSStage)]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("padding", ["static", "batch_max"])
def test_late_gather_keeps_the_logits(name, padding):
    factory, _, chw = MODELS[name]
    model = factory().eval().to(f64)
    x = torch.randn(2, *chw, dtype=f64)
    early = ats_fx.transform(model, stages=[1, 2], ratio=0.5, padding=padding, kernels="reference",
                             example_inputs=(x,))
    late = copy.deepcopy(early)
    moved = late_gather(late)
    assert moved == (0 if name in LEFT_EARLY else 2)
    assert [s.full_rows for s in stages(late)] == [name not in LEFT_EARLY] * 2
    with torch.no_grad():
        want, got = logits_of(early(x)), logits_of(late(x))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for a, b in zip(stages(early), stages(late)):
        assert torch.equal(a.last.positions, b.last.positions)


class SecondUse(nn.Module):
    """A block whose attention output feeds the projection and, besides, the residual itself."""

    def __init__(self, dim=32, heads=2, tokens=17):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.embed = nn.Linear(12, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(2))
        self.proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))
        self.heads = heads

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for qkv, proj in zip(self.qkv, self.proj):
            B, T, C = x.shape
            q, k, v = qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            o = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(-1) @ v
            o = o.transpose(1, 2).reshape(B, T, C)
            x = x + proj(o) + 0.5 * o
        return x[:, 0]


def test_a_second_consumer_of_the_attention_output_keeps_the_early_gather():
    model = SecondUse().to(f64)
    x = torch.randn(3, 16, 12, dtype=f64)
    early = ats_fx.transform(model, stages=[0, 1], ratio=0.5, kernels="reference", example_inputs=(x,))
    late = copy.deepcopy(early)
    assert late_gather(late) == 0
    assert not any(s.full_rows for s in stages(late))
    torch.testing.assert_close(late(x), early(x))


@pytest.mark.parametrize("padding", ["static", "batch_max"])
def test_late_gather_on_the_triton_kernels_is_bit_equal(padding):
    """The Triton path: the attention kernel writes the scores (``attention_with_scores``), the
    sampling kernel combines them; same rows sampled, same logits as the early gather."""
    factory, _, chw = MODELS["timm_deit_small"]
    model = factory().eval().to(DEVICE)
    x = torch.randn(2, *chw, device=DEVICE)
    early = ats_fx.transform(model, stages=[1, 2], ratio=0.5, padding=padding, kernels="triton",
                             example_inputs=(x,))
    late = copy.deepcopy(early)
    assert late_gather(late) == 2
    with torch.no_grad():
        want, got = early(x), late(x)
    assert torch.equal(got, want)
    for a, b in zip(stages(early), stages(late)):
        assert torch.equal(a.last.positions, b.last.positions)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_sampling_from_head_logits_equals_sampling_tokens(masked, kernels):
    """``ats_fx::sample_heads`` on ``reference.head_logits`` picks what ``sample_tokens`` picks."""
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 3, 4, 33, 16
    q, k, v = torch.randn(3, B, H, T, D, generator=g).unbind(0)
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, 25:] = False
        mask[2, 30:] = False
    args = (mask, 1, 0.5, None, -1, True, kernels)
    heads = reference.head_logits(q, k, v, mask, D**-0.5)
    got = library.sample_heads_impl(heads, *args)
    want = library.sample_tokens_impl(q, k, v, mask, 1, D**-0.5, 0.5, None, "attn_vnorm", -1, True, kernels)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_backend_gathers_late_unless_told_not_to():
    """backend='ats' hands the inner compiler a graph whose stages compute every row (default),
    with the same logits as ``late_gather=False``."""
    factory, _, chw = MODELS["timm_deit_small"]
    model = factory()
    x = torch.randn(2, *chw)
    out = {}
    for late in (True, False):
        seen = inner_graphs()
        torch._dynamo.reset()
        options = {"stages": "1-3", "ratio": 0.6, "backend": "ats_test_inner_graph", "late_gather": late}
        with torch.no_grad():
            out[late] = torch.compile(model, backend="ats", options=options)(x)
        (gm,) = seen
        assert [s.full_rows for s in stages(gm)] == [late] * 3
    torch._dynamo.reset()
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-5)


def test_late_gather_option_must_be_a_bool():
    from ats_fx.compile import parse_options

    with pytest.raises(ATSConfigError, match="late_gather must be True"):
        parse_options({"stages": "1", "late_gather": 1})
