"""Where a compiled model's forward leaves the GPU idle: kernel time against wall time, the host
syncs, and the longest gaps between kernels with the kernel before each (issue 4, ``batch_max``).

    python -m benchmarks.gap_trace --model deit_small_patch16_224 --batch 256 --mode default \
        --configs "dense same-compile" "multi rho=1.0:static" "multi rho=1.0:batch_max"

A config is an operating point of ``benchmarks.throughput`` with ``:padding`` (ATS only), or
"eager:<point>[:<padding>]" for the uncompiled ``ats_fx.transform``. Each is timed with ``do_bench``
(median), then 5 forwards are recorded under ``torch.profiler`` (CPU and CUDA). Per forward: the
kernels' summed time, the span from the first kernel's start to the last one's end, the time the
host spent in ``cudaStreamSynchronize``/``cudaMemcpy*`` (where ``batch_max`` reads widths), and the
CPU ops that took longest.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

import ats_fx
from benchmarks.compiled import DENSE_SAME_COMPILE, compile_model, set_switches, split_padding
from benchmarks.throughput import OPERATING_POINTS, bench_ms, environment

CALLS = 5
SYNC_CALLS = ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaMemcpy", "cudaDeviceSynchronize",
              "cudaEventSynchronize")


def build(base, config: str, mode: str):
    """The model a config names: compiled as ``benchmarks.compiled`` compiles it, or with "eager:" the
    plain ``ats_fx.transform``."""
    if not config.startswith("eager:"):
        return compile_model(base, config, mode)  # which reads a ":padding" suffix
    point, padding = split_padding(config.removeprefix("eager:"), "batch_max")
    _, stages, ratio, k = next(p for p in OPERATING_POINTS if p[0] == point)
    return ats_fx.transform(base, stages, ratio=ratio, k=k, padding=padding, check_inputs=False)


def record(model, x) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(CALLS):
                model(x)
            torch.cuda.synchronize()
    events = list(prof.events())
    gpu = sorted((e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")),
                 key=lambda e: e.time_range.start)
    cpu = [e for e in events if not str(getattr(e, "device_type", "")).endswith("CUDA")]
    busy = sum(e.time_range.elapsed_us() for e in gpu)
    span = gpu[-1].time_range.end - gpu[0].time_range.start if gpu else 0.0
    gaps = []
    for a, b in zip(gpu, gpu[1:]):
        gap = b.time_range.start - a.time_range.end
        if gap > 0:
            gaps.append((gap, a.name, b.name))
    gaps.sort(reverse=True)
    by_kernel = defaultdict(float)
    for e in gpu:
        by_kernel[e.name[:90]] += e.time_range.elapsed_us() / CALLS
    sync = defaultdict(lambda: [0, 0.0])
    cpu_ops = defaultdict(float)
    for e in cpu:
        cpu_ops[e.name[:90]] += e.time_range.elapsed_us() / CALLS
        if e.name in SYNC_CALLS:
            sync[e.name][0] += 1
            sync[e.name][1] += e.time_range.elapsed_us()
    return dict(
        kernels=len(gpu) / CALLS, kernel_us=busy / CALLS, span_us=span / CALLS,
        idle_us=(span - busy) / CALLS,
        sync={k: [n / CALLS, us / CALLS] for k, (n, us) in sync.items()},
        gaps=[[round(g, 1), a[:70], b[:70]] for g, a, b in gaps[:15]],
        gap_total_over_20us=sum(g for g, _, _ in gaps if g > 20) / CALLS,
        top_kernels=sorted(by_kernel.items(), key=lambda kv: -kv[1])[:15],
        top_cpu=sorted(cpu_ops.items(), key=lambda kv: -kv[1])[:25],
    )


def main(argv=None) -> None:
    import timm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--mode", default="default")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--configs", nargs="+",
                   default=[DENSE_SAME_COMPILE, "multi rho=1.0:static", "multi rho=1.0:batch_max"])
    p.add_argument("--variant", action="append", default=[],
                   help="also trace each ATS config with these switches set, as benchmarks.interleaved's "
                        "--variant ('label:module.SWITCH=value,...')")
    p.add_argument("--out", help="JSON path; a text summary is written beside it (.txt)")
    args = p.parse_args(argv)
    torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval().cuda().to(dtype)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda", dtype=dtype)
    results, lines = {"env": environment(), "rows": []}, []
    runs = [(c, None) for c in args.configs]
    runs += [(c, v) for c in args.configs if c not in ("dense", DENSE_SAME_COMPILE) for v in args.variant]
    for config, variant in runs:
        restore = set_switches(variant)  # set through compile, timing and recording
        try:
            torch._dynamo.reset()
            model = build(base, config, args.mode)
            t0 = time.time()
            with torch.no_grad():
                model(x)
            torch.cuda.synchronize()
            compile_s = time.time() - t0
            ms = bench_ms(lambda: model(x), 300)
            recorded = record(model, x)
        finally:
            restore()
        if variant is not None:
            config = f"{config} {variant.split(':')[0]}"
        row = dict(config=config, variant=variant, model=args.model, batch=args.batch, mode=args.mode, ms=ms,
                   compile_s=compile_s, **recorded)
        results["rows"].append(row)
        lines.append(f"== {config}: {ms * 1e3:.0f} us per forward (do_bench), kernels {row['kernels']:.0f} "
                     f"summing {row['kernel_us']:.0f} us over a span of {row['span_us']:.0f} us "
                     f"(idle {row['idle_us']:.0f} us; gaps over 20 us: {row['gap_total_over_20us']:.0f} us); "
                     f"host syncs {row['sync']}; first call {compile_s:.1f} s")
        lines += ["  gap " + " | ".join(map(str, g)) for g in row["gaps"][:10]]
        lines += [f"  kernel {us:9.1f}  {name}" for name, us in row["top_kernels"][:10]]
        lines += [f"  cpu {us:9.1f}  {name}" for name, us in row["top_cpu"][:15]]
        print("\n".join(lines[-36:]), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
            Path(args.out).with_suffix(".txt").write_text("\n".join(lines) + "\n")
        del model


if __name__ == "__main__":
    main()
