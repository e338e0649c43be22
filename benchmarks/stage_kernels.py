"""The front of one ATS stage as the compiled model runs it, timed inside CUDA graphs: the fused
qkv projection (cuBLAS), then the stage's three kernels (head logits, sampling, attention over the
kept rows), for each setting of the kernels' launch switches.

    python -m benchmarks.stage_kernels --out benchmarks/results/stage_kernels.json

Switches (module attributes of ``ats_fx.kernels``): ``pdl.ENABLED`` (programmatic dependent
launch of the three kernels) and ``scores.LAST_IMAGE_FIRST`` (head logits read the images the
projection wrote last first, while they are in L2). (Session 9 also switched
``sample.CDF_IN_REGISTERS``, C[j-1] by ``tl.gather`` or through memory: no difference; the gather
stayed and the switch went. results/stage_kernels.md has those rows.) Each row also times the
projection alone,
so "stage us - qkv us" is what the three kernels cost. Median of ``do_bench_cudagraph``.
"""
from __future__ import annotations

import itertools
import logging

import torch
import torch.nn.functional as F

from ats_fx.kernels import pdl, reference, sample, scores
from ats_fx.kernels.attention_rows import attention_rows
from benchmarks.scores_configs import graph_bench_main, time_us
from benchmarks.throughput import environment

log = logging.getLogger("benchmarks.stage_kernels")

# (batch, heads, tokens in): DeiT-S and ViT-B first stages, and a later DeiT-S stage.
SHAPES = [(1, 6, 197), (1, 12, 197), (1, 6, 114), (64, 6, 197), (256, 6, 197), (256, 6, 114), (256, 12, 197)]
SWITCHES = [(pdl, "ENABLED"), (scores, "LAST_IMAGE_FIRST")]


def stage_front(x, w, bias, H: int, ratio: float):
    B, T, C = x.shape
    q, k, v = F.linear(x, w, bias).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
    K = reference.static_budget(T, 1, ratio, None)
    heads = scores.head_scores(q, k, v, None, (C // H) ** -0.5)
    index, _, _, _, _, _ = sample.sample_with_budget(heads, None, 1, ratio, None, K + 1, None, stats=False)
    return attention_rows(q, k, v, index, None, (C // H) ** -0.5)


def run(args) -> dict:
    saved = [getattr(m, a) for m, a in SWITCHES]
    results = {"env": environment(), "switches": [f"{m.__name__.split('.')[-1]}.{a}" for m, a in SWITCHES],
               "rows": []}
    try:
        for B, H, T in SHAPES:
            torch.manual_seed(0)
            C = 64 * H
            x = torch.randn(B, T, C, device="cuda", dtype=torch.float16)
            w = torch.randn(3 * C, C, device="cuda", dtype=torch.float16) * C**-0.5
            bias = torch.zeros(3 * C, device="cuda", dtype=torch.float16)
            qkv_us = time_us(lambda: F.linear(x, w, bias), args.rep)
            for values in itertools.product((True, False), repeat=len(SWITCHES)):
                for (m, a), value in zip(SWITCHES, values):
                    setattr(m, a, value)
                us = time_us(lambda: stage_front(x, w, bias, H, 0.87), args.rep)
                row = dict(B=B, H=H, T=T, switches=list(values), us=us, qkv_us=qkv_us)
                results["rows"].append(row)
                log.info("%s", row)
    finally:
        for (m, a), value in zip(SWITCHES, saved):
            setattr(m, a, value)
    return results


def table(results: dict) -> str:
    env = results["env"]
    names = results["switches"]
    lines = [f"Device: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. fp16, head "
             "size 64, rho 0.87 (static width); median us per stage front inside CUDA graphs; 'kernels' = stage "
             "- qkv projection alone.", "",
             "| B | H | T | " + " | ".join(names) + " | stage us | kernels us |",
             "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for r in results["rows"]:
        flags = " | ".join("on" if v else "off" for v in r["switches"])
        lines.append(f"| {r['B']} | {r['H']} | {r['T']} | {flags} | {r['us']:.2f} | {r['us'] - r['qkv_us']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    graph_bench_main(__doc__, run, table, argv)


if __name__ == "__main__":
    main()
