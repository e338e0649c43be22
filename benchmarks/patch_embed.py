"""The patch-embedding convolution (kernel = stride = 16) on its own, in the layouts a user can pick.

    python -m benchmarks.patch_embed --out benchmarks/results/patch_embed.json

Why: in the compiled DeiT-S traces (trace_session6_*.txt) this one conv took 1.0 ms of the dense
model's 9.2 ms at batch 256 and 49 us of 406 us at batch 1 on an H100 (cuDNN's
``precomputed_convolve_sgemm`` on NCHW fp16, even with ``cudnn.benchmark``). ATS does not shrink it,
so it caps the compiled speed-up. This table says which layout makes it cheap for dense and ATS
alike: NCHW, channels-last (``model.to(memory_format=torch.channels_last)`` and a channels-last
input), and the same conv written as one GEMM over the patches (``ats_fx.passes.patchify.conv_as_gemm``,
the exact same math), each eager and under ``torch.compile``.
"""
from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F

from ats_fx.passes.patchify import conv_as_gemm
from benchmarks.throughput import bench_ms, environment, run_and_report

log = logging.getLogger("benchmarks.patch_embed")


def variants(weight, bias, patch):
    conv = lambda x: F.conv2d(x, weight, bias, stride=patch)  # noqa: E731
    cl_weight = weight.contiguous(memory_format=torch.channels_last)
    conv_cl = lambda x: F.conv2d(x, cl_weight, bias, stride=patch)  # noqa: E731
    gemm = lambda x: conv_as_gemm(x, weight, bias)  # noqa: E731
    return {"conv NCHW": (conv, False), "conv channels-last": (conv_cl, True), "patches GEMM": (gemm, False),
            "compiled conv NCHW": (torch.compile(conv), False),
            "compiled conv channels-last": (torch.compile(conv_cl), True),
            "compiled patches GEMM": (torch.compile(gemm), False)}


def run(args) -> dict:
    torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, args.dtype)
    results = {"env": environment(), "rows": []}
    for dim in args.dims:
        torch.manual_seed(0)
        weight = torch.randn(dim, 3, args.patch, args.patch, device="cuda", dtype=dtype) * 0.02
        bias = torch.randn(dim, device="cuda", dtype=dtype)
        for batch in args.batches:
            x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            expected = F.conv2d(x.float(), weight.float(), bias.float(), stride=args.patch)
            for name, (fn, channels_last) in variants(weight, bias, args.patch).items():
                inp = x_cl if channels_last else x
                with torch.no_grad():
                    err = (fn(inp).float() - expected).abs().max().item()
                ms = bench_ms(lambda: fn(inp), args.rep)
                row = dict(dim=dim, batch=batch, variant=name, us=ms * 1e3, max_abs_err=err)
                results["rows"].append(row)
                log.info("%s", row)
    return results


def table(results: dict) -> str:
    env = results["env"]
    lines = [f"Device: {env['device']}, torch {env['torch']}, {env['date']}. Patch-embedding conv 3 -> D, "
             "16x16 stride 16 on 224x224, fp16, median do_bench; error against an fp32 conv.", "",
             "| D | batch | variant | us | max abs err |", "|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['dim']} | {r['batch']} | {r['variant']} | {r['us']:.1f} | {r['max_abs_err']:.3g} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", nargs="+", type=int, default=[384, 768], help="embedding widths (DeiT-S, ViT-B)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--rep", type=int, default=200)
    p.add_argument("--out", help="JSON path; a markdown table is written beside it (.md)")
    run_and_report(p.parse_args(argv), run, table)


if __name__ == "__main__":
    main()
