"""The benchmark harness: rotating rounds, the results file and the README table generated from it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from benchmarks import harness, report, speed


def test_rounds_rotate_and_speedups_are_per_round():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    times = harness.rounds(fns, torch.device("cpu"), n_rounds=3, budget_ms=1)
    assert all(len(v) == 3 for v in times.values())
    # Each round starts with another function: the first call of each round's first timing.
    starts = [order[0]] + [b for a, b in zip(order, order[1:]) if a != b]
    assert starts[0] == "a" and "b" in starts and "c" in starts
    ups = harness.speedups({"dense": [2.0, 4.0, 3.0], "ats": [1.0, 1.0, 3.0]}, "dense")
    assert ups["ats"] == (2.0, 1.0, 4.0) and ups["dense"] == (1.0, 1.0, 1.0)


def test_speed_appends_rows_with_environment_and_report_renders_them(tmp_path):
    results = tmp_path / "results.jsonl"
    speed.main(["--device", "cpu", "--models", "vit_tiny_patch16_224", "--img-size", "32", "--runs", "eager",
                "eager:no-graphs", "eager:autograd", "--batches", "1", "--points", "single K=48", "--rounds", "2", "--budget-ms", "5",
                "--flops-images", "1", "--results", str(results), "--cudnn-benchmark", "off"])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert {r["cudnn_benchmark"] for r in rows if r["batch"] > 0} == {False}  # torch's default, as asked
    timed = [r for r in rows if r["metric"] in ("img_s", "speedup")]
    assert timed and {(r["rounds"], r["budget_ms"]) for r in timed} == {(2, 5.0)}  # how each cell was timed
    metrics = {r["metric"] for r in rows}
    assert {"img_s", "speedup", "speedup_min", "speedup_max", "flops_ratio"} <= metrics
    for r in rows:
        assert {"device", "torch", "triton", "commit", "date", "model", "run", "batch", "config", "value"} <= set(r)
    assert {r["device"] for r in rows} == {harness.device_name(torch.device("cpu"))}
    table = report.speed_table(harness.load(results), rows[0]["device"], configs=("single K=48",))
    assert "| vit_tiny_patch16_224 | eager |" in table and "single K=48, batch 1" in table
    assert "| vit_tiny_patch16_224 | eager:no-graphs |" in table
    assert "| vit_tiny_patch16_224 | eager:autograd |" in table
    assert "Host time of one eager stage at batch 1" in table  # from the stage_host_us row


def test_speed_refuses_an_ats_fx_from_elsewhere_unless_its_commit_is_named(monkeypatch, tmp_path):
    # An A/B against an earlier commit imports that commit's ats_fx: its rows must name it.
    monkeypatch.setattr(speed.ats_fx, "__file__", str(tmp_path / "earlier" / "ats_fx" / "__init__.py"))
    monkeypatch.delenv("ATS_FX_COMMIT", raising=False)
    with pytest.raises(SystemExit, match="earlier.*set ATS_FX_COMMIT"):
        speed.check_tree()
    monkeypatch.setenv("ATS_FX_COMMIT", "08373e4")
    speed.check_tree()
    assert harness.environment()["commit"] == "08373e4"


def test_speed_hands_over_each_batch_as_soon_as_it_is_measured():
    # A GPU call cut off by its time limit keeps the batches it finished: rows come per batch.
    args = argparse.Namespace(img_size=32, rounds=1, budget_ms=1.0, dtype="float32")
    base = harness.build_timm("vit_tiny_patch16_224", img_size=32)
    cells = speed.measure_run("vit_tiny_patch16_224", base, "eager", ["single K=48"], [1, 2], args,
                              torch.device("cpu"), torch.float32)
    first = next(cells)
    assert {r["batch"] for r in first} == {1} and {"img_s", "speedup"} <= {r["metric"] for r in first}
    assert {r["batch"] for r in next(cells)} == {2}
    assert {r["metric"] for r in next(cells)} == {"stage_host_us"}
    assert next(cells, None) is None


def test_report_gives_each_device_its_own_table():
    base = {"benchmark": "speed", "model": "deit_small_patch16_224", "config": "multi rho=0.87", "torch": "2",
            "triton": "3", "dtype": "float16", "date": "d"}
    rows = [{**base, "device": "CPU (x, 2 threads)", "run": "eager", "batch": 1, "metric": "speedup", "value": 1.05,
             "commit": "c1"},
            {**base, "device": "NVIDIA H200", "run": "eager", "batch": 256, "metric": "speedup", "value": 1.3,
             "commit": "c2"},
            {**base, "device": "NVIDIA H200", "run": "any", "batch": 0, "metric": "flops_ratio", "value": 1.5,
             "commit": "c2"}]
    text = report.speed_tables(rows)
    gpu, cpu = text.split("**CPU (x, 2 threads)**")
    assert gpu.startswith("**NVIDIA H200**") and "1.30x (0.87)" in gpu and "batch 1" not in gpu
    assert "1.05x" in cpu and "batch 256" not in cpu and "1.30x" not in cpu
    # A GPU row says how cuDNN chose the dense conv (rows from before the field: on); a CPU row does not.
    assert "commit c2, d, cudnn.benchmark on" in gpu and "cudnn" not in cpu
    rows[1]["cudnn_benchmark"] = False
    assert "commit c2, d, cudnn.benchmark off" in report.speed_tables(rows)


def test_report_keeps_each_cells_newest_commit_on_its_own_row():
    # A rerun of some batches at a new commit must not blank the others, nor mix commits in a row.
    base = {"benchmark": "speed", "model": "deit_small_patch16_224", "config": "multi rho=0.87", "torch": "2",
            "triton": "3", "dtype": "float16", "date": "d", "device": "GPU", "run": "eager", "metric": "speedup"}
    rows = [{**base, "batch": 1, "value": 1.1, "commit": "old"}, {**base, "batch": 256, "value": 1.5, "commit": "old"},
            {**base, "batch": 1, "value": 1.2, "commit": "new"}]
    lines = [line for line in report.speed_table(rows, "GPU", configs=("multi rho=0.87",)).splitlines()
             if line.startswith("| DeiT-S")]
    assert lines == ["| DeiT-S | eager | new | 1.20x | n/m |", "| DeiT-S | eager | old | n/m | 1.50x |"]


def test_report_leaves_out_rows_from_before_their_run_changed():
    # compile:default before b09dcb9 timed the backend without CUDA graphs: a newer row of another
    # batch must not leave the old cells in the table as if they were current.
    base = {"benchmark": "speed", "model": "deit_small_patch16_224", "config": "multi rho=0.87", "torch": "2",
            "triton": "3", "dtype": "float16", "date": "d", "device": "GPU", "metric": "speedup"}
    rows = [{**base, "run": "compile:default", "batch": 8, "value": 0.4, "commit": "before"},
            {**base, "run": "compile:default", "batch": 1, "value": 5.0, "commit": "after"},
            {**base, "run": "eager", "batch": 8, "value": 1.3, "commit": "before"}]
    order = {("b09dcb9", "before"): False, ("b09dcb9", "after"): True}
    text = report.speed_table(rows, "GPU", configs=("multi rho=0.87",), ancestor=lambda a, b: order[(a, b)])
    lines = [line for line in text.splitlines() if line.startswith("| DeiT-S")]
    assert lines == ["| DeiT-S | compile:default | after | 5.00x | n/m |", "| DeiT-S | eager | before | n/m | 1.30x |"]
    assert "Not shown: compile:default rows from before commit b09dcb9" in text
    # Where git cannot place a commit the row stays, and nothing is said.
    kept = report.speed_table(rows, "GPU", configs=("multi rho=0.87",), ancestor=lambda a, b: None)
    assert "0.40x" in kept and "Not shown" not in kept


def test_report_places_commits_with_git():
    if report.is_ancestor("b09dcb9", "c20ad78") is None:
        pytest.skip("this checkout holds no history back to b09dcb9 (a shallow clone)")
    assert report.is_ancestor("b09dcb9", "c20ad78") is True and report.is_ancestor("c20ad78", "b09dcb9") is False
    assert report.is_ancestor("b09dcb9", "0000000") is None  # a commit git does not hold


def test_report_deploy_table_shows_the_newest_commit_per_device_and_dtype():
    base = {"benchmark": "deploy", "model": "deit_small_patch16_224", "run": "aoti", "torch": "2", "triton": "3",
            "dtype": "float16", "date": "d", "device": "GPU", "cxx": "/usr/bin/g++ (13)", "ld_preload": ""}

    def cell(commit, batch, speedup, ran=1.0):
        ats = {**base, "config": "multi rho=0.87", "commit": commit, "batch": batch}
        dense = {**ats, "config": "dense"}
        return [{**dense, "metric": "runs_without_ats_fx", "value": 1.0},
                {**ats, "metric": "runs_without_ats_fx", "value": ran},
                {**ats, "metric": "agreement", "value": 0.96875}, {**ats, "metric": "max_abs_diff", "value": 0.1},
                {**dense, "metric": "img_s", "value": 1000.0}, {**ats, "metric": "img_s", "value": 1500.0},
                {**ats, "metric": "speedup", "value": speedup}]

    rows = cell("old", 8, 0.5) + cell("new", 8, 1.5) + cell("new", 64, 1.25, ran=0.0)
    # The kernels the ATS package runs are a row's key: rows without the field ran the reference.
    rows += [{**r, "kernels": "triton", "commit": "newer"} for r in cell("x", 8, 2.0)]
    text = report.deploy_table(rows)
    lines = [line for line in text.splitlines() if line.startswith("| GPU")]
    assert len(lines) == 3 and "0.50x" not in text  # an older commit's cell never shares the table
    assert lines[0].split(" | ")[1:] == ["DeiT-S multi rho=0.87", "float16", "reference", "8", "both", "0.9688", "0.1",
                                         "1000", "1500", "1.50x", "new |"]
    assert " | 64 | dense | " in lines[1]  # the ATS package did not run there
    assert " | triton | 8 | both | " in lines[2] and "2.00x | newer |" in lines[2]
    assert "GPU: torch 2, triton 3, packages built by /usr/bin/g++ (13), preload none" in text
    assert report.deploy_table([r for r in rows if r["benchmark"] == "speed"]) == ""


def test_report_summary_shows_each_cells_newest_value_for_the_runs_users_make():
    base = {"benchmark": "speed", "model": "vit_base_patch16_224", "config": "multi rho=0.87", "torch": "2",
            "triton": "3", "dtype": "float16", "device": "GPU", "metric": "speedup", "cudnn_benchmark": False}
    rows = [{**base, "run": "eager", "batch": 1, "value": 1.1, "commit": "old", "date": "d1"},
            {**base, "run": "eager", "batch": 256, "value": 1.5, "commit": "old", "date": "d1"},
            {**base, "run": "eager", "batch": 1, "value": 1.2, "commit": "new", "date": "d2"},
            {**base, "run": "eager:no-graphs", "batch": 1, "value": 0.4, "commit": "new", "date": "d2"},
            {**base, "run": "compile:default", "batch": 256, "value": 1.6, "commit": "new", "date": "d2"},
            {**base, "run": "eager", "batch": 1, "value": 1.9, "commit": "new", "date": "d2",
             "metric": "speedup_vs_graphed_dense"},
            {**base, "model": "deit_small_patch16_224", "run": "eager", "batch": 1, "value": 1.3, "commit": "new",
             "date": "d2", "cudnn_benchmark": True}]
    text = report.summary_table(rows, "GPU", configs=("multi rho=0.87",), ancestor=lambda a, b: None)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == "| model | run | rho=0.87 b1 | rho=0.87 b256 |"
    # DeiT-S first, whatever the file's order; the newest value of each cell, across commits; only the
    # runs users make (no-graphs and the graphed-dense baseline stay in the whole matrix).
    assert lines[2:] == ["| DeiT-S | eager | 1.30x | - |", "| ViT-B/16 | eager | 1.20x | 1.50x |",
                         "| ViT-B/16 | compile | - | 1.60x |"]
    assert "GPU: torch 2, triton 3, float16; commits new, old (d1 to d2); cudnn.benchmark on at new, off at the others." in text
    assert report.summary_table(rows, "CPU", configs=("multi rho=0.87",), ancestor=lambda a, b: None) == ""


def test_report_readme_writes_the_summary_and_the_whole_matrix(tmp_path, monkeypatch):
    readme, full, results = tmp_path / "README.md", tmp_path / "speed.md", tmp_path / "results.jsonl"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\n")
    row = {"benchmark": "speed", "model": "deit_small_patch16_224", "config": "multi rho=0.87", "torch": "2",
           "triton": "3", "dtype": "float16", "device": "GPU", "metric": "speedup", "run": "eager:no-graphs",
           "batch": 1, "value": 0.42, "commit": "c", "date": "d"}
    results.write_text(json.dumps(row) + "\n" + json.dumps({**row, "run": "eager", "value": 1.25}) + "\n")
    monkeypatch.setattr(report, "README", readme)
    monkeypatch.setattr(report, "FULL", full)
    report.main(["--results", str(results), "--readme"])
    assert "1.25x" in readme.read_text() and "0.42x" not in readme.read_text()
    assert "| DeiT-S | eager:no-graphs | c | 0.42x |" in full.read_text() and "1.25x" in full.read_text()


def test_readme_and_speed_md_are_what_the_results_file_generates():
    # A result appended without `benchmarks.report --readme` would leave the README's tables stale.
    if report.is_ancestor("b09dcb9", "c20ad78") is None:
        pytest.skip("this checkout holds no history back to b09dcb9: the tables' left-out rows need it")
    rows = harness.load(harness.RESULTS)
    readme = report.README.read_text()
    between = readme.split(report.BEGIN, 1)[1].split(report.END, 1)[0]
    assert between == "\n" + report.summary_tables(rows) + "\n", "run python -m benchmarks.report --readme"
    assert report.FULL.read_text() == report.full_text(rows), "run python -m benchmarks.report --readme"


def test_report_rewrites_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold\n{report.END}\noutro\n")
    report.rewrite_readme("| new |", readme)
    assert readme.read_text() == f"intro\n{report.BEGIN}\n| new |\n{report.END}\noutro\n"


def test_kernels_benchmark_checks_each_kernel_against_its_reference(tmp_path):
    from benchmarks import kernels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: Triton's interpreter
    rows = kernels.run([(2, 2, 17, 8)], device, torch.float32, rounds=1, budget_ms=1)
    checks = {r["model"]: r["value"] for r in rows if r["metric"] in ("max_abs_error", "equal")}
    assert set(checks) == {"scores", "received_scores", "sample", "attention_rows", "masked_attention", "gather_add"}
    assert checks.pop("sample") == 1.0
    assert max(checks.values()) < 1e-5, checks
    assert {r["config"] for r in rows if r["metric"] == "ms"} == {"2x2x17x8 triton", "2x2x17x8 reference"}


def test_deploy_checks_the_package_against_eager_ats_and_records_refused_batches(tmp_path):
    from benchmarks import deploy

    results = tmp_path / "results.jsonl"
    deploy.main(["--device", "cpu", "--dtype", "float32", "--model", "vit_tiny_patch16_224", "--img-size", "32",
                 "--batches", "1", "3", "--rounds", "1", "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    runs = {(r["config"], r["batch"]): r["value"] for r in rows if r["metric"] == "runs_without_ats_fx"}
    assert runs[("dense", 3)] == runs[("multi rho=0.87", 3)] == 1.0
    assert runs[("dense", 1)] == runs[("multi rho=0.87", 1)]  # AOTInductor's batch range, not ATS
    agreement = {r["batch"]: r["value"] for r in rows if r["metric"] == "agreement"}
    diff = {r["batch"]: r["value"] for r in rows if r["metric"] == "max_abs_diff"}
    assert agreement[3] == 1.0 and diff[3] < 1e-4
    assert {r["batch"] for r in rows if r["metric"] == "speedup"} == set(agreement)
    assert all(r["cxx"] and not r["cxx"].startswith("unknown") for r in rows)  # the compiler is part of the result
    assert all(r["ld_preload"] == "" for r in rows)  # this machine's loader needs no preload
    assert all(r["kernels"] == "reference" for r in rows)  # on the CPU the package holds aten ops only


def test_deploy_retries_a_segfaulting_loader_with_the_compilers_libstdcxx(monkeypatch, tmp_path):
    from benchmarks import deploy

    runtime = deploy.compiler_runtime()
    assert runtime and Path(runtime).name.startswith("libstdc++.so.6")  # Inductor's compiler names its runtime
    calls = []

    def loader(exit_without_preload):
        def run(package, inputs, outputs, env):
            calls.append(env.get("LD_PRELOAD"))
            return (exit_without_preload, "died") if "LD_PRELOAD" not in env else (0, "")
        return run

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(deploy, "run_without_ats_fx", loader(deploy.SIGSEGV))
    env, preload, crash = deploy.loader_env("dense.pt2", tmp_path / "in.pt", tmp_path / "out.pt")
    assert (env["LD_PRELOAD"], preload, crash, calls) == (runtime, runtime, "", [None, runtime])

    calls.clear()  # an exit that is not a segfault (a Python error) is reported, not retried
    monkeypatch.setattr(deploy, "run_without_ats_fx", loader(1))
    env, preload, crash = deploy.loader_env("dense.pt2", tmp_path / "in.pt", tmp_path / "out.pt")
    assert ("LD_PRELOAD" in env, preload, crash, calls) == (False, "", "died", [None])

    calls.clear()  # a preload that does not help either: the first crash is what the caller reports
    monkeypatch.setattr(deploy, "run_without_ats_fx", lambda package, inputs, outputs, env: (
        calls.append(env.get("LD_PRELOAD")) or (deploy.SIGSEGV, f"died with {env.get('LD_PRELOAD')}")))
    env, preload, crash = deploy.loader_env("dense.pt2", tmp_path / "in.pt", tmp_path / "out.pt")
    assert ("LD_PRELOAD" in env, preload, crash, calls) == (False, "", "died with None", [None, runtime])


def test_stage_host_times_each_piece_of_the_first_stage(tmp_path):
    from benchmarks import stage_host

    results = tmp_path / "results.jsonl"
    stage_host.main(["--device", "cpu", "--dtype", "float32", "--models", "vit_tiny_patch16_224", "--img-size", "32",
                     "--point", "single K=48", "--results", str(results)])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    pieces = {r["config"]: r["value"] for r in rows}
    assert {"single K=48: stage (whole call)", "single K=48: sdpa (the dense layer's attention)",
            "single K=48: input finite check"} <= set(pieces)
    assert all(r["benchmark"] == "stage_host" and r["metric"] == "host_us" and r["batch"] == 1 for r in rows)
    assert all(0 < us < 1e6 for us in pieces.values())
    text = report.pieces_text(harness.load(results), rows[0]["device"])
    assert "vit_tiny_patch16_224 single K=48, batch 1" in text and "stage (whole call)" in text


def test_breakdown_puts_each_kernel_in_its_part_by_name():
    from benchmarks.breakdown import part_of

    names = {
        "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64": "GEMM",
        "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT": "GEMM",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7": "attention",
        "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nchw": "patch conv",
        "void nchwToNhwcKernel<__half, __half, float, true, false>": "patch conv",
        "triton_per_fused_add_native_layer_norm_3": "LayerNorm",
        "triton_poi_fused_addmm_gelu_5": "GELU",
        "_head_logits_kernel": "ats_fx scoring and sampling",
        "_sample_kernel": "ats_fx scoring and sampling",
        "_attention_kernel": "ats_fx attention",
        "_gather_add_kernel": "ats_fx gathers",
        "aten::addmm": "GEMM",
        "aten::where": "other",
    }
    assert {name: part_of(name) for name in names} == names


def kernel_event(name: str, start: float, end: float):
    """A profiler event of a CUDA kernel, as breakdown reads one (times in us)."""
    from types import SimpleNamespace

    from benchmarks.breakdown import DeviceType

    rng = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)
    return SimpleNamespace(name=name, device_type=DeviceType.CUDA, time_range=rng)


def test_breakdown_idle_time_is_counted_inside_each_pass_only():
    from benchmarks.breakdown import breakdown

    # Two passes of two kernels: 2 us idle inside each pass, 1000 us between the passes (not counted).
    events = [kernel_event("gemm", 0, 10), kernel_event("_sample_kernel", 12, 15),
              kernel_event("gemm", 1015, 1025), kernel_event("_sample_kernel", 1027, 1030)]
    parts = breakdown(events, torch.device("cuda"), calls=2)
    assert parts["GEMM"] == pytest.approx(0.010) and parts["ats_fx scoring and sampling"] == pytest.approx(0.003)
    assert parts["all"] == pytest.approx(0.013) and parts["kernels"] == 2 and parts["idle"] == pytest.approx(0.002)
    assert parts["all_min"] == parts["all_max"] == pytest.approx(0.013) and parts["graphs"] == 0
    assert parts["span"] == pytest.approx(0.015)


def test_breakdown_span_counts_kernels_on_two_streams_once():
    from benchmarks.breakdown import breakdown

    # One pass: the attention (0-8 us) beside scoring (1-4) and sampling (5-7), then a GEMM (9-12).
    events = [kernel_event("_attention_kernel", 0, 8), kernel_event("_head_logits_kernel", 1, 4),
              kernel_event("_sample_kernel", 5, 7), kernel_event("gemm", 9, 12)]
    parts = breakdown(events, torch.device("cuda"), calls=1)
    assert parts["all"] == pytest.approx(0.016)  # every kernel's time, side by side or not
    assert parts["span"] == pytest.approx(0.012)  # what the pass took on the GPU


def test_top_kernels_ranks_by_time_per_pass():
    from benchmarks.breakdown import top_kernels

    # Two passes: a GEMM of 10 us once, a sampling kernel of 3 us four times per pass.
    events = [kernel_event("gemm", 0, 10)] + [kernel_event("_sample_kernel", 20 + 5 * i, 23 + 5 * i) for i in range(4)]
    events = events + [kernel_event(e.name, e.time_range.start + 100, e.time_range.end + 100) for e in events]
    lines = top_kernels(events, torch.device("cuda"), calls=2, n=2).splitlines()
    assert lines[0].split() == ["12.0", "us", "4.0", "x", "3.00", "us", "_sample_kernel"]
    assert lines[1].split() == ["10.0", "us", "1.0", "x", "10.00", "us", "gemm"]


def test_breakdown_appends_one_row_per_part_and_the_report_prints_them(tmp_path, capsys):
    from benchmarks import breakdown

    results = tmp_path / "results.jsonl"
    breakdown.main(["--device", "cpu", "--dtype", "float32", "--models", "vit_tiny_patch16_224", "--img-size", "32",
                  "--runs", "eager", "--batches", "2", "--points", "single K=48", "--calls", "2", "--top", "3",
                  "--results", str(results)])
    rows = harness.load(results)
    assert {r["benchmark"] for r in rows} == {"breakdown"} and {r["config"] for r in rows} == {"dense", "single K=48"}
    for config in ("dense", "single K=48"):
        parts = {r["part"]: r["value"] for r in rows if r["config"] == config and r["metric"] == "cpu_ms"}
        assert parts["GEMM"] > 0 and parts["attention"] > 0
        assert parts["all"] == pytest.approx(sum(v for p, v in parts.items() if p != "all"))
    report.main(["--results", str(results), "--breakdown"])
    text = capsys.readouterr().out
    assert "**vit_tiny_patch16_224, eager, batch 2**" in text and "| part | dense | single K=48 |" in text
    assert "| GEMM |" in text and "| all |" in text


def test_attention_tiles_follow_the_stage_widths_and_check_every_config(tmp_path, capsys):
    from benchmarks import attention_tiles

    # ViT-B/16 at rho=0.87: 197 keys and 172 kept rows at stage 3, each stage's rows the next one's keys.
    shapes = attention_tiles.stage_shapes(harness.build_timm("vit_base_patch16_224"), range(3, 12), 0.87)
    assert shapes[0] == (12, 64, 197, 172) and shapes[1] == (12, 64, 172, 151)
    assert all(a[3] == b[2] for a, b in zip(shapes, shapes[1:])) and len(shapes) == 9
    results = tmp_path / "results.jsonl"
    attention_tiles.main(["--device", "cpu", "--models", "vit_tiny_patch16_224", "--img-size", "48", "--batch", "2",
                          "--configs", "16x32,w4,s2", "32x16,w4,s2", "--rounds", "1", "--budget-ms", "1",
                          "--results", str(results)])
    rows = harness.load(results)
    errors = {r["config"]: r["value"] for r in rows if r["metric"] == "max_abs_error"}
    assert set(errors) == {"16x32,w4,s2", "32x16,w4,s2"} and max(errors.values()) < 2e-3  # fp16 against float32
    assert {r["config"] for r in rows if r["metric"] == "us"} == {*errors, attention_tiles.SDPA}
    report.main(["--results", str(results), "--tiles"])
    assert "| 16x32,w4,s2 |" in capsys.readouterr().out


def test_variant_labels_parse_into_point_keywords_and_switches():
    from benchmarks import variants

    assert variants.parse("multi rho=0.87") == ("multi rho=0.87", {}, {})
    assert variants.parse("single K=108 padding=static overlap=off pdl=off") == (
        "single K=108", {"padding": "static"}, {"overlap": "off", "pdl": "off"})
    assert speed.point_kwargs("multi rho=0.87 overlap=off") == {"stages": "3-11", "ratio": 0.87}
    assert variants.parse("multi rho=0.87 unmasked=off")[2] == {"unmasked": "off"}
    assert speed.point_kwargs("multi rho=0.87 patch_gemm=off") == {"stages": "3-11", "ratio": 0.87, "patch_gemm": False}
    for bad in ("rho=0.87", "multi rho=0.87 overlap=maybe", "multi rho=0.87 speed=fast",
                "multi rho=0.87 patch_gemm=maybe", "multi rho=0.87 padding=wide"):
        with pytest.raises(SystemExit):
            variants.parse(bad)


def test_switched_sets_ats_fx_choices_around_each_call_and_restores_them():
    from ats_fx import dispatch
    from ats_fx.kernels import pdl
    from benchmarks import variants

    seen = []
    before = (dispatch.OVERLAP, pdl.ENABLED)
    model = variants.Switched(lambda x: seen.append((dispatch.OVERLAP, pdl.ENABLED)), {"overlap": "off", "pdl": "off"})
    model(torch.zeros(1)), model(torch.zeros(8))
    assert seen == [("off", False)] * 2 and (dispatch.OVERLAP, pdl.ENABLED) == before

    def fails(x):
        raise RuntimeError("a model that fails")

    with pytest.raises(RuntimeError):
        variants.Switched(fails, {"overlap": "off"})(torch.zeros(1))
    assert (dispatch.OVERLAP, pdl.ENABLED) == before  # restored on the way out of an error too
    assert variants.labels(["single K=108"], ["overlap=off"]) == ["single K=108", "single K=108 overlap=off"]
    for key, (_, _, values) in variants.SWITCHES.items():  # every switch names a real attribute
        for value in values:
            ((module, attr, setting),) = variants.resolve({key: value})
            assert hasattr(module, attr) and type(getattr(module, attr)) is type(setting), (key, value)
    from ats_fx import overlap

    seen.clear()
    default = overlap.JOIN_AFTER_PROJECTION
    variants.Switched(lambda x: seen.append(overlap.JOIN_AFTER_PROJECTION), {"late_join": "off"})(torch.zeros(1))
    assert seen == [False] and overlap.JOIN_AFTER_PROJECTION is default is True


def test_speed_times_each_variant_as_its_own_configuration(tmp_path):
    results = tmp_path / "results.jsonl"
    speed.main(["--device", "cpu", "--models", "vit_tiny_patch16_224", "--img-size", "32", "--runs", "eager",
                "--batches", "1", "--points", "single K=48", "--variants", "overlap=off", "--rounds", "1",
                "--budget-ms", "1", "--flops-images", "1", "--results", str(results)])
    ups = {r["config"] for r in harness.load(results) if r["metric"] == "speedup"}
    assert ups == {"single K=48", "single K=48 overlap=off"}


def test_a_switch_changes_what_the_compiled_model_runs(monkeypatch):
    # The variants A/B relies on it: each compiled configuration runs its stages with its own
    # switches, built as the benchmark builds them (no Dynamo reset between them, Inductor's caches
    # on). Two backend="ats" compiles with equal options once shared one compiled graph, so an
    # "overlap=off" arm ran the overlapped stage (variants.own_backend).
    from ats_fx import overlap

    calls = []
    real = overlap.overlapped_stage_attention
    monkeypatch.setattr(overlap, "overlapped_stage_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(speed, "point_kwargs", lambda label, real=speed.point_kwargs: {**real(label), "kernels": "triton"})
    base = harness.build_timm("vit_tiny_patch16_224", img_size=32)
    x = torch.randn(1, 3, 32, 32)
    labels = ["multi rho=0.87 overlap=on", "multi rho=0.87 overlap=off", "multi rho=0.87 overlap=on pdl=off"]
    models = speed.callers(speed.compiled_models(base, labels, "default", torch.device("cpu"), torch.float32))
    counts = {}
    for label in labels:
        calls.clear()
        with torch.no_grad():
            models[label](x), models[label](x)
        counts[label] = len(calls)
    assert counts[labels[0]] > 0 and counts[labels[1]] == 0 and counts[labels[2]] > 0

def test_every_compiled_configuration_stays_compiled_at_a_second_batch(monkeypatch):
    # Dense and four ATS configurations share timm's forward: at batches 1 and 2 Dynamo holds ten
    # graphs of that frame, past its default limit of 8. The benchmark raises the limit; without it
    # the last two configurations ran the frame uncompiled, the dense model, at batch 2.
    from ats_fx import library

    # The limits the benchmark raises are restored after the test by Dynamo's own config.patch: pytest's
    # monkeypatch (9.2) reads the old value from the module's __dict__, where a torch config module
    # keeps none, so its undo deleted the entry and every later compile in the process failed
    # ("torch._dynamo.config.recompile_limit does not exist").
    config = torch._dynamo.config
    limits = {name: getattr(config, name) for name in ("recompile_limit", "fail_on_recompile_limit_hit")
              if hasattr(config, name)}
    with config.patch(limits):
        calls = []
        for name in ("_sample", "_sample_scores"):
            monkeypatch.setattr(library, name, lambda *a, real=getattr(library, name), **k: calls.append(1) or real(*a, **k))
        # The ATS rewrite with Dynamo's eager backend behind it: what runs is what the benchmark compiles.
        monkeypatch.setattr(speed, "point_kwargs", lambda label, real=speed.point_kwargs: {**real(label), "backend": "eager"})
        base = harness.build_timm("vit_tiny_patch16_224", img_size=32)
        labels = ["single K=48", "single K=48 overlap=off", "single K=48 pdl=off", "single K=48 unmasked=off"]
        models = speed.callers(speed.compiled_models(base, labels, "default", torch.device("cpu"), torch.float32))
        ran = {}
        for batch in (1, 2):  # as the benchmark calls them: every model at one batch, then the next
            x = torch.randn(batch, 3, 32, 32)
            for label in labels:
                calls.clear()
                with torch.no_grad():
                    models[label](x)
                ran[label, batch] = bool(calls)
        assert all(ran.values()), ran
