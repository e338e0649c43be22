"""Programmatic dependent launch (Hopper and later) for a stage's three kernels.

A stage runs head logits -> sampling -> attention back to back, and at batch 1 each is a few
microseconds, so the gap between kernels and each kernel's launch are a large share of the stage
(~0.5 us of gap per kernel in CUDA graphs, docs/performance.md). Launched with PDL, a kernel
may be scheduled as soon as every program of the kernel before it has started; it then waits in
``gdc_wait`` until that kernel has finished and its writes are visible.

The rule every kernel here keeps: ``gdc_wait`` is its first statement, before any load or store,
so nothing it touches can race the kernel before it (not even a buffer that kernel still reads),
and since that kernel also waited first, every earlier kernel has finished too. Only the launch
latency overlaps, never memory traffic.

Off on CPUs, Triton's interpreter (which has no ``gdc_wait``) and GPUs before sm_90, and wherever
``ATS_FX_PDL=0`` is set in the environment.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# The switch benchmarks flip to measure the same kernels without PDL.
ENABLED = os.environ.get("ATS_FX_PDL", "1") != "0"
# Older Triton releases (torch>=2.6 allows them) lack gdc_wait and the launch_pdl option: no PDL there.
_TRITON_HAS_PDL = hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")


def use_pdl(x: torch.Tensor) -> bool:
    """Launch with PDL: ``x`` is on a CUDA device of compute capability 9 or later, not interpreted,
    and this Triton has PDL."""
    if not (ENABLED and _TRITON_HAS_PDL and x.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _hopper_or_later(x.device.index if x.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _hopper_or_later(device: int) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """The first statement of a PDL-launched kernel: wait for the kernel before it to finish, then
    let the kernel after it be scheduled (it waits in turn)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launch_options(pdl: bool) -> dict:
    """Keyword arguments for a kernel launch: ``launch_pdl`` only when used (older Triton lacks it)."""
    return {"launch_pdl": True} if pdl else {}
