"""An independent, readable ATS: one image at a time, no padding, no graph rewriting.

Written from the paper (eqs. 1-6) and ATS-NOTES.md; it shares no code with the ats_fx pass. Each model family gets a
block-by-block forward that reuses the model's own layers (linear, norm, MLP) but does the
attention, scoring, sampling and token dropping here. Because each image runs alone, comparing
a batched ats_fx model against it also checks padding, masking and batch invariance.
"""
from __future__ import annotations

import math

import torch


def sample_tokens(scores: torch.Tensor, budget: int, prefix: int) -> list[int]:
    """Inverse-transform sampling for one image. scores: (N,) with zeros on the prefix."""
    tail = scores[prefix:]
    cdf = torch.cumsum(tail, 0)
    picked = set()
    for i in range(1, budget + 1):
        u = (2 * i - 1) / (2 * budget)
        hits = (cdf >= u).nonzero()
        j = int(hits[0]) if len(hits) else len(tail) - 1
        picked.add(prefix + j)
    return list(range(prefix)) + sorted(picked)


def budget_for(n_in: int, prefix: int, ratio=None, k=None) -> int:
    if k is not None:
        want = k
    else:
        want = max(math.floor(ratio * n_in + 0.5), 8)
    return min(want, n_in - prefix)


def attention_with_ats(q, k, v, scale, prefix, stage, bias=None, class_token=True):
    """q, k, v: (H, N, dh) for one image. stage: None or dict(ratio=..)/dict(k=..).
    bias: None or an additive (H, N, N) position bias. Without a class token (``class_token``
    False: the prefix, if any, is registers) a token's score is the attention it receives, the
    mean of its column over every query row. Returns (output rows (H, N', dh), kept row indices)."""
    n = q.shape[1]
    rows = list(range(n))
    bias = torch.zeros(1, n, n, dtype=q.dtype, device=q.device) if bias is None else bias
    if stage is not None:
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        if class_token and prefix:
            logits0 = (q[:, :1].to(dt) @ k.to(dt).transpose(1, 2))[:, 0] * scale + bias[:, 0].to(dt)
            a0 = torch.softmax(logits0, dim=-1)  # (H, N)
        else:
            logits = (q.to(dt) @ k.to(dt).transpose(1, 2)) * scale + bias.to(dt)
            a0 = torch.softmax(logits, dim=-1).mean(dim=1)  # (H, N): attention received
        s = a0 * v.to(dt).norm(dim=-1) if stage.get("score", "attn_vnorm") == "attn_vnorm" else a0
        s[:, :prefix] = 0
        s = s.sum(0)
        s = s / s.sum()
        budget = budget_for(n, prefix, stage.get("ratio"), stage.get("k"))
        if stage.get("selection", "ats") == "topk":  # the paper's top-K baseline
            rows = list(range(prefix)) + sorted((prefix + s[prefix:].topk(budget).indices).tolist())
        else:
            rows = sample_tokens(s, budget, prefix)
    attn = torch.softmax((q[:, rows] @ k.transpose(1, 2)) * scale + bias[:, rows], dim=-1)
    return attn @ v, rows


def split_heads(t, heads):
    n, c = t.shape
    return t.reshape(n, heads, c // heads).transpose(0, 1)


def merge_heads(t):
    h, n, d = t.shape
    return t.transpose(0, 1).reshape(n, h * d)


def run_blocks(x, blocks, prefix, stages, kept_log=None, class_token=True, dropped=None):
    """x: (N, C) tokens of one image. blocks: per block a dict of callables:
    norm1, qkv (-> q, k, v each (N, C)), heads, proj, post_attn (layer scale), mlp_branch; and
    optionally qk (q, k, positions -> q, k: RoPE) and bias (positions -> (H, N, N)), which see
    the original positions of the tokens still present. ``dropped`` (a dict) receives, for each
    token a stage drops, its value when dropped (the block's input); ``kept_log`` K' per stage."""
    positions = list(range(x.shape[0]))
    for i, b in enumerate(blocks):
        h = b["norm1"](x)
        q, k, v = (split_heads(t, b["heads"]) for t in b["qkv"](h))
        if "qk" in b:
            q, k = b["qk"](q, k, positions)
        bias = b["bias"](positions) if "bias" in b else None
        scale = q.shape[-1] ** -0.5
        o, rows = attention_with_ats(q, k, v, scale, prefix, stages.get(i), bias, class_token)
        if dropped is not None:
            dropped.update({positions[r]: x[r] for r in set(range(len(positions))) - set(rows)})
        positions = [positions[r] for r in rows]
        x = x[rows] + b["post_attn"](b["proj"](merge_heads(o)))
        x = x + b["mlp_branch"](x)
        if kept_log is not None and i in stages:
            kept_log.append(len(rows) - prefix)
    if dropped is not None:
        dropped["positions"] = positions
    return x


# ------------------------------------------------------------------ model families
def timm_blocks(model):
    out = []
    for blk in model.blocks:
        attn = blk.attn

        def qkv(h, attn=attn):
            return attn.qkv(h).chunk(3, dim=-1)

        # Drop path (training) draws one keep flag per image: run it on this image as a batch of one.
        out.append(dict(
            norm1=blk.norm1, qkv=qkv, heads=attn.num_heads, proj=attn.proj,
            post_attn=lambda t, blk=blk: blk.drop_path1(blk.ls1(t)[None])[0],
            mlp_branch=lambda x, blk=blk: blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))[None])[0],
        ))
    return out


def timm_forward(model, image, stages, head=True, dropped=None):
    """timm ``VisionTransformer``: class token, registers only, or no prefix (average pool,
    attention pooling as in SigLIP). Without ``head``: the final tokens (N', C)."""
    x = model.patch_embed(image[None])
    x = model._pos_embed(x)
    x = model.norm_pre(x)[0]
    x = run_blocks(x, timm_blocks(model), model.num_prefix_tokens, stages, class_token=model.cls_token is not None,
                   dropped=dropped)
    x = model.norm(x)[None]
    return model.forward_head(x)[0] if head else x[0]


def timm_relpos_forward(model, image, stages):
    """timm ``VisionTransformerRelPos``: a relative position bias per block (or shared), gathered at
    the kept positions; no class token in the average-pool variants."""
    x = model.patch_embed(image[None])
    if model.cls_token is not None:
        x = torch.cat((model.cls_token.expand(1, -1, -1), x), dim=1)
    shared = model.shared_rel_pos.get_bias() if model.shared_rel_pos is not None else None
    blocks = timm_blocks(model)
    for block, blk in zip(blocks, model.blocks):
        table = blk.attn.rel_pos.get_bias() if blk.attn.rel_pos is not None else shared
        if table is not None:
            block["bias"] = lambda positions, table=table: table.reshape(-1, *table.shape[-2:])[:, positions][:, :, positions]
    x = run_blocks(x[0], blocks, model.num_prefix_tokens, stages, class_token=model.cls_token is not None)
    return model.forward_head(model.norm(x)[None])[0]


def cait_forward(model, image, stages):
    """timm ``Cait``: self-attention blocks with talking heads on the patch tokens alone (no class
    token yet: a stage scores token j by Σ_h mean_i |A_h[i, j]|·‖V_h,j‖ over the queries, with A
    after the head mixing), then class-attention blocks in which the class token attends to the
    kept tokens, then norm over [class token, kept tokens] and the head."""
    x = (model.patch_embed(image[None]) + model.pos_embed)[0]
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        q, k, v = (split_heads(t, attn.num_heads) for t in attn.qkv(blk.norm1(x)).chunk(3, dim=-1))
        logits = (q @ k.transpose(1, 2)) * attn.scale  # (H, N, N)
        logits = attn.proj_l(logits.permute(1, 2, 0)).permute(2, 0, 1)
        a = attn.proj_w(torch.softmax(logits, dim=-1).permute(1, 2, 0)).permute(2, 0, 1)
        rows = list(range(x.shape[0]))
        stage = stages.get(i)
        if stage is not None:
            s = (a.abs().mean(dim=1) * v.norm(dim=-1)).sum(0)
            rows = sample_tokens(s / s.sum(), budget_for(len(rows), 0, stage.get("ratio"), stage.get("k")), 0)
        x = x[rows] + blk.gamma_1 * attn.proj(merge_heads(a[:, rows] @ v))
        x = x + blk.gamma_2 * blk.mlp(blk.norm2(x))
    cls = model.cls_token[0]
    for blk in model.blocks_token_only:
        attn = blk.attn
        h = blk.norm1(torch.cat([cls, x]))
        q, k, v = (split_heads(t, attn.num_heads) for t in (attn.q(h[:1]), attn.k(h), attn.v(h)))
        o = torch.softmax((q @ k.transpose(1, 2)) * attn.scale, dim=-1) @ v
        cls = cls + blk.gamma_1 * attn.proj(merge_heads(o))
        cls = cls + blk.gamma_2 * blk.mlp(blk.norm2(cls))
    return model.forward_head(model.norm(torch.cat([cls, x]))[None])[0]


def hf_blocks(encoder_layers, heads):
    """HF ViT-style layers (layernorm_before/after, q/k/v/o projections, no layer scale)."""
    return [_hf_block(layer, layer.attention, layer.layernorm_before, layer.layernorm_after, lambda t: t,
                      lambda t: t, heads) for layer in encoder_layers]


def hf_vit_forward(model, image, stages):
    x = model.vit.embeddings(image[None])[0]
    x = run_blocks(x, hf_blocks(model.vit.layers, model.config.num_attention_heads), 1, stages)
    x = model.vit.layernorm(x)
    return model.classifier(x[0])


def hf_deit_teacher_forward(model, image, stages):
    x = model.deit.embeddings(image[None])[0]
    x = run_blocks(x, hf_blocks(model.deit.layers, model.config.num_attention_heads), 2, stages)
    x = model.deit.layernorm(x)
    return (model.cls_classifier(x[0]) + model.distillation_classifier(x[1])) / 2


def torchvision_forward(model, image, stages):
    x = model._process_input(image[None])
    x = torch.cat([model.class_token, x], dim=1)
    x = (x + model.encoder.pos_embedding)[0]
    blocks = []
    for layer in model.encoder.layers:
        mha = layer.self_attention
        blocks.append(dict(
            norm1=layer.ln_1,
            qkv=lambda h, mha=mha: torch.nn.functional.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1),
            heads=mha.num_heads, proj=mha.out_proj, post_attn=lambda t: t,
            mlp_branch=lambda x, layer=layer: layer.mlp(layer.ln_2(x)),
        ))
    x = run_blocks(x, blocks, 1, stages)
    x = model.encoder.ln(x)
    return model.heads(x[0])


def _qkv_with_bias(attn):
    def qkv(h):
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        out = torch.nn.functional.linear(h, attn.qkv.weight, bias if bias is not None else attn.qkv.bias)
        return out.chunk(3, dim=-1)
    return qkv


def _scaled(gamma):
    return (lambda t: t) if gamma is None else (lambda t, g=gamma: g * t)


def beit_forward(model, image, stages):
    """timm BEiT / BEiT v2: relative position bias per layer, gathered at the kept positions."""
    x = model.patch_embed(image[None])
    x = torch.cat((model.cls_token, x), dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    blocks = []
    for blk in model.blocks:
        attn = blk.attn

        def bias(positions, attn=attn):
            full = 0
            if attn.relative_position_bias_table is not None:
                full = attn._get_rel_pos_bias()[0]
            if shared is not None:
                full = full + shared.reshape(-1, *shared.shape[-2:])
            return full[:, positions][:, :, positions]

        blocks.append(dict(
            norm1=blk.norm1, qkv=_qkv_with_bias(attn), heads=attn.num_heads, proj=attn.proj,
            post_attn=_scaled(blk.gamma_1), bias=bias,
            mlp_branch=lambda x, blk=blk: _scaled(blk.gamma_2)(blk.mlp(blk.norm2(x))),
        ))
    x = run_blocks(x[0], blocks, 1, stages)
    x = model.norm(x)[None]
    return model.forward_head(x)[0]


def eva_forward(model, image, stages):
    """timm EVA / EVA-02: rotary embeddings on the patch tokens, at their original positions."""
    from timm.layers import apply_rot_embed_cat

    x = model.patch_embed(image[None])
    x, rope = model._pos_embed(x)
    x = model.norm_pre(x)
    prefix = model.num_prefix_tokens
    blocks = []
    for blk in model.blocks:
        attn = blk.attn

        def qk(q, k, positions, attn=attn):
            q, k = attn.q_norm(q), attn.k_norm(k)
            if rope is None:
                return q, k
            patches = [p - prefix for p in positions[prefix:]]
            r = rope[patches]
            half = getattr(attn, "rotate_half", False)
            q = torch.cat([q[:, :prefix], apply_rot_embed_cat(q[:, prefix:], r, half=half)], 1).type_as(q)
            k = torch.cat([k[:, :prefix], apply_rot_embed_cat(k[:, prefix:], r, half=half)], 1).type_as(k)
            return q, k

        blocks.append(dict(
            norm1=blk.norm1, qkv=_qkv_with_bias(attn), qk=qk, heads=attn.num_heads,
            proj=lambda t, attn=attn: attn.proj(attn.norm(t)), post_attn=_scaled(blk.gamma_1),
            mlp_branch=lambda x, blk=blk: _scaled(blk.gamma_2)(blk.mlp(blk.norm2(x))),
        ))
    x = run_blocks(x[0], blocks, prefix, stages, class_token=model.cls_token is not None)
    x = model.norm(x)[None]
    return model.forward_head(x)[0]


def _hf_block(layer, attn, norm1, norm2, post_attn, post_mlp, heads, bias=None):
    block = dict(
        norm1=norm1, qkv=lambda h, a=attn: (a.q_proj(h), a.k_proj(h), a.v_proj(h)), heads=heads,
        proj=attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj, post_attn=post_attn,
        mlp_branch=lambda x: post_mlp(layer.mlp(norm2(x))),
    )
    if bias is not None:
        block["bias"] = bias
    return block


def hf_beit_forward(model, image, stages):
    """HF BeitForImageClassification: per-layer (and shared) relative position bias."""
    beit, heads = model.beit, model.config.num_attention_heads
    x = beit.embeddings(image[None])[0]
    window = tuple(s // model.config.patch_size for s in image.shape[-2:])
    shared = None
    if beit.shared_position_bias is not None:
        shared = beit.shared_position_bias(window, dim_size=x.shape[0]).reshape(-1, x.shape[0], x.shape[0])
    blocks = []
    for layer in beit.layers:
        def bias(positions, layer=layer, n=x.shape[0]):
            full = torch.zeros(1, n, n, dtype=x.dtype, device=x.device)
            if layer.relative_position_bias is not None:
                full = full + layer.relative_position_bias(window, dim_size=n).reshape(-1, n, n)
            if shared is not None:
                full = full + shared
            return full[:, positions][:, :, positions]

        blocks.append(_hf_block(layer, layer.attention, layer.layernorm_before, layer.layernorm_after,
                                lambda t, layer=layer: layer.lambda_1 * t, lambda t, layer=layer: layer.lambda_2 * t,
                                heads, bias))
    x = run_blocks(x, blocks, 1, stages)
    x = beit.layernorm(x)
    pooled = beit.pooler(x[None])[0]
    return model.classifier(pooled)


def hf_dinov2_tokens(model, image, stages, dropped=None):
    """HF Dinov2Model's last_hidden_state rows (N', C) after ATS: class token and registers first."""
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    x = model.embeddings(image[None])[0]
    blocks = [_hf_block(layer, layer.attention, layer.norm1, layer.norm2, layer.layer_scale1, layer.layer_scale2,
                        model.config.num_attention_heads) for layer in model.encoder.layer]
    return model.layernorm(run_blocks(x, blocks, prefix, stages, dropped=dropped))


def hf_clip_tokens(model, image, stages, dropped=None):
    """HF CLIPVisionModel's last_hidden_state rows (N', C) after ATS (no norm after the encoder)."""
    x = model.pre_layrnorm(model.embeddings(image[None]))[0]
    blocks = [_hf_block(layer, layer.self_attn, layer.layer_norm1, layer.layer_norm2, lambda t: t, lambda t: t,
                        model.config.num_attention_heads) for layer in model.encoder.layers]
    return run_blocks(x, blocks, 1, stages, dropped=dropped)


def hf_dinov2_forward(model, image, stages):
    """HF Dinov2(WithRegisters)ForImageClassification: class token + registers are the prefix;
    the head reads the class token and the mean of the patch tokens."""
    body = getattr(model, "dinov2", None) or model.dinov2_with_registers
    prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    x = body.embeddings(image[None])[0]
    blocks = [_hf_block(layer, layer.attention, layer.norm1, layer.norm2, layer.layer_scale1, layer.layer_scale2,
                        model.config.num_attention_heads) for layer in body.encoder.layer]
    x = body.layernorm(run_blocks(x, blocks, prefix, stages))
    return model.classifier(torch.cat([x[0], x[prefix:].mean(0)]))


def hf_clip_pooled_forward(model, image, stages):
    """HF CLIPVisionModel's pooler_output (post-layernorm class token)."""
    x = model.embeddings(image[None])
    x = model.pre_layrnorm(x)[0]
    blocks = [_hf_block(layer, layer.self_attn, layer.layer_norm1, layer.layer_norm2, lambda t: t, lambda t: t,
                        model.config.num_attention_heads) for layer in model.encoder.layers]
    x = run_blocks(x, blocks, 1, stages)
    return model.post_layernorm(x[0])


def hf_siglip_pooled_forward(model, image, stages, head=True, dropped=None):
    """HF SiglipVisionModel's pooler_output: no class token (each stage scores by the mean query row),
    then the attention-pooling head's learned probe over the kept tokens. Without ``head``: the
    last_hidden_state rows (N', C)."""
    body = getattr(model, "vision_model", model)
    x = body.embeddings(image[None])[0]
    blocks = [_hf_block(layer, layer.self_attn, layer.layer_norm1, layer.layer_norm2, lambda t: t, lambda t: t,
                        body.config.num_attention_heads) for layer in body.encoder.layers]
    x = body.post_layernorm(run_blocks(x, blocks, 0, stages, class_token=False, dropped=dropped))
    return body.head(x[None])[0] if head else x


def hf_vivit_forward(model, video, stages):
    """HF VivitForVideoClassification: joint space-time tokens (tubelets) behind a class token."""
    x = model.vivit.embeddings(video[None])[0]
    x = model.vivit.layernorm(run_blocks(x, hf_blocks(model.vivit.layers, model.config.num_attention_heads), 1, stages))
    return model.classifier(x[0])
