"""Where the time goes: top CUDA kernels of the dense model and of an ATS model (torch.profiler).

    python -m benchmarks.profile_ats --model deit_small_patch16_224 --batch 256 --stages 3-11 --ratio 0.87
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import ats_fx


def top_kernels(model, x, n: int, sort: str = "self_cuda_time_total") -> str:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            model(x)
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by=sort, row_limit=n, max_name_column_width=70)


def main(argv=None) -> None:
    import timm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--stages", default="3-11")
    p.add_argument("--ratio", type=float, default=0.87)
    p.add_argument("--padding", default="batch_max")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--sort", default="self_cuda_time_total", help="or self_cpu_time_total")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.backends.cudnn.benchmark = True  # as in throughput.py
    dense = timm.create_model(args.model).eval()
    ats = ats_fx.transform(dense, args.stages, ratio=args.ratio, padding=args.padding, check_inputs=False)
    dense, ats = dense.cuda().to(dtype), ats.cuda().to(dtype)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda", dtype=dtype)
    print("== dense\n" + top_kernels(dense, x, args.rows, args.sort))
    print("== ats\n" + top_kernels(ats, x, args.rows, args.sort))


if __name__ == "__main__":
    main()
