"""Deployment on a GPU: export an ATS model with a dynamic batch, package it with AOTInductor, load the
package in a process that never imports ats_fx, check its logits, and time it against the dense model
packaged the same way.

    python -m benchmarks.deploy                               # DeiT-S, multi rho=0.87, fp16
    python -m benchmarks.deploy --model vit_base_patch16_224 --batches 2 64 256

Appends ``benchmark="deploy"`` rows to the results file: ``runs_without_ats_fx`` (1 or 0, per
package and batch: the dense package too, so a failure of AOTInductor itself shows as such),
``agreement`` (top-1 of the package against the eager ATS model, per batch), ``max_abs_diff``,
``img_s`` and ``speedup`` (against the dense package, rotating rounds, timed in a fresh process
without ats_fx too), with ``run="aoti"``. ``kernels`` says what the ATS package runs: "triton"
(ats_fx's kernels, compiled into it: CUDA) or "reference" (aten ops: the CPU, or ``--kernels
reference``). Each row names the C++ compiler that built the packages
(``cxx``) and the libstdc++ the loading processes preloaded (``ld_preload``, "" for none): a
package's ``.so`` runs its own copy of libstdc++'s templates against the loading process's
libstdc++, so both are part of the result. When the dense package's process segfaults, it is run
once more with the compiler's libstdc++ preloaded, and that is used from then on. Set ``CXX`` to
build with another compiler (Inductor reads it).

The packages check their inputs' shapes at run time (``AOTI_RUNTIME_CHECK_INPUTS=1`` when they are
compiled; AOTInductor does not otherwise), and the fresh process runs one batch at a time under
``faulthandler``, so a crash names the package, the batch and the Python frame.

Batch 1 is not in the default list: AOTInductor compiles a dynamic batch for sizes of 2 and more
(its shape environment gives backed sizes a lower bound of 2, whatever ``Dim(min=1)`` says), so
both packages, dense and ATS, refuse batch 1 with "dim value is too small" (measured on CPU, torch
2.14). Serve batch 1 from a package exported at a static batch of 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Optional

import torch

import ats_fx
from benchmarks import harness
from benchmarks.speed import point_kwargs

log = logging.getLogger("benchmarks.deploy")


def ask_compiler(flag: str) -> tuple[str, str]:
    """Inductor's C++ compiler (what ``CXX`` names, else its default) and its answer to ``flag``."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    cxx = get_cpp_compiler()
    return cxx, subprocess.run([cxx, flag], capture_output=True, text=True, timeout=60).stdout.strip()


def cpp_compiler() -> str:
    """The C++ compiler Inductor builds packages with, as ``path (version line)``."""
    try:
        cxx, version = ask_compiler("--version")
    except Exception as error:  # noqa: BLE001 - a label for the results, never a reason to stop
        return f"unknown ({type(error).__name__}: {error})"
    return f"{shutil.which(cxx) or cxx} ({version.splitlines()[0] if version else 'no version'})"


# On the lent H100 machine (torch 2.11) packages built by /opt/gcc/bin/g++ died at load with SIGSEGV
# in std::regex inside their own .so, and ran once the loading process preloaded the system
# libstdc++; packages built by /usr/bin/g++ ran as they were (docs/performance.md, "Deployment").
# So a crash of the dense package is retried once with the compiler's libstdc++ preloaded, and the
# rows record the preload.
CRASH_HINT = ("the dense package dies as well: the loader or the compiler that built the packages, not "
              "ATS; try another compiler with CXX=... (docs/performance.md, Deployment)")
SIGSEGV = -11  # subprocess's return code for a process killed by signal 11


def package(model: torch.nn.Module, example: torch.Tensor, path: Path) -> tuple[str, str]:
    """Export ``model`` with a dynamic batch and package it: ``(package path, kernels)``, where
    ``kernels`` is "triton" when the program calls ats_fx's kernels (``ats_fx::packaged_*``, which
    AOTInductor compiles into the package), else "reference" (aten ops only)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
    ats_ops = {str(n.target) for n in program.graph.nodes if "ats_fx" in str(n.target)}
    leftover = sorted(op for op in ats_ops if ".packaged_" not in op)
    if leftover:
        raise RuntimeError(f"the exported program still calls {leftover}, which AOTInductor cannot package")
    log.info("%s: batch range %s, ats_fx ops %s", path.name, program.range_constraints, sorted(ats_ops))
    os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"  # a shape outside the export's range raises, never reads past
    built = torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return built, "triton" if ats_ops else "reference"


def compiler_runtime() -> Optional[str]:
    """The libstdc++ that Inductor's C++ compiler links against, or None where it names none."""
    try:
        path = ask_compiler("-print-file-name=libstdc++.so.6")[1]
    except Exception:  # noqa: BLE001 - no compiler answer means no retry, never a failure
        return None
    return os.path.realpath(path) if os.path.isabs(path) and os.path.exists(path) else None


def fresh_process(body: str, env: dict) -> subprocess.CompletedProcess:
    """Run ``body`` in a new Python process that cannot import ats_fx (a segfault prints its frame)."""
    script = textwrap.dedent("""
        import faulthandler
        import sys
        faulthandler.enable()
        sys.modules["ats_fx"] = None  # any import of ats_fx fails
        sys.path.insert(0, {root!r})  # benchmarks.harness (torch and the standard library only)
    """).format(root=str(Path(__file__).resolve().parents[1])) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env={**env, "AOTI_RUNTIME_CHECK_INPUTS": "1"})


def run_without_ats_fx(package_path: str, inputs: Path, outputs: Path, env: dict) -> tuple[int, str]:
    """Run the package on each saved batch in a fresh process without ats_fx; the outputs go to
    ``outputs`` (None for a batch that raised). Returns the exit code and, if it died, what it printed."""
    done = fresh_process(f"""
        import torch
        from torch._inductor import aoti_load_package

        print("loading", flush=True)
        run = aoti_load_package({package_path!r})
        outs = []
        with torch.no_grad():
            for x in torch.load({str(inputs)!r}):
                print("batch", len(x), flush=True)
                try:
                    outs.append(run(x).cpu())
                except RuntimeError as error:  # e.g. a batch outside the package's range
                    print("batch", len(x), "failed:", error, flush=True)
                    outs.append(None)
        torch.save(outs, {str(outputs)!r})
    """, env)
    if done.returncode:
        return done.returncode, f"exit {done.returncode}:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
    if "failed:" in done.stdout:
        log.warning("%s", done.stdout[-1500:])
    return 0, ""


def loader_env(package_path: str, inputs: Path, outputs: Path) -> tuple[dict, str, str]:
    """Run the dense package without ats_fx; if its process segfaults, once more with the compiler's
    libstdc++ preloaded. Returns the environment that worked (or the plain one), the preload it
    needed ("" for none) and what the last dead process printed ("" if it ran)."""
    env = dict(os.environ)
    code, crash = run_without_ats_fx(package_path, inputs, outputs, env)
    runtime = compiler_runtime() if code == SIGSEGV and "LD_PRELOAD" not in env else None
    if not runtime:
        return env, env.get("LD_PRELOAD", ""), crash
    log.warning("the dense package segfaulted at load; retrying with LD_PRELOAD=%s (the runtime of the "
                "compiler that built it)", runtime)
    preloaded = {**env, "LD_PRELOAD": runtime}
    if run_without_ats_fx(package_path, inputs, outputs, preloaded)[0]:
        return env, "", crash
    log.warning("it runs with the compiler's libstdc++ preloaded: load packages built here with "
                "LD_PRELOAD=%s (docs/performance.md, Deployment)", runtime)
    return preloaded, runtime, ""


def time_without_ats_fx(dense_pkg: str, ats_pkg: str, inputs: Path, times: Path, device: torch.device,
                        n_rounds: int, env: dict) -> None:
    """Time both packages on each saved batch, in rotating rounds, in one fresh process without ats_fx
    (where a deployed model runs); ms per call per round go to ``times``, keyed by batch."""
    done = fresh_process(f"""
        import json
        import torch
        from torch._inductor import aoti_load_package
        from benchmarks import harness

        device = torch.device({device.type!r})
        runs = {{"dense": aoti_load_package({dense_pkg!r}), "ats": aoti_load_package({ats_pkg!r})}}
        out = {{}}
        for x in torch.load({str(inputs)!r}):
            fns = {{label: (lambda run=run, x=x: run(x)) for label, run in runs.items()}}
            out[len(x)] = harness.rounds(fns, device, {n_rounds})
        open({str(times)!r}, "w").write(json.dumps(out))
    """, env)
    if done.returncode:
        raise RuntimeError(f"timing the packages failed: exit {done.returncode}\n{done.stderr[-3000:]}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--point", default="multi rho=0.87", choices=list(harness.POINTS))
    p.add_argument("--batches", nargs="+", type=int, default=[2, 8, 64, 256])
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--results", type=Path, default=harness.RESULTS)
    p.add_argument("--device", default="cuda", help="cpu only to try the script (the reference path)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--kernels", default="auto", choices=["auto", "reference"],
                   help="the ATS model's kernels: auto packages ats_fx's Triton kernels on CUDA")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import timm

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    base = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    ats = ats_fx.transform(base, **point_kwargs(args.point), padding="static", cuda_graphs=False,
                           kernels=args.kernels).to(device, dtype)
    dense = base.to(device, dtype)
    work = Path(tempfile.mkdtemp())
    example = torch.randn(2, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    ats_pkg, kernels = package(ats, example, work / "ats.pt2")
    dense_pkg, _ = package(dense, example, work / "dense.pt2")
    batches = [torch.randn(b, 3, args.img_size, args.img_size, device=device, dtype=dtype) for b in args.batches]
    torch.save(batches, work / "inputs.pt")
    rows = []
    cell = {"benchmark": "deploy", "model": args.model, "run": "aoti", "dtype": args.dtype, "config": args.point,
            "kernels": kernels, "cxx": cpp_compiler()}
    log.info("packages built by %s", cell["cxx"])
    crashed, refused = {}, {}  # per package: what the dead process printed; the batches that raised
    env, cell["ld_preload"], crashed["dense"] = loader_env(dense_pkg, work / "inputs.pt", work / "dense.pt")
    crashed["ats"] = run_without_ats_fx(ats_pkg, work / "inputs.pt", work / "ats.pt", env)[1]
    for label in ("dense", "ats"):  # dense first: is AOTInductor itself at fault?
        if crashed[label]:
            hint = f" ({CRASH_HINT})" if crashed["dense"] else ""
            log.error("the %s package failed in a process without ats_fx%s: %s", label, hint, crashed[label])
        outs = [None] * len(batches) if crashed[label] else torch.load(work / f"{label}.pt")
        refused[label] = {len(x) for x, out in zip(batches, outs) if out is None}
        rows += [{**cell, "config": args.point if label == "ats" else "dense", "batch": len(x),
                  "metric": "runs_without_ats_fx", "value": float(out is not None)} for x, out in zip(batches, outs)]
    if crashed["ats"] or refused["ats"] - refused["dense"]:
        harness.append(rows, args.results, device)
        raise SystemExit(f"the ATS package does not run without ats_fx where the dense package does: "
                         f"ats refused {sorted(refused['ats'])}, dense refused {sorted(refused['dense'])}")
    if refused["ats"]:
        log.warning("batches %s fail in both packages (AOTInductor's range): skipped", sorted(refused["ats"]))
    got = [out for out in torch.load(work / "ats.pt") if out is not None]
    batches = [x for x in batches if len(x) not in refused["ats"]]
    with torch.no_grad():
        for x, out in zip(batches, got):
            want = ats(x).float().cpu()
            agree = float((want.argmax(-1) == out.float().argmax(-1)).float().mean())
            diff = float((want - out.float()).abs().max())
            rows += [{**cell, "batch": len(x), "metric": "agreement", "value": agree},
                     {**cell, "batch": len(x), "metric": "max_abs_diff", "value": diff}]
            log.info("batch %d: top-1 agreement %.4f, max |diff| %.3g", len(x), agree, diff)
    torch.save(batches, work / "timed.pt")  # the batches both packages accept
    time_without_ats_fx(dense_pkg, ats_pkg, work / "timed.pt", work / "times.json", device, args.rounds, env)
    timed = json.loads((work / "times.json").read_text())
    for x in batches:
        times = timed[str(len(x))]
        med, lo, hi = harness.speedups(times, "dense")["ats"]
        for label in ("dense", "ats"):
            ms = sorted(times[label])[len(times[label]) // 2]
            rows.append({**cell, "batch": len(x), "config": args.point if label == "ats" else "dense",
                         "metric": "img_s", "value": len(x) / ms * 1e3})
        rows += [{**cell, "batch": len(x), "metric": "speedup", "value": med},
                 {**cell, "batch": len(x), "metric": "speedup_min", "value": lo},
                 {**cell, "batch": len(x), "metric": "speedup_max", "value": hi}]
        log.info("batch %d: AOTI ATS %.3fx the AOTI dense model", len(x), med)
    harness.append(rows, args.results, device)


if __name__ == "__main__":
    main()
