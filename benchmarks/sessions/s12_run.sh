#!/usr/bin/env bash
# Session 12, one device run (H200): the one-launch stage (kernels/stage.py). Ran at commit 104b472;
# the stage kernel, its tests and benchmarks/one_launch_stage.py were removed later in session 12 (slower; last present at bc38683).
#   1. its GPU tests (the barrier path runs only there) and the kernel tests no H200 run reached;
#   2. its micro-benchmark against the three kernels at batch-1 stage shapes;
#   3. DeiT-S rho=0.87 compiled (reduce-overhead) with it and without it (variant "three"), in
#      interleaved rounds, batch 1 and 256;
#   4. with what time is left: max-autotune DeiT-S multi rho=0.87 resumed from the carried
#      autotune cache (.device_carry/max_autotune_cache.tgz, session 12's first two calls).
set -u
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$LOG" 2>&1
echo "== GPU tests" >>"$LOG"
XDIST=""; python3 -c "import xdist" 2>/dev/null && XDIST="-n 4"
timeout 140 python3 -m pytest tests/test_kernels.py -q -p no:cacheprovider $XDIST -x \
  -k "one_launch or static_stage or budget or rho_reaches or model_with_kernels or cuda_graph or pdl_chain" \
  >/tmp/gputests.txt 2>&1
echo "pytest exit $?" >>"$LOG"
grep -E "passed|failed|Error|error" /tmp/gputests.txt | tail -15 >>"$LOG"
echo "== one_launch_stage at $SECONDS s" >>"$LOG"
timeout 70 python3 -m benchmarks.one_launch_stage --rep 25 --out "$OUT/one_launch_stage.json" >/tmp/ols.txt 2>&1
echo "exit $?" >>"$LOG"; grep "^|" /tmp/ols.txt >>"$LOG" || tail -5 /tmp/ols.txt >>"$LOG"
echo "== interleaved at $SECONDS s" >>"$LOG"
TORCHINDUCTOR_CACHE_DIR=/tmp/ic_il timeout 170 python3 -m benchmarks.interleaved --models deit_small_patch16_224 \
  --configs "multi rho=0.87" --variant "three:stage.ENABLED=False" --batches 1 256 --rounds 5 --rep 100 \
  --out "$OUT/interleaved_s12_deit_s.json" >/tmp/il.txt 2>&1
echo "exit $?" >>"$LOG"; grep "^|" /tmp/il.txt >>"$LOG" || tail -5 /tmp/il.txt >>"$LOG"
LEFT=$((545 - SECONDS))
echo "== max-autotune at $SECONDS s, limit $LEFT s" >>"$LOG"
if [ "$LEFT" -gt 60 ]; then
  bash benchmarks/sessions/max_autotune_resume.sh "$LEFT" >/tmp/ma.txt 2>&1
  tail -4 /tmp/ma.txt >>"$LOG"
fi
cat "$LOG"
