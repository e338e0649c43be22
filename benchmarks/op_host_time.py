"""Host time of one call of each ATS operator and of its parts, on a CUDA device: what a compiled
model without CUDA graphs pays per stage on the CPU (issue 4, ``mode="default"``).

    python -m benchmarks.op_host_time --out benchmarks/results/op_host_time.json

A DeiT-S stage's inputs at batch 1 (the GPU finishes each kernel long before the host issues the
next, so the loop measures the host alone): ``time.perf_counter`` over 2000 calls, no sync inside.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ats_fx import library
from ats_fx.kernels.attention_rows import launch_attention
from ats_fx.kernels.sample import sample_with_budget
from ats_fx.kernels.scores import head_scores
from benchmarks.throughput import environment


def host_us(fn, calls: int = 2000) -> float:
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--out")
    args = p.parse_args(argv)
    B, H, T, D = args.batch, args.heads, args.tokens, 64
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.float16) for _ in range(3))
    W = T  # rho=1.0 static: K + p = T
    sample_args = (q, k, v, None, 1, D ** -0.5, 1.0, None, "attn_vnorm", W, False, "auto")
    index, mask, _, _ = library.sample_tokens_impl(*sample_args)
    heads = head_scores(q, k, v, None, D ** -0.5)
    cases = {
        "torch.empty (B, W) int64": lambda: torch.empty(B, W, device="cuda", dtype=torch.int64),
        "head_scores (Triton launch + empty)": lambda: head_scores(q, k, v, None, D ** -0.5),
        "sample_with_budget (Triton launch + 4 empties)": lambda: sample_with_budget(
            heads, None, 1, 1.0, None, W, None, stats=False),
        "sample_tokens_impl (direct)": lambda: library.sample_tokens_impl(*sample_args),
        "torch.ops.ats_fx.sample_tokens": lambda: torch.ops.ats_fx.sample_tokens(*sample_args),
        "sample_tokens batch_max (direct, one host read)": lambda: library.sample_tokens_impl(
            *sample_args[:9], -1, False, "auto"),
        "launch_attention (direct)": lambda: launch_attention(q, k, v, index, None, D ** -0.5, W),
        "torch.ops.ats_fx.attention_rows": lambda: torch.ops.ats_fx.attention_rows(q, k, v, index, None, D ** -0.5),
        "torch.ops.ats_fx.attention_rows, key mask": lambda: torch.ops.ats_fx.attention_rows(
            q, k, v, None, mask, D ** -0.5),
    }
    rows = {}
    with torch.no_grad():
        for name, fn in cases.items():
            rows[name] = host_us(fn)
            print(f"{rows[name]:8.1f} us  {name}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"env": environment(), "shape": [B, H, T, D], "host_us": rows}, indent=1))


if __name__ == "__main__":
    main()
