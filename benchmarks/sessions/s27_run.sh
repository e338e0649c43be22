#!/usr/bin/env bash
# Session 27 (H200, torch 2.11): why batch_max under torch.compile without CUDA graphs ran 0.54x
# of dense at batch 256 (session22.md section 5). PART=trace: benchmarks.gap_trace on DeiT-S, then
# ViT-B/16, batch 256, mode default: dense same-compile, static and batch_max padding compiled, and
# both paddings eager. PART=default: benchmarks.op_host_time, the generated code of batch_max, and
# mode default at batches 64 and 256 with static against batch_max padding.
set -u
export PYTHONUNBUFFERED=1
PART=${PART:-trace}
LIMIT=${LIMIT:-560}
{ nvidia-smi --query-gpu=name,clocks.sm --format=csv; date
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } 2>&1
if [ "$PART" = trace ]; then
  for model in deit_small_patch16_224 vit_base_patch16_224; do
    LEFT=$((LIMIT - SECONDS))
    [ "$LEFT" -lt 90 ] && { echo "$model: no time left"; break; }
    timeout "$LEFT" python3 -m benchmarks.gap_trace --model "$model" --batch 256 --mode default \
      --configs "dense same-compile" "multi rho=1.0:static" "multi rho=1.0:batch_max" \
        "eager:multi rho=1.0:batch_max" "eager:multi rho=1.0:static" "multi rho=0.87:batch_max" \
      --out "$OUT/gap_trace_s27_${model}_b256.json" 2>&1 | grep -v "^W\|Warning" | grep "^==\|gap\|sync\|Error\|error" | head -80
    echo "$model exit ${PIPESTATUS[0]} at $SECONDS s"
  done
fi
if [ "$PART" = default ]; then
  # Host time of each ATS op (batch 1), the batch_max graph's generated code, then mode default at
  # batches 64 and 256: static against batch_max padding.
  timeout 120 python3 -m benchmarks.op_host_time --out "$OUT/op_host_time_s27.json" 2>&1 | grep -v "^W\|Warning"
  TORCH_LOGS=output_code timeout 150 python3 -m benchmarks.gap_trace --model deit_small_patch16_224 --batch 256 \
    --configs "multi rho=1.0:batch_max" > "$OUT/s27_output_code_batch_max.log" 2>&1
  gzip -9 "$OUT/s27_output_code_batch_max.log"; ls -la "$OUT"
  for model in deit_small_patch16_224 vit_base_patch16_224; do
    LEFT=$((LIMIT - SECONDS))
    [ "$LEFT" -lt 90 ] && { echo "$model: no time left"; break; }
    timeout "$LEFT" python3 -m benchmarks.interleaved --models "$model" --mode default --batches 64 256 \
      --configs "multi rho=0.87:static" "multi rho=0.87:batch_max" "multi rho=1.0:static" "multi rho=0.72:static" \
      --rounds 3 --no-plain-dense --out "$OUT/interleaved_s27_default_${model}.json" 2>&1 | grep -v "^W\|Warning" | tail -12
    echo "$model exit ${PIPESTATUS[0]} at $SECONDS s"
  done
fi
if [ "$PART" = hint ]; then
  # batch_max with Inductor's unbacked-size fallback raised to 2**20 (a compile.UNBACKED_SIZE_HINT switch
  # that changed no kernel and was reverted, session27.md section 1) against Inductor's own 8192
  # ("nohint"), then mode default interleaved. Without that switch the variant no longer resolves.
  python3 -c "import torch; print('override_optimization_hint:', hasattr(torch._dynamo, 'override_optimization_hint'))"
  for model in deit_small_patch16_224 vit_base_patch16_224; do
    LEFT=$((LIMIT - SECONDS))
    [ "$LEFT" -lt 90 ] && { echo "$model: no time left"; break; }
    timeout "$LEFT" python3 -m benchmarks.gap_trace --model "$model" --batch 256 --mode default \
      --configs "dense same-compile" "multi rho=1.0:batch_max" "multi rho=0.87:batch_max" \
      --variant "nohint:compile.UNBACKED_SIZE_HINT=None" \
      --out "$OUT/gap_trace_s27_hint_${model}_b256.json" 2>&1 | grep "^==" 
    echo "$model exit ${PIPESTATUS[0]} at $SECONDS s"
  done
  LEFT=$((LIMIT - SECONDS))
  [ "$LEFT" -gt 120 ] && timeout "$LEFT" python3 -m benchmarks.interleaved --models deit_small_patch16_224 \
    --mode default --batches 256 --configs "multi rho=0.87:static" "multi rho=0.87:batch_max" "multi rho=1.0:batch_max" \
    "multi rho=1.0:static" --rounds 5 --no-plain-dense --out "$OUT/interleaved_s27_default_hint_deit_b256.json" 2>&1 \
    | grep -v "^W\|Warning" | tail -8
fi
