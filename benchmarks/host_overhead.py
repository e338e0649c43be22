"""Host (Python) time of one eager forward pass: where an ATS stage spends CPU time.

    python -m benchmarks.host_overhead --model deit_small_patch16_224 --out benchmarks/results/host_overhead.txt

Eager inference of a small batch is bound by the host: the GPU waits for Python to issue kernels.
Prints the wall time per forward at batch 1 for the dense model, the captured graph (no rewrite),
and ATS, then a cProfile of the ATS forward sorted by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch

import ats_fx
from ats_fx.passes.capture import capture


def wall_ms(fn, x, n: int = 200) -> float:
    with torch.no_grad():
        for _ in range(20):
            fn(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn(x)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main(argv=None) -> None:
    import timm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--stages", default="3-11")
    p.add_argument("--ratio", type=float, default=0.87)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args(argv)
    dense = timm.create_model(args.model).eval()
    x = torch.randn(args.batch, 3, 224, 224, device="cuda", dtype=torch.float16)
    lines = []
    graph = capture(dense, (torch.randn(2, 3, 224, 224),)).cuda().half()
    models = {"dense": dense.cuda().half(), "captured graph": graph}
    for padding in ("batch_max", "static"):
        models[f"ats {padding}"] = ats_fx.transform(dense, args.stages, ratio=args.ratio, padding=padding,
                                                    check_inputs=False).cuda().half()
    for name, m in models.items():
        lines.append(f"{name}: {wall_ms(m, x):.3f} ms per forward (batch {args.batch}, float16)")
    ats = models["ats batch_max"]
    with torch.no_grad():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            ats(x)
        torch.cuda.synchronize()
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(35)
    text = "\n".join(lines) + "\n\ncProfile of 50 ATS forwards:\n" + buf.getvalue()
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
