"""Attention after an ATS stage: every way to honour the key-padding mask, timed (issue 3, item 3).

    python -m benchmarks.masked_attention --out benchmarks/results/masked_attention.json

After a stage each image keeps K'+p real tokens first and padding after them. Variants, on the
layout timm produces (q, k, v strided views of one qkv tensor, output reshaped to (B, T, C)):

- ``flash, no mask``: SDPA without a mask on the same padded width (the floor, and wrong);
- ``SDPA mask``: SDPA with the (B, 1, 1, T) bool mask, default dispatch (what the reference does);
- ``SDPA mask efficient`` / ``SDPA mask cuDNN``: the same pinned to one backend;
- ``varlen flash``: ``torch.nn.attention.varlen.varlen_attn`` on packed real tokens, packing
  and unpacking included (where this torch has it);
- ``Triton masked``: ats_fx's kernel (``ats_fx/kernels/masked_attention.py``);
- ``rows: ...``: the stage's own attention for 0.87 T kept query rows, by SDPA with the mask on
  gathered queries (the reference) and by ``ats_fx/kernels/attention_rows.py``.

Times are medians of ``triton.testing.do_bench``; each variant is checked against SDPA with the
mask on the real rows first.
"""
from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F

from .throughput import bench_ms, environment, run_and_report

log = logging.getLogger(__name__)


def make_inputs(B, H, T, D, dtype, low, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, D, device="cuda", dtype=dtype, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    lens = torch.randint(int(low * T), T + 1, (B,), device="cuda", generator=g)
    lens[0] = T
    mask = torch.arange(T, device="cuda")[None] < lens[:, None]
    return q, k, v, mask, lens


def variants(q, k, v, mask, lens):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ats_fx.kernels.attention_rows import attention_rows
    from ats_fx.kernels.masked_attention import masked_attention

    B, H, T, D = q.shape
    m4 = mask[:, None, None, :]

    def out_btc(o):
        return o.transpose(1, 2).reshape(B, T, H * D)

    def pinned(backend):
        def run():
            with sdpa_kernel([backend]):
                return out_btc(F.scaled_dot_product_attention(q, k, v, attn_mask=m4))
        return run

    out = {
        "flash, no mask (floor)": lambda: out_btc(F.scaled_dot_product_attention(q, k, v)),
        "SDPA mask": lambda: out_btc(F.scaled_dot_product_attention(q, k, v, attn_mask=m4)),
        "SDPA mask efficient": pinned(SDPBackend.EFFICIENT_ATTENTION),
        "SDPA mask cuDNN": pinned(SDPBackend.CUDNN_ATTENTION),
        "Triton masked": lambda: out_btc(masked_attention(q, k, v, mask, D ** -0.5)),
    }
    # The stage's own attention: the kept rows only (R of T queries, prefix first).
    R = max(1, int(0.87 * T))
    index = torch.sort(torch.rand(B, T, device=q.device)[:, 1:].topk(R - 1, dim=1).indices + 1, dim=1).values
    index = torch.cat([index.new_zeros(B, 1), index], dim=1)
    rows_q = (index[:, None, :, None].expand(B, H, R, D))

    def rows_sdpa():
        o = F.scaled_dot_product_attention(q.gather(2, rows_q), k, v, attn_mask=m4)
        return o.transpose(1, 2).reshape(B, R, H * D)

    out["rows: SDPA mask on gathered queries"] = rows_sdpa
    out["rows: Triton (gathers in-kernel)"] = lambda: attention_rows(q, k, v, index, mask, D ** -0.5).transpose(
        1, 2).reshape(B, R, H * D)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    if varlen_attn is not None:
        real = mask.reshape(-1).nonzero().squeeze(1)
        cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        max_len = int(lens.max())

        def varlen():
            def pack(t):
                return t.transpose(1, 2).reshape(B * T, H, D).index_select(0, real)
            o = varlen_attn(pack(q), pack(k), pack(v), cu, cu, max_len, max_len)
            full = o.new_zeros(B * T, H, D).index_copy_(0, real, o)
            return full.reshape(B, T, H * D)
        out["varlen flash (pack+unpack)"] = varlen
    return out


def run(args) -> dict:
    results = {"env": environment(), "rows": []}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for B, H in args.shapes:
            for T in args.tokens:
                q, k, v, mask, lens = make_inputs(B, H, T, 64, dtype, args.low)
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None, None, :])
                ref = ref.transpose(1, 2).reshape(B, T, -1)
                real = mask[:, :, None]
                fns = variants(q, k, v, mask, lens)
                for name, fn in fns.items():
                    row = dict(dtype=dtype_name, batch=B, heads=H, tokens=T, mean_real=float(lens.float().mean()),
                               variant=name)
                    try:
                        with torch.no_grad():
                            got = fn().float()
                        if name.startswith("rows:"):  # checked against the other rows variant
                            want = fns["rows: SDPA mask on gathered queries"]().float()
                            err = (got - want).abs().max().item()
                        else:
                            err = (got - ref).abs().masked_fill(~real, 0).max().item()
                        row["max_err"] = err
                        row["ms"] = bench_ms(fn, args.rep)
                    except Exception as e:  # a backend that refuses this input
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                    results["rows"].append(row)
                    log.info("%s", row)
    return results


def table(results: dict) -> str:
    env = results["env"]
    lines = [f"Device: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}. head_dim 64; "
             "real tokens per image uniform in [low*T, T]; ms = median do_bench; x = time / 'SDPA mask' time "
             "(lower is better); max_err vs float32 SDPA on real rows.",
             "",
             "| dtype | batch | heads | T | mean real | variant | ms | x SDPA mask | max_err |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in results["rows"]:
        if r["variant"] == "SDPA mask" and "ms" in r:
            base[(r["dtype"], r["batch"], r["heads"], r["tokens"])] = r["ms"]
    for r in results["rows"]:
        key = (r["dtype"], r["batch"], r["heads"], r["tokens"])
        if "ms" not in r:
            lines.append(f"| {r['dtype']} | {r['batch']} | {r['heads']} | {r['tokens']} | {r['mean_real']:.0f} | "
                         f"{r['variant']} | {r.get('error', '')} | | |")
            continue
        rel = r["ms"] / base[key] if key in base else float("nan")
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['heads']} | {r['tokens']} | {r['mean_real']:.0f} | "
                     f"{r['variant']} | {r['ms']:.4f} | {rel:.2f} | {r['max_err']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    p.add_argument("--shapes", nargs="+", default=["256x6", "256x12", "64x6"],
                   help="BATCHxHEADS (DeiT-S has 6 heads, ViT-B 12)")
    p.add_argument("--tokens", nargs="+", type=int, default=[197, 172, 129])
    p.add_argument("--low", type=float, default=0.85, help="fewest real tokens per image, as a share of T")
    p.add_argument("--rep", type=int, default=200)
    p.add_argument("--out", help="JSON path; a markdown table is written beside it (.md)")
    args = p.parse_args(argv)
    args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    run_and_report(args, run, table)


if __name__ == "__main__":
    main()
