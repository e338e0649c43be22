#!/usr/bin/env bash
# Session 26 (H200, torch 2.11): the deferred gather (ats_fx/passes/defer.py) at batch 1.
#   PART=ro (default): the GPU tests of the deferred gather and the overlapped stage, then
#       reduce-overhead at batch 1 for ViT-B/16 and DeiT-S, 7 interleaved rounds against dense
#       same-compile, the multi-stage points deferred (default), "nodefer" (the overlapped stage
#       gathers its own rows, session 25's code) and "seq" (sequential stage).
#   PART=single: the single-stage points of both models, same variants.
#   Max-autotune at batch 1 runs through s15_run.sh with session 24's cache (commands in
#   benchmarks/results/session26.md).
set -u
export PYTHONUNBUFFERED=1
PART=${PART:-ro}
LIMIT=${LIMIT:-560}
{ nvidia-smi --query-gpu=name,clocks.sm --format=csv; date
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } 2>&1
if [ "$PART" = ro ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_defer.py tests/test_overlap.py \
    "tests/test_kernels.py::test_gather_add_kernel_is_bit_identical_to_gather_then_add" 2>&1 | tail -4 \
    | tee "$OUT/s26_gpu_tests.txt"
  MODELS="vit_base_patch16_224 deit_small_patch16_224"; CONFIGS=("multi rho=1.0" "multi rho=0.87" "multi rho=0.72")
else
  MODELS="deit_small_patch16_224 vit_base_patch16_224"; CONFIGS=("single K=108" "single K=78" "single K=48")
fi
for model in $MODELS; do
  LEFT=$((LIMIT - SECONDS))
  [ "$LEFT" -lt 60 ] && { echo "$model: no time left"; break; }
  timeout "$LEFT" python3 -m benchmarks.interleaved --models "$model" --batches 1 --configs "${CONFIGS[@]}" \
    --variant "nodefer:passes.defer.ENABLED=False" --variant "seq:overlap.MODE='off'" --rounds 7 --no-plain-dense \
    --out "$OUT/interleaved_s26_${PART}_${model}.json" 2>&1 | grep -v "^W\|Warning" | tail -14
  echo "$model exit ${PIPESTATUS[0]} at $SECONDS s"
done
