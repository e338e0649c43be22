"""Compiled ATS (``torch.compile(backend="ats")``) vs the compiled dense model on a GPU (issue 4).

    python -m benchmarks.compiled --out benchmarks/results/compiled.json
    python -m benchmarks.compiled --models deit_small_patch16_224 --modes reduce-overhead --batches 1 256

Each (model, configuration, mode) compiles once with a dynamic batch (``mark_dynamic``), then is
timed at every batch size (``triton.testing.do_bench``, median). Modes: ``default`` (Inductor, no
CUDA graphs), ``reduce-overhead`` (CUDA graphs) and ``max-autotune`` (also CUDA graphs). ATS pads
statically (fixed shapes, no host sync), the backend's default; a configuration label ending in
``:batch_max`` (``"multi rho=0.87:batch_max"``, mode default only) asks for the unbacked width.
Each configuration is timed right after its own compile, minutes apart from the dense baseline;
for speed-up ratios ``benchmarks.interleaved`` times all configurations in alternating rounds of
one process (drift between the two lands in neither). Compile time is the wall time of the first
call. GFLOPs (MACs) per image come from the eager
``ats_fx.transform`` of the same configuration (FlopCounterMode).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

import ats_fx
from benchmarks.graph_replay_autotune import graph_replay_autotune
from benchmarks.throughput import OPERATING_POINTS, bench_ms, environment, run_and_report

log = logging.getLogger("benchmarks.compiled")


DENSE_SAME_COMPILE = "dense same-compile"


def compile_model(model, label: str, mode: str, no_coordinate_descent: bool = False, inductor: Optional[dict] = None,
                  patch_gemm: bool = True, padding: Optional[str] = None):
    # max-autotune also tunes every pointwise/reduction kernel by coordinate descent on its first
    # run (serially, in the main process): minutes per distinct kernel shape set.
    extra = dict(inductor or {})
    if no_coordinate_descent:
        extra["coordinate_descent_tuning"] = False
    if label == DENSE_SAME_COMPILE:
        # The dense model compiled as backend='ats' compiles (patch-embedding conv as a GEMM, the
        # backend's default Inductor options): the baseline that isolates what ATS itself saves.
        from torch._inductor.compile_fx import compile_fx

        from ats_fx.compile import inductor_patches
        from ats_fx.passes.patchify import patchify_convs

        patches = inductor_patches(None if mode == "default" else mode, extra)

        def dense_backend(gm, example_inputs):
            if patch_gemm:
                patchify_convs(gm)
            return compile_fx(gm, example_inputs, config_patches=patches)

        return torch.compile(model, backend=dense_backend)
    if label == "dense":
        if extra:
            from torch._inductor import list_mode_options

            return torch.compile(model, options={**list_mode_options(mode), **extra})
        return torch.compile(model, mode=None if mode == "default" else mode)
    label, padding = split_padding(label, padding)
    _, stages, ratio, k = next(p for p in OPERATING_POINTS if p[0] == label)
    options = {"stages": stages, "ratio": ratio, "k": k, "mode": mode,  # padding None: the backend's (static)
               "patch_gemm": patch_gemm, "padding": padding}
    if extra:
        options["inductor_options"] = extra
    options = {key: v for key, v in options.items() if v is not None}
    # The callable is what backend="ats" resolves to once the package is pip-installed (the GPU
    # machine runs from a source tree without the entry point).
    from ats_fx.compile import ats_backend

    def backend(gm, example_inputs):
        return ats_backend(gm, example_inputs, options=options)

    # A fresh backend function per call, not torch.compile(backend=ats_backend, options=...): Dynamo
    # keeps its compiled graphs per code object and reuses one whose backend compares equal, and two
    # torch.compile wrappers of one backend with equal options do. So a second compile of the same
    # point (a --variant of benchmarks.interleaved) ran the first one's graph and CUDA graphs: in
    # session 17 both replayed the same kernels whatever the variant's switches said
    # (benchmarks/sessions/s17_variant_check.py), as in sessions 12 and 16.
    return torch.compile(model, backend=backend)


def add_autotune_options(parser: argparse.ArgumentParser) -> None:
    """``--autotune-rep MS`` and ``--no-coordinate-descent``: max-autotune's compile-time savers."""
    parser.add_argument("--autotune-rep", type=int, default=None,
                        help="Inductor's autotune benchmark time per choice, ms (its default 100; warm-up a quarter)")
    parser.add_argument("--no-coordinate-descent", action="store_true",
                        help="max-autotune without its coordinate-descent tuning of pointwise kernels "
                             "(dense and ATS alike)")


def add_graph_replay_options(parser: argparse.ArgumentParser) -> None:
    """``--graph-replay-autotune``, ``--calls-per-graph N`` (N calls back to back in each timed graph) and
    ``--no-plain-dense``: how the max-autotune runs time their GEMM choices, and the compile they skip."""
    parser.add_argument("--graph-replay-autotune", action="store_true",
                        help="max-autotune: time the GEMM choices as CUDA graph replays, as the compiled model runs "
                             "them (Inductor's autotune_cudagraph_benchmarking, or benchmarks/graph_replay_autotune.py's "
                             "scoped stand-in on a torch without it); dense and ATS alike")
    parser.add_argument("--no-plain-dense", action="store_true",
                        help="skip the plain-Inductor dense model ('vs Inductor'): saves its compile")
    parser.add_argument("--calls-per-graph", type=int, default=1, metavar="N",
                        help="with --graph-replay-autotune: record each choice N times in its graph and divide "
                             "the replay's time by N (batch 1: a GEMM takes about what one replay's launch "
                             "does; session 15 timed single GEMMs with 20). N > 1 always uses the stand-in")


def graph_replay_scope(args, mode: str):
    """The block that times this compile's GEMM choices as CUDA graph replays (``--graph-replay-autotune``
    under max-autotune; it yields the ``GraphReplayTiming``), or one that changes nothing and yields None."""
    if getattr(args, "graph_replay_autotune", False) and "max-autotune" in mode:
        return graph_replay_autotune(calls_per_graph=args.calls_per_graph)
    return contextlib.nullcontext()


def set_autotune_rep(rep: Optional[int]) -> None:
    """max-autotune: ``rep`` ms benchmarking each GEMM choice (warm-up a quarter); None keeps Inductor's."""
    if rep is not None:
        import torch._inductor.config as inductor_config

        inductor_config.inductor_default_autotune_rep = rep
        inductor_config.inductor_default_autotune_warmup = max(1, rep // 4)


def add_inductor_option(parser: argparse.ArgumentParser) -> None:
    """``--inductor KEY=VALUE ...``: Inductor options for every configuration (dense and ATS alike)."""
    parser.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Inductor options for every configuration, dense and ATS alike, e.g. "
                             "benchmark_epilogue_fusion=False or triton.autotune_pointwise=True")


def parse_inductor_options(items: list[str]) -> dict:
    """``["key=value", ...]`` -> ``{key: Python literal}``."""
    return {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in items)}


def mode_label(mode: str, args) -> str:
    extra = [" no-cd"] if args.no_coordinate_descent else []
    extra += [f" {k}={v}" for k, v in args.inductor.items()]
    if getattr(args, "channels_last", False):
        extra.append(" channels-last")
    if args.autotune_rep is not None:
        extra.append(f" autotune_rep={args.autotune_rep}")
    if getattr(args, "graph_replay_autotune", False) and "max-autotune" in mode:
        calls = getattr(args, "calls_per_graph", 1)
        extra.append(" graph-replay-autotune" + (f" x{calls}" if calls != 1 else ""))
    return mode + "".join(extra)


def kernel_switch(target: str):
    """``(module, attribute)`` of a switch named like ``"pdl.ENABLED"`` in ``ats_fx.kernels`` (or,
    like ``"overlap.MODE"``, in ``ats_fx``); an AttributeError for a misspelt one."""
    import importlib

    module_name, attr = target.strip().rsplit(".", 1)
    try:
        module = importlib.import_module(f"ats_fx.kernels.{module_name}")
    except ModuleNotFoundError:
        module = importlib.import_module(f"ats_fx.{module_name}")
    getattr(module, attr)
    return module, attr


def set_switches(variant: Optional[str]):
    """Set the ``ats_fx.kernels`` module attributes a ``--variant`` names ("label:pdl.ENABLED=False,...");
    returns the function that puts them back."""
    if variant is None:
        return lambda: None
    saved = []
    for item in variant.split(":", 1)[1].split(","):
        target, value = item.split("=", 1)
        module, attr = kernel_switch(target)
        saved.append((module, attr, getattr(module, attr)))
        setattr(module, attr, ast.literal_eval(value))

    def restore():
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)
    return restore


def split_padding(label: str, padding: Optional[str] = None) -> tuple[str, Optional[str]]:
    """``"multi rho=0.87:static"`` -> (``"multi rho=0.87"``, ``"static"``): an operating point with the
    padding it names, else ``padding``."""
    point, _, named = label.partition(":")
    return point, named or padding


def flops_of(base, label: str, x, padding: str = "batch_max", images: int = 4) -> float:
    """FLOPs per image of ``label`` on the first ``images`` images of ``x`` (one batch). ``batch_max``
    counts the rows ATS keeps, up to the batch's largest K' + p; ``static`` the K + p rows that the
    CUDA-graph modes run (at rho=1.0 every row). A ``:padding`` suffix of ``label`` overrides ``padding``."""
    if label in ("dense", DENSE_SAME_COMPILE):
        return float(ats_fx.count_flops(base, x[:images]).mean())
    label, padding = split_padding(label, padding)
    _, stages, ratio, k = next(p for p in OPERATING_POINTS if p[0] == label)
    model = ats_fx.transform(base, stages, ratio=ratio, k=k, padding=padding, check_inputs=False)
    return float(ats_fx.count_flops(model, x[:images]).mean())


def run(args) -> dict:
    import timm

    torch.backends.cudnn.benchmark = True
    set_autotune_rep(args.autotune_rep)
    results = {"env": environment(), "rows": []}
    start = time.time()
    dtype = getattr(torch, args.dtype)
    for name in args.models:
        torch.manual_seed(0)
        base = timm.create_model(name, pretrained=False).eval().cuda().to(dtype)
        inputs = {b: torch.randn(b, 3, 224, 224, device="cuda", dtype=dtype) for b in args.batches}
        if args.channels_last:  # the patch-embedding conv's fast cuDNN kernels want NHWC (patch_embed.md)
            base = base.to(memory_format=torch.channels_last)
            inputs = {b: x.contiguous(memory_format=torch.channels_last) for b, x in inputs.items()}
        dense_ms, inductor_ms = {}, {}
        baselines = ["dense", DENSE_SAME_COMPILE]
        runs = [(label, None) for label in [*baselines, *args.configs]
                if not (label == "dense" and args.no_plain_dense)]
        runs += [(label, variant) for label in args.configs for variant in args.variant]
        for label, variant in runs:
            for mode in args.modes:
                if time.time() - start > args.budget_s:
                    log.warning("time budget spent; skipping %s %s %s", name, mode, label)
                    continue
                torch._dynamo.reset()
                restore = set_switches(variant)  # CUDA graphs record the launches: keep them set to the end
                model = compile_model(base, label, mode, args.no_coordinate_descent, args.inductor,
                                      patch_gemm=not args.no_patch_gemm)
                first = inputs[args.batches[0]].clone(memory_format=torch.preserve_format)
                if not args.static_batch:
                    torch._dynamo.mark_dynamic(first, 0)
                # The first call compiles and, under max-autotune, times the GEMM choices; so may a
                # recompile for another batch size while timing: the graph-replay timing covers both.
                with graph_replay_scope(args, mode) as autotune_timing:
                    t0 = time.time()
                    try:
                        with torch.no_grad():
                            model(first)
                        torch.cuda.synchronize()
                    except Exception as err:  # record and go on: one failure must not void the run
                        log.exception("compile failed: %s %s %s", name, mode, label)
                        results["rows"].append(dict(model=name, dtype=args.dtype, mode=mode, config=label,
                                                    error=f"{type(err).__name__}: {str(err)[:300]}"))
                        restore()
                        continue
                    compile_s = time.time() - t0
                    flops = flops_of(base, label, inputs[args.batches[-1]])
                    for batch, x in inputs.items():
                        ms = bench_ms(lambda: model(x), args.rep)
                        row = dict(model=name, dtype=args.dtype, mode=mode_label(mode, args),
                                   config=label if variant is None else f"{label} {variant.split(':')[0]}",
                                   batch=batch, ms=ms,
                                   img_s=batch / ms * 1e3, gflops=flops, compile_s=compile_s)
                        if autotune_timing is not None:  # its own option, or the stand-in's counts
                            row["graph_replay_autotune"] = str(autotune_timing)
                        # Speed-ups are against the dense model compiled the same way (with the
                        # patch-embedding GEMM when ATS has it); also against plain Inductor dense.
                        if label == "dense":
                            inductor_ms[mode, batch] = ms
                        if label == baselines[-1]:
                            dense_ms[mode, batch] = (ms, flops)
                        elif label not in baselines and (mode, batch) in dense_ms:
                            row["speedup"] = dense_ms[mode, batch][0] / ms
                            row["flops_ratio"] = dense_ms[mode, batch][1] / flops
                            row["efficiency"] = row["speedup"] / row["flops_ratio"]
                        if label != "dense" and (mode, batch) in inductor_ms:
                            row["speedup_vs_inductor_dense"] = inductor_ms[mode, batch] / ms
                        results["rows"].append(row)
                        log.info("%s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
                if args.out:
                    Path(args.out).write_text(json.dumps(results, indent=1))
                del model
                restore()
    return results


def table(results: dict) -> str:
    env = results["env"]
    lines = [f"Device: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. "
             "torch.compile; ATS through backend='ats'; img/s from median do_bench times. Speed-up: against "
             "the dense model compiled the same way ('dense same-compile' when it was measured: the patch-"
             "embedding conv -> GEMM rewrite and the Inductor options that backend='ats' uses); 'vs Inductor' "
             "against plain Inductor dense.",
             "",
             "| model | dtype | mode | batch | config | img/s | GFLOPs | speed-up | FLOPs ratio | speed-up / FLOPs ratio "
             "| vs Inductor | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['dtype']} | {r['mode']} | | {r['config']} | failed: {r['error'][:80]} ||||||")
            continue

        def f(key):
            return f"{r[key]:.3f}" if key in r else ""
        lines.append(f"| {r['model']} | {r['dtype']} | {r['mode']} | {r['batch']} | {r['config']} | {r['img_s']:.0f} | "
                     f"{r['gflops']:.2f} | {f('speedup')} | {f('flops_ratio')} | {f('efficiency')} | "
                     f"{f('speedup_vs_inductor_dense')} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "vit_base_patch16_224"])
    p.add_argument("--configs", nargs="+", default=[p[0] for p in OPERATING_POINTS])
    p.add_argument("--modes", nargs="+", default=["default", "reduce-overhead"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    p.add_argument("--dtype", default="float16")
    p.add_argument("--rep", type=int, default=200)
    p.add_argument("--budget-s", type=float, default=540, help="stop starting new compiles after this")
    add_autotune_options(p)
    p.add_argument("--static-batch", action="store_true",
                   help="compile for the first batch size only (no dynamic batch): max-autotune then tunes "
                        "each GEMM for that one shape")
    add_inductor_option(p)
    p.add_argument("--no-patch-gemm", action="store_true",
                   help="keep the patch-embedding conv (backend option patch_gemm=False; the same-compile dense "
                        "baseline keeps it too)")
    p.add_argument("--channels-last", action="store_true",
                   help="model and inputs in channels-last memory format (dense and ATS alike)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:MODULE.ATTR=VALUE,...",
                   help="also run every ATS config with these ats_fx.kernels switches set, e.g. "
                        "'no PDL:pdl.ENABLED=False' (rows labelled '<config> <LABEL>')")
    add_graph_replay_options(p)
    p.add_argument("--out", help="JSON path; a markdown table is written beside it (.md)")
    args = p.parse_args(argv)
    args.inductor = parse_inductor_options(args.inductor)
    run_and_report(args, run, table)


if __name__ == "__main__":
    main()
