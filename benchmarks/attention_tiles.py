"""Tile configurations of the kept-row attention kernel at a model's stage shapes, into the results file.

    python -m benchmarks.attention_tiles                  # ViT-B/16 and EVA02-S, stages 3-11 at rho=0.87, batch 256
    TRITON_INTERPRET=1 python -m benchmarks.attention_tiles --device cpu --models vit_tiny_patch16_224 \\
        --img-size 32 --batch 2 --configs 16x32,w4,s2 32x32,w4,s2     # the harness on Triton's interpreter

The shapes are those a static-padded stage of the multi-stage point makes: stage s attends its
``K + p`` kept rows (``reference.static_budget``) over the previous stage's width of keys. Inputs are
random: after the first stage (all keys real, no mask) each image keeps between 85% and all of the
previous width as real keys (a one-run mask, real keys first, as a stage leaves them), and its rows
index real keys. Each configuration runs every stage once per pass; on CUDA a pass is one CUDA
graph replay, as under ``mode="reduce-overhead"``. Beside them (unless ``--no-sdpa``), torch's SDPA
on queries gathered beforehand and without the mask: what the kernel would be measured against were
the masks not there, not a drop-in replacement.

Rows: ``benchmark="attention_tiles"``, ``config`` the tiles ("64x32,w4,s3": query rows x keys per
tile, warps, pipeline stages), ``metric`` ``us`` (one pass over all stages, median of the rounds)
and ``max_abs_error`` (against the PyTorch reference in float32, every stage).
"""
from __future__ import annotations

import argparse
import logging
from typing import Callable, Optional

import torch

from benchmarks import harness

log = logging.getLogger("benchmarks.attention_tiles")

# The kernel's batch config first (``attention_rows.default_config``), then the alternatives it beat.
CONFIGS = ["64x32,w4,s3", "64x32,w4,s4", "64x32,w4,s2", "128x32,w8,s3", "64x64,w4,s2", "64x64,w4,s3",
           "32x64,w4,s3", "64x128,w8,s2"]
SDPA = "sdpa, gathered queries, no mask"


def parse_config(text: str) -> dict:
    """``"64x32,w4,s3"`` -> the kernel's launch config."""
    tiles, warps, stages = text.split(",")
    m, n = tiles.split("x")
    return dict(BLOCK_M=int(m), BLOCK_N=int(n), num_warps=int(warps.lstrip("w")), num_stages=int(stages.lstrip("s")))


def stage_shapes(model: torch.nn.Module, stages: range, ratio: float) -> list[tuple[int, int, int, int]]:
    """(heads, head dim, keys, kept rows) of each stage of a timm ViT padded statically."""
    from ats_fx.kernels.reference import static_budget

    prefix = model.num_prefix_tokens
    width = model.patch_embed.num_patches + prefix
    attn = model.blocks[0].attn
    heads = attn.num_heads
    head_dim = model.embed_dim // heads
    shapes = []
    for _ in stages:
        rows = static_budget(width, prefix, ratio, None) + prefix
        shapes.append((heads, head_dim, width, rows))
        width = rows
    return shapes


def stage_inputs(batch: int, shape: tuple[int, int, int, int], device, dtype, seed: int, first: bool) -> tuple:
    """q, k, v (strided views of one qkv tensor), the kept-row index and the key mask of one stage
    (None for the ``first`` stage, whose keys are all the model's tokens)."""
    heads, head_dim, keys, rows = shape
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, keys, 3, heads, head_dim, generator=g).to(device, dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    real = torch.full((batch,), keys) if first else torch.randint(int(0.85 * keys), keys + 1, (batch,), generator=g)
    real = real.clamp_min(rows)
    mask = None if first else (torch.arange(keys)[None, :] < real[:, None]).to(device)
    index = torch.stack([torch.randperm(int(n), generator=g)[:rows].sort().values for n in real])
    return q, k, v, index.to(device), mask


def one_pass(inputs: list[tuple], scale: float, config: Optional[dict]) -> Callable[[], list]:
    """Every stage's kept-row attention once, with ``config`` (None: SDPA on gathered queries)."""
    from ats_fx.kernels.attention_rows import launch_attention

    if config is None:
        gathered = [(q.gather(2, idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])), k, v)
                    for q, k, v, idx, _ in inputs]
        return lambda: [torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
                        for q, k, v in gathered]
    return lambda: [launch_attention(q, k, v, idx, mask, scale, idx.shape[1], config=config)
                    for q, k, v, idx, mask in inputs]


def graphed(fn: Callable[[], list], device: torch.device) -> Callable[[], object]:
    """``fn`` as one CUDA graph replay on CUDA (after a warm-up on a side stream); ``fn`` elsewhere."""
    if device.type != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run(models: list[str], batch: int, configs: list[str], sdpa: bool, device: torch.device, dtype, rounds: int,
        budget_ms: float, img_size: int) -> list[dict]:
    from ats_fx.kernels import reference

    rows = []
    stages = range(3, 12)
    for name in models:
        model = harness.build_timm(name, **({"img_size": img_size} if img_size != 224 else {}))
        shapes = stage_shapes(model, stages, 0.87)
        inputs = [stage_inputs(batch, shape, device, dtype, seed=i, first=i == 0) for i, shape in enumerate(shapes)]
        scale = shapes[0][1] ** -0.5
        with torch.no_grad():
            exact = [reference.attention_rows(q.float(), k.float(), v.float(), idx, mask, scale)
                     for q, k, v, idx, mask in inputs]
        labels = configs + ([SDPA] if sdpa else [])
        fns, errors = {}, {}
        for label in labels:
            fn = one_pass(inputs, scale, None if label == SDPA else parse_config(label))
            with torch.no_grad():
                if label != SDPA:
                    errors[label] = max(float((o.float() - e).abs().max()) for o, e in zip(fn(), exact))
                fns[label] = graphed(fn, device)
        times = harness.rounds(fns, device, rounds, budget_ms)
        cell = {"benchmark": "attention_tiles", "model": name, "run": "stages 3-11, rho=0.87", "batch": batch,
                "dtype": str(dtype).replace("torch.", "")}
        for label in labels:
            us = sorted(times[label])[len(times[label]) // 2] * 1e3
            rows.append({**cell, "config": label, "metric": "us", "value": us})
            if label in errors:
                rows.append({**cell, "config": label, "metric": "max_abs_error", "value": errors[label]})
            log.info("%s batch %d %s: %.1f us%s", name, batch, label, us,
                     f", max |error| {errors[label]:.2g}" if label in errors else "")
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "eva02_small_patch14_224"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--configs", nargs="+", default=CONFIGS, help="BLOCK_MxBLOCK_N,wWARPS,sSTAGES ...")
    p.add_argument("--no-sdpa", dest="sdpa", action="store_false", help="leave out SDPA on gathered queries")
    p.add_argument("--img-size", type=int, default=224)
    harness.add_kernel_args(p, rounds=5)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = harness.kernel_device("benchmarks.attention_tiles", args.device)
    rows = run(args.models, args.batch, args.configs, args.sdpa, device, getattr(torch, args.dtype), args.rounds,
               args.budget_ms, args.img_size)
    n = harness.append(rows, args.results, device)
    log.info("%d rows appended to %s", n, args.results)


if __name__ == "__main__":
    main()
