#!/usr/bin/env bash
# Session 22 (H200, torch 2.11): reduce-overhead at all six core operating points of issue 3
# (multi 3-11 rho=1.0/0.87/0.72, single stage 3 K=108/78/48), batches 1 64 256, 7 interleaved
# rounds against dense same-compile; session 16 had timed three of them. One model per call
# (about 6 min each on a fresh machine):
#   device run: PART=deit_small_patch16_224 bash benchmarks/sessions/s22_run.sh
#               PART=vit_base_patch16_224 bash benchmarks/sessions/s22_run.sh
set -u
export PYTHONUNBUFFERED=1
PART=${PART:?PART=a timm model name}
LIMIT=${LIMIT:-560}
{ nvidia-smi --query-gpu=name,clocks.sm --format=csv; date
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } 2>&1
timeout "$LIMIT" python3 -m benchmarks.interleaved --models "$PART" --batches 1 64 256 \
  --configs "multi rho=1.0" "multi rho=0.87" "multi rho=0.72" "single K=108" "single K=78" "single K=48" \
  --rounds 7 --no-plain-dense --out "$OUT/interleaved_s22_${PART}.json" 2>&1 | grep -v "^W\|Warning" | tail -30
echo "interleaved exit ${PIPESTATUS[0]} at $SECONDS s"
