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

    def capture(fn, calls):
        captured.append((fn, calls))
        return replay

    with gra.graph_replay_autotune(bench, capture=capture) as timing:
        assert timing.how == "patched"
        assert bench.benchmark_gpu(choice, rep=10, warmup=2) == 0.5
    assert captured == [(choice, 1)]
    assert (timing.replayed, timing.host_launched) == (1, 0)
    assert bench.timed == [(replay, {"rep": 10, "warmup": 2})]
    # Outside the block the benchmarker times what it is given, and the instance holds no patch.
    bench.benchmark_gpu(choice)
    assert bench.timed[-1] == (choice, {})
    assert "benchmark_gpu" not in vars(bench)


def test_a_callable_that_cannot_be_captured_is_timed_launched_from_the_host():
    bench = FakeBenchmarker()
    with gra.graph_replay_autotune(bench, capture=lambda fn, calls: None) as timing:
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
        with gra.graph_replay_autotune(bench, capture=lambda fn, calls: replay):
            raise RuntimeError("compile failed")
    bench.benchmark_gpu(choice)
    assert bench.timed == [(choice, {})]


def test_without_the_upstream_option_inductors_own_benchmarker_is_wrapped_and_restored(monkeypatch):
    from torch._inductor.runtime.benchmarking import benchmarker

    monkeypatch.setattr(gra, "has_upstream_option", lambda: False)
    before = benchmarker.benchmark_gpu
    with gra.graph_replay_autotune(capture=lambda fn, calls: replay) as timing:
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


class ListBenchmarker(FakeBenchmarker):
    """A benchmarker asked for every timing (Inductor's ``return_mode="all"``)."""

    def benchmark_gpu(self, _callable, **kwargs):
        self.timed.append((_callable, kwargs))
        return [0.5, 1.0]


def test_calls_back_to_back_in_one_graph_divide_the_replays_time():
    # At batch 1 a GEMM takes about what one replay's launch does: 20 calls in one graph share it.
    bench = FakeBenchmarker()
    asked = []
    with gra.graph_replay_autotune(bench, capture=lambda fn, calls: asked.append(calls) or replay,
                                   calls_per_graph=20) as timing:
        assert bench.benchmark_gpu(choice, rep=10) == pytest.approx(0.5 / 20)
    assert asked == [20]
    assert bench.timed == [(replay, {"rep": 10})]
    assert str(timing) == "patched: 1 replayed, 0 host-launched, 20 calls per graph"
    lists = ListBenchmarker()
    with gra.graph_replay_autotune(lists, capture=lambda fn, calls: replay, calls_per_graph=4):
        assert lists.benchmark_gpu(choice) == pytest.approx([0.125, 0.25])


def test_a_host_launched_fallback_is_not_divided():
    bench = FakeBenchmarker()
    with gra.graph_replay_autotune(bench, capture=lambda fn, calls: None, calls_per_graph=20):
        assert bench.benchmark_gpu(choice) == 0.5  # one call was timed: nothing to share


def test_several_calls_per_graph_use_the_stand_in_even_where_the_torch_has_the_option(monkeypatch):
    # Upstream's option records one call per graph; more need the stand-in.
    from torch._inductor.runtime.benchmarking import benchmarker

    monkeypatch.setattr(gra, "has_upstream_option", lambda: True)
    before = benchmarker.benchmark_gpu
    with gra.graph_replay_autotune(capture=lambda fn, calls: replay, calls_per_graph=20) as timing:
        assert timing.how == "patched"
        assert benchmarker.benchmark_gpu != before
    assert benchmarker.benchmark_gpu == before


def test_fewer_than_one_call_per_graph_is_refused():
    with pytest.raises(ValueError, match="calls_per_graph=0"):
        with gra.graph_replay_autotune(FakeBenchmarker(), calls_per_graph=0):
            pass
    with pytest.raises(ValueError, match="calls=0"):
        gra.capture_replay(choice, calls=0)


def test_interleaved_max_autotune_rows_say_how_they_were_compiled():
    from benchmarks.interleaved import table

    args = dict(mode="max-autotune", inductor={"benchmark_epilogue_fusion": False}, static_batch=True,
                no_coordinate_descent=True, autotune_rep=10, graph_replay_autotune=True, calls_per_graph=20,
                dtype="float16", warmup_batch=None, batches=[1], rounds=7, rep=200)
    dense = dict(model="m", batch=1, config="dense same-compile", img_s=2000.0, compile_s=4.0)
    ats = dict(model="m", batch=1, config="multi rho=0.87", img_s=2100.0, compile_s=400.0, speedup_median=1.05,
               speedup_min=1.04, speedup_max=1.06, flops_ratio=1.545, efficiency=1.05 / 1.545)
    text = table({"env": dict(device="GPU", torch="2.11", triton="3.6", date="today"), "args": args,
                  "rows": [dense, ats]})
    assert ("max-autotune, benchmark_epilogue_fusion=False, static batch, no coordinate descent, autotune rep 10 ms, "
            "GEMM choices timed as CUDA graph replays (graph_replay_autotune, 20 calls per graph)") in text
    # No plain-Inductor dense model was compiled: its column stays empty, the ATS row has its ratio.
    assert "| m | 1 | multi rho=0.87 | 2100 | 1.050 [1.040, 1.060] | 1.545 | 0.680 |  | 400.0 |" in text


def test_compiled_benchmark_labels_the_calls_per_graph():
    import argparse

    from benchmarks.compiled import mode_label

    args = argparse.Namespace(no_coordinate_descent=False, inductor={}, autotune_rep=None,
                              graph_replay_autotune=True, calls_per_graph=20)
    assert mode_label("max-autotune", args) == "max-autotune graph-replay-autotune x20"


@pytest.mark.parametrize("module", ["benchmarks.compiled", "benchmarks.interleaved"])
def test_both_benchmarks_take_the_graph_replay_flags(module, monkeypatch):
    import importlib

    bench = importlib.import_module(module)
    got = []
    monkeypatch.setattr(bench, "run_and_report", lambda args, run, table: got.append(args))
    bench.main(["--graph-replay-autotune", "--calls-per-graph", "20", "--no-plain-dense", "--static-batch",
                "--no-coordinate-descent", "--autotune-rep", "10", "--inductor", "benchmark_epilogue_fusion=False"])
    (args,) = got
    assert (args.graph_replay_autotune, args.calls_per_graph, args.no_plain_dense, args.static_batch) == (True, 20, True, True)
    assert (args.no_coordinate_descent, args.autotune_rep, args.inductor) == (True, 10, {"benchmark_epilogue_fusion": False})


def test_the_benchmarks_time_graph_replays_only_when_asked_and_under_max_autotune():
    import argparse

    from benchmarks.compiled import graph_replay_scope

    asked = argparse.Namespace(graph_replay_autotune=True, calls_per_graph=20)
    with graph_replay_scope(asked, "reduce-overhead") as timing:
        assert timing is None
    with graph_replay_scope(argparse.Namespace(graph_replay_autotune=False, calls_per_graph=1), "max-autotune") as timing:
        assert timing is None
    with graph_replay_scope(asked, "max-autotune") as timing:
        assert str(timing) == "patched: 0 replayed, 0 host-launched, 20 calls per graph"


def test_interleaved_rows_show_what_static_padding_runs_where_it_differs():
    """At rho=1.0 static padding runs every row: the FLOPs cell says so beside the kept-rows ratio."""
    from benchmarks.interleaved import table

    args = dict(mode="reduce-overhead", dtype="float16", warmup_batch=None, batches=[256], rounds=7, rep=200)
    row = dict(model="m", batch=256, config="multi rho=1.0", img_s=100.0, compile_s=30.0, speedup_median=0.95,
               speedup_min=0.94, speedup_max=0.96, flops_ratio=1.167, efficiency=0.95 / 1.167)
    env = dict(device="GPU", torch="2.11", triton="3.6", date="today")
    same = table({"env": env, "args": args, "rows": [{**row, "flops_ratio_static": 1.167}]})
    assert "| 1.167 | 0.814 |" in same and "static padding runs" not in same
    full = table({"env": env, "args": args, "rows": [{**row, "flops_ratio_static": 1.0}]})
    assert "| 1.167 (static padding runs 1.000) | 0.814 |" in full
