"""benchmarks.compiled.compile_model: every call is a compile of its own (a variant of a point must
not run the first compile's graph, as it silently did before session 17)."""
from __future__ import annotations

import pytest
import torch

import ats_fx.compile
from benchmarks.compiled import compile_model


@pytest.fixture
def backend_options(monkeypatch):
    """A stand-in for ats_backend that compiles nothing and records the options of each compile."""
    compiled = []

    def recording_backend(gm, example_inputs, options=None):
        compiled.append(options)
        return gm.forward

    monkeypatch.setattr(ats_fx.compile, "ats_backend", recording_backend)
    torch._dynamo.reset()
    yield compiled
    torch._dynamo.reset()  # no compiled entry of the stand-in backend outlives the test


def test_two_compiles_of_one_point_are_two_dynamo_compiles(backend_options):
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    x = torch.randn(2, 8)
    first = compile_model(base, "multi rho=0.87", "default")
    second = compile_model(base, "multi rho=0.87", "default")
    first(x)
    second(x)
    first(x)
    assert len(backend_options) == 2  # one Dynamo compile each, and no recompile on the way back
    assert backend_options[0] == backend_options[1] and backend_options[0]["ratio"] == 0.87


def test_a_padding_suffix_reaches_the_backend_and_the_flops_count(backend_options):
    """"multi rho=1.0:batch_max" asks the backend for batch_max; no suffix leaves the backend's default
    (static). The FLOPs of a suffixed label are counted with that padding."""
    import timm

    from benchmarks.compiled import flops_of, split_padding

    assert split_padding("multi rho=1.0:batch_max") == ("multi rho=1.0", "batch_max")
    assert split_padding("multi rho=1.0", "static") == ("multi rho=1.0", "static")
    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    for label in ("multi rho=1.0:batch_max", "multi rho=1.0"):
        compile_model(base, label, "default")(torch.randn(2, 8))
    assert backend_options[0]["padding"] == "batch_max" and "padding" not in backend_options[1]
    vit = timm.create_model("deit_tiny_patch16_224", img_size=64, patch_size=8).eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    static = flops_of(vit, "multi rho=1.0:static", x)
    assert static == flops_of(vit, "multi rho=1.0", x, padding="static")
    assert flops_of(vit, "multi rho=1.0:batch_max", x) < static  # the duplicates' rows are dropped
