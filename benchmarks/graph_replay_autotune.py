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
replays. The yielded ``GraphReplayTiming`` counts both.

``calls_per_graph`` (default 1, as upstream) records the callable that many times in one graph and
divides the replay's time by it. At batch 1 a GEMM takes 3-5 us in the model's graph, about what one
replay's own launch costs on the GPU: a graph of one call then times the launch as much as the GEMM
(session 15 saw cuBLAS timed at ~6 us, where it runs in 3.3). Back to back in one graph, that
cost is shared. This is not in the library: it patches an
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


def capture_replay(fn: Callable[[], Any], calls: int = 1) -> Optional[Callable[[], Any]]:
    """``fn`` captured in a CUDA graph, as torch 2.14's ``benchmark_gpu_with_cuda_graph`` does (a
    warm-up call, one on a side stream, then the capture on it; ``calls`` times back to back in the
    graph); returns the graph's ``replay``, or None where ``fn`` cannot be captured (it syncs with the
    host, or a capture is already running) or its capture recorded nothing (its launches went to
    another stream)."""
    if calls < 1:
        raise ValueError(f"calls={calls}: a graph records the callable at least once")
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
                for _ in range(calls):
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
    calls_per_graph: int = 1

    def __str__(self) -> str:
        if self.how == "inductor":
            return "inductor"
        per_graph = f", {self.calls_per_graph} calls per graph" if self.calls_per_graph != 1 else ""
        return f"patched: {self.replayed} replayed, {self.host_launched} host-launched{per_graph}"


@contextlib.contextmanager
def graph_replay_autotune(benchmarker: Any = None,
                          capture: Callable[..., Optional[Callable[[], Any]]] = capture_replay,
                          calls_per_graph: int = 1) -> Iterator[GraphReplayTiming]:
    """Within the block, Inductor times autotune choices as CUDA graph replays: with this torch's own
    option where it has one (and ``calls_per_graph`` 1), else by wrapping ``benchmark_gpu`` of
    ``benchmarker`` (Inductor's by default; put back on exit), each replay holding ``calls_per_graph``
    calls and its time divided by them. ``benchmarker`` and ``capture`` are for the tests, which run
    without a GPU."""
    if calls_per_graph < 1:
        raise ValueError(f"calls_per_graph={calls_per_graph}: at least 1")
    if benchmarker is None and calls_per_graph == 1 and has_upstream_option():
        import torch._inductor.config as inductor_config

        with inductor_config.patch({UPSTREAM_OPTION: True}):
            yield GraphReplayTiming("inductor")
        return
    if benchmarker is None:
        from torch._inductor.runtime.benchmarking import benchmarker
    timed_as_host_launch = benchmarker.benchmark_gpu  # bound method: Inductor's timing loop
    timing = GraphReplayTiming("patched", calls_per_graph=calls_per_graph)

    def benchmark_gpu(_callable: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        replay = capture(_callable, calls_per_graph)
        if replay is None:
            timing.host_launched += 1
            return timed_as_host_launch(_callable, *args, **kwargs)
        timing.replayed += 1
        ms = timed_as_host_launch(replay, *args, **kwargs)  # a float, or a list (return_mode="all")
        return [t / calls_per_graph for t in ms] if isinstance(ms, list) else ms / calls_per_graph

    with mock.patch.object(benchmarker, "benchmark_gpu", benchmark_gpu):
        yield timing
