"""Tile sizes of the Triton attention kernel (``ats_fx/kernels/attention_rows.py``), swept on the
shapes ATS produces, against two floors: cuDNN/flash SDPA without a mask on the same width, and
flash attention's variable-length path with per-image key counts (``seqused_k``, no packing).

    python -m benchmarks.attention_configs --out benchmarks/results/attention_configs.json

Shapes: a stage (R kept query rows gathered from T tokens), and a later layer (T tokens, the
last ones padding). Times: medians of ``triton.testing.do_bench``; every config is checked
against the default config's output first.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
from pathlib import Path

import torch

from .throughput import bench_ms, environment

log = logging.getLogger(__name__)

SHAPES = [  # batch, heads, tokens T, query rows R (None: a later layer on the T tokens)
    (256, 6, 197, 172), (256, 6, 172, 150), (256, 6, 150, None), (256, 6, 100, None), (256, 6, 66, None),
    (256, 12, 197, 172), (256, 12, 150, None),
    (64, 6, 172, None), (1, 6, 197, 172), (1, 6, 150, None), (1, 12, 150, None),
]
CONFIGS = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
           for m, n, w, s in itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3])]


def inputs(B, H, T, R, dtype=torch.float16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, 64, device="cuda", dtype=dtype, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    if R is not None:  # a stage: R sorted kept rows per image, no key mask (the input is dense)
        index = torch.rand(B, T, device="cuda", generator=g).argsort(1)[:, :R].sort(1).values
        index[:, 0] = 0
        return q, k, v, index, None, qkv
    lens = torch.randint(int(0.8 * T), T + 1, (B,), device="cuda", generator=g)
    mask = torch.arange(T, device="cuda")[None] < lens[:, None]
    return q, k, v, None, mask, qkv


def floors(q, k, v, mask, qkv, rows):
    """Unmasked SDPA on ``rows`` queries (the dense floor) and flash varlen with ``seqused_k``."""
    import torch.nn.functional as F

    B, H, T, D = k.shape
    out = {"SDPA no mask": lambda: F.scaled_dot_product_attention(q[:, :, :rows], k, v)}
    if mask is not None:
        lens = mask.sum(1).to(torch.int32)
        cu = torch.arange(B + 1, device="cuda", dtype=torch.int32) * T
        flat = qkv.reshape(B * T, 3, H, D)

        def varlen():
            return torch.ops.aten._flash_attention_forward(
                flat[:, 0], flat[:, 1], flat[:, 2], cu, cu, T, T, 0.0, False, False, scale=D**-0.5,
                seqused_k=lens)[0]
        out["flash varlen seqused_k"] = varlen
    return out


def run(args) -> dict:
    from ats_fx.kernels.attention_rows import default_config, launch_attention

    results = {"env": environment(), "rows": []}
    for B, H, T, R in SHAPES:
        q, k, v, index, mask, qkv = inputs(B, H, T, R)
        rows = T if R is None else R
        want = launch_attention(q, k, v, index, mask, 0.125, rows)
        base = default_config(rows, 64)
        timings = []
        for config in CONFIGS:
            try:
                got = launch_attention(q, k, v, index, mask, 0.125, rows, config)
                torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
                timings.append((bench_ms(lambda: launch_attention(q, k, v, index, mask, 0.125, rows, config), 100),
                                config))
            except Exception as err:  # out of shared memory, say: skip the config
                log.info("config %s failed on %s: %s", config, (B, H, T, R), str(err)[:100])
        timings.sort(key=lambda t: t[0])
        default_ms = next(ms for ms, c in timings if c == base)
        row = dict(batch=B, heads=H, tokens=T, rows=rows, stage=R is not None, default_ms=default_ms,
                   best_ms=timings[0][0], best=timings[0][1], top5=timings[:5])
        for name, fn in floors(q, k, v, mask, qkv, rows).items():
            try:
                row[name] = bench_ms(fn, 100)
            except Exception as err:
                row[name] = f"failed: {str(err)[:80]}"
        results["rows"].append(row)
        print({key: val for key, val in row.items() if key != "top5"}, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
