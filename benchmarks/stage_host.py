"""Where the host time of one eager ATS stage goes, piece by piece, into the results file.

    python -m benchmarks.stage_host                     # DeiT-S, batch 1, fp16, on the GPU
    python -m benchmarks.stage_host --device cpu --dtype float32

Without CUDA graphs an eager ATS model at batch 1 is host-bound: the GPU finishes each kernel long
before the host issues the next, so a forward pass costs what its Python, launches and host reads
cost. This times, with no synchronisation inside the loop, each piece of the model's first stage on
the inputs the forward pass gave it, beside the attention call it replaces (SDPA) and the input check
every call makes. On CUDA the pieces are the stage's Triton launches (head logits, sampling with its
width read, kept-row attention, the residual gather-add), a 3-argument Triton kernel (the cost of a
launch itself) and, where this Triton exposes it, the head-logits kernel launched through its
compiled kernel with every argument bound beforehand: the floor any launcher could reach.

Rows: ``benchmark="stage_host"``, ``metric="host_us"``, ``config`` = the piece.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch

import ats_fx
from ats_fx import ops
from benchmarks import harness

log = logging.getLogger("benchmarks.stage_host")


def host_us(fn: Callable[[], object], device: torch.device, calls: int = 300) -> float:
    """Host time of one call: ``calls`` calls with no synchronisation between them."""
    with torch.no_grad():
        for _ in range(10):
            fn()
        harness.sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - t0
        harness.sync(device)
    return elapsed / calls * 1e6


def stage_inputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[ops.ATSStage, tuple, dict]:
    """The model's first ATS stage and the arguments the forward pass called it with."""
    stage = next(m for m in model.modules() if isinstance(m, ops.ATSStage))
    seen: dict = {}
    handle = stage.register_forward_pre_hook(lambda mod, a, kw: seen.setdefault("call", (a, kw)), with_kwargs=True)
    with torch.no_grad():
        model(x)
    handle.remove()
    args, kwargs = seen["call"]
    return stage, args, kwargs


def _triton_pieces(stage: ops.ATSStage, q, k, v, device) -> dict[str, Callable[[], object]]:
    import triton
    import triton.language as tl

    from ats_fx.kernels import scores
    from ats_fx.kernels.attention_rows import launch_attention
    from ats_fx.kernels.gather_add import gather_add
    from ats_fx.kernels.sample import sample_with_budget

    @triton.jit
    def copy_kernel(X, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(X + i, tl.load(X + i, mask=i < n), mask=i < n)

    p, ratio, k_tokens = stage.num_prefix, stage.ratio, stage.k
    heads = scores.head_scores(q, k, v, None, stage.scale, stage.score)
    index, _, _, _, stats, _ = sample_with_budget(heads, None, p, ratio, k_tokens, None, None, stats=True)
    width = int(stats[0])
    index = index[:, :width].contiguous()
    B, H, T, D = q.shape
    x = torch.randn(B, T, H * D, device=device, dtype=q.dtype)
    y = torch.randn(B, width, H * D, device=device, dtype=q.dtype)
    buf = torch.zeros(64, device=device)
    pieces = {
        "triton launch, 3 arguments": lambda: copy_kernel[(1,)](buf, 64, BLOCK=64),
        "head logits (triton)": lambda: scores.head_scores(q, k, v, None, stage.scale, stage.score),
        "sampling + width read (triton)": lambda: sample_with_budget(heads, None, p, ratio, k_tokens, None, None,
                                                                     stats=True)[4].tolist(),
        "kept-row attention (triton)": lambda: launch_attention(q, k, v, index, None, stage.scale, width),
        "gather-add (triton)": lambda: gather_add(x, index, y),
    }
    floor = _prebound_head_logits(q, k, v, stage)
    if floor is not None:
        pieces["head logits, arguments pre-bound"] = floor
    return pieces


def _prebound_head_logits(q, k, v, stage: ops.ATSStage) -> Optional[Callable[[], object]]:
    """The head-logits kernel launched through Triton's compiled kernel with every argument bound once
    (nothing derived per call): the floor of any launcher. None where this Triton's internals differ."""
    from ats_fx.kernels import scores

    calls = []
    real = scores._head_logits_kernel

    class Spy:  # records the arguments head_scores launches with, and the compiled kernel
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                compiled = real[grid](*args, **kwargs)
                calls.append((grid, args, kwargs, compiled))
                return compiled
            return launch

    scores._head_logits_kernel = Spy()
    try:
        scores.head_scores(q, k, v, None, stage.scale, stage.score)
    finally:
        scores._head_logits_kernel = real
    grid, args, kwargs, compiled = calls[0]
    try:
        names = tuple(real.signature.parameters)[len(args):]
        bound = args + tuple(kwargs[n] for n in names)
        run, function, meta = compiled.run, compiled.function, compiled.packed_metadata
        stream = torch.cuda.current_stream(q.device).cuda_stream
        launch = lambda: run(grid[0], grid[1], grid[2], stream, function, meta, None, None, None, *bound)  # noqa: E731
        launch()
    except (AttributeError, KeyError, TypeError) as err:  # another Triton: no floor row
        log.warning("no pre-bound launch with this Triton (%s)", err)
        return None
    return launch


def measure(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Host microseconds of each piece of the first stage of ``model`` (an eager ATS model) on ``x``."""
    stage, args, kwargs = stage_inputs(model, x)
    q, k, v = args[:3]
    scale = stage.scale
    pieces = {
        "stage (whole call)": lambda: stage(*args, **kwargs),
        "sdpa (the dense layer's attention)": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, scale=scale),
        "input finite check": lambda: ops.check_finite(x),
        "torch.empty": lambda: torch.empty(4, device=x.device),
    }
    if x.is_cuda:
        pieces.update(_triton_pieces(stage, q, k, v, x.device))
    return {label: host_us(fn, x.device) for label, fn in pieces.items()}


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "vit_base_patch16_224"])
    p.add_argument("--point", default="multi rho=0.87", choices=list(harness.POINTS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--device", default="cuda")
    p.add_argument("--results", type=Path, default=harness.RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: pass --device cpu --dtype float32 to measure on the CPU")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    stages, ratio, k = harness.POINTS[args.point]
    for name in args.models:
        base = harness.build_timm(name, **({"img_size": args.img_size} if args.img_size != 224 else {}))
        model = ats_fx.transform(base, stages, ratio=ratio, k=k, cuda_graphs=False).to(device, dtype)
        x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
        times = measure(model, x)
        rows = [{"benchmark": "stage_host", "model": name, "batch": args.batch, "dtype": args.dtype,
                 "config": f"{args.point}: {label}", "metric": "host_us", "value": us}
                for label, us in times.items() if math.isfinite(us)]
        harness.append(rows, args.results, device)
        log.info("%s: %s", name, ", ".join(f"{label} {us:.1f} us" for label, us in times.items()))


if __name__ == "__main__":
    main()
