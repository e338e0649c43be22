"""The fast launcher (ats_fx/kernels/launch.py): same launch as Triton's, new key wherever Triton
would specialise anew, Triton's own path wherever the cache cannot be exact."""
from __future__ import annotations

import pytest
import torch

from ats_fx.kernels import launch

GLOBAL_SETTING = 1


class FakeCompiled:
    """Stands in for Triton's CompiledKernel: records what ``run`` got."""

    function, packed_metadata = "fn", "meta"

    def __init__(self, calls):
        self.calls = calls

    def run(self, g0, g1, g2, stream, function, metadata, launch_metadata, enter, exit_, *args):
        self.calls.append(("fast", (g0, g1, g2), stream, args))
        if enter is not None:
            enter(launch_metadata)

    def launch_metadata(self, grid, stream, *args):
        return ("metadata", grid, stream, args)


class FakeKernel:
    """Stands in for a JITFunction with signature (X, n, scale, FLAG: constexpr, BLOCK: constexpr = 16)."""

    def __init__(self):
        import inspect

        def kernel(X, n, scale, FLAG, BLOCK=16):
            pass

        self.signature = inspect.signature(kernel)
        self.used_global_vals = {}
        self.pre_run_hooks = []
        self.calls, self.compiles = [], 0

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.compiles += 1
            self.calls.append(("triton", grid, args, kwargs))
            return FakeCompiled(self.calls)
        return run


class FakeDriver:
    class active:
        @staticmethod
        def get_current_device():
            return 0

        @staticmethod
        def get_current_stream(device):
            return 1234


class FakeRuntime:
    launch_enter_hook = launch_exit_hook = add_stages_inspection_hook = None
    debug = False


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(launch, "_driver", FakeDriver)
    monkeypatch.setattr(launch, "_knobs", type("knobs", (), {"runtime": FakeRuntime}))
    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = FakeKernel()
    cached = launch.fast_launch(kernel)
    cached[(1,)](torch.zeros(64), 7, 1.5, FLAG=False)  # the first launch counts the leading tensors
    kernel.calls.clear()
    kernel.compiles = 0
    return kernel, cached


def test_second_launch_skips_triton_and_binds_every_argument_in_order(fake):
    kernel, cached = fake
    x = torch.zeros(64)
    cached[(3, 2)](x, 32, 0.5, FLAG=True, num_warps=4)
    y = torch.ones(64)  # another tensor of the same dtype and alignment, another grid
    cached[(5,)](y, 32, 0.5, FLAG=True, num_warps=4)
    assert kernel.compiles == 1
    kind, grid, stream, args = kernel.calls[-1]
    # every parameter in the kernel's order: keywords, then the signature's default; no launch options
    assert kind == "fast" and grid == (5, 1, 1) and stream == 1234 and args == (y, 32, 0.5, True, 16)


@pytest.mark.parametrize("change", ["int one", "int not /16", "int64", "dtype", "misaligned", "keyword", "option"])
def test_anything_triton_specialises_on_compiles_anew(fake, change):
    kernel, cached = fake
    x = torch.zeros(64)
    cached[(1,)](x, 32, 0.5, FLAG=True, num_warps=4)
    args, kw = [x, 32, 0.5], {"FLAG": True, "num_warps": 4}
    if change == "int one":
        args[1] = 1
    elif change == "int not /16":
        args[1] = 33
    elif change == "int64":
        args[1] = 2**33
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    elif change == "misaligned":
        args[0] = x[1:]
    elif change == "keyword":
        kw["FLAG"] = False
    else:
        kw["num_warps"] = 8
    cached[(1,)](*args, **kw)
    assert kernel.compiles == 2 and kernel.calls[-1][0] == "triton"


def test_equal_specialisation_reuses_the_kernel(fake):
    kernel, cached = fake
    cached[(1,)](torch.zeros(64), 32, 0.5, FLAG=True)
    cached[(1,)](torch.ones(128), 32, 0.5, FLAG=True)  # another tensor of the same dtype and alignment
    assert kernel.compiles == 1 and kernel.calls[-1][0] == "fast"


def test_triton_path_where_the_cache_cannot_be_exact(fake, monkeypatch):
    kernel, cached = fake
    x = torch.zeros(64)
    # a tensor passed by keyword is never cached
    cached[(1,)](x, 32, 0.5, FLAG=x)
    cached[(1,)](x, 32, 0.5, FLAG=x)
    assert kernel.compiles == 2
    # a global the kernel read has changed: Triton's path (which raises there)
    cached[(1,)](x, 32, 0.5, FLAG=True)
    kernel.used_global_vals = {("GLOBAL_SETTING", 0): (0, globals())}
    cached[(1,)](x, 32, 0.5, FLAG=True)
    assert kernel.calls[-1][0] == "triton"
    # a pre-run hook or Triton's debug mode: Triton's path
    kernel.used_global_vals = {}
    kernel.pre_run_hooks = [lambda *a, **k: None]
    cached[(1,)](x, 32, 0.5, FLAG=True)
    assert kernel.calls[-1][0] == "triton"
    kernel.pre_run_hooks = []
    monkeypatch.setattr(FakeRuntime, "debug", True)
    cached[(1,)](x, 32, 0.5, FLAG=True)
    assert kernel.calls[-1][0] == "triton"
    monkeypatch.setattr(FakeRuntime, "debug", False)
    # a tensor where the first launch had an int: Triton's path, nothing cached
    cached[(1,)](x, x, 0.5, FLAG=True)
    assert kernel.calls[-1][0] == "triton"
    cached[(1,)](x, 32, 0.5, FLAG=True)
    assert kernel.calls[-1][0] == "fast"
    # switched off, or under the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cached[(1,)](x, 32, 0.5, FLAG=True)
    assert kernel.calls[-1][0] == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(launch, "ENABLED", False)
    cached[(1,)](x, 32, 0.5, FLAG=True)
    assert kernel.calls[-1][0] == "triton"


def test_launch_hooks_get_the_metadata_triton_would_give_them(fake, monkeypatch):
    # A profiler's launch hook: the fast path computes the launch metadata and passes the hooks on.
    kernel, cached = fake
    seen = []
    monkeypatch.setattr(FakeRuntime, "launch_enter_hook", seen.append)
    x = torch.zeros(64)
    cached[(2,)](x, 32, 0.5, FLAG=True)
    cached[(2,)](x, 32, 0.5, FLAG=True)
    assert kernel.calls[-1][0] == "fast"
    assert seen[-1] == ("metadata", (2,), 1234, (x, 32, 0.5, True, 16))


def test_the_cache_is_bounded(fake, monkeypatch):
    kernel, cached = fake
    monkeypatch.setattr(launch, "MAX_KEYS", 3)
    x = torch.zeros(64)
    for n in range(10):  # a batch_max stage: one width per batch
        cached[(1,)](x, 32 + n, 0.5, FLAG=True)
    assert len(cached._cache) <= 3


def test_interpreted_kernels_are_left_as_they_are():
    class Interpreted:  # Triton's InterpretedFunction has no used_global_vals
        pass

    k = Interpreted()
    assert launch.fast_launch(k) is k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the cached path runs compiled kernels on a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cached_launches_equal_tritons_on_the_gpu(monkeypatch, dtype):
    """Every ATS kernel of a stage, launched twice through the cache, then through Triton's path:
    the same indices, bit for bit the same attention; the fast path did run."""
    from ats_fx.kernels.attention_rows import attention_rows
    from ats_fx.kernels.sample import inverse_transform_sample
    from ats_fx.kernels.scores import class_token_scores

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 197, 64, generator=g).cuda().to(dtype) for _ in range(3))

    def stage():
        scores, _ = class_token_scores(q, k, v, None, 1, 0.125)
        budget = torch.full((2,), 64, device="cuda", dtype=torch.int64)
        index = inverse_transform_sample(scores, None, budget, 1)[0][:, :65]
        return index, attention_rows(q, k, v, index, None, 0.125)

    monkeypatch.setattr(launch, "ENABLED", True)
    first = stage()
    before = launch.COUNTS["fast"]
    cached = stage()
    assert launch.COUNTS["fast"] >= before + 4  # scores, normalise, sampling, attention
    monkeypatch.setattr(launch, "ENABLED", False)
    triton_path = stage()
    for a, b in ((first, cached), (cached, triton_path)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
