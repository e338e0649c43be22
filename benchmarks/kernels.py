"""Each Triton kernel alone, against its PyTorch reference, at the shapes an ATS stage makes.

    python -m benchmarks.kernels                          # GPU: DeiT-S and ViT-B/16 stage shapes, fp16
    python -m benchmarks.kernels --device cpu --shapes 2,2,17,8   # the harness on Triton's interpreter

For each shape (batch, heads, tokens, head dim) and kernel: the largest difference from the reference
(computed in float32 on the same inputs; sampled indices must be equal), and the time of the kernel and
of the reference in the model's dtype, which eager would run instead (wall time per call, host included). Rows go to the results file with benchmark "kernels":
metrics ``ms`` (config "triton" / "reference"), ``speedup`` and ``max_abs_error`` (or ``equal`` for
the sampling's indices).
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional

import torch

from benchmarks import harness

log = logging.getLogger("benchmarks.kernels")

# DeiT-S (6 heads) and ViT-B/16 (12 heads) at 224 px: 197 tokens, head dim 64.
SHAPES = [(1, 6, 197, 64), (256, 6, 197, 64), (1, 12, 197, 64), (64, 12, 197, 64)]
RATIO = 0.87


def _inputs(B: int, H: int, T: int, D: int, device, dtype):
    g = torch.Generator(device=device).manual_seed(B * 1000 + T)
    qkv = torch.randn(B, T, 3, H, D, device=device, dtype=dtype, generator=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, as a fused qkv projection makes them
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[1::2, T - T // 4:] = False  # every other image padded, real keys first (as a stage leaves them)
    return q, k, v, mask


def cases(B: int, H: int, T: int, D: int, device, dtype) -> dict:
    """kernel -> (triton fn, reference fn, comparison of their outputs)."""
    from ats_fx.kernels import reference
    from ats_fx.kernels.attention_rows import attention_rows
    from ats_fx.kernels.gather_add import gather_add
    from ats_fx.kernels.masked_attention import masked_attention
    from ats_fx.kernels.received import received_scores
    from ats_fx.kernels.sample import inverse_transform_sample
    from ats_fx.kernels.scores import class_token_scores

    q, k, v, mask = _inputs(B, H, T, D, device, dtype)
    scale = D ** -0.5
    scores = reference.class_token_scores(q, k, v, mask, 1, scale)
    budget = reference.token_budget(mask, B, T, 1, RATIO, None, device)
    index, _, _ = reference.inverse_transform_sample(scores, mask, budget, 1)
    x = torch.randn(B, T, H * D, device=device, dtype=dtype)
    y = torch.randn(B, index.shape[1], H * D, device=device, dtype=dtype)

    def close(a, b):
        return float((a.float() - b.float()).abs().max())

    def same_indices(a, b):
        W = b[0].shape[1]
        return float(torch.equal(a[0][:, :W], b[0]) and torch.equal(a[2], b[2]))

    def received_reference(q, k, v):
        attn = reference.attention_weights(q, k, mask, scale)
        return reference.weight_scores(attn, v, mask, 0, strict=False, class_token=False)[0]

    qf, kf, vf = q.float(), k.float(), v.float()
    real = mask[:, None, :, None].expand(q.shape)
    # (triton, reference in the model's dtype: what eager would run instead, reference in float32: the
    # accuracy check, comparison)
    return {
        "scores": (lambda: class_token_scores(q, k, v, mask, 1, scale)[0],
                   lambda: reference.class_token_scores(q, k, v, mask, 1, scale), None, close),
        # No class token: the attention each token receives, without the matrix the reference builds.
        "received_scores": (lambda: received_scores(q, k, v, mask, 0, scale)[0],
                            lambda: received_reference(q, k, v), lambda: received_reference(qf, kf, vf), close),
        "sample": (lambda: inverse_transform_sample(scores, mask, budget, 1),
                   lambda: reference.inverse_transform_sample(scores, mask, budget, 1), None, same_indices),
        "attention_rows": (lambda: attention_rows(q, k, v, index, mask, scale),
                           lambda: reference.attention_rows(q, k, v, index, mask, scale),
                           lambda: reference.attention_rows(qf, kf, vf, index, mask, scale), close),
        "masked_attention": (lambda: masked_attention(q, k, v, mask, scale)[real],
                             lambda: reference.masked_attention(q, k, v, mask, scale)[real],
                             lambda: reference.masked_attention(qf, kf, vf, mask, scale)[real], close),
        "gather_add": (lambda: gather_add(x, index, y),
                       lambda: x.gather(1, index[..., None].expand(-1, -1, x.shape[2])) + y, None, close),
    }


def run(shapes: list[tuple[int, int, int, int]], device: torch.device, dtype, rounds: int, budget_ms: float,
        only: Optional[list[str]] = None) -> list[dict]:
    rows = []
    for shape in shapes:
        for name, (fast, ref, exact, compare) in cases(*shape, device, dtype).items():
            if only and name not in only:
                continue
            with torch.no_grad():
                diff = compare(fast(), (exact or ref)())
            times = harness.rounds({"triton": fast, "reference": ref}, device, rounds, budget_ms)
            up = harness.speedups(times, "reference")["triton"][0]
            cell = {"benchmark": "kernels", "model": name, "run": "eager", "batch": shape[0],
                    "config": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", "")}
            metric = "equal" if name == "sample" else "max_abs_error"
            rows.append({**cell, "metric": metric, "value": diff})
            rows.append({**cell, "metric": "speedup", "value": up})
            for label, ms in times.items():
                rows.append({**cell, "config": f"{cell['config']} {label}", "metric": "ms",
                             "value": sorted(ms)[len(ms) // 2]})
            log.info("%s %s: %s %.3g, triton %.3fx the reference", name, shape, metric, diff, up)
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None, help="B,H,T,D ... (default: DeiT-S and ViT-B/16 stages)")
    p.add_argument("--kernels", nargs="+", default=None, help="only these kernels")
    harness.add_kernel_args(p, rounds=3)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = harness.kernel_device("benchmarks.kernels", args.device)
    shapes = [tuple(int(n) for n in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    dtype = getattr(torch, args.dtype)
    rows = run(shapes, device, dtype, args.rounds, args.budget_ms, args.kernels)
    n = harness.append(rows, args.results)
    log.info("%d rows appended to %s", n, args.results)


if __name__ == "__main__":
    main()
