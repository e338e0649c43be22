"""Full-size correctness on the GPU: each Triton kernel against its reference at real shapes, and
whole models with the Triton path against the reference path (issue 3, "On the GPU").

    python -m benchmarks.gpu_check --out benchmarks/results/gpu_check.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import ats_fx
from ats_fx.kernels import reference
from ats_fx.kernels.attention_rows import attention_rows
from ats_fx.kernels.masked_attention import masked_attention
from ats_fx.kernels.sample import inverse_transform_sample
from ats_fx.kernels.scores import class_token_scores


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def kernel_checks() -> list[dict]:
    rows = []
    for B, H, T, D in [(256, 6, 197, 64), (64, 12, 197, 64), (32, 16, 577, 64), (8, 12, 50, 64)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            g = torch.Generator(device="cuda").manual_seed(T + B)
            buf = torch.randn(B, T, 3, H, D, device="cuda", dtype=dtype, generator=g)
            q, k, v = buf.permute(2, 0, 3, 1, 4).unbind(0)
            mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
            mask[1::2, T - T // 4:] = False
            for key_mask in (None, mask):
                s, bad = class_token_scores(q, k, v, key_mask, 1, D**-0.5)
                s_ref = reference.class_token_scores(q, k, v, key_mask, 1, D**-0.5)
                budget = reference.token_budget(key_mask, B, T, 1, 0.7, None, "cuda")
                idx, m, kept = inverse_transform_sample(s_ref, key_mask, budget, 1)
                idx_r, m_r, kept_r = reference.inverse_transform_sample(s_ref, key_mask, budget, 1)
                W = idx_r.shape[1]
                same = bool(torch.equal(idx[:, :W], idx_r) and torch.equal(m[:, :W], m_r) and torch.equal(kept, kept_r))
                out = attention_rows(q, k, v, idx_r, key_mask, D**-0.5)
                out_r = reference.attention_rows(q.float(), k.float(), v.float(), idx_r, key_mask, D**-0.5)
                row = dict(shape=[B, H, T, D], dtype=str(dtype), masked=key_mask is not None,
                           scores_max_abs=float((s - s_ref).abs().max()), no_bad=not bool(bad.any()),
                           sample_equal=same, attention_rel=rel(out, out_r))
                if key_mask is not None:  # later layers' attention: compare the real rows
                    o = masked_attention(q, k, v, key_mask, D**-0.5)
                    o_r = reference.masked_attention(q.float(), k.float(), v.float(), key_mask, D**-0.5)
                    real = key_mask[:, None, :, None].expand_as(o_r)
                    row["masked_attention_rel"] = rel(o[real], o_r[real])
                rows.append(row)
    return rows


def model_checks() -> list[dict]:
    import timm

    rows = []
    for name in ("deit_small_patch16_224", "vit_base_patch16_224"):
        torch.manual_seed(0)
        base = timm.create_model(name, pretrained=False).eval().cuda()
        with torch.no_grad():  # peakier attention than the default init, so K' varies per image
            for blk in base.blocks:
                blk.attn.qkv.weight.mul_(8.0)
        for dtype in (torch.float32, torch.float16):
            x = torch.randn(16, 3, 224, 224, device="cuda", dtype=dtype)
            # 3-11: every later layer is a stage; 3,6,9: masked attention in the layers between.
            for stages in ("3-11", "3,6,9"):
                outs, pos = {}, {}
                for kernels in ("triton", "reference"):
                    ats = ats_fx.transform(base, stages, ratio=0.87, kernels=kernels).cuda().to(dtype)
                    with torch.no_grad():
                        outs[kernels] = ats(x).float()
                    pos[kernels] = [t.positions for t in ats_fx.kept_tokens(ats)]
                    kept = [t.kept.tolist() for t in ats_fx.kept_tokens(ats)]
                same = all(torch.equal(a, b) for a, b in zip(pos["triton"], pos["reference"]))
                rows.append(dict(model=name, stages=stages, dtype=str(dtype), positions_equal=same,
                                 logits_rel=rel(outs["triton"], outs["reference"]),
                                 kept_last_stage=kept[-1], kept_varies=len(set(kept[-1])) > 1))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = {"kernels": kernel_checks(), "models": model_checks()}
    for section, rows in result.items():
        for r in rows:
            print(section, r)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
