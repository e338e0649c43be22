#!/usr/bin/env bash
# Issue 4's missing max-autotune point: multi-stage DeiT-S (rho=0.87) under mode="max-autotune",
# whose cold compile outlasted a 10-minute device call (session 6: ~15 min over three calls, session 8:
# >26 min with a dynamic batch). This script lets the compile resume across calls and sessions:
#   - restores the Inductor cache from .device_carry/max_autotune_cache.tgz when it is there (name
#     .device_carry in `carry`);
#   - compiles and times under a time limit (a static batch of 256: one GEMM shape per stage);
#   - always writes the autotune choices back to $OUT/max_autotune_cache.tgz; copy it to
#     .device_carry/ (ignored) for the next call, or commit it for the next session.
# Inductor's options: no coordinate descent, no epilogue-fusion benchmarking, 10 ms per choice, and,
# where this torch has it, pruning of GEMM configs over the shared-memory limit (session 8 saw most
# Triton choices compile and then fail with "out of resource: shared memory").
# Environment: SEED_CACHE, the committed choices to start from when nothing is carried (default
# "none", a cold start; max_autotune_cache_s12.tgz reproduces session 12, whose cuBLAS timings carry
# host dispatch; max_autotune_cache_s14.tgz goes with --graph-replay-autotune); EXTRA_INDUCTOR, more
# Inductor KEY=VALUE options (session 13:
# autotune_cudagraph_benchmarking=True, which times each choice as a CUDA graph replay; choices timed
# without it must not be reused, so pair it with SEED_CACHE=none or a cache it made); EXTRA_ARGS, more
# benchmarks.compiled flags (session 14: --graph-replay-autotune, the same timing on a torch without
# that option, and --no-plain-dense); MODEL (default deit_small_patch16_224) and BATCH (default 256)
# for the other points of issue 4 (ViT-B/16, batches 1 and 64; one cache holds every shape's choices).
#   device run: bash benchmarks/sessions/max_autotune_resume.sh [LIMIT_S] [CONFIG]
set -u
LIMIT=${1:-500}
CONFIG=${2:-multi rho=0.87}
CACHE=/tmp/inductor_max_autotune
mkdir -p "$CACHE"
# The committed caches hold choices of DeiT-S dense and multi rho=0.87 at a static batch of 256 on the
# H200 with torch 2.11 / triton 3.6 (Inductor keys them by GPU and versions, so another stack
# autotunes afresh). A carried one from the call before wins.
if [ -f .device_carry/max_autotune_cache.tgz ]; then tar -xzf .device_carry/max_autotune_cache.tgz -C "$CACHE"
elif [ "${SEED_CACHE:-none}" != none ]; then
  [ -f "$SEED_CACHE" ] || { echo "SEED_CACHE=$SEED_CACHE: no such file"; exit 2; }
  tar -xzf "$SEED_CACHE" -C "$CACHE"; fi
extra=(benchmark_epilogue_fusion=False ${EXTRA_INDUCTOR:-})
if python3 -c "import torch._inductor.config as c, sys; sys.exit(0 if hasattr(c, 'max_autotune_prune_choices_based_on_shared_mem') else 1)"; then
  extra+=(max_autotune_prune_choices_based_on_shared_mem=True)
fi
PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=$CACHE timeout "$LIMIT" python3 -m benchmarks.compiled \
  --models "${MODEL:-deit_small_patch16_224}" --modes max-autotune --batches "${BATCH:-256}" --static-batch --configs "$CONFIG" \
  --no-coordinate-descent --autotune-rep 10 --inductor "${extra[@]}" ${EXTRA_ARGS:-} --out /tmp/max_autotune.json 2>&1 \
  | grep -v "^W\|Warning" | tee -a "$OUT/compile_log.txt" | tail -20
echo "exit: ${PIPESTATUS[0]} (124: the time limit; run again with the cache carried)"
cp /tmp/max_autotune.json /tmp/max_autotune.md "$OUT/" 2>/dev/null
# The choices only (GEMM benchmark results, pointwise picks): small, where compiled kernels are not.
(cd "$CACHE" && find . -type f \( -name "*.best_config" -o -path "./cache/*" \) -print0 \
  | tar -czf "$OUT/max_autotune_cache.tgz" --null -T -)
ls -la "$OUT"
