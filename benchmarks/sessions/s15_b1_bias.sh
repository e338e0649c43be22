#!/usr/bin/env bash
# Session 15: at batch 1 max-autotune picked Triton templates for the ATS stages' GEMMs that run ~2x
# slower in the graph than cuBLAS (trace_s15_ma_b1.txt vs trace_s15_ro_b1.txt), and its timings (5-13
# us) are about what one graph replay's own launch costs. Three of those GEMMs alone, each timed by
# Inductor, by the stand-in (one call per graph) and by the stand-in with 20 calls per graph; columns
# "20 back to back" are the GEMM's time in a graph without the replay's launch.
#   device run: bash benchmarks/sessions/s15_b1_bias.sh
set -u
export PYTHONUNBUFFERED=1
for shape in "172 384 384" "172 1536 384" "172 384 1152"; do
  timeout 140 python3 -m benchmarks.autotune_bias --shape $shape \
    --settings "Inductor default (rep=100 warmup=25)" "graph replay (graph_replay_autotune)" \
    "graph replay, 20 calls per graph" --out "$OUT/autotune_bias_b1_${shape// /x}.json" 2>&1 | tail -6
  echo "exit ${PIPESTATUS[0]}"
done
