#!/usr/bin/env bash
# Session 11, device run 2 (H200): with backend='ats' now compiling with triton.autotune_pointwise=False
# (dense same-compile too), both models at the three operating points in interleaved rounds; the
# kernel trace of ATS DeiT-S at batch 256 (are all GELU kernels at one bandwidth now?); and the GPU
# kernel tests that run 1's time limit cut off (CUDA graphs, PDL, kernel switches, compiled path).
set -u
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$LOG" 2>&1
for m in deit_small_patch16_224 vit_base_patch16_224; do
  echo "== interleaved $m" >>"$LOG"
  TORCHINDUCTOR_CACHE_DIR=/tmp/ic_$m timeout 225 python3 -m benchmarks.interleaved --models $m --batches 1 64 256 \
    --rounds 4 --out /tmp/il_$m.json 2>&1 | grep "^|" >>"$LOG"
  cp /tmp/il_$m.json "$OUT/" 2>/dev/null
done
echo "== kernel trace" >>"$LOG"
TORCHINDUCTOR_CACHE_DIR=/tmp/ic_deit_small_patch16_224 timeout 60 python3 -m benchmarks.kernel_trace \
  --configs "multi rho=0.87" --batches 256 --out /tmp/trace.json >/dev/null 2>&1
cp /tmp/trace.txt "$OUT/trace_deit_s_b256.txt" 2>/dev/null
grep -E "==|gelu" /tmp/trace.txt >>"$LOG"
echo "== GPU kernel tests (the part run 1 did not reach)" >>"$LOG"
timeout 75 python3 -m pytest tests/test_kernels.py -q -p no:cacheprovider \
  -k "cuda_graph or pdl or switch or compiled_triton or op_triton or strict or unpadded" >"$OUT/gputests.txt" 2>&1
tail -3 "$OUT/gputests.txt" >>"$LOG"
cat "$LOG"
