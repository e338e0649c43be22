"""Session 17: does a benchmarks.interleaved --variant reach the compiled model's CUDA graphs?

The one-launch stage front (score_sample.ENABLED) was 1.3 us a stage slower at batch 1 and ~19 us
at batch 256 alone in CUDA graphs (stage_front_s17.md), yet the interleaved rounds gave the
default and its "two" variant the same speed to 0.1% (interleaved_s17_*.md), as session 12's
one-launch stage once did. This compiles DeiT-S rho=0.87 twice exactly as benchmarks.interleaved
does (same base module, no dynamo reset, switches set through compile and recording), then
counts which stage kernels each model's replays launch, and how often the Python front ran.

    PYTHONPATH=. python benchmarks/sessions/s17_variant_check.py [--copy]

With --copy each model compiles its own deep copy of the base module (tried as a fix: no help).
Ran at commit 5681c5a plus the score_sample switch; ``kernels/score_sample.py`` was removed after
b50520a, so run it from there (git checkout b50520a). The fix (a fresh backend function per
compile_model call) is tested on the CPU in tests/test_benchmark_compile.py.
"""
from __future__ import annotations

import copy
import sys
from collections import Counter

import timm
import torch
from torch.profiler import ProfilerActivity, profile

from ats_fx.kernels import score_sample
from benchmarks.compiled import compile_model, set_switches

NAMES = ("_score_sample_kernel", "_head_logits_kernel", "_sample_kernel", "_attention_kernel")


def stage_kernels(model, x) -> Counter:
    with torch.no_grad():
        model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(x)
            torch.cuda.synchronize()
    return Counter(e.name for e in prof.events() if e.name in NAMES)


def main() -> None:
    calls = Counter()
    real = score_sample.score_and_sample

    def counted(*a, **kw):
        calls[current] += 1
        return real(*a, **kw)

    score_sample.score_and_sample = counted
    torch.manual_seed(0)
    base = timm.create_model("deit_small_patch16_224", pretrained=False).eval().cuda().half()
    inputs = {b: torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.half) for b in (1, 64, 256)}
    models = {}
    for current, variant in (("one", None), ("two", "two:score_sample.ENABLED=False")):
        restore = set_switches(variant)
        try:
            module = copy.deepcopy(base) if "--copy" in sys.argv else base
            model = compile_model(module, "multi rho=0.87", "reduce-overhead")
            first = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.half)
            torch._dynamo.mark_dynamic(first, 0)
            with torch.no_grad():
                model(first)
                for x in inputs.values():
                    model(x)
            torch.cuda.synchronize()
        finally:
            restore()
        models[current] = model
        print(f"{current}: front calls while compiling and recording: {calls[current]}", flush=True)
    for current, model in models.items():
        for b in (1, 256):
            before = calls[current]
            print(f"{current} batch {b}: {dict(stage_kernels(model, inputs[b]))}; "
                  f"front calls in the traced calls {calls[current] - before}", flush=True)


if __name__ == "__main__":
    main()
