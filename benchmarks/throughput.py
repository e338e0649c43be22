"""Eager throughput of ATS vs the dense model on a GPU (issue 3), as a table and JSON.

    python -m benchmarks.throughput --out benchmarks/results/throughput.json
    python -m benchmarks.throughput --models deit_small_patch16_224 --batches 64 --dtypes float16

For each model (timm, random init: no weights offline), dtype and batch: the dense model, the
dense model under ``torch.compile`` (default mode), and ATS at the paper's operating points
(multi-stage 3-11 at rho 1.0/0.87/0.72, single-stage 3 at K 108/78/48), each with the kernel
choices of ``--kernels``: ``auto`` (Triton scoring, sampling and masked attention of later layers;
SDPA on gathered queries for the kept rows), ``triton`` (the kept rows by our Triton kernel too),
``reference`` (everything in PyTorch: SDPA with the mask after a stage). Times are medians of ``triton.testing.do_bench``; GFLOPs (MACs) per image
come from FlopCounterMode on the same images; ATS's own share is the CUDA time of its kernels
(scoring, sampling, gathers) over all CUDA kernel time, from torch.profiler.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

import ats_fx

log = logging.getLogger("benchmarks.throughput")

OPERATING_POINTS = [  # (label, stages, ratio, k)
    ("multi rho=1.0", "3-11", 1.0, None),
    ("multi rho=0.87", "3-11", 0.87, None),
    ("multi rho=0.72", "3-11", 0.72, None),
    ("single K=108", "3", None, 108),
    ("single K=78", "3", None, 78),
    ("single K=48", "3", None, 48),
]
# CUDA kernels that are ATS's own work (not the transformer's): our Triton kernels and the gathers.
ATS_KERNELS = ("_head_logits_kernel", "_sample_kernel", "gather", "index_elementwise", "scatter")


def environment() -> dict:
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def bench_ms(fn, rep_ms: int = 300) -> float:
    from triton.testing import do_bench

    with torch.no_grad():
        return float(do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))


def ats_share(model, x) -> float:
    """Share of CUDA kernel time spent in ATS's own kernels during one forward pass."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(x)
            torch.cuda.synchronize()
    total = own = 0.0
    for evt in prof.key_averages():
        t = evt.self_device_time_total if hasattr(evt, "self_device_time_total") else evt.self_cuda_time_total
        if t <= 0:
            continue
        total += t
        if any(name in evt.key for name in ATS_KERNELS):
            own += t
    return own / total if total else float("nan")


def gflops(model, x, n: int) -> float:
    return float(ats_fx.count_flops(model, x[:n]).mean())


def run(args) -> dict:
    import timm

    device = "cuda"
    # Both models get cuDNN's autotuned patch-embedding convolution (the default pick cost ~15%
    # of DeiT-S's GPU time in our first profile, for dense and ATS alike).
    torch.backends.cudnn.benchmark = True
    results = {"env": environment(), "rows": []}
    for name in args.models:
        torch.manual_seed(0)
        base = timm.create_model(name, pretrained=False).eval()
        variants = {}
        t0 = time.time()
        for label, stages, ratio, k in OPERATING_POINTS:
            for kernels in args.kernels:
                for padding in args.paddings:
                    name_ = label if padding == "batch_max" else f"{label} {padding}"
                    variants[name_, kernels] = ats_fx.transform(base, stages, ratio=ratio, k=k, kernels=kernels,
                                                                padding=padding, check_inputs=False)
        log.info("%s: transformed %d operating points in %.1fs", name, len(variants), time.time() - t0)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            dense = timm.create_model(name, pretrained=False).eval()
            dense.load_state_dict(base.state_dict())
            dense = dense.to(device, dtype)
            ats_models = {lab: m.to(device, dtype) for lab, m in variants.items()}
            # One compile per model and dtype: a dynamic batch (the compiled.py benchmark compares
            # compiled dense with compiled ATS in full).
            compiled = torch.compile(dense) if args.compile_dense and dtype_name == args.dtypes[0] else None
            for batch in args.batches:
                x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
                dense_ms = bench_ms(lambda: dense(x), args.rep)
                dense_flops = gflops(dense, x, 1)
                row = dict(model=name, dtype=dtype_name, batch=batch, config="dense", kernels="-",
                           ms=dense_ms, img_s=batch / dense_ms * 1e3, gflops=dense_flops)
                results["rows"].append(row)
                comp_ms = None
                if compiled is not None:
                    t0 = time.time()
                    first = x.clone()
                    torch._dynamo.mark_dynamic(first, 0)
                    with torch.no_grad():
                        compiled(first)
                    compile_s = time.time() - t0
                    comp_ms = bench_ms(lambda: compiled(x), args.rep)
                    results["rows"].append(dict(model=name, dtype=dtype_name, batch=batch, config="dense compiled",
                                                kernels="-", ms=comp_ms, img_s=batch / comp_ms * 1e3,
                                                gflops=dense_flops, compile_s=compile_s))
                flops_of = {}
                for (label, kernels), model in ats_models.items():
                    if label not in flops_of:
                        flops_of[label] = gflops(model, x, min(batch, args.flop_images))
                    flops = flops_of[label]
                    ms = bench_ms(lambda: model(x), args.rep)
                    row = dict(model=name, dtype=dtype_name, batch=batch, config=label, kernels=kernels,
                               ms=ms, img_s=batch / ms * 1e3, gflops=flops,
                               speedup=dense_ms / ms, flops_ratio=dense_flops / flops)
                    row["efficiency"] = row["speedup"] / row["flops_ratio"]
                    if comp_ms is not None:
                        row["speedup_vs_compiled_dense"] = comp_ms / ms
                    if batch in args.profile_batches:
                        row["ats_share"] = ats_share(model, x)
                    with torch.no_grad():
                        model(x)
                    row["mean_tokens_last"] = float(ats_fx.kept_tokens(model)[-1].tokens_out.float().mean())
                    results["rows"].append(row)
                    log.info("%s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
                if args.out:
                    Path(args.out).write_text(json.dumps(results, indent=1))
            del compiled
            torch._dynamo.reset()
    return results


def table(results: dict) -> str:
    env = results["env"]
    lines = [f"Device: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. "
             "Eager unless noted; img/s from median do_bench times; GFLOPs = MACs per image (FlopCounterMode).",
             "",
             "| model | dtype | batch | config | rows by | img/s | GFLOPs | speed-up | FLOPs ratio | speed-up / FLOPs ratio | vs compiled dense | ATS ops share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        def f(key, fmt="{:.3f}"):
            return fmt.format(r[key]) if key in r and r[key] is not None else ""
        rows_by = {"auto": "SDPA", "triton": "Triton", "-": ""}.get(r["kernels"], r["kernels"])
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['config']} | {rows_by} | {r['img_s']:.0f} | "
            f"{r['gflops']:.2f} | {f('speedup')} | {f('flops_ratio')} | {f('efficiency')} | "
            f"{f('speedup_vs_compiled_dense')} | {f('ats_share', '{:.1%}')} |"
        )
    return "\n".join(lines)


def run_and_report(args, run_fn, table_fn, needs_cuda: bool = True) -> None:
    """The benchmarks' common ending: run, print the markdown table, and with ``--out`` write
    the JSON and the table beside it (.md). ``needs_cuda``: refuse to start without a GPU."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if needs_cuda and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    results = run_fn(args)
    text = table_fn(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
        Path(args.out).with_suffix(".md").write_text(text + "\n")
    print(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "vit_base_patch16_224"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--no-compile-dense", dest="compile_dense", action="store_false",
                   help="skip the torch.compile'd dense baseline")
    p.add_argument("--profile-batches", nargs="*", type=int, default=[1, 256],
                   help="batches at which to profile ATS's own share of CUDA time")
    p.add_argument("--kernels", nargs="+", default=["auto", "triton", "reference"],
                   help="kernel choices to time (ats_fx.transform(kernels=...))")
    p.add_argument("--paddings", nargs="+", default=["batch_max"],
                   help="padding modes to time: batch_max syncs once per stage, static never")
    p.add_argument("--flop-images", type=int, default=8, help="images counted per point for GFLOPs")
    p.add_argument("--rep", type=int, default=300, help="do_bench repetition time, ms")
    p.add_argument("--out", help="JSON path; a markdown table is written beside it (.md)")
    args = p.parse_args(argv)
    run_and_report(args, run, table)


if __name__ == "__main__":
    main()
