#!/usr/bin/env bash
# Session 16 (H200, torch 2.11): the attention kernel's mask prologue. In the batch-256 trace every
# masked stage's attention took ~18 us more than its tile count predicts from the unmasked first
# stage (trace_session11_deit_s_b256.txt). attention_rows.Q_FIRST issues the index and query loads
# before the mask reduction (shipped, default on); "s15" below is the kernel as it was (Q_FIRST off).
# What happened (session16.md): call 1 ran PART=kernels with a second trial switch, BRANCHLESS (one
# predicated key loop), which lost at every masked shape and was removed; so PART=kernels now
# compares Q_FIRST alone. Calls 3-4 ran PART=deit_small_patch16_224 and PART=vit_base_patch16_224.
#   PART=kernels: the kernel alone at DeiT-S rho=0.87's stage shapes (batch 1 and 256) with Q_FIRST
#     flipped and without the mask; then one batch-256 forward's kernel trace (reduce-overhead).
#   PART=MODEL (a timm name): dense same-compile, the three core points and each again as "s15",
#     reduce-overhead, batches 1 64 256, 7 interleaved rounds.
#   device run: PART=... bash benchmarks/sessions/s16_run.sh
set -u
export PYTHONUNBUFFERED=1
PART=${PART:-kernels}
{ nvidia-smi --query-gpu=name,clocks.sm --format=csv; date
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } 2>&1
OLD="s15:attention_rows.Q_FIRST=False"
if [ "$PART" = kernels ]; then
  timeout 300 python3 -m benchmarks.attention_configs --default-only --no-floors --unmasked \
    --compare attention_rows.Q_FIRST \
    --out "$OUT/attention_mask_prologue.json" 2>&1 | grep -v "^{" | tail -40
  echo "attention_configs exit ${PIPESTATUS[0]}"
  timeout 200 python3 -m benchmarks.kernel_trace --configs "multi rho=0.87" --batches 256 \
    --mode reduce-overhead --out "$OUT/trace_s16_ro_b256.json" 2>&1 | grep "^==\|rror" | head
  echo "trace exit ${PIPESTATUS[0]}"
else
  timeout 560 python3 -m benchmarks.interleaved --models "$PART" --batches 1 64 256 \
    --configs "multi rho=0.87" "multi rho=0.72" "single K=108" --variant "$OLD" --rounds 7 --no-plain-dense \
    --out "$OUT/interleaved_s16_${PART}.json" 2>&1 | grep -v "^W\|Warning" | tail -30
  echo "interleaved exit ${PIPESTATUS[0]}"
fi
