"""Configuration labels: an operating point, then the transform keywords and implementation switches
that vary it, so an A/B of ats_fx's own choices runs as one more configuration of a benchmark.

    "multi rho=0.87"                       # stages 3-11 at rho=0.87 (harness.POINTS)
    "multi rho=0.87 padding=static"        # ... with a transform keyword
    "single K=108 overlap=off pdl=off"     # ... with ats_fx's overlapped stage and PDL switched off

The switches are module-level choices of ats_fx that a user never sets (``SWITCHES``). They are read
when a stage is traced, compiled or captured as a CUDA graph, so ``Switched`` sets them around the
model's first calls at each batch size (every call for a model that runs without graphs).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from benchmarks import harness

TRANSFORM_KEYS = ("padding",)
# switch -> (ats_fx module, attribute, value of each setting)
SWITCHES = {
    "overlap": ("ats_fx.dispatch", "OVERLAP", {"auto": "auto", "on": "on", "off": "off"}),
    "pdl": ("ats_fx.kernels.pdl", "ENABLED", {"on": True, "off": False}),
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
        if key in TRANSFORM_KEYS:
            transform_kw[key] = value
        elif key in SWITCHES and value in SWITCHES[key][2]:
            switches[key] = value
        else:
            raise SystemExit(f"configuration {label!r}: {token!r} is neither {TRANSFORM_KEYS} nor a switch "
                             f"{ {k: list(v[2]) for k, v in SWITCHES.items()} }")
    return point, transform_kw, switches


@contextlib.contextmanager
def switched(switches: dict) -> Iterator[None]:
    """ats_fx's switches set to ``switches`` inside the block, restored after it."""
    import importlib

    saved = []
    try:
        for key, value in switches.items():
            module_name, attr, values = SWITCHES[key]
            module = importlib.import_module(module_name)
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, values[value])
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


class Switched:
    """``model`` called with ``switches`` set during its first ``warm_calls`` calls at each batch size
    (where it traces, compiles and captures its graphs), then called directly, so the timed calls pay
    nothing for the switch; ``every_call`` sets them around every call (a model without graphs decides
    at every call)."""

    def __init__(self, model: Callable, switches: dict, every_call: bool = False, warm_calls: int = 3):
        self.model, self.switches, self.every_call, self.warm_calls = model, switches, every_call, warm_calls
        self.calls: dict[int, int] = {}

    def __call__(self, x: torch.Tensor):
        n = self.calls.get(x.shape[0], 0)
        if n >= self.warm_calls and not self.every_call:
            return self.model(x)
        self.calls[x.shape[0]] = n + 1
        with switched(self.switches):
            return self.model(x)
