"""Tile sizes of the Triton attention kernel (``ats_fx/kernels/attention_rows.py``), swept on the
shapes ATS produces, against two floors: cuDNN/flash SDPA without a mask on the same width, and
flash attention's variable-length path with per-image key counts (``seqused_k``, no packing).

    python -m benchmarks.attention_configs --out benchmarks/results/attention_configs.json

Shapes: the nine stages of DeiT-S at rho=0.87 with static padding (R kept query rows gathered
from T tokens; after the first stage the keys carry a padding mask), at batch 1 and 256, and
three of them with ViT-B's 12 heads. Times: medians of ``triton.testing.do_bench_cudagraph``
(``--no-graphs``: ``do_bench``), as ``mode="reduce-overhead"`` runs the kernel; every config is
checked against the default config's output first.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import re
from pathlib import Path

import torch

from .compiled import kernel_switch, set_switches
from .throughput import bench_ms, environment

log = logging.getLogger(__name__)

# DeiT-S, rho=0.87, static padding: (keys T, kept rows R) of stages 3..11.
CHAIN = [(197, 172), (172, 150), (150, 131), (131, 114), (114, 99), (99, 86), (86, 75), (75, 65), (65, 57)]
SHAPES = (  # batch, heads, tokens T, query rows R (None: a later layer on the T tokens), key mask
    [(B, 6, T, R, T != 197) for B in (1, 256) for T, R in CHAIN]
    + [(B, 12, T, R, T != 197) for B in (1, 256) for T, R in (CHAIN[0], CHAIN[4], CHAIN[8])]
)
# 2 warps only for the 16/32-row tiles, 8 only for 64/128 rows, 4 for all: 32 settings.
CONFIGS = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
           for m, n, w, s in itertools.product([16, 32, 64, 128], [32, 64], [2, 4, 8], [2, 3])
           if (w == 2) == (m <= 32) or w == 4]


def parse_config(text: str) -> dict:
    """'64x128w4s2' -> BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2."""
    m = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"tile setting {text!r}: write it like 64x128w4s2")
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), map(int, m.groups())))


def inputs(B, H, T, R, masked, dtype=torch.float16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, 64, device="cuda", dtype=dtype, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    mask = index = None
    if masked:  # a static-padding stage's keys: each image's real tokens first, the rest padding
        lens = torch.randint(int(0.8 * T), T + 1, (B,), device="cuda", generator=g)
        mask = torch.arange(T, device="cuda")[None] < lens[:, None]
    if R is not None:  # R sorted kept rows per image
        index = torch.rand(B, T, device="cuda", generator=g).argsort(1)[:, :R].sort(1).values
        index[:, 0] = 0
    return q, k, v, index, mask, qkv


def time_ms(fn, graphs: bool) -> float:
    if not graphs:
        return bench_ms(fn, 100)
    from triton.testing import do_bench_cudagraph

    with torch.no_grad():
        return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))


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


@contextlib.contextmanager
def flipped(switches: str):
    """Within the block, the boolean ``ats_fx.kernels`` switches named in ``switches`` (one, or several
    joined by "+", e.g. "attention_rows.Q_FIRST+attention_rows.ONE_RUN_LOOP") are negated."""
    names = switches.split("+")
    restore = set_switches("flipped:" + ",".join(f"{n}={not getattr(*kernel_switch(n))}" for n in names))
    try:
        yield
    finally:
        restore()


def run(args) -> dict:
    from ats_fx.kernels.attention_rows import default_config, launch_attention, multiprocessors

    results = {"env": environment(), "graphs": args.graphs, "compare": args.compare, "unmasked": args.unmasked,
               "rows": []}
    for B, H, T, R, masked in SHAPES:
        if args.batches and B not in args.batches:
            continue
        q, k, v, index, mask, qkv = inputs(B, H, T, R, masked)
        rows = T if R is None else R
        want = launch_attention(q, k, v, index, mask, 0.125, rows)
        base = default_config(rows, 64, B * H, multiprocessors(q.device))
        timings = []
        configs = [] if args.default_only else args.configs or CONFIGS
        for config in configs + ([base] if base not in configs else []):
            try:
                got = launch_attention(q, k, v, index, mask, 0.125, rows, config)
                torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
                fn = lambda: launch_attention(q, k, v, index, mask, 0.125, rows, config)  # noqa: E731
                timings.append((time_ms(fn, args.graphs), config))
            except Exception as err:  # out of shared memory, say: skip the config
                log.info("config %s failed on %s: %s", config, (B, H, T, R), str(err)[:100])
        timings.sort(key=lambda t: t[0])
        default_ms = next(ms for ms, c in timings if c == base)
        row = dict(batch=B, heads=H, tokens=T, rows=rows, stage=R is not None, masked=masked, default=base,
                   default_ms=default_ms, best_ms=timings[0][0], best=timings[0][1], top5=timings[:5],
                   all=[(ms, c) for ms, c in timings])
        for switch in args.compare:  # the default config again with kernel switches flipped ("a+b": both)
            with flipped(switch):
                got = launch_attention(q, k, v, index, mask, 0.125, rows)
                torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
                row[f"default, {switch} flipped"] = time_ms(
                    lambda: launch_attention(q, k, v, index, mask, 0.125, rows), args.graphs)
        if args.unmasked and mask is not None:  # the same tiles without the mask: what the mask costs
            row["default, no mask"] = time_ms(lambda: launch_attention(q, k, v, index, None, 0.125, rows),
                                              args.graphs)
        for name, fn in (floors(q, k, v, mask, qkv, rows) if args.floors else {}).items():
            try:
                row[name] = time_ms(fn, args.graphs)
            except Exception as err:
                row[name] = f"failed: {str(err)[:80]}"
        results["rows"].append(row)
        print({key: val for key, val in row.items() if key not in ("top5", "all")}, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    if args.out:
        Path(args.out).with_suffix(".md").write_text(table(results) + "\n")
    return results


def table(results: dict) -> str:
    env = results["env"]
    how = "do_bench_cudagraph" if results.get("graphs") else "do_bench"
    lines = [f"Device: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; fp16, "
             f"head size 64, median us ({how}).", "",
             "| B | H | keys | rows | mask | default | us | best | us | SDPA no mask us |"
             + "".join(f" {s} flipped us |" for s in results.get("compare", []))
             + (" default without the mask us |" if results.get("unmasked") else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(results.get("compare", []))
             + ("---|" if results.get("unmasked") else "")]

    def short(c):
        return f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}"

    for r in results["rows"]:
        sdpa = r.get("SDPA no mask", "")
        sdpa = f"{sdpa * 1e3:.2f}" if isinstance(sdpa, float) else str(sdpa)
        lines.append(f"| {r['batch']} | {r['heads']} | {r['tokens']} | {r['rows']} | {r['masked']} | "
                     f"{short(r['default'])} | {r['default_ms'] * 1e3:.2f} | {short(r['best'])} | "
                     f"{r['best_ms'] * 1e3:.2f} | {sdpa} |"
                     + "".join(f" {r[f'default, {s} flipped'] * 1e3:.2f} |" for s in results.get("compare", []))
                     + (f" {r['default, no mask'] * 1e3:.2f} |" if "default, no mask" in r
                        else " |" if results.get("unmasked") else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--default-only", action="store_true", help="time the default config only, no sweep")
    p.add_argument("--configs", nargs="*", type=parse_config, default=None, metavar="MxNwWsS",
                   help="sweep these tile settings instead of the 32 built in, e.g. 64x128w4s2")
    p.add_argument("--no-floors", dest="floors", action="store_false", help="skip the SDPA and varlen floors")
    p.add_argument("--batches", nargs="*", type=int, default=None, help="only the shapes of these batch sizes")
    p.add_argument("--compare", nargs="*", default=[], metavar="MODULE.ATTR",
                   help="also time the default config with this boolean ats_fx.kernels switch flipped, "
                        "e.g. attention_rows.ONE_RUN_LOOP; 'a+b' flips both in one timing")
    p.add_argument("--unmasked", action="store_true",
                   help="also time each masked shape's default config without its mask (the same tiles)")
    p.add_argument("--out")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="time with do_bench, not in CUDA graphs")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(table(run(p.parse_args(argv))))


if __name__ == "__main__":
    main()
