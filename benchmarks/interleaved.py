"""Compiled ATS vs compiled dense, timed in interleaved rounds (issue 4's batch-256 ratio).

    python -m benchmarks.interleaved --models deit_small_patch16_224 --rounds 7 --out benchmarks/results/interleaved.json

``benchmarks.compiled`` times each model right after compiling it, minutes apart from the dense
baseline, so a drift of the GPU (clocks, temperature) between the two lands in the ratio. Here every
configuration is compiled first and kept; then each round times all of them once per batch size
(``do_bench`` median), in an order that rotates from round to round, and each round gives its own
speed-up against the dense model of that round. Reported: the median, lowest and highest of those
per-round speed-ups, and the median speed-up over the FLOPs ratio. Same compiles as
``benchmarks.compiled`` (dynamic batch, ``compile_model``, the same operating points and FLOPs).

The first call of a compiled model is where run-time choices are made and kept for every later
batch size: cuDNN's algorithms (``cudnn.benchmark``) and, where Inductor autotunes them (plain
``torch.compile``; backend='ats' and the dense same-compile baseline use fixed configs), the
pointwise kernels' configs, which Inductor also writes to its on-disk cache: run variants in separate
processes with their own ``TORCHINDUCTOR_CACHE_DIR``. ``--warmup-batch`` says which batch that first
call has (default: the largest timed; ``benchmarks.compiled`` makes it at the first batch).

``--mode max-autotune`` wants ``--static-batch`` (a dynamic batch made its multi-stage compile outlast
26 minutes, session 8) and takes ``benchmarks.compiled``'s autotune flags (``--no-coordinate-descent``,
``--autotune-rep``, ``--graph-replay-autotune``), so its cached GEMM choices are the same:

    python -m benchmarks.interleaved --mode max-autotune --static-batch --batches 256 --configs "multi rho=0.87" \
        --no-coordinate-descent --autotune-rep 10 --graph-replay-autotune --no-plain-dense
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.compiled import (DENSE_SAME_COMPILE, add_autotune_options, add_graph_replay_options,
                                 add_inductor_option, compile_model, flops_of, graph_replay_scope,
                                 parse_inductor_options, set_autotune_rep, set_switches, split_padding)
from benchmarks.throughput import OPERATING_POINTS, bench_ms, environment, run_and_report


def run(args) -> dict:
    import timm

    torch.backends.cudnn.benchmark = True
    # Every configuration compiles the same forward code object and stays alive, each with a dynamic
    # graph and a batch-1 graph: past Dynamo's recompile limit (8) a configuration would silently run
    # eagerly. Raise the limit, and make hitting it an error.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if args.static_batch:  # one static graph per batch size: no dynamic batch after the first recompile
        torch._dynamo.config.automatic_dynamic_shapes = False
    set_autotune_rep(args.autotune_rep)
    dtype = getattr(torch, args.dtype)
    results = {"env": environment(), "args": vars(args), "rows": []}
    for name in args.models:
        torch.manual_seed(0)
        base = timm.create_model(name, pretrained=False).eval().cuda().to(dtype)
        inputs = {b: torch.randn(b, 3, 224, 224, device="cuda", dtype=dtype) for b in args.batches}
        # (label, operating point, --variant): a variant's switches are set while it compiles and
        # records, and around each of its timed calls (so a re-recording would see them too).
        baselines = [DENSE_SAME_COMPILE] if args.no_plain_dense else ["dense", DENSE_SAME_COMPILE]
        entries = [(label, label, None) for label in [*baselines, *args.configs]]
        entries += [(f"{c} {v.split(':')[0]}", c, v) for c in args.configs for v in args.variant]
        labels = [label for label, _, _ in entries]
        variant_of = {label: variant for label, _, variant in entries}
        models, compile_s, flops, static_flops, autotune_timing = {}, {}, {}, {}, {}
        warmup = args.warmup_batch or max(args.batches)
        for label, point, variant in entries:
            restore = set_switches(variant)
            try:
                model = compile_model(base, point, args.mode, args.no_coordinate_descent, args.inductor)
                first = torch.randn(warmup, 3, 224, 224, device="cuda", dtype=dtype)
                if not args.static_batch:
                    torch._dynamo.mark_dynamic(first, 0)
                with graph_replay_scope(args, args.mode) as timing:  # the GEMM choices are timed in here
                    t0 = time.time()
                    with torch.no_grad():
                        model(first)
                        for x in inputs.values():  # record every batch size's CUDA graph before timing
                            model(x)
                    torch.cuda.synchronize()
            finally:
                restore()
            models[label], compile_s[label] = model, time.time() - t0
            if timing is not None:
                autotune_timing[label] = str(timing)
            flops[label] = flops_of(base, point, inputs[args.batches[-1]])
            # The backend pads statically unless a label asks for batch_max (and the CUDA-graph modes refuse it).
            if label not in baselines and split_padding(point)[1] != "batch_max":
                static_flops[label] = flops_of(base, point, inputs[args.batches[-1]], padding="static")
        times = {(label, b): [] for label in labels for b in args.batches}
        for r in range(args.rounds):
            order = labels[r % len(labels):] + labels[: r % len(labels)]
            for label in order:
                restore = set_switches(variant_of[label])
                try:
                    for b, x in inputs.items():
                        times[label, b].append(bench_ms(lambda: models[label](x), args.rep))
                finally:
                    restore()
        for label in labels:
            for b in args.batches:
                ms = times[label, b]
                row = dict(model=name, mode=args.mode, dtype=args.dtype, config=label, batch=b, rounds=len(ms),
                           ms_median=statistics.median(ms), ms_all=ms, img_s=b / statistics.median(ms) * 1e3,
                           gflops=flops[label], compile_s=compile_s[label])
                if label in autotune_timing:
                    row["graph_replay_autotune"] = autotune_timing[label]
                if label not in baselines:
                    per_round = [d / a for d, a in zip(times[DENSE_SAME_COMPILE, b], ms)]
                    ratio = flops[DENSE_SAME_COMPILE] / flops[label]
                    row.update(speedup_median=statistics.median(per_round), speedup_min=min(per_round),
                               speedup_max=max(per_round), flops_ratio=ratio,
                               efficiency=statistics.median(per_round) / ratio)
                    if label in static_flops:
                        row["flops_ratio_static"] = flops[DENSE_SAME_COMPILE] / static_flops[label]
                    if "dense" in models:
                        row["speedup_vs_inductor_dense"] = statistics.median(
                            [d / a for d, a in zip(times["dense", b], ms)])
                results["rows"].append(row)
        if args.out:  # partial results survive a timeout
            Path(args.out).write_text(json.dumps(results, indent=1))
        models.clear()
        torch._dynamo.reset()
    return results


def table(results: dict) -> str:
    env = results["env"]
    a = results["args"]
    extra = "".join(f", {k}={v}" for k, v in a.get("inductor", {}).items())
    extra += ", static batch" if a.get("static_batch") else ""
    extra += ", no coordinate descent" if a.get("no_coordinate_descent") else ""
    extra += f", autotune rep {a['autotune_rep']} ms" if a.get("autotune_rep") is not None else ""
    if a.get("graph_replay_autotune") and "max-autotune" in a["mode"]:
        calls = a.get("calls_per_graph", 1)
        extra += (", GEMM choices timed as CUDA graph replays (graph_replay_autotune"
                  + (f", {calls} calls per graph)" if calls != 1 else ")"))
    lines = [f"Device: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. "
             f"{a['mode']}{extra}, {a['dtype']}, first (autotuning) call at batch "
             f"{a.get('warmup_batch') or max(a['batches'])}, {a['rounds']} interleaved rounds (do_bench median, "
             f"rep {a['rep']} ms, order rotating each round). Speed-up: per round against 'dense same-compile' of "
             "that round; median [lowest, highest] over the rounds.",
             "",
             "| model | batch | config | img/s | speed-up median [min, max] | FLOPs ratio | speed-up / FLOPs ratio "
             "| vs Inductor dense | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        spread = (f"{r['speedup_median']:.3f} [{r['speedup_min']:.3f}, {r['speedup_max']:.3f}]"
                  if "speedup_median" in r else "")
        eff = f"{r['efficiency']:.3f}" if "efficiency" in r else ""
        ratio = f"{r['flops_ratio']:.3f}" if "flops_ratio" in r else ""
        if "flops_ratio_static" in r and abs(r["flops_ratio_static"] - r["flops_ratio"]) >= 5e-4:
            ratio += f" (static padding runs {r['flops_ratio_static']:.3f})"  # the rows K + p, not K' + p
        vs = f"{r['speedup_vs_inductor_dense']:.3f}" if "speedup_vs_inductor_dense" in r else ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['config']} | {r['img_s']:.0f} | {spread} | {ratio} | {eff} "
                     f"| {vs} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224"])
    p.add_argument("--configs", nargs="+", default=["multi rho=0.87", "multi rho=0.72", "single K=108"])
    p.add_argument("--mode", default="reduce-overhead")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 256])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rep", type=int, default=200, help="do_bench time per measurement, ms")
    p.add_argument("--warmup-batch", type=int, default=None,
                   help="batch of the first call, where Inductor autotunes (default: the largest of --batches)")
    p.add_argument("--variant", action="append", default=[],
                   help='each config again with ats_fx.kernels switches set, "name:pdl.ENABLED=False,..."')
    add_inductor_option(p)
    add_autotune_options(p)
    p.add_argument("--static-batch", action="store_true",
                   help="no dynamic batch: one static graph per batch size (max-autotune then tunes each GEMM "
                        "for one shape; give one --batches value to compile once)")
    add_graph_replay_options(p)
    p.add_argument("--out", help="JSON path; a markdown table is written beside it (.md)")
    args = p.parse_args(argv)
    args.inductor = parse_inductor_options(args.inductor)
    unknown = {c for c in args.configs if split_padding(c)[0] not in {q[0] for q in OPERATING_POINTS}}
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}: one of {[q[0] for q in OPERATING_POINTS]}, "
                         "optionally with ':static' or ':batch_max' (the padding, in mode default)")
    run_and_report(args, run, table)


if __name__ == "__main__":
    main()
