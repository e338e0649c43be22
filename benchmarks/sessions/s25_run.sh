#!/usr/bin/env bash
# Session 25 (H200, torch 2.11): the overlapped static stage (ats_fx/overlap.py).
#   PART=micro: the GPU tests of tests/test_overlap.py, then benchmarks.stage_overlap (one stage at
#               batches 1-32, sequential vs overlapped vs dense, CUDA graphs).
#   PART=<timm model>: reduce-overhead at batch 1, 7 interleaved rounds against dense same-compile,
#               the multi-stage points with overlap (MODE auto: on at batch 1) and without ("seq").
#   PART=single: the single-stage points of both models at batch 1, overlap on (auto) and off.
set -u
export PYTHONUNBUFFERED=1
PART=${PART:?PART=micro, single or a timm model name}
LIMIT=${LIMIT:-560}
{ nvidia-smi --query-gpu=name,clocks.sm --format=csv; date
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } 2>&1
if [ "$PART" = micro ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_overlap.py 2>&1 | tail -5
  timeout "$LIMIT" python3 -m benchmarks.stage_overlap --rep 30 --out "$OUT/stage_overlap_s25.json" 2>&1 \
    | grep -v "^W\|Warning" | tail -50
  echo "stage_overlap exit ${PIPESTATUS[0]} at $SECONDS s"
  exit 0
fi
if [ "$PART" = single ]; then
  MODELS="deit_small_patch16_224 vit_base_patch16_224"; CONFIGS=("single K=108" "single K=78" "single K=48")
else
  MODELS="$PART"; CONFIGS=("multi rho=1.0" "multi rho=0.87" "multi rho=0.72")
fi
timeout "$LIMIT" python3 -m benchmarks.interleaved --models $MODELS --batches 1 --configs "${CONFIGS[@]}" \
  --variant "seq:overlap.MODE='off'" ${EXTRA_VARIANT:+--variant "$EXTRA_VARIANT"} --rounds 7 --no-plain-dense --out "$OUT/interleaved_s25_overlap_${PART}.json" \
  2>&1 | grep -v "^W\|Warning" | tail -30
echo "interleaved exit ${PIPESTATUS[0]} at $SECONDS s"
