"""A/B in one process at batch 1, reduce-overhead: dense vs ATS overlapped (default) vs ATS sequential vs overlapped without PDL."""
import copy, sys, torch
sys.path.insert(0, ".")
import ats_fx
from ats_fx import dispatch
from ats_fx.kernels import pdl
from benchmarks import harness
out = sys.argv[1]
torch.backends.cudnn.benchmark = False
lines = []
cases = [("deit_small_patch16_224", "rho", {"stages": "3-11", "ratio": 0.87}),
         ("deit_small_patch16_224", "k108", {"stages": "3", "k": 108}),
         ("vit_base_patch16_224", "rho", {"stages": "3-11", "ratio": 0.87})]
for name, point, opts in cases:
    base = harness.build_timm(name)
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.float16)
    fns = {}
    with torch.no_grad():
        torch._dynamo.reset()
        d = torch.compile(copy.deepcopy(base).cuda().half(), mode="reduce-overhead")
        for _ in range(4): d(x)
        fns["dense"] = d
        for label, overlap, use_pdl in (("overlapped", "auto", True), ("sequential", "off", True), ("overlapped, no PDL", "auto", False)):
            dispatch.OVERLAP, pdl.ENABLED = overlap, use_pdl
            m = torch.compile(copy.deepcopy(base).cuda().half(), backend="ats", options={**opts, "mode": "reduce-overhead"})
            for _ in range(4): m(x)
            torch.cuda.synchronize()
            fns[label] = m
        dispatch.OVERLAP, pdl.ENABLED = "auto", True
        ref = fns["overlapped"](x).float()
        for k in ("sequential", "overlapped, no PDL"):
            lines.append(f"{name} {point}: max|overlapped - {k}| {(ref - fns[k](x).float()).abs().max().item():.3g}")
    times = harness.rounds({k: (lambda m=m: m(x)) for k, m in fns.items()}, torch.device("cuda"), 7, 200)
    for k, v in harness.speedups(times, "dense").items():
        lines.append(f"  {name} {point} {k}: median {v[0]:.3f} min {v[1]:.3f} max {v[2]:.3f}")
    print("\n".join(lines[-6:]), flush=True)
open(out, "w").write("\n".join(lines))
