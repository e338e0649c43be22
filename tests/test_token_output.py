"""Models that return their token sequence: token_output="full" (original length, dropped tokens hold
their last value) and "kept" (ats_fx.KeptTokens), each against the per-image reference, eagerly, under
backend="ats" and under torch.export."""
from __future__ import annotations

import pytest
import torch

import ats_fx
from ats_fx.testing import eager
from conftest import hf_clip, sharpen, timm_model

STAGES = range(1, 4)
RATIO = 0.5
REF_STAGES = {s: {"ratio": RATIO} for s in STAGES}


class Features(torch.nn.Module):
    """timm's forward_features as a model: returns (B, N, C)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.patch_embed = model.patch_embed  # tells ats_fx the input size

    def forward(self, x):
        return self.model.forward_features(x)


def timm_features():
    return Features(timm_model("vit_small_patch16_224", img_size=64).double())


def hf_dinov2_model():
    import transformers as T

    cfg = T.Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8)
    return sharpen(T.Dinov2Model(cfg)).eval().double()


# name -> (factory, the model's last_hidden_state per image: fn(model, image, stages, dropped),
#          the row-wise ops between the residual stream and that output, how to read the sequence)
CASES = {
    "timm_forward_features": (timm_features, lambda m, x, s, d: eager.timm_forward(m.model, x, s, head=False, dropped=d),
                              lambda m: m.model.norm, lambda out: out),
    "hf_dinov2_last_hidden_state": (hf_dinov2_model, eager.hf_dinov2_tokens, lambda m: m.layernorm,
                                    lambda out: out.last_hidden_state),
    "hf_clip_last_hidden_state": (lambda: hf_clip().double(), eager.hf_clip_tokens, lambda m: (lambda t: t),
                                  lambda out: out.last_hidden_state),
}


def reference(name, model, images):
    """Per image: the kept rows with their positions, and the full sequence ("full")."""
    _, forward, tail, _ = CASES[name]
    kept, full = [], []
    with torch.no_grad():
        for image in images:
            dropped = {}
            rows = forward(model, image, REF_STAGES, dropped)
            positions = dropped.pop("positions")
            n = len(positions) + len(dropped)
            seq = torch.zeros(n, rows.shape[-1], dtype=rows.dtype)
            for j, value in dropped.items():
                seq[j] = value
            seq = tail(model)(seq)
            seq[positions] = rows
            kept.append((rows, positions))
            full.append(seq)
    return kept, torch.stack(full)


def check(name, out, kept, full, mode):
    seq = CASES[name][3](out)
    if mode == "full":
        torch.testing.assert_close(seq, full)
        return
    assert isinstance(seq, ats_fx.KeptTokens)
    for b, (rows, positions) in enumerate(kept):
        real = seq.mask[b]
        assert seq.positions[b][real].tolist() == positions
        assert (seq.positions[b][~real] == -1).all()
        torch.testing.assert_close(seq.tokens[b][real], rows)


@pytest.mark.parametrize("mode", ["full", "kept"])
@pytest.mark.parametrize("padding", ["batch_max", "static"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_token_output_matches_reference(name, padding, mode):
    torch.manual_seed(0)
    model = CASES[name][0]()
    ats = ats_fx.transform(model, STAGES, ratio=RATIO, padding=padding, token_output=mode)
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    kept, full = reference(name, model, images)
    with torch.no_grad():
        out = ats(images)
    check(name, out, kept, full, mode)
    if hasattr(out, "pooler_output"):  # outputs without a token axis are unchanged
        assert out.pooler_output.shape == model(images).pooler_output.shape
    if padding == "batch_max":
        counts = torch.stack([t.kept for t in ats_fx.kept_tokens(ats)])
        assert (counts.max(dim=1).values > counts.min(dim=1).values).any(), "padding must be exercised"


@pytest.mark.parametrize("mode", ["full", "kept"])
@pytest.mark.parametrize("name", ["timm_forward_features", "hf_dinov2_last_hidden_state"])
def test_token_output_exports_with_a_dynamic_batch(name, mode):
    torch.manual_seed(0)
    model = CASES[name][0]()
    ats = ats_fx.transform(model, STAGES, ratio=RATIO, token_output=mode)
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    program = torch.export.export(ats, (images[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
    kept, full = reference(name, model, images)
    with torch.no_grad():
        check(name, program.module()(images), kept, full, mode)


@pytest.mark.parametrize("mode", ["full", "kept"])
@pytest.mark.parametrize("name", ["timm_forward_features", "hf_clip_last_hidden_state"])
def test_token_output_under_the_ats_backend(name, mode):
    torch.manual_seed(0)
    model = CASES[name][0]()
    compiled = torch.compile(model, backend="ats", options={"stages": "1-3", "ratio": RATIO, "backend": "aot_eager",
                                                            "token_output": mode})
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    kept, full = reference(name, model, images)
    with torch.no_grad():
        check(name, compiled(images), kept, full, mode)


def test_kept_token_output_of_a_transformed_model_compiles():
    torch.manual_seed(0)
    model = timm_features()
    ats = ats_fx.transform(model, STAGES, ratio=RATIO, token_output="kept", padding="static")
    compiled = torch.compile(ats, backend="aot_eager")
    images = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    kept, full = reference("timm_forward_features", model, images)
    with torch.no_grad():
        check("timm_forward_features", compiled(images), kept, full, "kept")


def test_kept_tokens_survive_save_and_load(tmp_path):
    model = timm_features()
    ats = ats_fx.transform(model, STAGES, ratio=RATIO, token_output="kept")
    ats_fx.save(ats, tmp_path / "m.pt")
    again = ats_fx.load(tmp_path / "m.pt", model)
    images = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        a, b = ats(images), again(images)
    assert isinstance(b, ats_fx.KeptTokens)
    torch.testing.assert_close(a.tokens, b.tokens)


def test_unknown_token_output_is_refused():
    with pytest.raises(ats_fx.ATSConfigError, match="token_output='all'"):
        ats_fx.transform(timm_model("vit_tiny_patch16_224", img_size=32), 1, token_output="all")
