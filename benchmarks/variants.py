"""Configuration labels: an operating point, then the transform keywords and implementation switches
that vary it, so an A/B of ats_fx's own choices runs as one more configuration of a benchmark.

    "multi rho=0.87"                       # stages 3-11 at rho=0.87 (harness.POINTS)
    "multi rho=0.87 padding=static"        # ... with a transform keyword
    "multi rho=0.87 patch_gemm=off"        # ... with the patch embedding left a conv
    "single K=108 overlap=off pdl=off"     # ... with ats_fx's overlapped stage and PDL switched off

The switches are module-level choices of ats_fx that a user never sets (``SWITCHES``). They are read
when a stage is traced, compiled or captured as a CUDA graph, or at every call without graphs, so
``Switched`` sets them around every call of the configuration's model. A compiled configuration with
switches also compiles through a backend of its own (``own_backend``): Dynamo treats two
``backend="ats"`` compiles with equal options as one backend and, the model and its weights being
the same, runs the first configuration's compiled graph for the second, whose switches then never
take effect.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from benchmarks import harness

# transform keyword -> its value for each setting a label may give
TRANSFORM_KEYS = {
    "padding": {"auto": "auto", "static": "static", "batch_max": "batch_max"},
    "patch_gemm": {"on": True, "off": False},  # the patch-embedding conv as a GEMM (passes/patchify.py)
}
# switch -> (ats_fx module, attribute, value of each setting)
SWITCHES = {
    "overlap": ("ats_fx.dispatch", "OVERLAP", {"auto": "auto", "on": "on", "off": "off"}),
    "pdl": ("ats_fx.kernels.pdl", "ENABLED", {"on": True, "off": False}),
    "unmasked": ("ats_fx.dispatch", "UNMASKED", {"on": True, "off": False}),  # overlap the first stage too
    # stages without a class token score with kernels/received.py (on) or materialise A (off)
    "received": ("ats_fx.dispatch", "RECEIVED", {"on": True, "off": False}),
    # the overlapped stage's streams join after the output projection (on, the default) or before it (off)
    "late_join": ("ats_fx.overlap", "JOIN_AFTER_PROJECTION", {"on": True, "off": False}),
}


def parse(label: str) -> tuple[str, dict, dict]:
    """``label`` -> (operating point, transform keywords, switches)."""
    point = next((p for p in sorted(harness.POINTS, key=len, reverse=True)
                  if label == p or label.startswith(p + " ")), None)
    if point is None:
        raise SystemExit(f"configuration {label!r} does not start with an operating point: {list(harness.POINTS)}")
    transform_kw, switches = {}, {}
    for token in label[len(point):].split():
        key, _, value = token.partition("=")
        if key in TRANSFORM_KEYS and value in TRANSFORM_KEYS[key]:
            transform_kw[key] = TRANSFORM_KEYS[key][value]
        elif key in SWITCHES and value in SWITCHES[key][2]:
            switches[key] = value
        else:
            raise SystemExit(f"configuration {label!r}: {token!r} is neither a transform keyword "
                             f"{ {k: list(v) for k, v in TRANSFORM_KEYS.items()} } nor a switch "
                             f"{ {k: list(v[2]) for k, v in SWITCHES.items()} }")
    return point, transform_kw, switches


def labels(points: list[str], switch_sets: list[str]) -> list[str]:
    """Each point, then each point with each set of switches (``"overlap=off pdl=off"``)."""
    return list(points) + [f"{pt} {v}" for pt in points for v in switch_sets]


def resolve(switches: dict) -> list[tuple[object, str, object]]:
    """``switches`` as (ats_fx module, attribute, value) triples, resolved once."""
    import importlib

    out = []
    for key, value in switches.items():
        module_name, attr, values = SWITCHES[key]
        out.append((importlib.import_module(module_name), attr, values[value]))
    return out


@contextlib.contextmanager
def applied(settings: list[tuple[object, str, object]]) -> Iterator[None]:
    """Resolved switches (``resolve``) set inside the block, restored after it."""
    saved = [(module, attr, getattr(module, attr)) for module, attr, _ in settings]
    try:
        for module, attr, value in settings:
            setattr(module, attr, value)
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def own_backend() -> Callable:
    """A backend that compiles as ``backend="ats"`` does, but is not equal to it or to another one:
    Dynamo reuses a code object's compiled graph wherever the backend compares equal and the guards
    pass, and the same model with other switches passes them, so an A/B of two configurations that
    differ only in their switches ran one compiled graph twice (docs/performance.md, "Small batches")."""
    from torch._dynamo.backends.registry import lookup_backend

    ats = lookup_backend("ats")

    def ats_variant(gm, example_inputs, **kwargs):
        return ats(gm, example_inputs, **kwargs)

    return ats_variant


def switched(switches: dict) -> contextlib.AbstractContextManager:
    """ats_fx's switches set to ``switches`` inside the block, restored after it."""
    return applied(resolve(switches))


class Switched:
    """``model`` called with ``switches`` set around every call: a traced, compiled or captured model
    reads them once, one that runs without graphs (batch_max padding, ``cuda_graphs=False``, compile
    without graphs) at every call. A few attribute writes a call: nothing next to a forward pass."""

    def __init__(self, model: Callable, switches: dict):
        self.model, self.settings = model, resolve(switches)

    def __call__(self, x: torch.Tensor):
        with applied(self.settings):
            return self.model(x)
