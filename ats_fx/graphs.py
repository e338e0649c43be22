"""CUDA graphs for an eager ATS model at inference: each input shape is captured once and replayed.

An eager stage is host-bound below a few hundred images: its Python, its Triton launches and the torch
ops around it cost ~230 us on the host for DeiT-S (H200), more than the GPU work it removes. A replayed
graph issues the whole forward pass in one launch. Stages then pad statically (fixed shapes; the same
logits as batch_max), and each stage's trace (``ats_fx.kept_tokens``) points at tensors the replay
rewrites. ``dispatch.graphs_apply`` decides when a call is replayed; a capture that fails turns the
model's graphs off with one warning, and the call runs eagerly.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from . import dispatch

log = logging.getLogger(__name__)

MAX_SHAPES = 4  # graphs kept per model (least recently used dropped): each holds its activations


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list, outputs: Any, traces: dict):
        self.graph, self.inputs, self.outputs, self.traces = graph, inputs, outputs, traces


class GraphCache:
    """Captured forward passes of one model, by input shape, dtype and device."""

    def __init__(self) -> None:
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.failed = False

    def clear(self) -> None:
        self.graphs.clear()

    def __call__(self, forward: Callable, stages: Callable[[], list], inputs: list) -> Any:
        """``forward(*inputs)`` replayed from the graph captured for these inputs' shapes (captured
        now if new). ``stages()`` lists the model's ATS stages; it is called at capture only."""
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(forward, stages, inputs)
            if entry is None:
                return forward(*inputs)
            self.graphs[key] = entry
            while len(self.graphs) > MAX_SHAPES:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        for static, x in zip(entry.inputs, inputs):
            static.copy_(x)
        entry.graph.replay()
        for stage, trace in entry.traces.items():
            stage.last = trace
        # The graph rewrites its outputs on the next replay: hand out copies.
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry.outputs)

    def _capture(self, forward: Callable, stages: Callable[[], list], inputs: list):
        static = [x.clone() for x in inputs]
        try:
            with dispatch.static_padding():
                side = torch.cuda.Stream(device=inputs[0].device)
                side.wait_stream(torch.cuda.current_stream(inputs[0].device))
                with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks, outside the capture
                    for _ in range(2):
                        forward(*static)
                torch.cuda.current_stream(inputs[0].device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outputs = forward(*static)
        except Exception as err:  # any op that cannot be captured: run this model eagerly from now on
            self.failed = True
            log.warning("ATS model: CUDA graph capture failed (%s: %s); running eagerly from now on. "
                        "ats_fx.transform(..., cuda_graphs=False) skips the attempt.", type(err).__name__, err)
            return None
        return _Graph(graph, static, outputs, {s: s.last for s in stages()})
