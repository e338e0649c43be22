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


def test_a_padding_suffix_reaches_the_backend_and_the_flops_count(monkeypatch):
    """"multi rho=1.0:batch_max" asks the backend for batch_max; no suffix leaves the backend's default
    (static). The FLOPs of a suffixed label are counted with that padding."""
    import timm

    from benchmarks.compiled import flops_of, split_padding

    assert split_padding("multi rho=1.0:batch_max") == ("multi rho=1.0", "batch_max")
    assert split_padding("multi rho=1.0", "static") == ("multi rho=1.0", "static")
    compiled = []

    def recording_backend(gm, example_inputs, options=None):
        compiled.append(options)
        return gm.forward

    monkeypatch.setattr(ats_fx.compile, "ats_backend", recording_backend)
    torch._dynamo.reset()
    try:
        base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
        for label in ("multi rho=1.0:batch_max", "multi rho=1.0"):
            compile_model(base, label, "default")(torch.randn(2, 8))
        assert compiled[0]["padding"] == "batch_max" and "padding" not in compiled[1]
    finally:
        torch._dynamo.reset()
    vit = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8).eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    static = flops_of(vit, "multi rho=1.0:static", x)
    assert static == flops_of(vit, "multi rho=1.0", x, padding="static")
    assert flops_of(vit, "multi rho=1.0:batch_max", x) < static  # the duplicates' rows are dropped
