"""The one-launch stage (ats_fx/kernels/stage.py) against the three kernels it replaces, timed
inside CUDA graphs behind the qkv projection that feeds them, at the stage shapes of batch 1.

    python -m benchmarks.one_launch_stage --out benchmarks/results/one_launch_stage.json

Variants: ``three`` (head logits -> sampling -> attention, PDL on), ``one`` (the library's call:
a fresh zeroed barrier buffer each call, so one memset more in the graph) and ``one, kept sync``
(one barrier buffer for every call: no memset). Each row also times the projection alone, so
"stage us - qkv us" is what the stage costs. Median of ``do_bench_cudagraph``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ats_fx.kernels import reference, sample, scores, stage
from ats_fx.kernels.attention_rows import attention_rows
from benchmarks.scores_configs import graph_bench_main, time_us
from benchmarks.stage_kernels import projection_inputs
from benchmarks.throughput import environment

log = logging.getLogger("benchmarks.one_launch_stage")

# (batch, heads, tokens in): the nine stage inputs of DeiT-S rho=0.87 (static widths) at batch 1,
# three of ViT-B's, and DeiT-S's first stage at batch 2 (132 programs: one wave of an H100/H200).
SHAPES = ([(1, 6, t) for t in (197, 172, 151, 132, 116, 102, 90, 79, 70)]
          + [(1, 12, t) for t in (197, 116, 70)] + [(2, 6, 197)])
RATIO = 0.87


def three(q, k, v, width):
    D = q.shape[-1]
    heads = scores.head_scores(q, k, v, None, D**-0.5)
    index, _, _, _, _, _ = sample.sample_with_budget(heads, None, 1, RATIO, None, width, None, stats=False)
    return attention_rows(q, k, v, index, None, D**-0.5)


def one(q, k, v, width, sync=None):
    return stage.launch_stage(q, k, v, None, 1, q.shape[-1] ** -0.5, RATIO, None, "attn_vnorm", width, sync)[0]


def run(args) -> dict:
    results = {"env": environment(), "ratio": RATIO, "rows": []}
    for B, H, T in SHAPES:
        x, w, bias = projection_inputs(B, H, T)
        C = x.shape[-1]
        width = reference.static_budget(T, 1, RATIO, None) + 1
        if not stage.fits_one_wave(B, H, width, x.device):
            log.warning("skipping B=%d H=%d T=%d: %d programs", B, H, T, stage.programs(B, H, width))
            continue
        sync = stage.new_sync(B, x.device)

        def front(fn, **kw):
            q, k, v = F.linear(x, w, bias).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
            return fn(q, k, v, width, **kw)

        q, k, v = F.linear(x, w, bias).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
        torch.testing.assert_close(one(q, k, v, width), three(q, k, v, width), atol=2e-3, rtol=2e-3)
        qkv_us = time_us(lambda: F.linear(x, w, bias), args.rep)
        row = dict(B=B, H=H, T=T, width=width, qkv_us=qkv_us,
                   three_us=time_us(lambda: front(three), args.rep),
                   one_us=time_us(lambda: front(one), args.rep),
                   one_kept_sync_us=time_us(lambda: front(one, sync=sync), args.rep))
        results["rows"].append(row)
        log.info("%s", row)
    return results


def table(results: dict) -> str:
    env = results["env"]
    lines = [f"Device: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. fp16, head "
             f"size 64, rho {results['ratio']} (static width); median us of the stage's kernels inside CUDA graphs "
             "(stage front minus the qkv projection alone).", "",
             "| B | H | T in | width | three kernels us | one launch us | one launch, kept sync us | one / three |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        three_k, one_k, kept_k = (r[key] - r["qkv_us"] for key in ("three_us", "one_us", "one_kept_sync_us"))
        lines.append(f"| {r['B']} | {r['H']} | {r['T']} | {r['width']} | {three_k:.2f} | {one_k:.2f} | "
                     f"{kept_k:.2f} | {one_k / three_k:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    graph_bench_main(__doc__, run, table, argv)


if __name__ == "__main__":
    main()
