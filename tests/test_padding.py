"""padding="auto", transform's default: static where it is traced or on a large CUDA batch, batch_max
elsewhere; the logits are the same either way."""
import pytest
import torch

from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

import ats_fx
from ats_fx import dispatch
from conftest import timm_model


def test_auto_resolves_per_call(monkeypatch):
    q = torch.randn(256, 2, 20, 8)
    assert dispatch.padding_for("auto", q, 10) == "batch_max"  # the CPU: a host read costs nothing
    assert dispatch.padding_for("static", q, 10) == "static"
    assert dispatch.padding_for("batch_max", q, 10) == "batch_max"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch.padding_for("auto", q, 10) == "static"  # compile and export: fixed shapes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_is_static_on_a_large_cuda_batch():
    q = torch.randn(dispatch.AUTO_STATIC_BATCH, 2, 20, 8, device="cuda")
    assert dispatch.padding_for("auto", q, 10) == "static"
    assert dispatch.padding_for("auto", q, 20) == "batch_max"  # static would keep every row
    assert dispatch.padding_for("auto", q[:1], 10) == "batch_max"


def test_auto_is_the_default_and_exports_with_static_widths():
    model = timm_model("vit_tiny_patch16_224", img_size=64)
    ats = ats_fx.transform(model, "1-3", ratio=0.5)
    assert ats.ats_options.padding == "auto"
    x = torch.randn(3, 3, 64, 64)
    static = ats_fx.transform(model, "1-3", ratio=0.5, padding="static")
    torch.testing.assert_close(ats(x), static(x))
    exported = torch.export.export(ats, (x,))
    vals = [n.meta["val"] for n in exported.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert not any(free_unbacked_symbols(v) for v in vals)  # no data-dependent (batch_max) width
    torch.testing.assert_close(exported.module()(x), static(x))
