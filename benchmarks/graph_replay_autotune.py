"""max-autotune's GEMM choices timed as CUDA graph replays, on a torch whose Inductor cannot (benchmarks only).

Session 13 (max_autotune_s13_diagnosis.md) found that Inductor times each autotune choice launched
from the host, and that for the extern (cuBLAS) choices this timing includes cuBLASLt's per-call
host work: 1.5-8x what the GEMM takes in the CUDA graph that mode='max-autotune' replays. So
templates won GEMMs they lose in the graph. torch 2.14's Inductor has the fix upstream
(``autotune_cudagraph_benchmarking``: capture each candidate in a CUDA graph and time the replay),
and ``backend="ats"`` turns it on under max-autotune. The lent GPU's torch 2.11 lacks it, so the
benchmarks bring the same step, for the one compile they wrap::

    with graph_replay_autotune():
        compiled(x)  # the first call compiles and autotunes

Where the torch has the option the context sets it. Otherwise it replaces ``benchmark_gpu`` on
Inductor's benchmarker *instance* for the duration of the block: each callable is captured in a CUDA
graph, as upstream does, and Inductor's own timing loop then times ``graph.replay``.

What the stand-in can capture differs from upstream in one place. torch 2.11 binds a Triton
template's launch stream when it builds the benchmark callable (2.14 resolves it at call time, so
that captures work), so on 2.11 a template launched during a capture goes to the default stream and
the graph comes out empty: timing its replay would credit the template with nothing (session 14's
first call did, and picked 3-us "templates"). An empty capture therefore falls back to Inductor's
own host-launched timing, which session 13 found right for the templates; the extern (cuBLAS)
choices, whose host-launched timing was the wrong one, run on the current stream and are timed as
replays. The yielded ``GraphReplayTiming`` counts both. This is not in the library: it patches an
Inductor internal, which a library must not do behind its users' back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from typing import Any, Callable, Iterator, Optional
from unittest import mock

import torch

from ats_fx.compile import CUDA_GRAPH_AUTOTUNE_OPTIONS

log = logging.getLogger("benchmarks.graph_replay_autotune")

# The option backend='ats' asks Inductor for under max-autotune; the stand-in is for torches without it.
(UPSTREAM_OPTION,) = CUDA_GRAPH_AUTOTUNE_OPTIONS


def capture_replay(fn: Callable[[], Any]) -> Optional[Callable[[], Any]]:
    """``fn`` captured in a CUDA graph, as torch 2.14's ``benchmark_gpu_with_cuda_graph`` does (a
    warm-up call, one on a side stream, then the capture on it); returns the graph's ``replay``, or
    None where ``fn`` cannot be captured (it syncs with the host, or a capture is already running) or
    its capture recorded nothing (its launches went to another stream)."""
    if torch.cuda.is_current_stream_capturing():
        return None
    torch.cuda.synchronize()
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            fn()
        side.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                fn()
    except RuntimeError:
        log.warning("CUDA graph capture failed; timing this choice launched from the host", exc_info=True)
        torch.cuda.synchronize()
        return None
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if captured_nothing(caught):  # its launches went to another stream (a 2.11 Triton template)
        return None
    return graph.replay  # the bound method keeps the graph alive as long as it is timed


def captured_nothing(caught: list) -> bool:
    """Whether the warnings of a capture include torch's "The CUDA Graph is empty" (raised at the end of
    a capture that recorded no work: the callable launched on a stream other than the capturing one)."""
    return any("graph is empty" in str(w.message).lower() for w in caught)


def has_upstream_option() -> bool:
    """Whether this torch's Inductor times choices as graph replays itself (torch 2.14 does, 2.11 not)."""
    import torch._inductor.config as inductor_config

    return hasattr(inductor_config, UPSTREAM_OPTION)


@dataclasses.dataclass
class GraphReplayTiming:
    """How a block timed its choices: ``how`` is "inductor" (this torch's own option; no counts) or
    "patched" (the stand-in), with the callables it timed as replays and those it left host-launched."""

    how: str
    replayed: int = 0
    host_launched: int = 0

    def __str__(self) -> str:
        if self.how == "inductor":
            return "inductor"
        return f"patched: {self.replayed} replayed, {self.host_launched} host-launched"


@contextlib.contextmanager
def graph_replay_autotune(benchmarker: Any = None,
                          capture: Callable[[Callable[[], Any]], Optional[Callable[[], Any]]] = capture_replay,
                          ) -> Iterator[GraphReplayTiming]:
    """Within the block, Inductor times autotune choices as CUDA graph replays: with this torch's own
    option where it has one, else by wrapping ``benchmark_gpu`` of ``benchmarker`` (Inductor's by
    default; put back on exit). ``benchmarker`` and ``capture`` are for the tests, which run without
    a GPU."""
    if benchmarker is None and has_upstream_option():
        import torch._inductor.config as inductor_config

        with inductor_config.patch({UPSTREAM_OPTION: True}):
            yield GraphReplayTiming("inductor")
        return
    if benchmarker is None:
        from torch._inductor.runtime.benchmarking import benchmarker
    timed_as_host_launch = benchmarker.benchmark_gpu  # bound method: Inductor's timing loop
    timing = GraphReplayTiming("patched")

    def benchmark_gpu(_callable: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        replay = capture(_callable)
        if replay is None:
            timing.host_launched += 1
            return timed_as_host_launch(_callable, *args, **kwargs)
        timing.replayed += 1
        return timed_as_host_launch(replay, *args, **kwargs)

    with mock.patch.object(benchmarker, "benchmark_gpu", benchmark_gpu):
        yield timing
