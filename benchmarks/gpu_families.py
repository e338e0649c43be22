"""Position-dependent families on a GPU (issue 5): correctness against the eager per-image
reference in float32, and eager speed vs dense in float16, at full size (random weights).

    python -m benchmarks.gpu_families --out benchmarks/results/gpu_families.json

Models: timm BEiT-B (relative position bias), timm EVA-02-S (RoPE), HF BEiT-B, HF DINOv2-S with
4 registers. Weights are random with larger scales (and non-zero relative position tables) so
attention is peaky and images keep different K'. Speed: ``triton.testing.do_bench`` median,
dense and ATS in the same run; GFLOPs (MACs) per image from FlopCounterMode on 4 images.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import ats_fx
from ats_fx.testing import eager
from benchmarks.throughput import bench_ms, environment


def sharpen(model, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 or "token" in name or "pos" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def families():
    import timm
    import transformers as T

    yield "timm beit_base_patch16_224", lambda: timm.create_model("beit_base_patch16_224"), eager.beit_forward
    yield "timm eva02_small_patch14_224", lambda: timm.create_model("eva02_small_patch14_224"), eager.eva_forward
    yield ("HF BeitForImageClassification (base)",
           lambda: T.BeitForImageClassification(T.BeitConfig(use_relative_position_bias=True, num_labels=1000)),
           eager.hf_beit_forward)
    yield ("HF Dinov2WithRegisters (small, 4 registers)",
           lambda: T.Dinov2WithRegistersForImageClassification(T.Dinov2WithRegistersConfig(
               hidden_size=384, num_attention_heads=6, image_size=224, patch_size=14, num_register_tokens=4,
               num_labels=1000)),
           eager.hf_dinov2_forward)


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def run(batch: int, rep: int) -> list[dict]:
    rows = []
    stages, ratio = "3-11", 0.87
    for label, build, reference in families():
        row = {"model": label, "stages": stages, "ratio": ratio}
        try:
            model = sharpen(build()).cuda()
            ats = ats_fx.transform(model, stages, ratio=ratio)
            x = torch.randn(4, 3, 224, 224, device="cuda")
            st = {i: {"ratio": ratio} for i in range(3, 12)}
            with torch.no_grad():
                got = logits(ats(x)).float()
                want = torch.stack([reference(model, img, st) for img in x]).float()
            kept = torch.stack([t.kept for t in ats_fx.kept_tokens(ats)]).cpu()
            row["fp32_max_abs_diff"] = float((got - want).abs().max())
            row["fp32_rel_diff"] = float((got - want).norm() / want.norm())
            row["kprime_last_stage"] = kept[-1].tolist()
            row["gflops_dense"] = float(ats_fx.count_flops(model, x).mean())
            row["gflops_ats"] = float(ats_fx.count_flops(ats, x).mean())
            half = model.half()
            ats16 = ats_fx.transform(half, stages, ratio=ratio)
            xb = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
            row["dense_ms"] = bench_ms(lambda: half(xb), rep)
            row["ats_ms"] = bench_ms(lambda: ats16(xb), rep)
            row["speedup"] = row["dense_ms"] / row["ats_ms"]
            row["batch"], row["dtype"] = batch, "float16"
        except Exception as err:  # recorded: the run goes on to the next family
            row["error"] = f"{type(err).__name__}: {err}"[:800]
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rep", type=int, default=200)
    p.add_argument("--out")
    args = p.parse_args(argv)
    result = {"env": environment(), "rows": run(args.batch, args.rep)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
