"""Bad input gets a clear error that names the fix; never a silent wrong answer."""
from __future__ import annotations

import pytest
import torch

import ats_fx
from conftest import timm_model


@pytest.fixture(scope="module")
def vit():
    return timm_model("vit_tiny_patch16_224", img_size=32, depth=4)


def test_no_class_token_scores_by_the_mean_query_row():
    """Average pool without a class token converts; its stages score with the mean query row."""
    model = timm_model("vit_small_patch16_224", img_size=32, class_token=False, global_pool="avg")
    ats = ats_fx.transform(model, 1, ratio=0.5)
    stage = ats.get_submodule("ats_stage_1")
    assert not stage.class_token and stage.num_prefix == 0
    assert "mean query row" in repr(stage)


def test_registers_without_class_token_are_kept_but_never_score():
    model = timm_model("vit_base_patch16_reg4_gap_256", img_size=32)  # class_token=False, 4 registers
    ats = ats_fx.transform(model, 1, ratio=0.5)
    stage = ats.get_submodule("ats_stage_1")
    assert not stage.class_token and stage.num_prefix == 4
    ats(torch.randn(3, 3, 32, 32))
    positions = ats_fx.kept_tokens(ats)[0].positions
    assert (positions[:, :4] == torch.arange(4)).all()  # the registers are always kept


def test_swin_is_refused_as_windowed_attention():
    import timm

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1), num_heads=(1, 2),
                              embed_dim=16, img_size=56).eval()
    with pytest.raises(ats_fx.ATSUnsupportedModel, match="windowed attention"):
        ats_fx.transform(model, 0)


def test_pit_is_refused_at_its_grid_reshape():
    import timm

    model = timm.create_model("pit_ti_224", pretrained=False, depth=(1, 1, 1), img_size=64).eval()
    with pytest.raises(ats_fx.ATSUnsupportedModel, match="2-D grid"):
        ats_fx.transform(model, 0)


def test_convnext_is_refused():
    import timm

    model = timm.create_model("convnext_atto", pretrained=False).eval()
    with pytest.raises(ats_fx.ATSUnsupportedModel, match="no attention"):
        ats_fx.transform(model, 0, example_inputs=torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(stages=4), r"out of range: VisionTransformer has 4 attention layers, numbered 0-3"),
        (dict(stages=range(2, 9)), "out of range"),
        (dict(stages=-1), "cannot be negative"),
        (dict(stages=[]), "stages is empty"),
        (dict(stages="3-x"), "cannot read"),
        (dict(stages=1, ratio=0.0), r"outside \(0, 1\]"),
        (dict(stages=1, ratio=1.5), r"outside \(0, 1\]"),
        (dict(stages=1, k=0), "k=0"),
        (dict(stages=1, k=2.5), "must be an int"),
        (dict(stages=[1, 2], ratio=[0.5]), "one per stage"),
        (dict(stages=1, ratio=0.5, k=8), "either ratio"),
        (dict(stages=1, padding="none"), "padding="),
        (dict(stages=1, score="topk"), "score="),
    ],
)
def test_bad_options(vit, kwargs, pattern):
    with pytest.raises(ats_fx.ATSConfigError, match=pattern):
        ats_fx.transform(vit, **kwargs)


def test_nan_input_is_refused(vit):
    ats = ats_fx.transform(vit, 1)
    x = torch.randn(2, 3, 32, 32)
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(ats_fx.ATSInputError, match="NaN"):
        ats(x)


def test_nan_activation_is_refused_at_the_stage(vit):
    ats = ats_fx.transform(vit, 1, check_inputs=False)
    x = torch.randn(2, 3, 32, 32)
    x[1] = float("inf")
    with pytest.raises(ats_fx.ATSInputError, match=r"image\(s\) \[1\]"):
        ats(x)


def test_nan_activation_with_static_padding_reaches_the_logits(vit):
    """static padding never reads back to the host: no raise at the stage, but never a silent
    finite answer either."""
    ats = ats_fx.transform(vit, 1, check_inputs=False, padding="static")
    x = torch.randn(2, 3, 32, 32)
    x[1] = float("inf")
    with torch.no_grad():
        out = ats(x)
    assert torch.isfinite(out[0]).all() and not torch.isfinite(out[1]).any()


def test_wrong_shape_is_refused(vit):
    ats = ats_fx.transform(vit, 1)
    with pytest.raises(ats_fx.ATSInputError, match=r"captured for \(batch, 3, 32, 32\).*example_inputs="):
        ats(torch.randn(2, 3, 64, 64))


def test_kept_tokens_before_forward(vit):
    ats = ats_fx.transform(vit, 1)
    with pytest.raises(ats_fx.ATSConfigError, match="no forward pass yet"):
        ats_fx.kept_tokens(ats)
    with pytest.raises(ats_fx.ATSConfigError, match="no ATS stages"):
        ats_fx.kept_tokens(vit)


def test_position_embedding_added_after_a_stage_is_gathered():
    """A position-dependent term added after the ATS stage follows the sampled tokens: it is
    gathered with their original positions. Reference: the stage's kept rows equal the
    dense rows (attention over all keys), then each image continues alone on its kept tokens."""
    from test_match import Attention, TinyViT

    class LatePositions(TinyViT):
        def forward(self, x):
            x = self.tokens(x)
            x = self.blocks[0](x) + self.pos_embed  # a second position embedding, mid-network
            for blk in self.blocks[1:]:
                x = blk(x)
            return self.head(self.norm(x)[:, 0])

    torch.manual_seed(0)
    model = LatePositions(lambda i: Attention(32, 4, "sdpa")).double().eval()
    with torch.no_grad():
        model.pos_embed.normal_()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():  # peaky attention: images keep different K'
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(5)
    ats = ats_fx.transform(model, 0, k=8, example_inputs=x[:1])
    with torch.no_grad():
        got = ats(x)
        positions = ats_fx.kept_tokens(ats)[0].positions
        after0 = model.blocks[0](model.tokens(x))
        want = []
        for b in range(x.shape[0]):
            rows = positions[b][positions[b] >= 0]
            y = after0[b, rows][None] + model.pos_embed[:, rows]
            for blk in model.blocks[1:]:
                y = blk(y)
            want.append(model.head(model.norm(y)[:, 0])[0])
    torch.testing.assert_close(got, torch.stack(want))


def test_timesformer_divided_attention_is_refused_with_the_design_reason():
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    cfg = TimesformerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            image_size=32, patch_size=8, num_frames=2, num_labels=3)
    with pytest.raises(ats_fx.ATSUnsupportedModel, match="divided space-time attention.*same patch positions"):
        ats_fx.transform(TimesformerForVideoClassification(cfg).eval(), 0)


def test_cait_stages_count_its_self_attention_blocks_only():
    """CaiT converts (tests/test_models.py); its class-attention blocks are not stages, and a stage
    index past the self-attention blocks names the count."""
    import timm

    from ats_fx.api import analyse

    model = timm.create_model("cait_xxs24_224", depth=2, img_size=64).eval()
    _, analysis, _ = analyse(model)
    assert len(analysis.token_sites) == 2 and len(analysis.class_attention) == 2 and analysis.prefix == 0
    assert analysis.late_class_token is not None
    with pytest.raises(ats_fx.ATSConfigError, match="has 2 attention layers"):
        ats_fx.transform(model, 2)


class _ChannelsFirstTokens(torch.nn.Module):
    """Returns its tokens as (batch, channels, tokens)."""

    def __init__(self):
        super().__init__()
        self.vit = timm_model("vit_tiny_patch16_224", img_size=32, depth=4)
        self.patch_embed = self.vit.patch_embed

    def forward(self, x):
        return self.vit.forward_features(x).transpose(1, 2)


def test_token_sequence_that_cannot_be_restored_names_the_option_that_works():
    model = _ChannelsFirstTokens()
    with pytest.raises(ats_fx.ATSUnsupportedModel, match="token_output='kept'"):
        ats_fx.transform(model, 1, ratio=0.5)
    out = ats_fx.transform(model, 1, ratio=0.5, token_output="kept")(torch.randn(3, 3, 32, 32))
    assert out.tokens.shape[:2] == (3, 64) and out.positions.shape == (3, out.tokens.shape[2])


class _TinyTokens(torch.nn.Module):
    """A class token, 8 patch tokens, one attention written by ``attend``, class-token pooling."""

    def __init__(self, attend):
        super().__init__()
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.embed = torch.nn.Linear(4, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.attend = attend

    def forward(self, x):  # x: (B, 8, 4)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
        B, T, _ = t.shape
        q, k, v = self.qkv(t).reshape(B, T, 3, 2, 8).permute(2, 0, 3, 1, 4)
        out = self.attend(self, q, k, v).transpose(1, 2).reshape(B, T, 16)
        return (t + out)[:, 0]


def _cosine_attention(self, q, k, v):  # SwinV2: normalised q, k times a learned logit scale
    logits = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-2, -1)
    return (logits * self.logit_scale.exp()).softmax(dim=-1) @ v


def _talking_heads_transposed(self, q, k, v):  # heads mixed around the softmax, not in CaiT's layout
    attn = (q * 8 ** -0.5) @ k.transpose(-2, -1)
    attn = self.proj_l(attn.transpose(1, -1)).transpose(1, -1).softmax(dim=-1)
    return self.proj_w(attn.transpose(1, -1)).transpose(1, -1) @ v


@pytest.mark.parametrize("attend,pattern", [
    (_cosine_attention, "multiplied by a learned tensor.*SwinV2"),
    (_talking_heads_transposed, "mixed across heads by a linear layer.*layout.*CaiT"),
])
def test_unmatched_attention_spellings_are_named(attend, pattern):
    model = _TinyTokens(attend)
    model.logit_scale = torch.nn.Parameter(torch.zeros(2, 1, 1))
    model.proj_l, model.proj_w = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with pytest.raises(ats_fx.ATSUnsupportedModel, match=pattern):
        ats_fx.transform(model.eval(), 0, example_inputs=torch.randn(2, 8, 4))


def test_static_padding_that_keeps_every_row_warns(vit, caplog):
    """ratio=1.0 with static padding runs every row (K + p = N): a stage that only costs time."""
    import logging

    wide = timm_model("vit_tiny_patch16_224", img_size=64, depth=4)  # 16 patch tokens

    def warned(*args, **kw) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ats_fx.api"):
            ats_fx.transform(*args, **kw)
        return [r.getMessage() for r in caplog.records if "keeps every row" in r.getMessage()]

    messages = warned(wide, [1, 2], ratio=1.0, padding="static")
    assert len(messages) == 1 and "2 stage(s) (layer 1: ratio=1.0" in messages[0] and "layer 2:" in messages[0]
    assert "batch_max" in messages[0], messages
    assert not warned(wide, [1, 2], ratio=0.5, padding="static")  # K = 9 of 16, then 8 of 9
    # The third stage sees 9 rows: K = max(round(4.5), 8) = 8 = all its patch tokens.
    third = warned(wide, [1, 2, 3], ratio=0.5, padding="static")[0]
    assert "1 stage(s) (layer 3:" in third and "floor of 8 tokens" in third
    assert not warned(wide, [1, 2], ratio=1.0, padding="batch_max")
    assert not warned(vit, 1, k=3, padding="static")  # K = 3 of 4 patch tokens: one row dropped
    assert warned(vit, 1, k=4, padding="static")  # K = all 4
