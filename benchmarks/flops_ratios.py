"""FLOPs ratios (dense / ATS) of the core operating points, counted with FlopCounterMode
(``ats_fx.count_flops``, each image alone), for both padding modes; no GPU needed.

    python -m benchmarks.flops_ratios --images 16 --out benchmarks/results/flops_ratios.json

The models are built as the GPU benchmarks build them (``torch.manual_seed(0)``, then timm's random
init, so the same weights); the images are ``torch.randn`` from ``--seed`` on the CPU, not the GPU
runs' own (CUDA draws other numbers). ``batch_max`` counts the rows ATS keeps (the method's FLOPs,
the ratio issue 4's share is taken against); ``static`` the K + p rows the CUDA-graph modes run.
Per-image ratios spread because K' is adaptive: min and max are given.
"""
from __future__ import annotations

import argparse
import logging

import torch

import ats_fx
from benchmarks.throughput import OPERATING_POINTS, environment, run_and_report

log = logging.getLogger("benchmarks.flops_ratios")

POINTS = ["multi rho=1.0", "multi rho=0.87", "multi rho=0.72", "single K=108", "single K=78", "single K=48"]


def run(args) -> dict:
    import timm

    results = {"env": environment(), "images": args.images, "seed": args.seed, "rows": []}
    for name in args.models:
        torch.manual_seed(0)
        base = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed))
        dense = ats_fx.count_flops(base, x[:1])[0].item()  # every image costs the same
        for label in args.points:
            _, stages, ratio, k = next(p for p in OPERATING_POINTS if p[0] == label)
            row = dict(model=name, config=label, dense_gflops=dense)
            for padding in ("batch_max", "static"):
                model = ats_fx.transform(base, stages, ratio=ratio, k=k, padding=padding, check_inputs=False)
                per_image = ats_fx.count_flops(model, x)
                ratios = dense / per_image
                row[padding] = dict(gflops=per_image.mean().item(), ratio=dense / per_image.mean().item(),
                                    ratio_min=ratios.min().item(), ratio_max=ratios.max().item())
            for batch in args.batch_counts:  # one batch of the first `batch` images, padded to its widest image
                model = ats_fx.transform(base, stages, ratio=ratio, k=k, padding="batch_max", check_inputs=False)
                gflops = ats_fx.count_flops(model, x[:batch], per_image=False).item()
                row[f"batch_max_b{batch}"] = dict(gflops=gflops, ratio=dense / gflops)
            results["rows"].append(row)
            log.info("%s", row)
    return results


def table(results: dict) -> str:
    env = results["env"]
    batch_keys = [k for k in results["rows"][0] if k.startswith("batch_max_b")] if results["rows"] else []
    lines = [f"torch {env['torch']}, {env['date']}, CPU, float32; {results['images']} random images (seed "
             f"{results['seed']}), each counted alone; ratio = dense GFLOPs / mean ATS GFLOPs, [min, max] over "
             "the images.", "",
             "| model | point | dense GFLOPs | batch_max ratio [min, max] | static ratio [min, max] |"
             + "".join(f" batch_max, one batch of {k.split('_b')[-1]} |" for k in batch_keys),
             "|---|---|---|---|---|" + "---|" * len(batch_keys)]
    for r in results["rows"]:
        cells = [f"{r[p]['ratio']:.3f} [{r[p]['ratio_min']:.3f}, {r[p]['ratio_max']:.3f}]"
                 for p in ("batch_max", "static")]
        cells += [f"{r[key]['ratio']:.3f}" for key in batch_keys]
        lines.append(f"| {r['model']} | {r['config']} | {r['dense_gflops']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "vit_base_patch16_224"])
    p.add_argument("--points", nargs="+", default=POINTS, choices=POINTS)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-counts", type=int, nargs="*", default=[], metavar="B",
                   help="also count batch_max on one batch of the first B images (B <= --images): the rows a "
                        "batch really runs, padded to its largest K' + p")
    p.add_argument("--out", help="JSON path; a markdown table is written beside it (.md)")
    args = p.parse_args(argv)
    if any(b > args.images for b in args.batch_counts):
        p.error(f"--batch-counts {args.batch_counts}: each batch must fit in --images {args.images}")
    run_and_report(args, run, table, needs_cuda=False)


if __name__ == "__main__":
    main()
