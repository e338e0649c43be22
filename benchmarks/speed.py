"""The speed matrix: ATS against the dense model run the same way, on a GPU, into the results file.

    python -m benchmarks.speed                       # the whole matrix (DeiT-S, ViT-B/16, BEiTv2-B, EVA02-S)
    python -m benchmarks.speed --device cpu --dtype float32 --runs eager --batches 1 8 64   # on the CPU
    python -m benchmarks.speed --models deit_small_patch16_224 --runs eager --batches 1 256

For each model (timm, random weights from seed 0), each way of running it and each batch, the ATS
configurations and the dense baseline are timed in one process, in rotating rounds
(``harness.rounds``; wall time per call, host included). Ways of running ("runs"):

- ``eager``: ``ats_fx.transform(model, stages, ratio=/k=)`` with its default arguments, against the
  dense model; ``--eager-paddings`` adds each padding as its own configuration ("... padding=static").
  ``--variants`` adds, in every run, each point with ats_fx's own choices switched
  (``benchmarks.variants``: "... overlap=off" runs the stages one after another at batch 1 too), the
  A/B of a decision timed like everything else.
- ``eager:no-graphs``: the same with ``cuda_graphs=False``, every launch issued from the host (what
  a user who turns graphs off gets), against the dense model; not in the default matrix.
- ``eager:autograd``: ``eager`` called with autograd on (eval mode, no ``torch.no_grad()``: how a
  user first tries a model), the dense model too; not in the default matrix.
- ``compile:MODE``: ``torch.compile(model, backend="ats", options={..., "mode": MODE})`` against plain
  ``torch.compile(model, mode=MODE)`` (``default`` is no mode). One compiled module per configuration,
  called at every batch as a user would (Dynamo recompiles once for a dynamic batch).

Rows appended per cell: ``img_s``, ``speedup`` (median over rounds against the dense model of the same
run, with ``speedup_min``/``speedup_max``), ``speedup_vs_eager_dense`` for compiled runs,
``speedup_vs_graphed_dense`` for eager runs on CUDA (the dense model replayed as CUDA graphs, as the
eager ATS model is at inference: what ATS itself adds), and, once per
model and configuration, ``flops_ratio`` (dense / ATS GFLOPs per image, FlopCounterMode, the method's
rows) and ``stage_host_us`` (host time of one eager call of the first stage at batch 1: its launches
and the torch ops around it).

Against an earlier commit on the same machine (did a change cost speed?), time that commit's
``ats_fx`` with this benchmark, then this tree's, so the README keeps showing the current rows::

    mkdir -p /tmp/earlier && git archive 08373e4 ats_fx | tar -x -C /tmp/earlier
    PYTHONPATH=/tmp/earlier:. ATS_FX_COMMIT=08373e4 python -m benchmarks.speed --runs compile:reduce-overhead
    python -m benchmarks.speed --runs compile:reduce-overhead

Rows name the commit whose ``ats_fx`` ran (``ATS_FX_COMMIT``), and each run has its dense baseline
in its own process, so compare speed-ups, not img/s. Compiled runs need only ``transform``,
``count_flops`` and the ``ats`` backend of that commit.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

import ats_fx
from benchmarks import harness, variants

log = logging.getLogger("benchmarks.speed")

MODELS = ["deit_small_patch16_224", "vit_base_patch16_224", "beitv2_base_patch16_224", "eva02_small_patch14_224"]
RUNS = ["eager", "compile:default", "compile:reduce-overhead"]
EAGER_RUNS = ("eager", "eager:no-graphs", "eager:autograd")
DENSE = "dense"
GRAPHED_DENSE = "dense, CUDA graphs"


def point_kwargs(label: str) -> dict:
    """``"multi rho=0.87"`` -> transform keywords (a `` padding=X`` suffix adds ``padding``; switches,
    ``benchmarks.variants``, are applied by ``callers``)."""
    point, transform_kw, _ = variants.parse(label)
    stages, ratio, k = harness.POINTS[point]
    kw = {"stages": stages, "ratio": ratio, "k": k, **transform_kw}
    return {key: v for key, v in kw.items() if v is not None}


def callers(models: dict[str, Callable]) -> dict[str, Callable]:
    """Each model as the benchmark calls it: with its label's ats_fx switches set around each call, the
    others as they are."""
    out = {}
    for label, model in models.items():
        switches = {} if label == DENSE else variants.parse(label)[2]
        out[label] = variants.Switched(model, switches) if switches else model
    return out


def build_models(base: torch.nn.Module, run: str, configs: list[str], device, dtype) -> dict[str, Callable]:
    """The dense model and each configuration's ATS model, as ``run`` runs them."""
    if run in EAGER_RUNS:
        return eager_models(base, configs, device, dtype, cuda_graphs=run != "eager:no-graphs")
    return compiled_models(base, configs, run.split(":", 1)[1], device, dtype)


def eager_models(base: torch.nn.Module, configs: list[str], device, dtype,
                 cuda_graphs: bool = True) -> dict[str, torch.nn.Module]:
    """The dense model and one ``ats_fx.transform`` per configuration (captured on the CPU in float32,
    then moved, as a user converting a checkpoint would)."""
    models = {DENSE: copy.deepcopy(base).to(device, dtype)}
    for label in configs:
        models[label] = ats_fx.transform(base, **point_kwargs(label), cuda_graphs=cuda_graphs).to(device, dtype)
    return models


def compiled_models(base: torch.nn.Module, configs: list[str], mode: str, device, dtype) -> dict[str, Callable]:
    """Plain ``torch.compile`` of the dense model and ``backend="ats"`` per configuration, same mode."""
    torch._dynamo.reset()
    allow_recompiles(2 * (len(configs) + 1))
    torch_mode = None if mode == "default" else mode
    models = {DENSE: torch.compile(copy.deepcopy(base).to(device, dtype), mode=torch_mode)}
    for label in configs:
        options = {**point_kwargs(label), "mode": mode}
        # A configuration with switches gets a backend of its own, or it would run the compiled graph
        # of the configuration with the same options (variants.own_backend).
        backend = variants.own_backend() if variants.parse(label)[2] else "ats"
        models[label] = torch.compile(copy.deepcopy(base).to(device, dtype), backend=backend, options=options)
    return models


def allow_recompiles(entries: int) -> None:
    """Let Dynamo hold ``entries`` compiled graphs of one frame, and fail rather than fall back past that.

    Every configuration's model and the dense one share timm's ``forward``, and Dynamo counts the
    graphs it holds per frame (``recompile_limit``, 8 by default): each model compiles once at batch 1
    and once more for a dynamic batch. Past the limit Dynamo runs the frame *uncompiled*, so an ATS
    configuration silently timed the dense eager model (an A/B of three switches at batches 1 and 8
    gave 0.22x for its last two arms)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, entries)
    if hasattr(config, "fail_on_recompile_limit_hit"):  # torch >= 2.6
        config.fail_on_recompile_limit_hit = True


def flops_ratio(base: torch.nn.Module, label: str, x: torch.Tensor) -> float:
    """Dense / ATS GFLOPs per image on ``x`` (each image alone: the method's adaptive count)."""
    kw = {**point_kwargs(label), "padding": "batch_max"}  # the rows the method keeps
    ats = ats_fx.transform(base, **kw)
    dense = float(ats_fx.count_flops(base, x).mean())
    return dense / float(ats_fx.count_flops(ats, x).mean())


def stage_host_us(model: torch.nn.Module, x: torch.Tensor, calls: int = 200) -> float:
    """Host time of one call of the model's first ATS stage, inputs as the forward pass gave them.
    At batch 1 the GPU finishes each kernel long before the host issues the next, so the loop measures
    the host (with batch_max padding that includes the stage's own read of the batch width)."""
    stage = next(m for m in model.modules() if isinstance(m, ats_fx.ops.ATSStage))
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("call", (args, kwargs))

    handle = stage.register_forward_pre_hook(grab, with_kwargs=True)
    graphed, model.ats_cuda_graphs = model.ats_cuda_graphs, False  # a replay calls no module
    with torch.no_grad():
        model(x)
    model.ats_cuda_graphs = graphed
    handle.remove()
    args, kwargs = seen["call"]
    with torch.no_grad():
        for _ in range(10):
            stage(*args, **kwargs)
        harness.sync(x.device)
        t0 = time.perf_counter()
        for _ in range(calls):
            stage(*args, **kwargs)
        host = time.perf_counter() - t0
        harness.sync(x.device)
    return host / calls * 1e6


def _switched_host_us(label: str, model: torch.nn.Module, x: torch.Tensor) -> float:
    """``stage_host_us`` with the configuration's switches set (a stage without graphs decides at each call)."""
    with variants.switched(variants.parse(label)[2]):
        return stage_host_us(model, x)


def _with_grad(model: torch.nn.Module, x: torch.Tensor):
    with torch.enable_grad():
        return model(x)


def measure_run(name: str, base, run: str, configs: list[str], batches: list[int], args, device,
                dtype) -> Iterator[list[dict]]:
    """Every batch of one (model, run): each batch's rows for the results file, as soon as they are
    measured (a run cut off by a time limit keeps the batches it finished)."""
    models = build_models(base, run, configs, device, dtype)
    calls = callers(models)
    eager_dense = graphed_dense = None
    if run not in EAGER_RUNS:
        eager_dense = copy.deepcopy(base).to(device, dtype)
    elif run == "eager" and device.type == "cuda":
        # An eager ATS model replays CUDA graphs at inference (ats_fx/graphs.py): the dense model replayed
        # the same way tells what ATS itself adds.
        from ats_fx import graphs  # here, not at the top: an earlier commit's ats_fx may have no graphs.py

        cache, dense = graphs.GraphCache(), models[DENSE]
        graphed_dense = lambda x: cache(dense.forward, list, [x])  # noqa: E731
    for batch in batches:
        rows = []
        x = torch.randn(batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
        if run == "eager:autograd":  # harness.time_ms turns autograd off; turn it back on inside the call
            fns = {label: (lambda m=m: _with_grad(m, x)) for label, m in calls.items()}
        else:
            fns = {label: (lambda m=m: m(x)) for label, m in calls.items()}
        if eager_dense is not None:
            fns["eager dense"] = lambda: eager_dense(x)
        if graphed_dense is not None:
            fns[GRAPHED_DENSE] = lambda: graphed_dense(x)
        t0 = time.time()
        times = harness.rounds(fns, device, args.rounds, args.budget_ms)
        ups = harness.speedups(times, DENSE)
        vs_eager = harness.speedups(times, "eager dense") if eager_dense is not None else {}
        vs_graphed = harness.speedups(times, GRAPHED_DENSE) if graphed_dense is not None else {}
        # How the cell was timed goes with it: at 200 ms a measurement a batch-256 cell's rounds spread
        # by up to 16%, so the number of rounds and the time per measurement say how far its median goes.
        cell = {"benchmark": "speed", "model": name, "run": run, "batch": batch, "dtype": args.dtype,
                "cudnn_benchmark": torch.backends.cudnn.benchmark, "rounds": args.rounds,
                "budget_ms": args.budget_ms}
        for label in [*models, *([GRAPHED_DENSE] if graphed_dense is not None else [])]:
            ms = sorted(times[label])[len(times[label]) // 2]
            base_row = {**cell, "config": label}
            rows.append({**base_row, "metric": "img_s", "value": batch / ms * 1e3})
            if label in (DENSE, GRAPHED_DENSE):
                continue
            med, lo, hi = ups[label]
            rows += [{**base_row, "metric": "speedup", "value": med},
                     {**base_row, "metric": "speedup_min", "value": lo},
                     {**base_row, "metric": "speedup_max", "value": hi}]
            if vs_eager:
                rows.append({**base_row, "metric": "speedup_vs_eager_dense", "value": vs_eager[label][0]})
            if vs_graphed:
                rows.append({**base_row, "metric": "speedup_vs_graphed_dense", "value": vs_graphed[label][0]})
        log.info("%s %s batch %d: %s (%.0f s)", name, run, batch,
                 ", ".join(f"{k} {v[0]:.3f}x" for k, v in ups.items() if k != DENSE), time.time() - t0)
        yield rows
    if run == "eager" and 1 in batches:
        x = torch.randn(1, 3, args.img_size, args.img_size, device=device, dtype=dtype)
        yield [{"benchmark": "speed", "model": name, "run": "eager", "batch": 1, "dtype": args.dtype,
                "cudnn_benchmark": torch.backends.cudnn.benchmark, "config": label, "metric": "stage_host_us",
                "value": _switched_host_us(label, m, x)}
               for label, m in models.items() if label != DENSE]


def check_tree() -> None:
    """Refuse to label rows with this tree's commit when ``ats_fx`` was imported from elsewhere."""
    tree = Path(ats_fx.__file__).resolve().parents[1]
    if tree != Path(__file__).resolve().parents[1] and not os.environ.get("ATS_FX_COMMIT"):
        raise SystemExit(f"ats_fx comes from {tree}, not this checkout: set ATS_FX_COMMIT to the commit it "
                         "holds, so the rows name the code that ran")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--runs", nargs="+", default=RUNS, help="eager and/or compile:<mode>")
    p.add_argument("--points", nargs="+", default=["multi rho=0.87", "single K=108"], choices=list(harness.POINTS))
    p.add_argument("--eager-paddings", nargs="*", default=[], choices=["batch_max", "static"],
                   help="also time eager ATS with each padding named, as its own configuration")
    p.add_argument("--variants", nargs="*", default=[],
                   help="also time each point with these ats_fx switches, as its own configuration in every run "
                        "(benchmarks.variants), e.g. overlap=off 'overlap=off pdl=off'")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64, 256])
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3)
    # 1 s a measurement: at batch 256 a 200 ms one holds about eight forward passes, and its rounds spread
    # by 3-16%; with 1 s they spread by 0.3-1.1% (H100, docs/performance.md).
    p.add_argument("--budget-ms", type=float, default=1000.0, help="time per measurement")
    p.add_argument("--flops-images", type=int, default=8)
    p.add_argument("--results", type=Path, default=harness.RESULTS)
    p.add_argument("--deadline", type=float, default=None, help="seconds; start no new (model, run) after it")
    p.add_argument("--device", default="cuda", help="cpu: the same matrix on the CPU (use --dtype float32)")
    # Off by default, as a user runs a model. On, cuDNN times its algorithms for the dense model's
    # patch-embedding conv, which backend="ats" replaces by a GEMM (passes/patchify.py): that lowered
    # DeiT-S's reduce-overhead speed-up at batch 256 from 1.71x to 1.58x (H100; docs/performance.md).
    p.add_argument("--cudnn-benchmark", default="off", choices=["on", "off"],
                   help="torch.backends.cudnn.benchmark (off: cuDNN's heuristics, torch's default); rows record it")
    args = p.parse_args(argv)
    check_tree()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: pass --device cpu --dtype float32 to measure on the CPU")
    start = time.time()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    for name in args.models:
        base = harness.build_timm(name, **({"img_size": args.img_size} if args.img_size != 224 else {}))
        compiled_configs = variants.labels(args.points, args.variants)
        configs = compiled_configs + [f"{pt} padding={pad}" for pt in args.points for pad in args.eager_paddings]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.flops_images, 3, args.img_size, args.img_size, generator=g)
        rows = [{"benchmark": "speed", "model": name, "run": "any", "batch": 0, "dtype": "float32", "config": pt,
                 "metric": "flops_ratio", "value": flops_ratio(base, pt, x)} for pt in args.points]
        harness.append(rows, args.results, device)
        for run in args.runs:
            if args.deadline and time.time() - start > args.deadline:
                log.warning("deadline reached: %s %s not measured", name, run)
                continue
            run_configs = configs if run in EAGER_RUNS else compiled_configs
            n = sum(harness.append(rows, args.results, device)
                    for rows in measure_run(name, base, run, run_configs, args.batches, args, device, dtype))
            log.info("%s %s: %d rows appended to %s", name, run, n, args.results)


if __name__ == "__main__":
    main()
