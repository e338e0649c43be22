"""Launch settings of a stage's two small kernels, timed inside CUDA graphs (as ``reduce-overhead``
runs them): the head-logits kernels of ``scores`` (one program per head and token chunk, or per
token chunk reading whole rows; tokens per program x warps) and, with ``--sample``,
``sample._sample_kernel`` (warps).

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
    names = ("LAYOUT", "BLOCK_T", "NUM_WARPS", "ROW_BLOCK_T", "ROW_NUM_WARPS", "ROW_MAX_ELEMENTS")
    defaults = {n: getattr(scores, n) for n in names}
    results = {"env": environment(), "defaults": defaults, "sample_warps": sample.NUM_WARPS, "rows": []}
    settings = [dict(LAYOUT="heads", BLOCK_T=bt, NUM_WARPS=w) for bt, w in ((32, 8), (64, 4), (32, 4))]
    settings += [dict(LAYOUT="rows", ROW_BLOCK_T=bt, ROW_NUM_WARPS=w, ROW_MAX_ELEMENTS=e)
                 for bt, w, e in itertools.product((4, 8, 16, 32), (1, 2, 4, 8), (512, 1024))]
    try:
        for B, H, T in SHAPES:
            torch.manual_seed(0)
            qkv = torch.randn(B, T, 3, H, 64, device="cuda", dtype=torch.float16)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            want = scores.head_scores(q, k, v, None, 0.125)
            for setting in settings:
                if setting.get("ROW_MAX_ELEMENTS", 0) > 512 and H * 64 <= 512:
                    continue  # the same launch as 512
                for n, val in setting.items():
                    setattr(scores, n, val)
                torch.testing.assert_close(scores.head_scores(q, k, v, None, 0.125), want, atol=1e-3, rtol=1e-3)
                us = time_us(lambda: scores.head_scores(q, k, v, None, 0.125), args.rep)
                results["rows"].append(dict(kernel="head_logits", B=B, H=H, T=T, **setting, us=us))
                log.info("%s", results["rows"][-1])
                for n, val in defaults.items():
                    setattr(scores, n, val)
            heads = scores.head_scores(q, k, v, None, 0.125)
            for warps in (2, 4) if args.sample else ():
                sample.NUM_WARPS = warps
                us = time_us(lambda: sample.sample_with_budget(heads, None, 1, 0.87, None, T, None, stats=False),
                             args.rep)
                results["rows"].append(dict(kernel="sample", B=B, H=H, T=T, warps=warps, us=us))
                log.info("%s", results["rows"][-1])
                sample.NUM_WARPS = results["sample_warps"]
    finally:
        for n, val in defaults.items():
            setattr(scores, n, val)
        sample.NUM_WARPS = results["sample_warps"]
    return results


def table(results: dict) -> str:
    env = results["env"]
    lines = [f"Device: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. "
             f"Median us inside CUDA graphs; defaults: {results['defaults']}, sampling warps "
             f"{results['sample_warps']}.", "",
             "| kernel | B | H | T | setting | us |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if r["kernel"] == "sample":
            setting = f"{r['warps']} warps"
        elif r["LAYOUT"] == "heads":
            setting = f"heads: {r['BLOCK_T']} tokens x {r['NUM_WARPS']} warps"
        else:
            setting = (f"rows: {r['ROW_BLOCK_T']} tokens x {r['ROW_NUM_WARPS']} warps, "
                       f"<= {r['ROW_MAX_ELEMENTS']} elements")
        lines.append(f"| {r['kernel']} | {r['B']} | {r['H']} | {r['T']} | {setting} | {r['us']:.2f} |")
    best = {}
    for r in results["rows"]:
        if r["kernel"] == "head_logits":
            key = (r["B"], r["H"], r["T"], r["LAYOUT"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    lines += ["", "Fastest of each layout:", "", "| B | H | T | heads us | rows us | rows setting |",
              "|---|---|---|---|---|---|"]
    for (B, H, T, layout), r in best.items():
        if layout == "rows":
            h = best.get((B, H, T, "heads"))
            lines.append(f"| {B} | {H} | {T} | {h['us'] if h else float('nan'):.2f} | {r['us']:.2f} | "
                         f"{r['ROW_BLOCK_T']} x {r['ROW_NUM_WARPS']}, <= {r['ROW_MAX_ELEMENTS']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rep", type=int, default=30, help="do_bench_cudagraph's time per setting, ms")
    p.add_argument("--sample", action="store_true", help="also time the sampling kernel at 2 and 4 warps")
    p.add_argument("--out", help="JSON path; a markdown table is written beside it (.md)")
    run_and_report(p.parse_args(argv), run, table)


if __name__ == "__main__":
    main()
