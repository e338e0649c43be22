"""Where a forward pass's time goes: kernels grouped by what they do, dense beside ATS, into the results file.

    python -m benchmarks.breakdown --models vit_base_patch16_224 --batches 256      # GPU, reduce-overhead
    python -m benchmarks.breakdown --models deit_small_patch16_224 --batches 1 --runs eager
    python -m benchmarks.breakdown --device cpu --dtype float32 --runs eager --batches 8   # aten ops

The models are built as ``benchmarks.speed`` builds them (same runs, same operating points). After a
warm-up, ``torch.profiler`` records ``--calls`` forward passes of each, one synchronised call at a
time. On CUDA each kernel (a CUDA-graph replay's too) is put in one part by its name (``PARTS``: the
first pattern that matches); on the CPU each aten op's self time is. Per forward pass the rows give:

- ``gpu_ms`` per part, and for ``part="all"`` (on the CPU: ``cpu_ms``, self time of the ops);
- ``kernels``: kernels per forward pass, and ``graph_launches`` (CUDA), the CUDA graphs it replayed
  (``part="all"``);
- ``idle_ms`` (CUDA): the time between one kernel's end and the next one's start inside a forward
  pass, the cost a batch-1 pass pays per launch even in a graph;
- ``span_ms`` (CUDA): the first kernel's start to the last kernel's end, the pass's time on the GPU
  (kernels that run side by side on two streams count once here, and in ``gpu_ms`` each);
- ``gpu_ms_min`` / ``gpu_ms_max`` (CUDA): the fastest and slowest pass's kernel time.

The profiler adds its own cost per kernel, so these rows say where the time goes; ``benchmarks.speed``
says how fast. ``python -m benchmarks.report --breakdown`` prints them as tables. (Not ``profile.py``:
that name would shadow the standard library's ``profile``, which ``cProfile`` imports, wherever
benchmarks/ is on the path.)
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks import harness, speed, variants

log = logging.getLogger("benchmarks.breakdown")

# (part, pattern over the lower-cased kernel or op name), first match wins: the ats_fx kernels by their
# Triton names, then attention before conv (cuDNN's SDPA kernels are "..._fprop_..."), conv (with the
# layout transposes cuDNN adds around it) before GEMM (its kernels are "implicit_gemm"), and the fused
# Inductor kernels by the op that gives them their cost.
PARTS = [
    ("ats_fx scoring and sampling", r"_head_logits_kernel|_normalise_kernel|_sample_kernel|ats_fx::.*(score|sampl)"),
    ("ats_fx attention", r"_attention_kernel|ats_fx::.*attention"),
    ("ats_fx gathers", r"_gather_add_kernel|_gather_rows_kernel|ats_fx::.*gather"),
    ("attention", r"sdpa|flash|fmha|attention|attn|_efficient_"),
    ("patch conv", r"conv|fprop|nchw|nhwc"),
    ("GEMM", r"gemm|nvjet|xmma|cutlass|cublas|triton_tem|^aten::(mm|addmm|bmm|baddbmm)$"),
    ("LayerNorm", r"layer_norm|layernorm"),
    ("GELU", r"gelu"),
    ("copies", r"memcpy|memset|copy|cat_|^aten::(cat|index|gather|contiguous|clone)"),
]
_COMPILED = [(part, re.compile(pattern)) for part, pattern in PARTS]


# Keys of ``breakdown``'s result that describe the whole pass, and the metric each is written as.
PASS_METRICS = {"kernels": "kernels", "graphs": "graph_launches", "idle": "idle_ms", "span": "span_ms",
                "all_min": "gpu_ms_min", "all_max": "gpu_ms_max"}


def part_of(name: str) -> str:
    """The part a kernel or op belongs to, by its name; "other" where no pattern matches."""
    low = name.lower()
    return next((part for part, pattern in _COMPILED if pattern.search(low)), "other")


def _record(fn: Callable[[], object], device: torch.device, calls: int) -> list:
    """The profiler's events over ``calls`` synchronised calls of ``fn``, after a warm-up."""
    with torch.no_grad():
        for _ in range(3):
            fn()
        harness.sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
                harness.sync(device)
    return list(prof.events())


def _timed(events: list, device: torch.device) -> list:
    """The events that carry a pass's time: CUDA kernels, or on the CPU the aten and ats_fx ops."""
    if device.type == "cuda":
        return [e for e in events if e.device_type == DeviceType.CUDA]
    return [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith(("aten::", "ats_fx::"))]


def _us(e, device: torch.device) -> float:
    """An event's time in us: a kernel's duration, an op's self time."""
    return e.time_range.elapsed_us() if device.type == "cuda" else e.self_cpu_time_total


def breakdown(events: list, device: torch.device, calls: int) -> dict[str, float]:
    """Per forward pass: ms per part, ``all``, the kernel count and (CUDA) the idle time between
    kernels, the span from the first kernel's start to the last one's end and the spread over passes."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        kernels = sorted(_timed(events, device), key=lambda e: e.time_range.start)
        for e in kernels:
            part = part_of(e.name)
            out[part] = out.get(part, 0.0) + e.time_range.elapsed_us() / 1e3 / calls
        out["all"] = sum(out.values())
        out["kernels"] = len(kernels) / calls
        # Whether the pass ran as CUDA graph replays (and as how many): a graph Inductor skipped, or
        # split, shows here before it shows as host time.
        out["graphs"] = sum(e.name == "cudaGraphLaunch" for e in events if e.device_type == DeviceType.CPU) / calls
        if kernels and len(kernels) % calls == 0:  # the same kernels every pass: split the trace into passes
            n, idle, span, per_pass = len(kernels) // calls, 0.0, 0.0, []
            for c in range(calls):
                one = kernels[c * n:(c + 1) * n]
                idle += sum(max(0.0, b.time_range.start - a.time_range.end) for a, b in zip(one, one[1:]))
                span += max(e.time_range.end for e in one) - one[0].time_range.start
                per_pass.append(sum(e.time_range.elapsed_us() for e in one) / 1e3)
            out["idle"] = idle / 1e3 / calls
            # First kernel's start to last kernel's end: the pass's GPU time. Kernels that run side by
            # side on two streams count once here, each in "all".
            out["span"] = span / 1e3 / calls
            # How much one pass's kernel time moves from pass to pass (a replayed graph's should not).
            out["all_min"], out["all_max"] = min(per_pass), max(per_pass)
        return out
    for e in _timed(events, device):
        part = part_of(e.name)
        out[part] = out.get(part, 0.0) + _us(e, device) / 1e3 / calls
    out["all"] = sum(out.values())
    return out


def top_kernels(events: list, device: torch.device, calls: int, n: int) -> str:
    """The ``n`` kernels (CPU: aten ops) that took the most time per forward pass, one line each: time
    per pass, launches per pass and time per launch. For the log only (kernel names change with the
    compiler; the rows keep the parts)."""
    per: dict[str, list[float]] = {}
    for e in _timed(events, device):
        per.setdefault(e.name, []).append(_us(e, device))
    ranked = sorted(per.items(), key=lambda kv: -sum(kv[1]))[:n]
    return "\n".join(f"  {sum(t) / calls:9.1f} us  {len(t) / calls:5.1f} x {sum(t) / len(t):7.2f} us  {name[:110]}"
                     for name, t in ranked)


def rows_for(cell: dict, label: str, parts: dict[str, float], device: torch.device) -> list[dict]:
    """Results rows of one model's breakdown."""
    time_metric = "gpu_ms" if device.type == "cuda" else "cpu_ms"
    return [{**cell, "config": label, "part": "all" if key in PASS_METRICS else key,
             "metric": PASS_METRICS.get(key, time_metric), "value": value} for key, value in parts.items()]


def measure(name: str, base: torch.nn.Module, run: str, points: list[str], batches: list[int], args, device,
            dtype) -> Iterator[list[dict]]:
    """Per batch, the breakdown of the dense model and of each ATS configuration of one (model, run);
    the models are built once, as ``benchmarks.speed`` builds them."""
    models = speed.callers(speed.build_models(base, run, points, device, dtype))
    for batch in batches:
        x = torch.randn(batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
        cell = {"benchmark": "breakdown", "model": name, "run": run, "batch": batch, "dtype": args.dtype,
                "cudnn_benchmark": torch.backends.cudnn.benchmark}
        rows = []
        for label, model in models.items():
            events = _record(lambda m=model: m(x), device, args.calls)
            parts = breakdown(events, device, args.calls)
            log.info("%s %s batch %d %s: %s", name, run, batch, label,
                     ", ".join(f"{k} {v:.3f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))
            if args.top:
                log.info("%s %s batch %d %s, top kernels:\n%s", name, run, batch, label,
                         top_kernels(events, device, args.calls, args.top))
            rows += rows_for(cell, label, parts, device)
        yield rows


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_base_patch16_224"])
    p.add_argument("--runs", nargs="+", default=["compile:reduce-overhead"], help="as benchmarks.speed")
    p.add_argument("--points", nargs="+", default=["multi rho=0.87"], choices=list(harness.POINTS))
    p.add_argument("--variants", nargs="*", default=[], help="as benchmarks.speed (benchmarks.variants)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--calls", type=int, default=10, help="forward passes recorded per model")
    p.add_argument("--results", type=Path, default=harness.RESULTS)
    p.add_argument("--top", type=int, default=0, help="also log the N kernels that took the most time")
    p.add_argument("--device", default="cuda")
    p.add_argument("--cudnn-benchmark", default="off", choices=["on", "off"], help="as benchmarks.speed")
    args = p.parse_args(argv)
    speed.check_tree()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: pass --device cpu --dtype float32 for the CPU's breakdown")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    for name in args.models:
        base = harness.build_timm(name, **({"img_size": args.img_size} if args.img_size != 224 else {}))
        for run in args.runs:
            for rows in measure(name, base, run, variants.labels(args.points, args.variants), args.batches, args,
                                device, dtype):
                n = harness.append(rows, args.results, device)
                log.info("%s %s batch %d: %d rows appended to %s", name, run, rows[0]["batch"], n, args.results)


if __name__ == "__main__":
    main()
