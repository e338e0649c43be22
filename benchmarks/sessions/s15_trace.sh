#!/usr/bin/env bash
# Session 15, after s15_run.sh: why multi rho=0.87 loses to dense at batch 1 under max-autotune
# (0.924x) when it ties under reduce-overhead. The kernels of one forward of each (kernel_trace), under
# max-autotune from the choices s15_run.sh made (carried as .device_carry/max_autotune_cache.tgz, so
# nothing is re-timed) and under reduce-overhead; then reduce-overhead's interleaved ratio, same machine.
#   device run: bash benchmarks/sessions/s15_trace.sh
set -u
export PYTHONUNBUFFERED=1
CACHE=/tmp/inductor_max_autotune
mkdir -p "$CACHE"
[ -f .device_carry/max_autotune_cache.tgz ] && tar -xzf .device_carry/max_autotune_cache.tgz -C "$CACHE"
extra=(benchmark_epilogue_fusion=False)
if python3 -c "import torch._inductor.config as c, sys; sys.exit(0 if hasattr(c, 'max_autotune_prune_choices_based_on_shared_mem') else 1)"; then
  extra+=(max_autotune_prune_choices_based_on_shared_mem=True)
fi
TORCHINDUCTOR_CACHE_DIR=$CACHE timeout 300 python3 -m benchmarks.kernel_trace --configs "dense same-compile" "multi rho=0.87" \
  --batches 1 --mode max-autotune --no-coordinate-descent --autotune-rep 10 --inductor "${extra[@]}" \
  --out "$OUT/trace_s15_ma_b1.json" 2>&1 | grep -v "^W\|Warning" | grep "^==\|AUTOTUNE\|rror" | head -40
echo "max-autotune trace exit ${PIPESTATUS[0]}"
timeout 120 python3 -m benchmarks.kernel_trace --configs "dense same-compile" "multi rho=0.87" --batches 1 \
  --mode reduce-overhead --out "$OUT/trace_s15_ro_b1.json" 2>&1 | grep "^==\|rror" | head
echo "reduce-overhead trace exit ${PIPESTATUS[0]}"
timeout 150 python3 -m benchmarks.interleaved --models deit_small_patch16_224 --configs "multi rho=0.87" \
  --batches 1 --static-batch --rounds 7 --no-plain-dense --out "$OUT/interleaved_s15_ro_b1.json" 2>&1 | tail -4
echo "interleaved exit ${PIPESTATUS[0]}"
