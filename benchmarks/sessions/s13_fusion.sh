#!/usr/bin/env bash
# Session 13, device call 2 (H200). Call 1 (s13_trace.sh) showed that under max-autotune with
# benchmark_epilogue_fusion=False (session 12's compile-time saving) Inductor fused the LayerNorm and
# GELU before a GEMM (prologue) and the attention-output transpose into Triton GEMM templates without
# timing the fusion, and those fused templates ran slower than cuBLAS + a separate kernel. So, DeiT-S
# at a static batch of 256, max-autotune with session 12's cached GEMM choices:
#   1. "bench-fusion": Inductor's default, each template fusion timed against the unfused kernels;
#   2. "no-template-fusion": prologue_fusion=False, epilogue_fusion=False (templates are plain GEMMs).
# Result: the same 138 kernels in both runs, as in call 1. No fusion had taken place: the LayerNorm and
# GELU in the template kernels' names are the origins of their inputs (max_autotune_s13_diagnosis.md).
#   device run: bash benchmarks/sessions/s13_fusion.sh
set -u
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$LOG" 2>&1
MA=(--mode max-autotune --no-coordinate-descent --autotune-rep 10 --inductor max_autotune_prune_choices_based_on_shared_mem=True)
run() {  # name limit inductor-options...
  local name=$1 limit=$2; shift 2
  mkdir -p /tmp/ic_$name && tar -xzf benchmarks/sessions/max_autotune_cache_s12.tgz -C /tmp/ic_$name
  echo "== $name at $SECONDS s" >>"$LOG"
  TORCHINDUCTOR_CACHE_DIR=/tmp/ic_$name timeout "$limit" python3 -m benchmarks.kernel_trace \
    --model deit_small_patch16_224 --configs dense "dense same-compile" "multi rho=0.87" --batches 256 \
    "${MA[@]}" "$@" --out "$OUT/trace_s13_$name.json" >/tmp/$name.txt 2>&1
  echo "exit $?" >>"$LOG"; grep "^==" /tmp/$name.txt | sort -u >>"$LOG" || tail -8 /tmp/$name.txt >>"$LOG"
}
run bench_fusion 300 benchmark_epilogue_fusion=True
run no_template_fusion $((570 - SECONDS)) benchmark_epilogue_fusion=False prologue_fusion=False epilogue_fusion=False
cat "$LOG"
