"""benchmarks/autotune_bias.py reads Inductor's AUTOTUNE report; its parser, on the report's format."""
from benchmarks.autotune_bias import parse_autotune_report

REPORT = """AUTOTUNE addmm(44032x384, 44032x384, 384x384)
strides: [0, 1], [384, 1], [1, 384]
dtypes: torch.float16, torch.float16, torch.float16
  triton_mm_17 0.0400 ms 100.0% ACC_TYPE='tl.float32', ALLOW_TF32=False, BLOCK_K=64, num_stages=3
  bias_addmm 0.0525 ms 76.2% 
  addmm 0.0636 ms 62.9% 
  triton_mm_3 0.1090 ms 36.7% ACC_TYPE='tl.float32', BLOCK_K=32
SingleProcess AUTOTUNE benchmarking takes 1.2 seconds and 3.4 seconds precompiling for 21 choices
"""


def test_autotune_report_gives_every_choice_with_its_time_fastest_first():
    assert parse_autotune_report(REPORT) == [
        ("triton_mm_17", 0.04), ("bias_addmm", 0.0525), ("addmm", 0.0636), ("triton_mm_3", 0.109)]


def test_autotune_report_without_timings_gives_nothing():
    assert parse_autotune_report("nothing was autotuned\n  a line 1.0 s\n") == []
