#!/usr/bin/env bash
# Session 13, device call 1 (H200): why max-autotune runs the multi-stage ATS model 8.8% slower than
# reduce-overhead while dense loses only 3.0% (session 12). The kernels of one forward at a static
# batch of 256, DeiT-S dense same-compile and multi rho=0.87, under
#   1. max-autotune, with session 12's options and its committed autotune choices (no re-tuning);
#   2. reduce-overhead;
#   3. max-autotune with cuBLAS only for GEMMs (max_autotune_gemm_backends="ATEN"), if time is left.
#   device run: bash benchmarks/sessions/s13_trace.sh
set -u
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$LOG" 2>&1
MA_OPTS=(--mode max-autotune --no-coordinate-descent --autotune-rep 10 --inductor benchmark_epilogue_fusion=False
         max_autotune_prune_choices_based_on_shared_mem=True)
CONFIGS=(--configs "dense same-compile" "multi rho=0.87" --batches 256)
mkdir -p /tmp/ic_ma && tar -xzf benchmarks/sessions/max_autotune_cache_s12.tgz -C /tmp/ic_ma
run() {  # name limit args...
  local name=$1 limit=$2; shift 2
  echo "== $name at $SECONDS s" >>"$LOG"
  timeout "$limit" python3 -m benchmarks.kernel_trace --model deit_small_patch16_224 "${CONFIGS[@]}" "$@" \
    --out "$OUT/trace_s13_$name.json" >/tmp/$name.txt 2>&1
  echo "exit $?" >>"$LOG"; grep "^==" /tmp/$name.txt >>"$LOG" || tail -8 /tmp/$name.txt >>"$LOG"
}
TORCHINDUCTOR_CACHE_DIR=/tmp/ic_ma run ma 260 "${MA_OPTS[@]}"
TORCHINDUCTOR_CACHE_DIR=/tmp/ic_ro run ro 150 --mode reduce-overhead
LEFT=$((570 - SECONDS))
if [ "$LEFT" -gt 90 ]; then
  TORCHINDUCTOR_CACHE_DIR=/tmp/ic_aten run ma_aten "$LEFT" "${MA_OPTS[@]}" 'max_autotune_gemm_backends="ATEN"'
fi
cat "$LOG"
