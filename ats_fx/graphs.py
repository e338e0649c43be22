"""CUDA graphs for an eager ATS model at inference: each input shape is captured once and replayed.

An eager stage is host-bound below a few hundred images: its Python, its Triton launches and the torch
ops around it cost ~230 us on the host for DeiT-S (H200), more than the GPU work it removes. A replayed
graph issues the whole forward pass in one launch. Stages then pad statically (fixed shapes; the same
logits as batch_max), and each stage's trace (``ats_fx.kept_tokens``) points at tensors the replay
rewrites. ``dispatch.graphs_apply`` decides when a call is replayed; a capture that fails turns the
model's graphs off with one warning, and the call runs eagerly.

With autograd on (an eval-mode call outside ``torch.no_grad()``, the usual way a user first tries a
model) the replay is one autograd node, ``_Replayed``. A graph keeps no activations for autograd, so
a backward through it recomputes the forward pass eagerly, with autograd on and static padding, and
differentiates that: the call costs a replay, and only a backward pays for the pass again.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Optional

import torch
import torch.utils._pytree as pytree
from torch.autograd.function import once_differentiable

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


class _Recompute:
    """What a backward through a replay needs: the model's forward, its stages, the parameters it
    differentiates, the positions the replay kept, and what to do once a backward happened."""

    def __init__(self, forward: Callable, stages: list, params: list, on_backward: Callable[[int], None]):
        self.forward, self.stages, self.params, self.on_backward = forward, stages, params, on_backward
        self.spec: Any = None
        self.leaves: list = []
        self.positions: Any = None


class _Replayed(torch.autograd.Function):
    """A replayed forward pass as one autograd node over its inputs and the model's parameters."""

    @staticmethod
    def forward(ctx, run: _Recompute, cache: "GraphCache", n_inputs: int, *tensors: torch.Tensor):
        inputs = list(tensors[:n_inputs])
        out = cache(run.forward, lambda: run.stages, inputs)
        run.leaves, run.spec = pytree.tree_flatten(out)
        # One concatenation of the kept positions: the backward checks that its recompute kept the same.
        run.positions = torch.cat([s.last.positions.reshape(-1) for s in run.stages])
        ctx.run, ctx.n_inputs = run, n_inputs
        ctx.save_for_backward(*inputs)
        outs = tuple(t for t in run.leaves if isinstance(t, torch.Tensor))
        ctx.mark_non_differentiable(*(t for t in outs if not t.is_floating_point()))
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Optional[torch.Tensor]):
        run = ctx.run
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        traces = [s.last for s in run.stages]
        with torch.enable_grad(), dispatch.static_padding():
            out = run.forward(*inputs)
        recomputed = torch.cat([s.last.positions.reshape(-1) for s in run.stages])
        for stage, trace in zip(run.stages, traces):  # kept_tokens reports the call, not its recompute
            stage.last = trace
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wanted = [x for x in inputs if x.requires_grad] + run.params
        got = (torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
               if pairs and wanted else [None] * len(wanted))
        changed = int((recomputed != run.positions).sum()) if recomputed.shape == run.positions.shape else -1
        run.on_backward(changed)
        it = iter(got)
        input_grads = [next(it) if x.requires_grad else None for x in inputs]
        return (None, None, None, *input_grads, *it)


def replay_differentiable(cache: GraphCache, forward: Callable, stages: list, inputs: list, params: list,
                          on_backward: Callable[[int], None]) -> Any:
    """``cache(forward, ...)`` for a call with autograd on: the outputs are those of the replay, and a
    backward reaches ``inputs`` and ``params`` through an eager recompute (see the module docstring).
    ``on_backward(changed)`` is called after each backward with the number of kept positions the
    recompute changed (-1 if the shapes differ): rounding between the replay's Triton kernels and
    autograd's PyTorch path can move a token across a quantile."""
    run = _Recompute(forward, stages, params, on_backward)
    outs = iter(_Replayed.apply(run, cache, len(inputs), *inputs, *params))
    leaves = [next(outs) if isinstance(t, torch.Tensor) else t for t in run.leaves]
    return pytree.tree_unflatten(leaves, run.spec)
