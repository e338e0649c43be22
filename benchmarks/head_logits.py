"""The head-logits kernel's two layouts, timed inside CUDA graphs after the qkv projection that
feeds it (``ats_fx/kernels/scores.py``): one program per (head, token chunk, image), the shipped
kernel, against one per (token chunk, image) reading every head (``scores.ALL_HEADS``) at a few
tile sizes and warp counts.

    python -m benchmarks.head_logits --out benchmarks/results/head_logits.json

Why: at batch 256 the per-head kernel reads K and V at ~2.9 TB/s (27 us for DeiT-S's 77 MB at
197 tokens, trace_s22_ro_b256.txt), and a stage's head logits have no dense counterpart. In a fused
qkv projection's output a token's keys of all heads are one contiguous run (and its values the
next), which the all-heads kernel reads whole. Each timing is the projection plus the kernel, minus
the projection alone (so K and V sit in L2 as they do in the model); every setting's output is
checked against the shipped kernel's first. GB/s counts K and V once.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ats_fx.kernels import scores
from benchmarks.scores_configs import graph_bench_main, time_us
from benchmarks.throughput import environment

log = logging.getLogger("benchmarks.head_logits")

# (batch, heads, tokens): DeiT-S rho=0.87's stage widths at batch 256 (static padding), ViT-B's
# first and a late stage, and batch 1 and 64 at the first stage.
SHAPES = ([(256, 6, t) for t in (197, 173, 151, 132, 115, 100, 87, 76, 66)]
          + [(256, 12, 197), (256, 12, 66), (64, 6, 197), (1, 6, 197), (1, 12, 197)])
# All-heads settings: (elements of K per program, warps).
SETTINGS = [(2048, 4), (4096, 4), (4096, 8), (8192, 8)]


def run(args) -> dict:
    saved = scores.ALL_HEADS, scores.ALL_HEADS_ELEMENTS, scores.ALL_HEADS_WARPS
    results = {"env": environment(), "rows": []}
    try:
        for B, H, T in SHAPES:
            torch.manual_seed(0)
            C = 64 * H
            x = torch.randn(B, T, C, device="cuda", dtype=torch.float16)
            w = torch.randn(3 * C, C, device="cuda", dtype=torch.float16) * C**-0.5
            bias = torch.zeros(3 * C, device="cuda", dtype=torch.float16)

            def front():
                q, k, v = F.linear(x, w, bias).view(B, T, 3, H, 64).permute(2, 0, 3, 1, 4)
                return scores.head_scores(q, k, v, None, 0.125)

            qkv_us = time_us(lambda: F.linear(x, w, bias), args.rep)
            scores.ALL_HEADS = False
            want = front()
            row = dict(B=B, H=H, T=T, qkv_us=qkv_us, per_head_us=time_us(front, args.rep) - qkv_us)
            scores.ALL_HEADS = True
            for elements, warps in SETTINGS:
                scores.ALL_HEADS_ELEMENTS, scores.ALL_HEADS_WARPS = elements, warps
                torch.testing.assert_close(front(), want, atol=1e-3, rtol=1e-3)
                row[f"all_heads_{elements}_w{warps}_us"] = time_us(front, args.rep) - qkv_us
            scores.ALL_HEADS, scores.ALL_HEADS_ELEMENTS, scores.ALL_HEADS_WARPS = saved
            results["rows"].append(row)
            log.info("%s", row)
    finally:
        scores.ALL_HEADS, scores.ALL_HEADS_ELEMENTS, scores.ALL_HEADS_WARPS = saved
    return results


def table(results: dict) -> str:
    env = results["env"]
    names = [f"all_heads_{e}_w{w}_us" for e, w in SETTINGS]
    lines = [f"Device: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. fp16, head "
             "size 64; median us inside CUDA graphs, (qkv projection + head logits) - projection alone; "
             "GB/s of K and V read once.", "",
             "| B | H | T | per head us (GB/s) | " + " | ".join(f"all heads {e} el. w{w} us" for e, w in SETTINGS)
             + " |", "|---|---|---|---|" + "---|" * len(names)]
    for r in results["rows"]:
        gbps = 2 * r["B"] * r["T"] * r["H"] * 64 * 2 / (r["per_head_us"] * 1e3)
        best = min(r[n] for n in names)
        cells = [f"**{r[n]:.2f}**" if r[n] == best else f"{r[n]:.2f}" for n in names]
        lines.append(f"| {r['B']} | {r['H']} | {r['T']} | {r['per_head_us']:.2f} ({gbps:.0f}) | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    graph_bench_main(__doc__, run, table, argv)


if __name__ == "__main__":
    main()
