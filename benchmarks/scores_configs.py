"""Launch settings of a stage's two small kernels, timed inside CUDA graphs (as ``reduce-overhead``
runs them): ``scores._head_logits_kernel`` (tokens per program x warps) and ``sample._sample_kernel``
(warps).

    python -m benchmarks.scores_configs --out benchmarks/results/scores_configs.json

Why: at batch 1 with CUDA graphs each stage costs ~7 us in these two kernels
(trace_session7_final.txt), more than fewer tokens save in the GEMMs; at batch 256 the head-logits
kernel reads K and V at ~1.8 TB/s. q, k, v are views of one (B, T, 3, H, 64) fp16 tensor, as a
ViT's fused qkv projection makes them. Times are medians of ``triton.testing.do_bench_cudagraph``.
"""
from __future__ import annotations

import argparse
import itertools
import logging

import torch

from ats_fx.kernels import sample, scores
from benchmarks.throughput import environment, run_and_report

log = logging.getLogger("benchmarks.scores_configs")

SHAPES = [(1, 6, 197), (1, 12, 197), (1, 6, 100), (256, 6, 197), (256, 6, 100), (256, 12, 197), (64, 6, 172)]


def time_us(fn, rep: int) -> float:
    from triton.testing import do_bench_cudagraph

    with torch.no_grad():
        return float(do_bench_cudagraph(fn, rep=rep, return_mode="median")) * 1e3


def run(args) -> dict:
    defaults = scores.BLOCK_T, scores.NUM_WARPS, sample.NUM_WARPS
    results = {"env": environment(), "defaults": list(defaults), "rows": []}
    try:
        for B, H, T in SHAPES:
            torch.manual_seed(0)
            qkv = torch.randn(B, T, 3, H, 64, device="cuda", dtype=torch.float16)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            for block_t, warps in itertools.product((32, 64, 128), (1, 2, 4, 8)):
                scores.BLOCK_T, scores.NUM_WARPS = block_t, warps
                us = time_us(lambda: scores.head_scores(q, k, v, None, 0.125), args.rep)
                results["rows"].append(dict(kernel="head_logits", B=B, H=H, T=T, block_t=block_t, warps=warps, us=us))
                log.info("%s", results["rows"][-1])
            scores.BLOCK_T, scores.NUM_WARPS = defaults[:2]
            heads = scores.head_scores(q, k, v, None, 0.125)
            for warps in (1, 2, 4, 8):
                sample.NUM_WARPS = warps
                us = time_us(lambda: sample.sample_with_budget(heads, None, 1, 0.87, None, T, None, stats=False),
                             args.rep)
                results["rows"].append(dict(kernel="sample", B=B, H=H, T=T, warps=warps, us=us))
                log.info("%s", results["rows"][-1])
    finally:
        scores.BLOCK_T, scores.NUM_WARPS, sample.NUM_WARPS = defaults
    return results


def table(results: dict) -> str:
    env = results["env"]
    lines = [f"Device: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. "
             f"Median us inside CUDA graphs; defaults (head-logits tokens, warps; sampling warps): "
             f"{results['defaults']}.", "",
             "| kernel | B | H | T | tokens/program | warps | us |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['kernel']} | {r['B']} | {r['H']} | {r['T']} | {r.get('block_t', '')} | {r['warps']} | "
                     f"{r['us']:.2f} |")
    return "\n".join(lines)


def graph_bench_main(doc: str, run_fn, table_fn, argv=None) -> None:
    """The command line of the benchmarks timed with ``time_us``: --rep and --out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rep", type=int, default=30, help="do_bench_cudagraph's time per setting, ms")
    p.add_argument("--out", help="JSON path; a markdown table is written beside it (.md)")
    run_and_report(p.parse_args(argv), run_fn, table_fn)


def main(argv=None) -> None:
    graph_bench_main(__doc__, run, table, argv)


if __name__ == "__main__":
    main()
