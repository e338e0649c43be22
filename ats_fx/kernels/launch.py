"""A cached launcher for the ATS kernels in eager: Triton's compiled kernel, launched directly.

``kernel[grid](...)`` goes through ``JITFunction.run``, which binds every argument, derives the
call's specialisation, hashes it into the kernel-cache key and checks the kernel's globals, on every
call: 65-90 us of host time per launch on the H200's host for these kernels of 20-45 arguments
(docs/performance.md, "Host time"). An eager stage launches three to five of them, so at batch 1,
without CUDA graphs, the host is the stage's cost.

``cached_launch(kernel)[grid](...)`` takes Triton's path once per *specialisation key* and keeps the
``CompiledKernel`` it returns; later calls with the same key launch that kernel with the same call
Triton itself makes (``CompiledKernel.run`` with every bound argument, constexprs included).

The key holds everything Triton specialises on, never less: per tensor its dtype and whether its
address is 16-byte aligned; per int its type, whether it is 1, whether it divides by 16 and whether
it fits 32 bits; the type of every other argument; every keyword (constexprs and launch options);
and the current device. A finer key than Triton's costs at most a second entry for the same kernel,
never a wrong one.

Triton's own path is kept where this one cannot be exact: Triton's interpreter, Triton releases
before 3.4 (no ``triton.knobs``; their launch call differs), launch hooks set (profilers read them),
``ATS_FX_CACHED_LAUNCH=0`` (benchmarks flip it), and any keyword argument that is a tensor.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

# The switch benchmarks flip to measure Triton's own launch path.
ENABLED = os.environ.get("ATS_FX_CACHED_LAUNCH", "1") != "0"

try:
    from triton import knobs as _knobs
    from triton.runtime.driver import driver as _driver
except ImportError:  # Triton before 3.4: its launch call differs; keep its own path
    _knobs = _driver = None


_MISSING = object()


def _spec(a: Any) -> Any:
    """What Triton specialises a kernel on for one argument (or finer)."""
    if type(a) is torch.Tensor:
        return a.dtype, a.data_ptr() % 16 == 0
    if type(a) is int:
        return int, a == 1, a % 16 == 0, -(2**31) <= a < 2**31
    return type(a)


class CachedLaunch:
    """``launcher[grid](*args, **kwargs)`` runs the Triton kernel as ``kernel[grid](...)`` would."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._cache: dict = {}
        self._names: tuple = ()
        self._defaults: dict = {}

    def __getitem__(self, grid: tuple) -> Callable[..., Any]:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _usable(self) -> bool:
        return (ENABLED and _knobs is not None and os.environ.get("TRITON_INTERPRET") != "1"
                and _knobs.runtime.launch_enter_hook is None and _knobs.runtime.launch_exit_hook is None)

    def launch(self, grid: tuple, args: tuple, kwargs: dict) -> Any:
        """Launch on ``grid`` (a tuple of up to three ints)."""
        if not self._usable():
            return self.kernel[grid](*args, **kwargs)
        device = _driver.active.get_current_device()
        key = (device, tuple(map(_spec, args)), tuple(kwargs.items()))
        entry = self._cache.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if compiled is not None and hasattr(compiled, "packed_metadata") and not any(
                    isinstance(v, torch.Tensor) for v in kwargs.values()):
                self._remember(key, compiled, len(args), kwargs)
            return compiled
        compiled, tail = entry
        for (name, _), (value, scope) in self.kernel.used_global_vals.items():
            if scope.get(name, _MISSING) != value:  # Triton's own path raises on a changed global
                return self.kernel[grid](*args, **kwargs)
        bound = args + tuple(kwargs[n] if n in kwargs else self._defaults[n] for n in tail)
        stream = _driver.active.get_current_stream(device)
        g1 = grid[1] if len(grid) > 1 else 1
        g2 = grid[2] if len(grid) > 2 else 1
        compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None,
                     None, None, *bound)
        return compiled

    def _remember(self, key: tuple, compiled: Any, positional: int, kwargs: dict) -> None:
        """Keep ``compiled`` for ``key``, with the names of the parameters bound after the positional
        ones (keywords, else the signature's defaults), in the kernel's own order."""
        if not self._names:
            params = self.kernel.signature.parameters
            self._names = tuple(params)
            self._defaults = {n: p.default for n, p in params.items() if p.default is not p.empty}
        tail = self._names[positional:]
        if all(n in kwargs or n in self._defaults for n in tail):
            self._cache[key] = (compiled, tail)


def cached_launch(kernel: Any) -> CachedLaunch:
    """Wrap a ``@triton.jit`` kernel so that eager launches skip Triton's per-call binding."""
    return CachedLaunch(kernel)
