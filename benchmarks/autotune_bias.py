"""Does Inductor's GEMM autotuning, as our max-autotune runs configured it, rank cuBLAS fairly?

    python -m benchmarks.autotune_bias --out benchmarks/results/autotune_bias.json

Session 13 (kernel_trace.py under max-autotune vs reduce-overhead, DeiT-S multi rho=0.87, batch
256) found that every one of the 36 GEMMs where max-autotune picked a Triton template ran 15-35%
slower in the graph than the cuBLAS kernel reduce-overhead used at the same place. Session 12's
autotune log had cuBLAS at 0.109 ms against a template's 0.092 ms for one of those shapes, while
cuBLAS runs it in ~60 us in the graph. The first suspect was the benchmarks' shortened per-choice
timing (``inductor_default_autotune_rep=10`` ms, warm-up 2 ms); the settings below ruled it out
(autotune_bias_fc1.md, autotune_bias_qkv.md). What it showed instead: Inductor's own timing of the
extern (cuBLAS) choices carries per-call host work that a CUDA graph replay does not pay, more so
with busy CPUs (autotune_bias_proj.md, autotune_graph_*.md; max_autotune_s13_diagnosis.md).

For one such GEMM (bias + [M, K] @ [K, N], fp16), each setting compiles ``torch.addmm`` under
``max-autotune-no-cudagraphs`` in a fresh process with a fresh Inductor cache, then records:
Inductor's own timings of the cuBLAS choices and of its best template (from its AUTOTUNE report),
the choice it made, and do_bench (median, warm GPU) of the compiled GEMM and of eager cuBLAS, each
launched from the host and as a CUDA graph replay (how a CUDA-graph mode runs it).
The "back to back" columns time the GEMM 20 times in one graph, per call: at batch 1 (session 15,
autotune_bias_b1_*.md) one replay's own launch costs about what the GEMM does, so they are the
ground truth there, and the setting "graph replay, 20 calls per graph" times the choices that way.
``--cpu-load N`` repeats each setting with N busy CPU processes beside it, as a model's compile has
its compile workers busy while it autotunes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

GRAPH_REPLAY = "graph replay (graph_replay_autotune)"
BACK_TO_BACK = 20  # calls per graph for the batch-1 setting and the back-to-back columns
GRAPH_REPLAY_MANY = f"graph replay, {BACK_TO_BACK} calls per graph"
SETTINGS = {  # label: Inductor config for the compile
    "rep=10 warmup=2 (sessions 6-12)": dict(inductor_default_autotune_rep=10, inductor_default_autotune_warmup=2),
    "rep=10 warmup=25": dict(inductor_default_autotune_rep=10, inductor_default_autotune_warmup=25),
    "Inductor default (rep=100 warmup=25)": {},
    # Times each choice as a CUDA graph replay (no host dispatch in the timing), where this torch has it.
    "cudagraph benchmarking": dict(autotune_cudagraph_benchmarking=True),
    # The same through benchmarks/graph_replay_autotune.py: the torch's own option where it has it,
    # else a scoped stand-in for it (torch 2.11).
    GRAPH_REPLAY: {},
    # The stand-in with the calls back to back in one graph, the replay's time divided by them: at
    # batch 1 a GEMM takes about what a replay's own launch does (session 15).
    GRAPH_REPLAY_MANY: {},
}


def burn(seconds: float) -> None:
    """A busy CPU loop: stands in for the compile workers that keep a model's compile busy."""
    import time

    end = time.time() + seconds
    while time.time() < end:
        pass


def parse_autotune_report(text: str) -> list[tuple[str, float]]:
    """(choice, ms) from Inductor's ``AUTOTUNE op(sizes)`` report on stderr, fastest first: its lines
    read ``  <choice> <ms> ms <percent>% <description>``."""
    return [(name, float(ms)) for name, ms in re.findall(r"^\s+(\S+) (\d+\.\d+) ms [\d.]+%", text, flags=re.M)]


def graph_replay_us(fn, calls: int = 1) -> float:
    """do_bench (median, us) of ``fn`` captured in a CUDA graph, per call of the ``calls`` the graph
    holds back to back: its GPU time without host dispatch, as a compiled model under
    mode='max-autotune' or 'reduce-overhead' runs it (with ``calls`` > 1, also without the replay's
    own launch, which a model's graph shares among its kernels)."""
    from triton.testing import do_bench

    from benchmarks.graph_replay_autotune import capture_replay

    replay = capture_replay(fn, calls)
    if replay is None:
        raise RuntimeError("the GEMM could not be captured in a CUDA graph")
    return do_bench(replay, rep=200) * 1e3 / calls


def child(m: int, k: int, n: int, setting: str) -> dict:
    """Runs in the subprocess: compile, parse Inductor's report, time."""
    import contextlib
    import io

    import torch
    import torch._inductor.config as inductor_config
    from triton.testing import do_bench

    inductor_config.autotune_num_choices_displayed = None  # every choice, cuBLAS included
    for key, value in SETTINGS[setting].items():
        if not hasattr(inductor_config, key):
            raise SystemExit(f"this torch's Inductor has no {key}")
        setattr(inductor_config, key, value)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w = torch.randn(n, k, device="cuda", dtype=torch.float16)
    b = torch.randn(n, device="cuda", dtype=torch.float16)
    gemm = torch.compile(lambda x, w, b: torch.addmm(b, x, w.t()), mode="max-autotune-no-cudagraphs")
    report = io.StringIO()
    from benchmarks.graph_replay_autotune import graph_replay_autotune

    timing = (graph_replay_autotune() if setting == GRAPH_REPLAY else
              graph_replay_autotune(calls_per_graph=BACK_TO_BACK) if setting == GRAPH_REPLAY_MANY else
              contextlib.nullcontext())
    with contextlib.redirect_stderr(report), timing as how:
        gemm(x, w, b)
    torch.cuda.synchronize()
    text = report.getvalue()
    timings = parse_autotune_report(text)
    return dict(
        setting=setting,
        graph_replay_autotune=None if how is None else str(how),
        report=timings,
        chosen=timings[0][0] if timings else None,
        compiled_us=do_bench(lambda: gemm(x, w, b), rep=200) * 1e3,
        eager_cublas_us=do_bench(lambda: torch.addmm(b, x, w.t()), rep=200) * 1e3,
        compiled_graph_us=graph_replay_us(lambda: gemm(x, w, b)),
        eager_cublas_graph_us=graph_replay_us(lambda: torch.addmm(b, x, w.t())),
        compiled_back_to_back_us=graph_replay_us(lambda: gemm(x, w, b), BACK_TO_BACK),
        eager_cublas_back_to_back_us=graph_replay_us(lambda: torch.addmm(b, x, w.t()), BACK_TO_BACK),
        autotune_report=text[-3000:],
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs=3, type=int, default=[29696, 384, 1536], metavar=("M", "K", "N"),
                   help="default: DeiT-S fc1 at a static batch of 256 with 116 tokens (ATS stage 4)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--cpu-load", type=int, default=0,
                   help="also run each setting with this many busy CPU processes beside the compile")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.shape, args.child)))
        return
    import multiprocessing

    rows = []
    for setting in args.settings:
        for load in sorted({0, args.cpu_load}):
            burners = [multiprocessing.Process(target=burn, args=(600,)) for _ in range(load)]
            for b in burners:
                b.start()
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                run = subprocess.run([sys.executable, "-m", "benchmarks.autotune_bias", "--child", setting,
                                      "--shape", *map(str, args.shape)], env=env, capture_output=True, text=True)
            for b in burners:
                b.terminate()
            label = setting + (f", {load} busy CPU processes" if load else "")
            if run.returncode:
                rows.append(dict(setting=label, error=(run.stdout + run.stderr)[-2000:]))
                continue
            rows.append({**json.loads(run.stdout.strip().splitlines()[-1]), "setting": label})
    lines = [f"bias + [{args.shape[0]}, {args.shape[1]}] @ [{args.shape[1]}, {args.shape[2]}], fp16; times in us",
             "", "| setting | Inductor's cuBLAS timing | Inductor's best template timing | chosen | "
             "compiled, warm | eager cuBLAS, warm | compiled, graph replay | eager cuBLAS, graph replay | "
             f"compiled, {BACK_TO_BACK} back to back in a graph | eager cuBLAS, {BACK_TO_BACK} back to back |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setting']} | failed: {r['error'].strip().splitlines()[-1][:80]} | | | | | | | | |")
            continue
        extern = [ms for name, ms in r["report"] if "addmm" in name and not name.startswith("triton")]
        tem = [ms for name, ms in r["report"] if name.startswith("triton")]
        lines.append(f"| {r['setting']} | {min(extern) * 1e3 if extern else float('nan'):.1f} | "
                     f"{min(tem) * 1e3 if tem else float('nan'):.1f} | {r['chosen']} | {r['compiled_us']:.1f} | "
                     f"{r['eager_cublas_us']:.1f} | {r.get('compiled_graph_us', float('nan')):.1f} | "
                     f"{r.get('eager_cublas_graph_us', float('nan')):.1f} | "
                     f"{r.get('compiled_back_to_back_us', float('nan')):.1f} | "
                     f"{r.get('eager_cublas_back_to_back_us', float('nan')):.1f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
