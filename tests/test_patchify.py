"""passes/patchify.py: a patch-embedding conv (kernel == stride) rewritten as one GEMM, exactly.
Each case is the conv spelled as models spell it; the reference is the conv itself (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ats_fx.errors import ATSConfigError
from ats_fx.passes.patchify import conv_as_gemm, patchify_convs
from conftest import MODELS

f64 = torch.float64


@pytest.mark.parametrize("chw, patch", [((3, 64, 64), (16, 16)), ((3, 56, 56), (14, 14)), ((4, 32, 24), (8, 4)),
                                         ((3, 70, 66), (8, 8))])  # last: the conv drops a partial patch
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_as_gemm_equals_the_conv(chw, patch, bias, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *chw, generator=g, dtype=f64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(20, chw[0], *patch, generator=g, dtype=f64)
    b = torch.randn(20, generator=g, dtype=f64) if bias else None
    expected = F.conv2d(x, weight, b, stride=patch)
    got = conv_as_gemm(x, weight, b)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)


class PatchEmbed(nn.Module):
    """The conv as timm/HF/torchvision ViTs write it, then flattened to tokens."""

    def __init__(self, **conv):
        super().__init__()
        self.proj = nn.Conv2d(3, 16, **conv)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def dynamo_graph(model, x) -> tuple[fx.GraphModule, list]:
    """Dynamo's captured graph (torch.conv2d, weights lifted to inputs) and its inputs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(x)
    torch._dynamo.reset()
    return graphs[0]


def aten_graph(model, x) -> tuple[fx.GraphModule, list]:
    """An ATen graph (aten.conv2d / aten.convolution, weights as attributes) and its input."""
    return torch.export.export(model, (x,)).run_decompositions({}).module(), [x]


@pytest.mark.parametrize("capture", [dynamo_graph, aten_graph])
def test_patch_conv_is_rewritten_in_dynamo_and_aten_graphs(capture):
    model = PatchEmbed(kernel_size=8, stride=8).to(f64).eval()
    x = torch.randn(2, 3, 32, 32, dtype=f64)
    gm, inputs = capture(model, x)
    assert patchify_convs(gm) == 1
    assert not [n for n in gm.graph.nodes if "conv" in str(n.target) and "as_gemm" not in str(n.target)]
    out = gm(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, model(x))


@pytest.mark.parametrize("conv", [dict(kernel_size=8, stride=4),  # overlapping patches
                                  dict(kernel_size=8, stride=8, padding=1),
                                  dict(kernel_size=8, stride=8, dilation=2),
                                  dict(kernel_size=1, stride=1),  # 1x1: already a GEMM
                                  dict(kernel_size=4, stride=4)])  # 3x4x4 = 48 deep: cuDNN kept
def test_other_convs_are_left_alone(conv):
    model = PatchEmbed(**conv).to(f64).eval()
    gm, _ = aten_graph(model, torch.randn(2, 3, 32, 32, dtype=f64))
    assert patchify_convs(gm) == 0


def test_grouped_conv_is_left_alone():
    model = nn.Conv2d(32, 8, kernel_size=4, stride=4, groups=2).eval()  # 16 x 4 x 4 = 256 deep per group
    gm, _ = aten_graph(model, torch.randn(1, 32, 16, 16))
    assert patchify_convs(gm) == 0


INNER_GRAPHS: list = []  # what the inner backend below was handed, newest last


def _record_inner_graph(gm, example_inputs):
    INNER_GRAPHS.append(gm)
    return gm.forward


def inner_graphs() -> list:
    """Register ``_record_inner_graph`` as backend 'ats_test_inner_graph' (once per process) and
    return its list, emptied."""
    from torch._dynamo.backends.registry import register_backend

    try:
        register_backend(compiler_fn=_record_inner_graph, name="ats_test_inner_graph")
    except AssertionError:  # registered by an earlier test in this process
        pass
    INNER_GRAPHS.clear()
    return INNER_GRAPHS


@pytest.mark.parametrize("patch_gemm", [True, False])
def test_backend_rewrites_the_patch_embedding_unless_told_not_to(patch_gemm):
    """backend='ats' hands the inner compiler a graph whose patch embedding is a GEMM (default),
    and the logits equal the un-rewritten compiled model's."""
    factory, _, chw = MODELS["timm_deit_small"]
    model = factory()
    seen = inner_graphs()
    options = {"stages": "1-3", "ratio": 0.6, "backend": "ats_test_inner_graph", "patch_gemm": patch_gemm}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="ats", options=options)
    x = torch.randn(2, *chw)
    with torch.no_grad():
        out = compiled(x)
    (gm,) = seen
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert any("conv_as_gemm" in t for t in targets) is patch_gemm
    assert any("convolution" in t or "conv2d" in t for t in targets) is not patch_gemm
    torch._dynamo.reset()
    with torch.no_grad():
        reference = torch.compile(model, backend="ats", options={**options, "patch_gemm": not patch_gemm})(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_patch_gemm_option_must_be_a_bool():
    from ats_fx.compile import parse_options

    with pytest.raises(ATSConfigError, match="patch_gemm must be True"):
        parse_options({"stages": "1", "patch_gemm": "yes"})


def _has_gemm_and_conv(gm) -> tuple[bool, bool]:
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    return (any("conv_as_gemm" in t for t in targets),
            any("convolution" in t or "conv2d" in t for t in targets))


@pytest.mark.parametrize("patch_gemm", [True, False])
def test_transform_rewrites_the_patch_embedding_unless_told_not_to_and_save_keeps_it(patch_gemm, tmp_path):
    """The eager model runs the patch embedding as a GEMM by default, with the conv's logits
    (float64), and ats_fx.save / load keep the choice."""
    import ats_fx

    factory, _, chw = MODELS["timm_deit_small"]
    model = factory().double().eval()
    ats = ats_fx.transform(model, stages="1-3", ratio=0.6, patch_gemm=patch_gemm)
    assert _has_gemm_and_conv(ats) == (patch_gemm, not patch_gemm)
    x = torch.randn(2, *chw, dtype=f64)
    other = ats_fx.transform(model, stages="1-3", ratio=0.6, patch_gemm=not patch_gemm)
    with torch.no_grad():
        out = ats(x)
        torch.testing.assert_close(out, other(x))
    ats_fx.save(ats, tmp_path / "ats.pt")
    loaded = ats_fx.load(tmp_path / "ats.pt", factory().double())
    assert _has_gemm_and_conv(loaded) == (patch_gemm, not patch_gemm)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out)


def test_transform_patch_gemm_must_be_a_bool():
    import ats_fx

    factory, _, _ = MODELS["timm_deit_small"]
    with pytest.raises(ATSConfigError, match="patch_gemm='yes'"):
        ats_fx.transform(factory(), stages="1", patch_gemm="yes")
