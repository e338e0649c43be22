"""One ATS stage at small batches, timed inside CUDA graphs: its three kernels in a row against
the same work on two streams.

    python -m benchmarks.stage_overlap --out benchmarks/results/stage_overlap.json

At batch 1 the stage's head logits, sampling and kept-row attention run one after the other
(~11 us on ViT-B) where dense runs one attention kernel (~6 us), and the GEMMs after it cost the
same for 172 rows as for 197, so the chain is what ATS pays there. ``overlap`` computes the
attention of every row on the main stream while a side stream scores and samples, then gathers
the kept rows (O = A[kept] V is those rows of the full attention): the chain becomes
max(attention, logits + sampling) + a gather. Each row is a stage as the compiled model runs it
(qkv projection, the stage, output projection); "dense" is the same with SDPA over all rows
(unmasked) or the Triton kernel over all rows (masked). Median of ``do_bench_cudagraph``.
(results/stage_overlap_s25.md was timed when the overlapped stage used SDPA at unmasked
shapes; it now uses the Triton kernel there too.)
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ats_fx.kernels import reference, sample, scores
from ats_fx.kernels.attention_rows import launch_attention
from ats_fx.overlap import overlapped_stage_attention
from benchmarks.scores_configs import graph_bench_main, time_us
from benchmarks.throughput import environment

log = logging.getLogger("benchmarks.stage_overlap")

RATIO = 0.87
# (heads, tokens in, padded keys): ViT-B and DeiT-S at rho=0.87, the first stage (no key mask)
# and three later ones (static padding: the last keys are padding).
STAGES = [(12, 197, 0), (12, 151, 2), (12, 102, 2), (12, 70, 2), (6, 197, 0), (6, 151, 2), (6, 102, 2)]
BATCHES = [1, 2, 4, 8, 16, 32]


def _qkv(x, w, H):
    B, T, C = x.shape
    return F.linear(x, w).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)


def _proj(out, wo):
    B, H, R, D = out.shape
    return F.linear(out.transpose(1, 2).reshape(B, R, H * D), wo)


def sequential(x, w, wo, H, mask, width):
    q, k, v = _qkv(x, w, H)
    scale = q.shape[-1] ** -0.5
    heads = scores.head_scores(q, k, v, mask, scale)
    index, _, _, _, _, _ = sample.sample_with_budget(heads, mask, 1, RATIO, None, width, None, stats=False)
    return _proj(launch_attention(q, k, v, index, mask, scale, width), wo)


def overlapped(x, w, wo, H, mask, width):
    q, k, v = _qkv(x, w, H)
    out, *_ = overlapped_stage_attention(q, k, v, mask, 1, q.shape[-1] ** -0.5, RATIO, None, "attn_vnorm", width)
    return _proj(out, wo)


def dense(x, w, wo, H, mask, width):
    q, k, v = _qkv(x, w, H)
    if mask is None:
        return _proj(F.scaled_dot_product_attention(q, k, v), wo)
    return _proj(launch_attention(q, k, v, None, mask, q.shape[-1] ** -0.5, q.shape[2]), wo)


def run(args) -> dict:
    results = {"env": environment(), "ratio": RATIO, "rows": []}
    for H, T, pad in STAGES:
        for B in BATCHES:
            torch.manual_seed(0)
            C = 64 * H
            x = torch.randn(B, T, C, device="cuda", dtype=torch.float16)
            w = torch.randn(3 * C, C, device="cuda", dtype=torch.float16) * C**-0.5
            wo = torch.randn(C, C, device="cuda", dtype=torch.float16) * C**-0.5
            mask = None
            if pad:
                mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
                mask[:, T - pad:] = False
            width = reference.static_budget(T, 1, RATIO, None) + 1
            with torch.no_grad():  # the two paths give the same rows
                a, b = sequential(x, w, wo, H, mask, width), overlapped(x, w, wo, H, mask, width)
                torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
            row = dict(B=B, H=H, T=T, padded_keys=pad, width=width)
            for name, fn in (("sequential", sequential), ("overlap", overlapped), ("dense", dense)):
                row[name] = time_us(lambda: fn(x, w, wo, H, mask, width), args.rep)
            results["rows"].append(row)
            log.info("%s", row)
    return results


def table(results: dict) -> str:
    env = results["env"]
    lines = [f"Device: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. fp16, head "
             f"size 64, rho {results['ratio']} (static width); median us of qkv projection + stage + output "
             "projection inside CUDA graphs. dense: SDPA (or the masked kernel) over every row.", "",
             "| H | T | padded keys | B | sequential us | overlap us | overlap / sequential | dense us |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['H']} | {r['T']} | {r['padded_keys']} | {r['B']} | {r['sequential']:.2f} | "
                     f"{r['overlap']:.2f} | {r['overlap'] / r['sequential']:.3f} | {r['dense']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    graph_bench_main(__doc__, run, table, argv)


if __name__ == "__main__":
    main()
