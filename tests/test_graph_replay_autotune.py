"""benchmarks/graph_replay_autotune.py: max-autotune's choices timed as CUDA graph replays.

No GPU here, so the capture is stood in for; what is tested is the plumbing the GPU runs rely on:
Inductor's own timing loop gets the replay instead of the callable, with its arguments, only within
the block, and the torch's own option is used where it exists."""
import pytest
import torch._inductor.config as inductor_config

from benchmarks import graph_replay_autotune as gra


class FakeBenchmarker:
    """Inductor's benchmarker as far as the stand-in uses it: a ``benchmark_gpu`` that times a callable."""

    def __init__(self):
        self.timed = []

    def benchmark_gpu(self, _callable, **kwargs):
        self.timed.append((_callable, kwargs))
        return 0.5


def choice():
    """An autotune choice's callable (never run here: the stand-in's capture is faked)."""


def replay():
    """What the faked capture returns for ``choice``."""


def test_within_the_block_inductor_times_the_graph_replay_with_its_own_arguments():
    bench = FakeBenchmarker()
    captured = []

    def capture(fn):
        captured.append(fn)
        return replay

    with gra.graph_replay_autotune(bench, capture=capture) as timing:
        assert timing.how == "patched"
        assert bench.benchmark_gpu(choice, rep=10, warmup=2) == 0.5
    assert captured == [choice]
    assert (timing.replayed, timing.host_launched) == (1, 0)
    assert bench.timed == [(replay, {"rep": 10, "warmup": 2})]
    # Outside the block the benchmarker times what it is given, and the instance holds no patch.
    bench.benchmark_gpu(choice)
    assert bench.timed[-1] == (choice, {})
    assert "benchmark_gpu" not in vars(bench)


def test_a_callable_that_cannot_be_captured_is_timed_launched_from_the_host():
    bench = FakeBenchmarker()
    with gra.graph_replay_autotune(bench, capture=lambda fn: None) as timing:
        bench.benchmark_gpu(choice, rep=10)
    assert bench.timed == [(choice, {"rep": 10})]
    assert str(timing) == "patched: 0 replayed, 1 host-launched"


class CaughtWarning:
    def __init__(self, message):
        self.message = message


def test_an_empty_capture_is_told_apart_from_one_that_recorded_work():
    # torch 2.11 binds a Triton template's launch stream before the capture: its graph comes out
    # empty, and torch says so at the capture's end; that choice must not be timed as a replay.
    empty = UserWarning("The CUDA Graph is empty. This usually means that the graph was attempted to be "
                        "captured on wrong device or stream.")
    assert gra.captured_nothing([CaughtWarning(empty)])
    assert not gra.captured_nothing([CaughtWarning(UserWarning("TF32 is off")), ])
    assert not gra.captured_nothing([])


def test_the_patch_is_put_back_when_the_compile_raises():
    bench = FakeBenchmarker()
    with pytest.raises(RuntimeError, match="compile failed"):
        with gra.graph_replay_autotune(bench, capture=lambda fn: replay):
            raise RuntimeError("compile failed")
    bench.benchmark_gpu(choice)
    assert bench.timed == [(choice, {})]


def test_without_the_upstream_option_inductors_own_benchmarker_is_wrapped_and_restored(monkeypatch):
    from torch._inductor.runtime.benchmarking import benchmarker

    monkeypatch.setattr(gra, "has_upstream_option", lambda: False)
    before = benchmarker.benchmark_gpu
    with gra.graph_replay_autotune(capture=lambda fn: replay) as timing:
        assert timing.how == "patched"
        assert benchmarker.benchmark_gpu != before
    assert benchmarker.benchmark_gpu == before
    assert "benchmark_gpu" not in vars(benchmarker)


@pytest.mark.skipif(not gra.has_upstream_option(), reason="this torch's Inductor has no autotune_cudagraph_benchmarking")
def test_where_the_torch_has_the_option_the_block_sets_it_and_patches_nothing():
    from torch._inductor.runtime.benchmarking import benchmarker

    before = benchmarker.benchmark_gpu
    was = inductor_config.autotune_cudagraph_benchmarking
    with gra.graph_replay_autotune() as timing:
        assert str(timing) == "inductor"
        assert inductor_config.autotune_cudagraph_benchmarking is True
        assert benchmarker.benchmark_gpu == before
    assert inductor_config.autotune_cudagraph_benchmarking == was


def test_capture_refuses_inside_a_running_capture(monkeypatch):
    monkeypatch.setattr(gra.torch.cuda, "is_current_stream_capturing", lambda: True)
    assert gra.capture_replay(choice) is None


def test_compiled_benchmark_labels_rows_timed_this_way():
    import argparse

    from benchmarks.compiled import mode_label

    args = argparse.Namespace(no_coordinate_descent=True, inductor={}, autotune_rep=10, graph_replay_autotune=True)
    assert mode_label("max-autotune", args) == "max-autotune no-cd autotune_rep=10 graph-replay-autotune"
    assert mode_label("reduce-overhead", args) == "reduce-overhead no-cd autotune_rep=10"
