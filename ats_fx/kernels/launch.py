"""A lean launcher for the ATS kernels in eager: Triton's compiled kernel, launched directly.

``kernel[grid](...)`` goes through ``JITFunction.run``, which derives a specialisation from every
argument on every call. On the H100 (triton 3.6) that is 42 us of host time for the head-logits
kernel's 30 arguments, against 10 us for a kernel of 3 and 5.5 us for the same compiled kernel
launched with its arguments bound beforehand (``benchmarks/stage_host.py``). An eager stage makes
four such launches, so at batch 1 without CUDA graphs the launches are most of its host time.

``fast_launch(kernel)[grid](...)`` takes Triton's path once per key and keeps the ``CompiledKernel``
it returns; later calls with the same key make the call Triton itself makes (``CompiledKernel.run``
with every bound argument, launch hooks and their metadata included). The key is cheap because the
kernels here pass their tensors first: the non-tensor arguments as they are (exact values: finer than
Triton's specialisation, so at worst a second entry for the same kernel), every keyword (constexprs
and launch options), the device, and per leading tensor its dtype and whether its address is 16-byte
aligned (what Triton specialises a pointer on). Each argument position keeps its type from call to
call at every call site here (an int never turns into a bool there).

An earlier launcher (commit 3efeb59) built its key argument by argument in Python and saved nothing.

Triton's own path is kept where the cache cannot be exact or cannot help: Triton's interpreter, a
Triton without ``knobs`` (before 3.4), pre-run hooks, Triton's debug mode or a stage-inspection hook,
a tensor among the trailing arguments or keywords, a changed global the kernel read, and
``ATS_FX_FAST_LAUNCH=0`` (benchmarks flip ``ENABLED``). ``COUNTS`` tells how many launches took each
path, so a benchmark can show that the fast one ran.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Callable

import torch

# The switch benchmarks flip to measure Triton's own launch path.
ENABLED = os.environ.get("ATS_FX_FAST_LAUNCH", "1") != "0"
# Keys kept per kernel (a batch_max stage has one width per batch, so one key per width seen).
MAX_KEYS = 1024
COUNTS: collections.Counter = collections.Counter()  # "fast" / "triton" launches

try:
    from triton import knobs as _knobs
    from triton.runtime.driver import driver as _driver
except ImportError:  # Triton before 3.4: its launch call differs; keep its own path
    _knobs = _driver = None

_MISSING = object()


class FastLaunch:
    """``launcher[grid](*args, **kwargs)`` runs the Triton kernel as ``kernel[grid](...)`` would."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.fn = getattr(kernel, "fn", kernel)  # the Python function, for tests and tools
        self._cache: dict = {}
        self._tensors = -1  # leading tensor arguments, counted at the first launch
        self._names: tuple = ()
        self._defaults: dict = {}

    def __getitem__(self, grid: tuple) -> Callable[..., Any]:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _usable(self) -> bool:
        return (ENABLED and _knobs is not None and os.environ.get("TRITON_INTERPRET") != "1"
                and not getattr(self.kernel, "pre_run_hooks", None) and not _knobs.runtime.debug
                and getattr(_knobs.runtime, "add_stages_inspection_hook", None) is None)

    def launch(self, grid: tuple, args: tuple, kwargs: dict) -> Any:
        """Launch on ``grid`` (a tuple of up to three ints)."""
        if not self._usable():
            return self._triton(grid, args, kwargs)
        n = self._tensors
        if n < 0:  # the first launch: count the leading tensors
            n = self._tensors = next((i for i, a in enumerate(args) if type(a) is not torch.Tensor), len(args))
        device = _driver.active.get_current_device()
        try:
            lead = args[:n]
            key = (device, args[n:], tuple(kwargs.items()), tuple([t.dtype for t in lead]),
                   tuple([t.data_ptr() & 15 == 0 for t in lead]))
            entry = self._cache.get(key)
        except (AttributeError, TypeError):  # not a tensor where the first call had one; unhashable
            return self._triton(grid, args, kwargs)
        if entry is None:
            compiled = self._triton(grid, args, kwargs)
            self._remember(key, compiled, args, kwargs)
            return compiled
        compiled, tail = entry
        for (name, _), (value, scope) in self.kernel.used_global_vals.items():
            if scope.get(name, _MISSING) != value:  # Triton's own path raises on a changed global
                return self._triton(grid, args, kwargs)
        bound = args + tuple([kwargs[t] if t in kwargs else self._defaults[t] for t in tail])
        stream = _driver.active.get_current_stream(device)
        enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
        meta = compiled.launch_metadata(grid, stream, *bound) if enter is not None else None
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                     compiled.function, compiled.packed_metadata, meta, enter, leave, *bound)
        COUNTS["fast"] += 1
        return compiled

    def _triton(self, grid: tuple, args: tuple, kwargs: dict) -> Any:
        COUNTS["triton"] += 1
        return self.kernel[grid](*args, **kwargs)

    def _remember(self, key: tuple, compiled: Any, args: tuple, kwargs: dict) -> None:
        """Keep ``compiled`` for ``key``, with the names of the parameters bound after the positional
        ones (keywords, else the signature's defaults), in the kernel's own order."""
        if compiled is None or not hasattr(compiled, "packed_metadata"):
            return
        if any(isinstance(a, torch.Tensor) for a in (*args[self._tensors:], *kwargs.values())):
            return
        if not self._names:
            params = self.kernel.signature.parameters
            self._names = tuple(params)
            self._defaults = {n: p.default for n, p in params.items() if p.default is not p.empty}
        tail = self._names[len(args):]
        if all(n in kwargs or n in self._defaults for n in tail):
            if len(self._cache) >= MAX_KEYS:
                self._cache.clear()
            self._cache[key] = (compiled, tail)


def fast_launch(kernel: Any) -> Any:
    """Wrap a ``@triton.jit`` kernel so that eager launches skip Triton's per-call binding (under the
    interpreter the kernel is returned as it is)."""
    if not hasattr(kernel, "used_global_vals"):  # Triton's InterpretedFunction
        return kernel
    return FastLaunch(kernel)
