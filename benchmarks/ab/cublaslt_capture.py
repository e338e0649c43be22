"""A/B in one process: dense (cuBLAS) vs ATS captured with cuBLAS vs ATS captured with cuBLASLt, reduce-overhead, b256."""
import copy, sys, torch
sys.path.insert(0, ".")
import ats_fx  # noqa: F401  (registers backend="ats")
from benchmarks import harness
out = sys.argv[1]
name = sys.argv[2] if len(sys.argv) > 2 else "vit_base_patch16_224"
torch.backends.cudnn.benchmark = False
lines = []
base = harness.build_timm(name)
x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.float16)
for point, opts in [("rho", {"stages": "3-11", "ratio": 0.87}), ("k108", {"stages": "3", "k": 108})]:
    fns = {}
    with torch.no_grad():
        torch._dynamo.reset()
        d = torch.compile(copy.deepcopy(base).cuda().half(), mode="reduce-overhead")
        for _ in range(4): d(x)
        fns["dense"] = d
        for lib in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(lib)
            m = torch.compile(copy.deepcopy(base).cuda().half(), backend="ats", options={**opts, "mode": "reduce-overhead"})
            for _ in range(4): m(x)
            torch.cuda.synchronize()
            fns[f"ats {lib}"] = m
        torch.backends.cuda.preferred_blas_library("cublas")
        a, b = fns["ats cublas"](x).float(), fns["ats cublaslt"](x).float()
        lines.append(f"{name} {point}: max|cublas-cublaslt| {(a-b).abs().max().item():.3g}")
    times = harness.rounds({k: (lambda m=m: m(x)) for k, m in fns.items()}, torch.device("cuda"), 7, 300)
    for k, v in harness.speedups(times, "dense").items():
        lines.append(f"  {point} {k}: median {v[0]:.3f} min {v[1]:.3f} max {v[2]:.3f}; ms {[round(t,2) for t in times[k]]}")
    print("\n".join(lines[-4:]), flush=True)
open(out, "w").write("\n".join(lines))
