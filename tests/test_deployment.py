"""Deployment without Python's ats_fx: an exported ATS model holds aten ops only, and its AOTInductor
package loads and runs in a process that never imports ats_fx (the CPU here; CUDA in
benchmarks/deploy.py on the GPU)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import ats_fx
from conftest import timm_model


def export(model: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)


def ats_ops(program: torch.export.ExportedProgram) -> list[str]:
    return [str(n.target) for n in program.graph.nodes if "ats_fx" in str(n.target)]


@pytest.mark.parametrize("name, kwargs", [
    ("deit_small_patch16_224", {}),  # class token
    ("vit_base_patch16_reg4_gap_256", {}),  # registers, no class token: mean query row scores
])
def test_exported_program_holds_no_ats_fx_ops(name, kwargs):
    ats = ats_fx.transform(timm_model(name, img_size=64, **kwargs), range(1, 4), ratio=0.5)
    assert not ats_ops(export(ats, torch.randn(2, 3, 64, 64)))


def test_aoti_package_runs_where_ats_fx_is_not_importable(tmp_path):
    torch.manual_seed(0)
    model = timm_model("deit_small_patch16_224", img_size=32, depth=3)
    ats = ats_fx.transform(model, range(1, 3), ratio=0.5)
    images = torch.randn(3, 3, 32, 32)
    program = export(ats, images[:2])
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "ats.pt2"))
    torch.save({"images": images}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ats_fx"] = None  # any import of ats_fx now fails
        import torch
        from torch._inductor import aoti_load_package

        run = aoti_load_package({package!r})
        images = torch.load({str(tmp_path / "inputs.pt")!r})["images"]
        with torch.no_grad():
            torch.save(run(images), {str(tmp_path / "out.pt")!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        want = ats(images)  # eager ATS: batch_max padding, the same logits
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, atol=1e-4, rtol=1e-4)
