"""Each attention spelling, written the way real models write it, is found and rewritten."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ats_fx
from ats_fx.api import analyse
from conftest import sharpen
from ats_fx.testing.eager import run_blocks


class Attention(nn.Module):
    def __init__(self, dim, heads, spelling):
        super().__init__()
        self.heads, self.spelling = heads, spelling
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        d = q.shape[-1]
        s = self.spelling
        if s == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            if s == "mul_q":
                a = (q * d**-0.5) @ k.transpose(-2, -1)
            elif s == "mul_kt":
                a = q @ (k.transpose(-2, -1) * d**-0.5)
            elif s == "div_product":
                a = (q @ k.transpose(-2, -1)) / math.sqrt(d)
            elif s == "mul_product":
                a = d**-0.5 * (q @ k.transpose(-2, -1))
            elif s == "permuted_k":
                a = (q @ k.permute(0, 1, 3, 2)) * d**-0.5
            elif s == "bias_zero":
                a = (q @ k.transpose(-2, -1)) * d**-0.5 + torch.zeros(1, 1, N, N)
            a = a.softmax(dim=-1)
            o = a @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, C))

    def qkv_split(self, h):
        return self.qkv(h).reshape(h.shape[0], 3, -1).unbind(1)


class MHAAttention(nn.Module):
    """nn.MultiheadAttention, as torchvision's ViT uses it (batch_first)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]

    def qkv_split(self, h):
        return F.linear(h, self.mha.in_proj_weight, self.mha.in_proj_bias).chunk(3, dim=-1)

    def proj(self, o):
        return self.mha.out_proj(o)


class ChannelAttention(nn.Module):
    """XCiT's cross-covariance attention: softmax over channels, not tokens."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1)  # (B, H, d, N)
        a = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)).softmax(dim=-1)
        return self.proj((a @ v).permute(0, 3, 1, 2).reshape(B, N, C))


class EinsumAttention(Attention):
    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = torch.einsum("bhnd,bhmd->bhnm", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
        return self.proj(torch.einsum("bhnm,bhmd->bhnd", a, v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, attn, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, make_attn, depth=3, dim=32, heads=4, patch=4, image=16):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(Block(make_attn(i), dim) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)
        self.image_size = image

    def tokens(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def forward(self, x):
        x = self.tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def tiny_reference(model, image, stages):
    x = model.tokens(image[None])[0]
    blocks = [
        dict(norm1=b.norm1, qkv=b.attn.qkv_split, heads=b.attn.heads, proj=b.attn.proj,
             post_attn=lambda t: t, mlp_branch=lambda x, b=b: b.mlp(b.norm2(x)))
        for b in model.blocks
    ]
    x = run_blocks(x, blocks, 1, stages)
    return model.head(model.norm(x)[0])


SPELLINGS = ["sdpa", "mul_q", "mul_kt", "div_product", "mul_product", "permuted_k", "bias_zero", "mha"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_spelling_is_matched_and_rewritten(spelling):
    torch.manual_seed(0)
    make = (lambda i: MHAAttention(32, 4)) if spelling == "mha" else (lambda i: Attention(32, 4, spelling))
    model = sharpen(TinyViT(make), std=0.3).double().eval()
    _, analysis, _ = analyse(model)
    assert len(analysis.token_sites) == 3
    expected = "sdpa" if spelling in ("sdpa", "mha") else "matmul"
    assert {s.spelling for s in analysis.token_sites} == {expected}
    ats = ats_fx.transform(model, [0, 2], k=6)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    want = torch.stack([tiny_reference(model, img, {0: dict(k=6), 2: dict(k=6)}) for img in x])
    torch.testing.assert_close(ats(x).detach(), want.detach())


class TalkingHeads(Attention):
    """Talking-heads attention (CaiT's spelling), here in a model with a class token."""

    def __init__(self, dim, heads):
        super().__init__(dim, heads, "talking_heads")
        self.proj_l, self.proj_w = nn.Linear(heads, heads), nn.Linear(heads, heads)

    def weights(self, q, k):
        a = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        a = self.proj_l(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(dim=-1)
        return self.proj_w(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj((self.weights(q, k) @ v).transpose(1, 2).reshape(B, N, C))


def test_talking_heads_with_a_class_token_score_the_mixed_class_row():
    """Eq. 3 on the attention after the head mixing: S_j ∝ Σ_h |A_h[0, j]|·‖V_h,j‖ (a mixed weight
    can be negative); the kept rows are A[kept] V. Reference: one image at a time, written here."""
    from ats_fx.testing.eager import budget_for, sample_tokens

    torch.manual_seed(0)
    model = sharpen(TinyViT(lambda i: TalkingHeads(32, 4), image=32), std=0.5).double().eval()
    _, analysis, _ = analyse(model)
    assert [s.spelling for s in analysis.token_sites] == ["talking_heads"] * 3
    ats = ats_fx.transform(model, [0, 2], ratio=0.5)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    want = []
    for img in x:
        t = model.tokens(img[None])[0]
        for i, blk in enumerate(model.blocks):
            q, k, v = (u.reshape(-1, 4, 8).transpose(0, 1)[None] for u in blk.attn.qkv_split(blk.norm1(t)))
            a = blk.attn.weights(q, k)[0]
            rows = list(range(t.shape[0]))
            if i in (0, 2):
                s = (a[:, 0].abs() * v[0].norm(dim=-1)).sum(0)
                s[0] = 0
                rows = sample_tokens(s / s.sum(), budget_for(len(rows), 1, 0.5), 1)
            o = (a[:, rows] @ v[0]).transpose(0, 1).reshape(len(rows), 32)
            t = t[rows] + blk.attn.proj(o)
            t = t + blk.mlp(blk.norm2(t))
        want.append(model.head(model.norm(t)[0]))
    torch.testing.assert_close(ats(x).detach(), torch.stack(want).detach())
    kept = torch.stack([tr.kept for tr in ats_fx.kept_tokens(ats)])
    assert (kept.max(dim=1).values > kept.min(dim=1).values).any(), kept  # padding exercised


class AttentionPoolViT(TinyViT):
    """A learned query attends over the final tokens (an attention-pooling head, as timm's
    ``attn_pool``): its queries have no token axis, so after a stage it must mask padded keys."""

    def __init__(self):
        super().__init__(lambda i: Attention(32, 4, "sdpa"), image=32)
        self.probe = nn.Parameter(torch.randn(1, 4, 1, 8))
        self.kv = nn.Linear(32, 64)

    def pool(self, x):
        B, N, _ = x.shape
        k, v = self.kv(x).reshape(B, N, 2, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(self.probe.expand(B, -1, -1, -1), k, v).reshape(B, 32)

    def forward(self, x):
        x = self.tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.pool(self.norm(x)))


def test_attention_pooling_head_attends_over_the_kept_tokens():
    torch.manual_seed(0)
    model = sharpen(AttentionPoolViT(), std=0.5).double().eval()
    _, analysis, _ = analyse(model)
    assert len(analysis.token_sites) == 3 and len(analysis.class_attention) == 1
    ats = ats_fx.transform(model, [0, 1], ratio=0.5)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    want = []
    for img in x:
        t = model.tokens(img[None])[0]
        blocks = [dict(norm1=b.norm1, qkv=b.attn.qkv_split, heads=4, proj=b.attn.proj, post_attn=lambda u: u,
                       mlp_branch=lambda u, b=b: b.mlp(b.norm2(u))) for b in model.blocks]
        t = run_blocks(t, blocks, 1, {0: dict(ratio=0.5), 1: dict(ratio=0.5)})
        want.append(model.head(model.pool(model.norm(t)[None]))[0])
    torch.testing.assert_close(ats(x).detach(), torch.stack(want).detach())
    kept = torch.stack([tr.kept for tr in ats_fx.kept_tokens(ats)])
    assert (kept.max(dim=1).values > kept.min(dim=1).values).any(), kept  # padding exercised


def test_softmax_over_channels_is_not_token_attention():
    model = TinyViT(lambda i: ChannelAttention(32, 4) if i == 1 else Attention(32, 4, "mul_q")).eval()
    _, analysis, _ = analyse(model)
    assert len(analysis.sites) == 3  # syntactically three softmax(QKᵀ)V ...
    assert [s.module for s in analysis.token_sites] == ["blocks.0.attn", "blocks.2.attn"]  # ... two over tokens
    (why,) = analysis.not_token.values()
    assert "channels" in why
    # stages count token attention only; a stage after the channel attention converts fine
    ats_fx.transform(model, 1, k=4)
    # ATS before the channel attention: that layer would see a varying token count -> refused
    with pytest.raises(ats_fx.ATSUnsupportedModel, match="blocks.1.attn"):
        ats_fx.transform(model, 0, k=4)


def test_unmatched_attention_after_ats_is_refused_naming_the_layer():
    model = TinyViT(lambda i: EinsumAttention(32, 4, "sdpa") if i == 2 else Attention(32, 4, "sdpa")).eval()
    with pytest.raises(ats_fx.ATSUnsupportedModel, match=r"blocks\.2\.attn"):
        ats_fx.transform(model, 0, k=4)


def inspect_model():
    """Factory for the CLI test: token attention, channel attention, token attention."""
    return TinyViT(lambda i: ChannelAttention(32, 4) if i == 1 else Attention(32, 4, "sdpa")).eval()
