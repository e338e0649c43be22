"""The CUDA kernels of one forward pass of a compiled model, in launch order, with their times:
where a compiled ATS model spends the time a compiled dense model does not (issue 4).

    python -m benchmarks.kernel_trace --model deit_small_patch16_224 --batches 1 --mode reduce-overhead
    python -m benchmarks.kernel_trace --configs "dense same-compile" "multi rho=0.87" --batches 256 \
        --mode max-autotune --no-coordinate-descent --autotune-rep 10   # session 13 (trace_s13_ma.txt)
    python -m benchmarks.kernel_trace --configs "multi rho=0.87" --batches 1 256 \
        --variant "two:score_sample.ENABLED=False"   # session 17 at b50520a (trace_s17_front.txt)

For each configuration: compile (``benchmarks.compiled.compile_model``), time with ``do_bench``
(median), then record 5 forward passes under ``torch.profiler`` (kernels inside CUDA graphs are
recorded too) and report per forward: the number of kernels, the sum of their durations, and the
kernels themselves. The gap between the wall time and the kernel sum is launch/scheduling latency.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.compiled import (DENSE_SAME_COMPILE, add_autotune_options, add_inductor_option, compile_model,
                                 parse_inductor_options, set_autotune_rep, set_switches)
from benchmarks.throughput import OPERATING_POINTS, bench_ms, environment

CALLS = 5


def kernels_per_forward(model, x) -> list[tuple[str, float]]:
    """(kernel name, microseconds) of one forward, averaged over ``CALLS`` recorded calls."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(CALLS):
                model(x)
            torch.cuda.synchronize()
    events = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    events.sort(key=lambda e: e.time_range.start)
    n = len(events) // CALLS
    first = events[:n]
    totals = defaultdict(float)
    for i, e in enumerate(events[: n * CALLS]):
        totals[i % n] += e.time_range.elapsed_us()
    return [(first[i].name, totals[i] / CALLS) for i in range(n)]


def main(argv=None) -> None:
    import timm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--configs", nargs="+", default=["dense", "single K=108", "multi rho=0.87"])
    p.add_argument("--mode", default="reduce-overhead")
    p.add_argument("--batches", nargs="+", type=int, default=[1])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels-last memory format")
    add_autotune_options(p)
    add_inductor_option(p)
    p.add_argument("--variant", action="append", default=[],
                   help="also trace each config with these kernel switches set, as benchmarks.interleaved's "
                        "--variant ('label:module.SWITCH=value,...')")
    p.add_argument("--out", help="JSON path; a text listing is written beside it (.txt)")
    args = p.parse_args(argv)
    inductor = parse_inductor_options(args.inductor)
    torch.backends.cudnn.benchmark = True
    set_autotune_rep(args.autotune_rep)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval().cuda().to(dtype)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    base = base.to(memory_format=layout)
    labels = {q[0] for q in OPERATING_POINTS} | {"dense", DENSE_SAME_COMPILE}
    results, lines = {"env": environment(), "rows": []}, []
    for label in args.configs:
        if label not in labels:
            raise SystemExit(f"unknown config {label!r}: one of {sorted(labels)}")
    for label, variant in [(c, v) for c in args.configs for v in [None, *args.variant]]:
        name = label if variant is None else f"{label} {variant.split(':')[0]}"
        for batch in args.batches:
            restore = set_switches(variant)  # set through compile, recording and the traced calls
            try:
                torch._dynamo.reset()
                model = compile_model(base, label, args.mode, args.no_coordinate_descent, inductor=inductor)
                x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype).contiguous(memory_format=layout)
                t0 = time.time()
                with torch.no_grad():
                    model(x)
                torch.cuda.synchronize()
                compile_s = time.time() - t0
                ms = bench_ms(lambda: model(x), 200)
                kernels = kernels_per_forward(model, x)
            finally:
                restore()
            busy = sum(us for _, us in kernels)
            row = dict(config=name, variant=variant, batch=batch, mode=args.mode, inductor=args.inductor,
                       channels_last=args.channels_last, ms=ms, compile_s=compile_s,
                       kernels=len(kernels), kernel_us=busy, trace=kernels)
            results["rows"].append(row)
            lines.append(f"== {args.model} {name} batch {batch} {args.mode}: {ms * 1e3:.1f} us per forward, "
                         f"{len(kernels)} kernels, {busy:.1f} us of kernel time, compiled in {compile_s:.0f} s")
            lines += [f"  {us:8.2f}  {kname[:110]}" for kname, us in kernels]
            print(lines[-len(kernels) - 1], flush=True)
            if args.out:  # after every row: a run cut short by a time limit keeps what it measured
                Path(args.out).write_text(json.dumps(results, indent=1))
                Path(args.out).with_suffix(".txt").write_text("\n".join(lines) + "\n")
            del model
    print("\n".join(lines))


if __name__ == "__main__":
    main()
