"""The kernels as ``triton_op``s (``packaged_ops.py``): what an exported CUDA model calls, and what
AOTInductor compiles into its package. On the CPU the ops run under Triton's interpreter against
the library's ops and the reference, and a CUDA export is traced with fake CUDA tensors to show
which ops it holds; on a GPU the exported program also runs (benchmarks/deploy.py packages it)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ats_fx
from ats_fx import dispatch, library
from ats_fx.kernels import reference
from conftest import MODELS, timm_model
from test_kernels import DEVICE, TOL, bias_inputs, padding_mask, qkv


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("case", ["rho", "k", "bias"])
def test_packaged_sample_equals_the_library_op(masked, case):
    """Same index, mask, K' and K as ``ats_fx::sample_tokens`` at a static width, lenient; K comes
    from torch ops here, from the kernel there."""
    B, H, T, D, p = 3, 3, 65, 16, 1
    q, k, v = qkv(B, H, T, D, torch.float16, sharp=3.0 if DEVICE == "cpu" else 1.0)
    mask = padding_mask(B, T) if masked else None
    ratio, k_tokens = (None, 20) if case == "k" else (0.7, None)
    bias, positions = None, None
    if case == "bias":
        bias, positions, _ = bias_inputs(B, H, T, False, True, "sampled")
        if mask is not None:
            positions = torch.where(mask, positions, -1)
    width = reference.static_budget(T, p, ratio, k_tokens) + p
    args = (q, k, v, mask, p, D**-0.5, ratio, k_tokens, "attn_vnorm", width)
    got = torch.ops.ats_fx.packaged_sample(*args, bias, positions)
    want = torch.ops.ats_fx.sample_tokens(*args, False, "triton", bias, positions)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    assert got[0].shape == (B, width) and (got[2] < got[3] + 1).all()
    if masked:  # the budget follows each image's real tokens
        assert torch.equal(got[3], reference.token_budget(mask, B, T, p, ratio, k_tokens, DEVICE))


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_packaged_sample_without_a_class_token_equals_the_received_path(masked, with_bias):
    """``class_token=False``: the received-attention kernels score (the mean query row), registers are
    kept; the same index, mask, K' and K as the eager received path at a static width."""
    B, H, T, D, p = 3, 3, 65, 16, 2
    q, k, v = qkv(B, H, T, D, torch.float16, sharp=3.0 if DEVICE == "cpu" else 1.0)
    mask = padding_mask(B, T) if masked else None
    bias, positions = None, None
    if with_bias:
        bias, positions, _ = bias_inputs(B, H, T, False, True, "sampled")
        if mask is not None:
            positions = torch.where(mask, positions, -1)
    width = reference.static_budget(T, p, 0.7, None) + p
    got = torch.ops.ats_fx.packaged_sample(q, k, v, mask, p, D**-0.5, 0.7, None, "attn_vnorm", width, bias,
                                           positions, False)
    want = library.received_sample(q, k, v, mask, p, D**-0.5, 0.7, None, "attn_vnorm", width, False, "triton",
                                   bias, positions)
    for g, w in zip(got, want[:4]):
        assert g.dtype == w.dtype and torch.equal(g, w)
    class_row = torch.ops.ats_fx.packaged_sample(q, k, v, mask, p, D**-0.5, 0.7, None, "attn_vnorm", width, bias,
                                                 positions)
    assert not torch.equal(class_row[0], got[0])  # a different score, not the class row's


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("rows", ["kept", "all"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_packaged_attention_equals_the_reference(dtype, rows, with_bias):
    B, H, T, D = 2, 3, 50, 32
    q, k, v = qkv(B, H, T, D, dtype, sharp=1.0)
    table, positions, mask = bias_inputs(B, H, T, True, True, "sampled")
    if not with_bias:
        table, positions = None, None
    index = torch.stack([torch.arange(0, T, 3, device=DEVICE)] * B) if rows == "kept" else None
    got = torch.ops.ats_fx.packaged_attention(q, k, v, index, mask, D**-0.5, table, positions)
    full = None if table is None else reference.position_bias(table.double(), positions, B)
    q64, k64, v64 = q.double(), k.double(), v.double()
    if index is None:
        want = reference.masked_attention(q64, k64, v64, mask, D**-0.5, bias=full)
        real = mask[:, None, :, None].expand_as(want)  # rows of padded tokens are never read
        got, want = got.double()[real], want[real]
    else:
        want = reference.attention_rows(q64, k64, v64, index, mask, D**-0.5, bias=full)
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_packaged_attention_layout_matches_its_fake():
    """The fake's strides are the kernel's: (B, R, H, dh) memory, so the model's transpose and
    reshape after it stays a view in the exported graph as in the package."""
    q, k, v = qkv(2, 3, 20, 16, torch.float32)
    real = torch.ops.ats_fx.packaged_attention(q, k, v, None, None, 0.25)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = torch.ops.ats_fx.packaged_attention(q, k, v, None, None, 0.25)
    assert fake.shape == real.shape and fake.stride() == real.stride()


@pytest.mark.parametrize("name", ["timm_deit_distilled", "timm_beit", "timm_vit_registers_gap"])
def test_model_on_the_packaged_ops_equals_the_reference(monkeypatch, name):
    """The whole model run through the packaged ops (forced on, eagerly, as the exported graph runs
    them) gives the logits of the reference path at the same static padding."""
    build, _, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().to(DEVICE)
    x = torch.randn(3, *shape, device=DEVICE)
    want_model = ats_fx.transform(model, range(1, 4), ratio=0.6, padding="static", kernels="reference")
    # On a GPU: no CUDA graph and no overlapped stage, so every stage samples through library.sample.
    ats = ats_fx.transform(model, range(1, 4), ratio=0.6, padding="static", cuda_graphs=False)
    monkeypatch.setattr(dispatch, "OVERLAP", "off")
    calls = Counter()

    def forced(x, kernels):
        calls[kernels] += 1
        return kernels != "reference"

    monkeypatch.setattr(library, "packaged", forced)
    monkeypatch.setattr(dispatch, "packaged", forced)  # a stage without a class token asks for its path
    monkeypatch.setattr(library, "use_triton", lambda x, kernels: False)  # on a GPU: not the eager launches
    with torch.no_grad():
        got, want = ats(x), want_model(x)
    assert calls["auto"] >= 6  # three stages' sampling and attention at least
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def fake_cuda_export(model: torch.nn.Module, shape: tuple, dtype=torch.float16) -> Counter:
    """The ats_fx ops of ``model`` exported for CUDA with a dynamic batch, traced on fake CUDA
    tensors (no GPU needed: nothing runs)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to("cuda", dtype)
        x = torch.empty(2, *shape, device="cuda", dtype=dtype)
    # Autograd on, as export runs by default: the packaged ops are used all the same.
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
    return Counter(str(n.target).split(".")[1] for n in program.graph.nodes if "ats_fx" in str(n.target))


@pytest.mark.parametrize("name", ["timm_deit_distilled", "timm_beit", "timm_vit_gap"])
def test_cuda_export_calls_the_packaged_kernels(name):
    """Exported for CUDA, every stage samples and attends with the packaged ops, and the layers
    after the stages attend over the key mask with them too; none of the library's custom ops,
    which AOTInductor cannot package, is left. Without a class token too: the stage scores with the
    received-attention kernels inside ``packaged_sample`` instead of materialising the matrix."""
    build, _, shape = MODELS[name]
    ops = fake_cuda_export(ats_fx.transform(build(), range(1, 3), ratio=0.6), shape)
    depth = 4
    assert ops == Counter(packaged_sample=2, packaged_attention=depth - 1), ops


def test_cuda_export_with_reference_kernels_holds_aten_ops_only():
    model = timm_model("deit_small_patch16_224", img_size=32)
    assert not fake_cuda_export(ats_fx.transform(model, range(1, 3), ratio=0.6, kernels="reference"), (3, 32, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the exported program's kernels on a GPU")
def test_exported_cuda_program_equals_eager_ats():
    torch.manual_seed(0)
    model = timm_model("deit_small_patch16_224", img_size=64).cuda()
    ats = ats_fx.transform(model, range(1, 4), ratio=0.6, padding="static")
    x = torch.randn(5, 3, 64, 64, device="cuda")
    with torch.no_grad():
        program = torch.export.export(ats, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
        assert "packaged_sample" in str(program.graph)
        torch.testing.assert_close(program.module()(x), ats(x), atol=1e-4, rtol=1e-4)
