"""Session 19: where max-autotune's per-shape benchmarking time goes (session 18: 6-10 s a GEMM shape of 21
choices, 44 s for fc2, against ~25 ms of timing asked per choice).

One fp16 GEMM ``x @ w.T + b`` (or, with ``--chain``, the DeiT block's four) compiled with max-autotune (no coordinate descent, autotune rep 10 ms, no
epilogue-fusion benchmarking, as the benchmarks compile) from an empty Inductor cache, under cProfile,
with or without ``benchmarks/graph_replay_autotune.py``'s stand-in. Prints Inductor's AUTOTUNE lines, the
compile's wall time and the profile's top functions (cumulative and own time). Run each variant in its
own process and cache directory, as ``benchmarks/sessions/s19_diag.sh`` does:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python3 -m benchmarks.sessions.s19_autotune_profile \
        --m 11008 --k 384 --n 384 --graph-replay
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import time

import torch

from benchmarks.compiled import add_inductor_option, compile_model, parse_inductor_options, set_autotune_rep


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=11008)
    p.add_argument("--k", type=int, default=384)
    p.add_argument("--n", type=int, default=384)
    p.add_argument("--graph-replay", action="store_true")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--chain", action="store_true",
                   help="a DeiT-S MLP-and-attention chain of four GEMMs (qkv, proj, fc1, fc2) at --m rows instead "
                        "of one: whether the second and later shapes of one compile are the slow ones")
    add_inductor_option(p)  # e.g. compile_threads=1: Inductor's worker pool off, autotune precompile on threads
    a = p.parse_args()
    try:
        torch._logging.set_logs(autotuning=True)  # per-choice load / bench times, where this torch logs them
    except Exception as e:  # noqa: BLE001 -- an artifact this torch does not know
        print("no autotuning log:", e)
    import torch._inductor.config as cfg

    from benchmarks.graph_replay_autotune import graph_replay_autotune

    set_autotune_rep(10)
    inductor = {"benchmark_epilogue_fusion": False}  # as benchmarks/sessions/s15_run.sh compiles
    if hasattr(cfg, "max_autotune_prune_choices_based_on_shared_mem"):
        inductor["max_autotune_prune_choices_based_on_shared_mem"] = True
    inductor.update(parse_inductor_options(a.inductor))
    x = torch.randn(a.m, a.k, device="cuda", dtype=torch.float16)
    F = torch.nn.functional
    if a.chain:
        d = a.k
        ws = {n: (torch.randn(o, i, device="cuda", dtype=torch.float16) / i ** 0.5,
                  torch.randn(o, device="cuda", dtype=torch.float16))
              for n, (o, i) in {"qkv": (3 * d, d), "proj": (d, d), "fc1": (4 * d, d), "fc2": (d, 4 * d)}.items()}

        def chain(x):  # qkv -> slice -> proj (+ residual) -> fc1 -> gelu -> fc2 (+ residual)
            h = F.linear(x, *ws["qkv"])[:, :d].contiguous()
            h = x + F.linear(h, *ws["proj"])
            return h + F.linear(F.gelu(F.linear(h, *ws["fc1"])), *ws["fc2"])

        model = chain
    else:
        w = torch.randn(a.n, a.k, device="cuda", dtype=torch.float16)
        b = torch.randn(a.n, device="cuda", dtype=torch.float16)

        def model(x):
            return F.linear(x, w, b)

    fn = compile_model(model, "dense", "max-autotune-no-cudagraphs", no_coordinate_descent=True, inductor=inductor)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    with graph_replay_autotune() if a.graph_replay else contextlib.nullcontext() as timing:
        prof.enable()
        fn(x)  # compiles, autotuning every GEMM
        torch.cuda.synchronize()
        prof.disable()
    if timing is not None:
        print("stand-in:", timing)
    print(f"compile+first call {time.perf_counter() - t0:.1f} s, graph_replay={a.graph_replay}, "
          f"GEMM {a.m}x{a.k}x{a.n}{' chain' if a.chain else ''}")
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(a.top)
        print(s.getvalue())


if __name__ == "__main__":
    main()
