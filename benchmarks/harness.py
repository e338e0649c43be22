"""What every benchmark shares: the models and operating points, timing in rotating rounds, and the
one results file every benchmark appends to (``benchmarks/results/results.jsonl``).

A results row is one measured number, in long format::

    {"benchmark": "speed", "metric": "speedup", "value": 1.42, "model": "deit_small_patch16_224",
     "run": "compile:reduce-overhead", "batch": 256, "config": "multi rho=0.87", "dtype": "float16",
     "device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "commit": "...", "date": "..."}

``benchmarks/report.py`` turns the newest row of each cell into the README's summary and
benchmarks/results/speed.md.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "results.jsonl"

# label -> (stages, ratio, k): the paper's DeiT-S operating points, for any 12-layer model.
POINTS = {
    "multi rho=1.0": ("3-11", 1.0, None),
    "multi rho=0.87": ("3-11", 0.87, None),
    "multi rho=0.72": ("3-11", 0.72, None),
    "single K=108": ("3", None, 108),
    "single K=78": ("3", None, 78),
    "single K=48": ("3", None, 48),
}


def commit() -> str:
    """The git commit measured: ``ATS_FX_COMMIT`` where the tree travels without .git, else git's."""
    if os.environ.get("ATS_FX_COMMIT"):
        return os.environ["ATS_FX_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: Optional[torch.device] = None) -> str:
    """What a results row calls the device: the GPU's name, or the CPU's model and the threads torch uses."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    return f"CPU ({model}, {torch.get_num_threads()} threads)"


def environment(device: Optional[torch.device] = None) -> dict:
    """Device, library versions, commit and date: the fields every results row carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = "-"
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:  # pragma: no cover
        timm_version = "-"
    return {"device": device_name(device), "torch": torch.__version__.split("+")[0], "triton": triton_version,
            "timm": timm_version, "commit": commit(), "date": time.strftime("%Y-%m-%d")}


def append(rows: Iterable[dict], path: Optional[Path] = None, device: Optional[torch.device] = None) -> int:
    """Append ``rows`` (each with the environment's fields added, ``device`` the one that ran them) to
    the results file; returns the count."""
    path = Path(path or RESULTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    n = 0
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({**env, **row}, sort_keys=True) + "\n")
            n += 1
    return n


def load(path: Optional[Path] = None) -> list[dict]:
    """Every row of the results file, oldest first."""
    path = Path(path or RESULTS)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build_timm(name: str, **kwargs) -> torch.nn.Module:
    """A timm model with random weights from seed 0 (no weights offline), in eval mode."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def add_kernel_args(parser, rounds: int) -> None:
    """The options every kernel benchmark takes: dtype, timing, results file and device."""
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--budget-ms", type=float, default=100.0, help="time per measurement")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--device", default="cuda", help="cpu runs the kernels under TRITON_INTERPRET=1 (slowly)")


def kernel_device(benchmark: str, name: str) -> torch.device:
    """The device a kernel benchmark runs on: CUDA, or the CPU under Triton's interpreter (set before
    Python starts, since Triton reads it at import)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{benchmark} needs a CUDA GPU (--device cpu with TRITON_INTERPRET=1 tries it)")
    if name == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu needs TRITON_INTERPRET=1 set before Python starts")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, budget_ms: float = 200.0) -> float:
    """Wall time of one call, host included (what a user's loop sees): as many calls as fit in about
    ``budget_ms`` after a warm-up, one synchronisation at each end."""
    with torch.no_grad():
        for _ in range(3):
            fn()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        once = max(time.perf_counter() - t0, 1e-6)
        calls = max(3, min(1000, int(budget_ms / 1e3 / once)))
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / calls * 1e3


def rounds(fns: dict[str, Callable[[], object]], device: torch.device, n_rounds: int = 3,
           budget_ms: float = 200.0) -> dict[str, list[float]]:
    """Time every function once per round, the order rotating from round to round, so that a drift of
    the device (clocks, temperature) lands on all of them alike. Returns ms per call, per round."""
    labels = list(fns)
    out: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(n_rounds):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for label in order:
            out[label].append(time_ms(fns[label], device, budget_ms))
    return out


def speedups(times: dict[str, list[float]], baseline: str) -> dict[str, tuple[float, float, float]]:
    """Per label: (median, min, max) over rounds of baseline time / label time, round by round."""
    out = {}
    for label, ms in times.items():
        ratios = [b / t for b, t in zip(times[baseline], ms)]
        out[label] = (statistics.median(ratios), min(ratios), max(ratios))
    return out
