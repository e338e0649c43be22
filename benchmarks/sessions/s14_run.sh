#!/usr/bin/env bash
# Session 14 (H200, torch 2.11): max-autotune with its GEMM choices timed as CUDA graph replays.
# Session 13 traced max-autotune's loss to Inductor timing cuBLAS with its host dispatch; torch 2.11
# has no autotune_cudagraph_benchmarking, so benchmarks/graph_replay_autotune.py stands in for it.
#   1. one of the mis-picked GEMMs alone (proj, 256 x 172 tokens), Inductor's timing vs the stand-in:
#      does the stand-in time cuBLAS as the graph runs it, and pick it?
#   2. the cold max-autotune compile of DeiT-S (dense same-compile, then multi rho=0.87) at a static
#      batch of 256 with the stand-in, resumable: call again with .device_carry/max_autotune_cache.tgz
#      (from $OUT) carried until the ATS row is timed. Part 1 runs only when nothing is carried or seeded.
# What happened (max_autotune_s14.md): call 1's stand-in captured Triton templates as empty graphs
# (torch 2.11 binds their launch stream early) and picked 3-us "templates"; fixed (empty captures
# fall back to host-launched timing), calls 2-3 tuned 40 of the 41 GEMM shapes (left: the last stage's fc2), then the device time
# ran out. Their choices are committed (max_autotune_cache_s14.tgz); session 15 finished the ATS row from
# them with s15_run.sh (interleaved rounds; max_autotune_s15.md).
#   device run: bash benchmarks/sessions/s14_run.sh [LIMIT_S]
set -u
export PYTHONUNBUFFERED=1
LIMIT=${1:-560}
LOG=$OUT/log.txt
{ nvidia-smi --query-gpu=name,clocks.sm --format=csv; date
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } >"$LOG" 2>&1
if [ ! -f .device_carry/max_autotune_cache.tgz ] && [ "${SEED_CACHE:-none}" = none ]; then
  timeout 150 python3 -m benchmarks.autotune_bias --shape 44032 384 384 \
    --settings "Inductor default (rep=100 warmup=25)" "graph replay (graph_replay_autotune)" \
    --out "$OUT/autotune_bias_graph_replay_proj.json" >/tmp/ab.txt 2>&1
  echo "autotune_bias exit $?" >>"$LOG"; tail -6 /tmp/ab.txt >>"$LOG"
fi
LEFT=$((LIMIT - SECONDS))
echo "== max-autotune with graph-replay timing at $SECONDS s, limit $LEFT s" >>"$LOG"
SEED_CACHE=${SEED_CACHE:-none} EXTRA_ARGS="--graph-replay-autotune --no-plain-dense" \
  bash benchmarks/sessions/max_autotune_resume.sh "$LEFT" >/tmp/ma.txt 2>&1
tail -8 /tmp/ma.txt >>"$LOG"
grep -c "^AUTOTUNE" "$OUT/compile_log.txt" >>"$LOG" 2>&1
cat "$LOG"
