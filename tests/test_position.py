"""Position-dependent attention after ATS: relative position bias (BEiT) and RoPE (EVA-02) are
gathered with the kept tokens' original positions."""
import pytest
import timm
import torch

import ats_fx
from ats_fx import ops
from ats_fx.testing import eager


@pytest.mark.parametrize("batched", [False, True])
def test_position_bias_gathers_rows_and_columns(batched):
    from ats_fx.kernels import reference

    bias = torch.arange(2 * 5 * 5, dtype=torch.float64).reshape(1, 2, 5, 5)
    table = ops.bias_table(bias.expand(3, 2, 5, 5) if batched else bias, batched)
    assert table.shape == (2, 5, 5) and table.data_ptr() == bias.data_ptr()  # a view, never a copy
    positions = torch.tensor([[0, 2, 4], [0, 3, -1]])
    out = reference.position_bias(table, positions, 2)
    assert out.shape == (2, 2, 3, 3)
    for b in range(2):
        idx = positions[b].clamp_min(0)
        torch.testing.assert_close(out[b], bias[0][:, idx][:, :, idx])
    torch.testing.assert_close(reference.position_bias(table, positions, 2, rows=1), out[:, :, :1])
    assert reference.position_bias(table, None, 4).shape == (4, 2, 5, 5)


@pytest.mark.parametrize("const_shape,batch_dim,token_dim,out_nd", [
    ((6, 4), 0, 2, 4),  # RoPE table (N, dh) against (B, H, N, dh)
    ((1, 6, 4), 0, 1, 3),  # a position embedding (1, N, C) against (B, N, C)
    ((6, 1, 4), 1, 0, 3),  # sequence-first layout (N, B, C)
])
def test_position_gather_places_batch_and_tokens(const_shape, batch_dim, token_dim, out_nd):
    const = torch.randn(const_shape)
    positions = torch.tensor([[0, 1, 3, 6], [0, 2, 5, -1]])  # one prefix token, start=1
    out = ops.position_gather(const, positions, 1, batch_dim, token_dim, out_nd)
    table = const.reshape(6, 4) if const.dim() == 2 else const.squeeze(batch_dim if const.dim() == 3 else 0)
    for b in range(2):
        rows = (positions[b, 1:] - 1).clamp_min(0)
        got = out.select(batch_dim, b)
        got = got.movedim(token_dim - (batch_dim < token_dim), 0).reshape(3, -1)
        torch.testing.assert_close(got, table.reshape(6, -1)[rows])


def test_zero_initialised_relative_position_table_is_not_treated_as_neutral():
    """At init timm's relative position bias table is zero: the bias evaluates to all zeros on the
    example input. It comes from a weight, so a loaded checkpoint makes it non-zero: it must be
    gathered, not dropped (this was a silent wrong answer)."""
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", img_size=64, depth=3, embed_dim=64, num_heads=2).double().eval()
    ats = ats_fx.transform(model, "1-2", ratio=0.6, example_inputs=torch.randn(1, 3, 64, 64).double())
    with torch.no_grad():  # as if pretrained weights were loaded afterwards
        for name, p in list(model.named_parameters()):
            if "relative_position_bias_table" in name or "qkv.weight" in name:
                p.normal_(0, 1)
        ats.load_state_dict(model.state_dict())
        x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
        want = torch.stack([eager.beit_forward(model, img, {1: {"ratio": 0.6}, 2: {"ratio": 0.6}}) for img in x])
        torch.testing.assert_close(ats(x), want)


def test_input_dependent_bias_after_a_stage_is_refused():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=3).eval()
    from timm.models.vision_transformer import Attention

    def forward(self, x, attn_mask=None, **kwargs):  # a data-dependent additive bias
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = x.norm(dim=-1)[:, None, None, :].expand(B, self.num_heads, N, N)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))

    for blk in model.blocks:
        blk.attn.forward = forward.__get__(blk.attn, Attention)
    with pytest.raises(ats_fx.ATSUnsupportedModel, match="depends on the input"):
        ats_fx.transform(model, 0, k=8)


def test_rope_model_keeps_non_persistent_buffers_out_of_the_state_dict():
    model = timm.create_model("eva02_tiny_patch14_224", img_size=56, depth=2).eval()
    ats = ats_fx.transform(model, 0, ratio=0.5)
    assert sorted(ats.state_dict()) == sorted(model.state_dict())


def _calls(gm, fn) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is fn)


def test_rope_table_is_gathered_once_per_token_set_and_matches_the_reference():
    """EVA's blocks chunk one RoPE table into sin and cos, for q and again for k: the rewrite
    gathers the whole table once per token set and takes the same chunks of it (one gather a stage,
    not four), and the logits still match the per-image float64 reference."""
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", img_size=56, depth=4).double().eval()
    stages = {1: {"ratio": 0.6}, 2: {"ratio": 0.6}, 3: {"ratio": 0.6}}
    ats = ats_fx.transform(model, "1-3", ratio=0.6, example_inputs=torch.randn(1, 3, 56, 56).double())
    assert _calls(ats, ops.position_gather) == 2  # blocks 2 and 3 read token sets 1 and 2 (was 8)
    x = torch.randn(3, 3, 56, 56, dtype=torch.float64)
    with torch.no_grad():
        want = torch.stack([eager.eva_forward(model, img, stages) for img in x])
        torch.testing.assert_close(ats(x), want)


def test_constant_parts_merge_only_when_cut_along_features(monkeypatch):
    """A constant cut along its feature axis is gathered whole and cut again; one cut along the
    token axis has other positions than the tokens and is gathered as it is. Either way the
    outputs equal those of gathering every part on its own."""
    from test_match import Attention, TinyViT

    from ats_fx.passes import rules

    class LateTables(TinyViT):
        def __init__(self):
            super().__init__(lambda i: Attention(32, 4, "sdpa"), depth=3)
            n = (self.image_size // 4) ** 2 + 1
            self.wide = torch.nn.Parameter(torch.randn(1, n, 64))  # cut along features
            self.long = torch.nn.Parameter(torch.randn(1, n + 1, 32))  # cut along tokens

        def forward(self, x):
            x = self.tokens(x)
            for blk in self.blocks:
                x = (blk(x) + self.wide[..., :32]) * self.wide[..., 32:] + self.long[:, 1:]
            return self.head(self.norm(x)[:, 0])

    torch.manual_seed(0)
    model = LateTables().double().eval()
    example = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    ats = ats_fx.transform(model, "0-1", ratio=0.5, example_inputs=example)
    gathered = [n.args[0].name for n in ats.graph.nodes if n.target is ops.position_gather]
    # wide: once per token set (blocks 1 and 2 share set 2); long: each block's token-axis cut on its own
    assert gathered.count("wide") == 2 and len(gathered) == 5 and "long" not in gathered, gathered
    monkeypatch.setattr(rules, "feature_parts", lambda node: (node, []))
    apart = ats_fx.transform(model, "0-1", ratio=0.5, example_inputs=example)
    assert _calls(apart, ops.position_gather) == 9  # each block's three cuts, each alone
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ats(x), apart(x), rtol=0, atol=0)
