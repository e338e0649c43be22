#!/usr/bin/env bash
# Session 17 (H200, torch 2.11): the one-launch stage front (ats_fx/kernels/score_sample.py: head
# logits, then each image's sampling in its last program) against the two launches it replaces
# ("two" below: score_sample.ENABLED=False).
# What happened (session17.md, session17_device_log.txt): the one launch was slower everywhere and was
# removed after commit b50520a; run PART=front or PART=recheck from that commit (git checkout b50520a).
# PART=front's interleaved rounds were void (the --variant bug fixed in benchmarks.compiled.compile_model);
# PART=recheck is the valid A/B.
#   PART=front: the GPU tests of the kernels (the one launch raced at batch 256, in a CUDA graph), then
#     the stage front alone in CUDA graphs (benchmarks.stage_kernels, both switches), then the
#     interleaved rounds of MODEL (default DeiT-S): dense same-compile, multi rho=0.87 and rho=0.72,
#     each also as "two", reduce-overhead, batches 1 64 256.
#   PART=MODEL (a timm name): the interleaved rounds only.
#   PART=recheck: after the fix of benchmarks.compiled.compile_model (a variant ran the first compile's
#     graph, s17_variant_check.py): DeiT-S multi rho=0.87 against "two" and against session 15's
#     attention kernel ("s15": attention_rows.Q_FIRST=False), batches 1 and 256.
#   device run: PART=... bash benchmarks/sessions/s17_run.sh
set -u
export PYTHONUNBUFFERED=1
PART=${PART:-front}
{ nvidia-smi --query-gpu=name,clocks.sm --format=csv; date
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } 2>&1
MODEL=$PART
if [ "$PART" = recheck ]; then
  timeout 400 python3 -m benchmarks.interleaved --models deit_small_patch16_224 --batches 1 256 \
    --configs "multi rho=0.87" --variant "two:score_sample.ENABLED=False" --variant "s15:attention_rows.Q_FIRST=False" \
    --rounds 7 --no-plain-dense --out "$OUT/interleaved_s17_recheck.json" 2>&1 | grep -v "^W\|Warning" | tail -12
  echo "interleaved exit ${PIPESTATUS[0]}"
  exit 0
fi
if [ "$PART" = front ]; then
  MODEL=deit_small_patch16_224
  timeout 150 python3 -m pytest -q -x tests/test_score_sample.py tests/test_kernels.py -k \
    "score_sample or one_launch or cuda_graph or switches or sample_kernel or head_scores" 2>&1 | tail -5
  echo "pytest exit ${PIPESTATUS[0]}"
  timeout 150 python3 -m benchmarks.stage_kernels --rep 20 --out "$OUT/stage_front_s17.json" 2>&1 \
    | grep -v "^{\|INFO" | tail -30
  echo "stage_kernels exit ${PIPESTATUS[0]}"
fi
timeout 330 python3 -m benchmarks.interleaved --models "$MODEL" --batches 1 64 256 \
  --configs "multi rho=0.87" "multi rho=0.72" --variant "two:score_sample.ENABLED=False" --rounds 7 --no-plain-dense \
  --out "$OUT/interleaved_s17_${MODEL}.json" 2>&1 | grep -v "^W\|Warning" | tail -30
echo "interleaved exit ${PIPESTATUS[0]}"
