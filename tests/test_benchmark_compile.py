"""benchmarks.compiled.compile_model: every call is a compile of its own (a variant of a point must
not run the first compile's graph, as it silently did before session 17)."""
from __future__ import annotations

import torch

import ats_fx.compile
from benchmarks.compiled import compile_model


def test_two_compiles_of_one_point_are_two_dynamo_compiles(monkeypatch):
    compiled = []

    def counting_backend(gm, example_inputs, options=None):
        compiled.append(options)
        return gm.forward

    monkeypatch.setattr(ats_fx.compile, "ats_backend", counting_backend)
    torch._dynamo.reset()
    try:
        base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
        x = torch.randn(2, 8)
        first = compile_model(base, "multi rho=0.87", "default")
        second = compile_model(base, "multi rho=0.87", "default")
        first(x)
        second(x)
        first(x)
        assert len(compiled) == 2  # one Dynamo compile each, and no recompile on the way back
        assert compiled[0] == compiled[1] and compiled[0]["ratio"] == 0.87
    finally:
        torch._dynamo.reset()  # no compiled entry of the stand-in backend outlives the test
