"""Stages without a class token on the Triton path: the received-attention kernels
(``kernels/received.py``) against the whole-matrix reference, and the models that use them.

On the CPU the kernels run under Triton's interpreter (conftest), so the shapes stay small.
"""
from __future__ import annotations

import pytest
import torch
from test_kernels import DEVICE, DTYPES, TOL, bias_inputs, padding_mask, qkv

import ats_fx
from ats_fx import dispatch
from ats_fx.kernels import reference
from ats_fx.kernels.received import received_head_scores, received_scores

SHAPES = [  # B, H, T, dh, prefix (registers: queries, never scored)
    (3, 2, 50, 32, 4),
    (2, 4, 65, 24, 1),
]


def whole_matrix_scores(q, k, v, mask, prefix, score="attn_vnorm"):
    """The reference in float64: the attention matrix, then the mean over its real query rows."""
    attn = reference.attention_weights(q.double(), k.double(), mask, q.shape[-1] ** -0.5)
    return reference.weight_scores(attn, v.double(), mask, prefix, score, strict=False, class_token=False)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[2]}H{s[1]}p{s[4]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
def test_received_scores_kernel(shape, dtype, masked):
    B, H, T, D, p = shape
    q, k, v = qkv(B, H, T, D, dtype, seed=5)
    mask = padding_mask(B, T) if masked else None
    got, bad = received_scores(q, k, v, mask, p, D**-0.5)
    want, want_bad = whole_matrix_scores(q, k, v, mask, p)
    assert got.dtype == torch.float32 and got.shape == (B, T)
    assert not bad.any() and not want_bad.any()
    # The logits are accumulated in the input dtype's dot product: fp16/bf16 inputs round there.
    tol = 1e-6 if dtype == torch.float32 else TOL[dtype] / 10
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=TOL[dtype])
    assert (got[:, :p] == 0).all()
    if masked:
        assert (got[~mask] == 0).all()
    torch.testing.assert_close(got.sum(1), torch.ones(B, device=DEVICE))


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
def test_received_scores_kernel_at_a_vit_stage_shape(masked):
    """197 tokens, head dim 64 (a ViT-B/16 stage at 224 px; several key and query tiles, the last one
    partial), in fp16 as models run."""
    B, H, T, D = 2, 3, 197, 64
    q, k, v = qkv(B, H, T, D, torch.float16, seed=5)
    mask = padding_mask(B, T) if masked else None
    got, bad = received_scores(q, k, v, mask, 0, D**-0.5)
    want, _ = whole_matrix_scores(q, k, v, mask, 0)
    assert not bad.any()
    torch.testing.assert_close(got.double(), want, atol=TOL[torch.float16] / 10, rtol=TOL[torch.float16])


def test_received_head_logits_are_log_column_sums_and_value_norms():
    """Each head's logits are ln Σ_i A[i, j] over the real queries (-inf at padded keys): their
    softmax over the keys is the column mean, which is what ``combine_heads`` takes from them."""
    B, H, T, D = 2, 3, 40, 16
    q, k, v = qkv(B, H, T, D, torch.float32, seed=6)
    mask = padding_mask(B, T, seed=6)
    logits, norms = received_head_scores(q, k, v, mask, D**-0.5)
    attn = reference.attention_weights(q.double(), k.double(), mask, D**-0.5)
    column = (attn * mask.double()[:, None, :, None]).sum(dim=2)
    want = column.log().masked_fill(~mask[:, None], float("-inf"))
    torch.testing.assert_close(logits.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norms, v.float().norm(dim=-1), atol=1e-5, rtol=1e-5)
    _, ones = received_head_scores(q, k, v, mask, D**-0.5, "attn")
    assert (ones == 1).all()
    got, _ = received_scores(q, k, v, mask, 0, D**-0.5, "attn")
    torch.testing.assert_close(got.double(), whole_matrix_scores(q, k, v, mask, 0, "attn")[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("heads_in_table", [True, False], ids=["per-head", "shared"])
@pytest.mark.parametrize("positions_kind", ["none", "sampled"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
def test_received_scores_with_position_bias_table(heads_in_table, positions_kind, masked):
    """A relative position bias (an average-pool relpos ViT), read from the (L, N, N) table at each
    query's and key's original position, enters every row of the matrix the scores average."""
    B, H, T, D, p = 2, 4, 65, 24, 1
    q, k, v = qkv(B, H, T, D, torch.float32, seed=9)
    table, positions, mask = bias_inputs(B, H, T, masked, heads_in_table, positions_kind)
    table = table * 4  # a bias that moves the scores
    got, bad = received_scores(q, k, v, mask, p, D**-0.5, bias=table, positions=positions)
    full = reference.position_bias(table.double(), positions, B)
    attn = reference.attention_weights(q.double(), k.double(), mask, D**-0.5, bias=full)
    want, _ = reference.weight_scores(attn, v.double(), mask, p, strict=False, class_token=False)
    unbiased, _ = whole_matrix_scores(q, k, v, mask, p)
    assert not torch.allclose(want, unbiased, atol=1e-3)
    assert not bad.any()
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)


def test_received_scores_flag_nan_and_zero_rows():
    """A NaN anywhere in an image's queries or keys, or all-zero values: that image falls back to
    uniform scores and is flagged (strict stages then raise), as the reference does."""
    q, k, v = qkv(3, 2, 20, 16, torch.float32, seed=7)
    q, v = q.clone(), v.clone()
    q[0, 1, 7, 3] = float("nan")  # image 0: one query row holds NaN, so every column sum does
    v[2] = 0  # image 2: all values zero, denominator 0
    got, bad = received_scores(q, k, v, None, 2, 0.25)
    _, want_bad = whole_matrix_scores(q, k, v, None, 2)
    assert bad.bool().tolist() == want_bad.tolist() == [True, False, True]
    uniform = torch.full((18,), 1 / 18, device=DEVICE)
    torch.testing.assert_close(got[0, 2:], uniform)
    torch.testing.assert_close(got[2, 2:], uniform)
    assert torch.isfinite(got).all()


def test_received_scores_op_fake_matches_the_kernels():
    """``ats_fx::received_scores``: schema, fake implementation and the real kernels agree."""
    q, k, v = qkv(2, 3, 20, 16, torch.float32, seed=8)
    mask = padding_mask(2, 20, seed=8)
    torch.library.opcheck(torch.ops.ats_fx.received_scores.default, (q, k, v, mask, 1, 0.25, "attn_vnorm"))
    torch.library.opcheck(torch.ops.ats_fx.received_scores.default, (q, k, v, None, 0, 0.25, "attn"))


def test_stage_path_without_a_class_token():
    """Triton at inference, with or without a position bias: ``received``. A gradient, dropout, a
    baseline selection, the reference kernels, talking heads or ``count_flops``: the PyTorch path on
    the whole matrix (``weights``)."""
    q = torch.randn(1, 2, 9, 8, device=DEVICE)
    common = dict(class_token=False, width=5, selection="ats", dropout_p=0.0, bias=None, mix=None)
    assert dispatch.stage_path(q, q, q, None, kernels="triton", **common) == "received"
    assert dispatch.stage_path(q, q, q, None, kernels="reference", **common) == "weights"
    assert dispatch.stage_path(q, q, q, None, kernels="triton", **{**common, "dropout_p": 0.1}) == "weights"
    assert dispatch.stage_path(q, q, q, None, kernels="triton", **{**common, "selection": "topk"}) == "weights"
    table = torch.zeros(2, 9, 9, device=DEVICE)
    assert dispatch.stage_path(q, q, q, None, kernels="triton", **{**common, "bias": table}) == "received"
    mix = (torch.eye(2),) * 4
    assert dispatch.stage_path(q, q, q, None, kernels="triton", **{**common, "mix": mix}) == "weights"
    grad = q.clone().requires_grad_()
    assert dispatch.stage_path(grad, grad, grad, None, kernels="triton", **common) == "weights"
    with dispatch.sequential_stages():  # count_flops: the method's count
        assert dispatch.stage_path(q, q, q, None, kernels="triton", **common) == "weights"
    assert dispatch.RECEIVED


@pytest.mark.parametrize("name,padding", [("timm_vit_gap", "batch_max"), ("timm_vit_registers_gap", "static"),
                                          ("timm_siglip_map", "batch_max"), ("timm_siglip_map", "static"),
                                          ("timm_relpos_gap", "batch_max")])
def test_class_free_model_on_the_kernels_equals_the_reference_and_never_builds_the_matrix(monkeypatch, name,
                                                                                          padding):
    """End to end: the model's stages on the received-attention kernels keep the same tokens and give
    the same logits as the reference path, which materialises the attention matrix, and as the
    independent per-image ATS (``ats_fx.testing.eager``); the kernel path never builds the matrix
    (not at the stages, and the layers after them attend on the Triton kernel too)."""
    from conftest import MODELS, logits

    factory, per_image, chw = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = factory().to(DEVICE)
        x = torch.randn(3, *chw).to(DEVICE)
    built = []
    real = reference.attention_weights
    monkeypatch.setattr(reference, "attention_weights", lambda *a, **kw: built.append(1) or real(*a, **kw))
    outs, kept = {}, {}
    for kernels in ("triton", "reference"):
        built.clear()
        ats = ats_fx.transform(model, "1-3", ratio=0.6, padding=padding, kernels=kernels)
        built.clear()  # transform validates on the reference path
        with torch.no_grad():
            outs[kernels] = logits(ats(x))
        kept[kernels] = [t.positions for t in ats_fx.kept_tokens(ats)]
        assert bool(built) == (kernels == "reference")
    for a, b in zip(kept["triton"], kept["reference"]):
        assert torch.equal(a, b)
    torch.testing.assert_close(outs["triton"], outs["reference"], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        want = torch.stack([per_image(model, img, {s: {"ratio": 0.6} for s in (1, 2, 3)}) for img in x])
    torch.testing.assert_close(outs["triton"], want, atol=1e-4, rtol=1e-4)


def test_compiled_class_free_model_calls_the_received_op(monkeypatch):
    """Traced (here by Dynamo with the aot_eager backend) a class-free stage on the kernels is the
    opaque ``ats_fx::received_scores`` then ``ats_fx::sample_scores``, and matches eager."""
    from conftest import MODELS, logits

    from ats_fx.kernels import received

    factory, _, chw = MODELS["timm_vit_registers_gap"]
    torch.manual_seed(0)
    model, x = factory().to(DEVICE), torch.randn(2, *chw).to(DEVICE)
    ats = ats_fx.transform(model, "1-3", ratio=0.6, padding="static", kernels="triton")
    with torch.no_grad():
        want = logits(ats(x))
    calls = []
    real = received.received_scores
    monkeypatch.setattr(received, "received_scores", lambda *a: calls.append(1) or real(*a))
    torch._dynamo.reset()
    with torch.no_grad():
        got = logits(torch.compile(ats, backend="aot_eager")(x))
    assert len(calls) == 3  # one per stage, through the registered op
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flop_count_of_a_class_free_model_is_the_method_count():
    """``count_flops`` counts the whole matrix's logits once, as the CPU's reference path does,
    whatever path the stages run; raw FlopCounterMode on the kernel path counts the received op."""
    from conftest import MODELS
    from torch.utils.flop_counter import FlopCounterMode

    factory, _, chw = MODELS["timm_vit_gap"]
    torch.manual_seed(0)
    model, x = factory().to(DEVICE), torch.randn(2, *chw).to(DEVICE)
    counts = {k: ats_fx.count_flops(ats_fx.transform(model, "1-3", ratio=0.6, kernels=k), x)
              for k in ("triton", "reference")}
    torch.testing.assert_close(counts["triton"], counts["reference"], rtol=1e-12, atol=0)
    fast = ats_fx.transform(model, "1-3", ratio=0.6, padding="static", kernels="triton")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fast(x)
    assert counter.get_flop_counts()["Global"][torch.ops.ats_fx.received_scores] > 0
