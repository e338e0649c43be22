#!/usr/bin/env bash
# Session 15 (H200, torch 2.11): issue 4's max-autotune points, dense same-compile and ATS multi rho=0.87
# timed in interleaved rounds (benchmarks.interleaved --mode max-autotune --static-batch), the GEMM
# choices timed as CUDA graph replays (--graph-replay-autotune, benchmarks/graph_replay_autotune.py).
#   POINTS: "MODEL:BATCH ..." in order (default: DeiT-S at 256, which session 14's committed choices
#   nearly finish, then DeiT-S at 1). One Inductor cache holds every point's choices: it starts from
#   SEED_CACHE (default benchmarks/sessions/max_autotune_cache_s14.tgz; "none": cold), then what a call
#   before carried (.device_carry/max_autotune_cache.tgz) or left on a warm machine, and goes back to
#   $OUT/max_autotune_cache.tgz at the end, also when the time limit stops a compile; carry it again
#   and the next call resumes there. A point whose results are in .device_carry/ is not run again.
#   CONFIGS (default "multi rho=0.87"): ";"-separated operating points timed together (session 22).
#   CALLS_PER_GRAPH (default 1): --calls-per-graph, the calls back to back in each timed graph.
# What happened (max_autotune_s15.md): three calls. DeiT-S 256 finished (0.883 of the FLOPs ratio);
# DeiT-S 1 took ~13 min cold and ran 0.924x dense: its stages' GEMMs went to Triton templates, their
# timings (5-13 us) no longer resolving what the GEMMs take (3-5 us in the graph). The single-GEMM test
# after it (s15_b1_bias.sh) picked cuBLAS with 20 calls per graph. Next: batch 1 again with
#   CALLS_PER_GRAPH=20 POINTS=deit_small_patch16_224:1 bash benchmarks/sessions/s15_run.sh 575
# (two calls, carrying .device_carry/max_autotune_cache.tgz; do not seed it with
# max_autotune_cache_s15.tgz, whose batch-1 choices are the one-call ones: Inductor's cache keys do not
# say how a choice was timed).
#   INDUCTOR_EXTRA (default none): more KEY=VALUE Inductor options for dense and ATS alike, e.g.
#   compile_threads=1, which cut a cold point to ~3.5 min (session 22: ViT-B 64 1.404x, DeiT-S 256 1.374x;
#   since then backend='ats' and benchmarks.compiled's dense same-compile set it under max-autotune anyway).
#   Session 21: CALLS_PER_GRAPH=20 POINTS=deit_small_patch16_224:1 finished, 1.020x (session22.md).
#   Session 24: the last 20 cells (batches 64 and 1, CONFIGS of the five other points; commands in
#   benchmarks/results/session24.md). max_autotune_cache_s24.tgz holds every choice so far, all batches.
#   device run: POINTS="..." bash benchmarks/sessions/s15_run.sh [LIMIT_S]
set -u
export PYTHONUNBUFFERED=1
LIMIT=${1:-570}
POINTS=${POINTS:-deit_small_patch16_224:256 deit_small_patch16_224:1}
CALLS=${CALLS_PER_GRAPH:-1}
# CONFIGS: operating points separated by ";" (default "multi rho=0.87"), e.g. "multi rho=0.72;single K=108"
IFS=';' read -r -a CONFIG_LIST <<<"${CONFIGS:-multi rho=0.87}"
TAG=$([ -z "${CONFIGS:-}" ] || echo "_$(echo "$CONFIGS" | tr -c 'A-Za-z0-9.\n' '_' | tr -s _)")
SEED=${SEED_CACHE:-benchmarks/sessions/max_autotune_cache_s14.tgz}
CACHE=/tmp/inductor_max_autotune
LOG=$OUT/log.txt
mkdir -p "$CACHE"
{ nvidia-smi --query-gpu=name,clocks.sm --format=csv; date
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } >"$LOG" 2>&1
# Merged, not untarred over: on a machine still warm from the call before, a carried copy of the one
# JSON benchmark file is older than the one here (session 20 lost 7 shapes that way).
merge_in() {
  local d; d=$(mktemp -d); tar -xzf "$1" -C "$d"
  python3 benchmarks/sessions/merge_inductor_cache.py "$d" "$CACHE" >>"$LOG" 2>&1
}
if [ "$SEED" != none ]; then
  [ -f "$SEED" ] || { echo "SEED_CACHE=$SEED: no such file"; exit 2; }
  merge_in "$SEED"; fi
[ -f .device_carry/max_autotune_cache.tgz ] && merge_in .device_carry/max_autotune_cache.tgz
extra=(benchmark_epilogue_fusion=False ${INDUCTOR_EXTRA:-})
if python3 -c "import torch._inductor.config as c, sys; sys.exit(0 if hasattr(c, 'max_autotune_prune_choices_based_on_shared_mem') else 1)"; then
  extra+=(max_autotune_prune_choices_based_on_shared_mem=True)
fi
for point in $POINTS; do
  model=${point%:*}; batch=${point#*:}
  name=interleaved_max_autotune_${model}_b${batch}$([ "$CALLS" = 1 ] || echo "_x$CALLS")$TAG
  if [ -f ".device_carry/$name.json" ]; then echo "$name: done in a call before" >>"$LOG"; continue; fi
  LEFT=$((LIMIT - SECONDS - 25))  # 25 s for saving the cache
  [ "$LEFT" -lt 30 ] && { echo "$name: no time left" >>"$LOG"; break; }
  echo "== $name at $SECONDS s, limit $LEFT s" >>"$LOG"
  TORCHINDUCTOR_CACHE_DIR=$CACHE timeout "$LEFT" python3 -m benchmarks.interleaved --models "$model" \
    --mode max-autotune --static-batch --batches "$batch" --configs "${CONFIG_LIST[@]}" --rounds 7 \
    --no-coordinate-descent --autotune-rep 10 --graph-replay-autotune --calls-per-graph "$CALLS" --no-plain-dense \
    --inductor "${extra[@]}" --out "/tmp/$name.json" 2>&1 | grep -v "^W\|Warning" >>"$OUT/compile_log.txt"
  echo "$name exit ${PIPESTATUS[0]} (124: the time limit)" >>"$LOG"
  if [ -f "/tmp/$name.md" ]; then cp "/tmp/$name.json" "/tmp/$name.md" "$OUT/"; cat "/tmp/$name.md" >>"$LOG"; fi
done
# The choices only (GEMM benchmark results, pointwise picks): small, where compiled kernels are not.
(cd "$CACHE" && find . -type f \( -name "*.best_config" -o -path "./cache/*" \) -print0 \
  | tar -czf "$OUT/max_autotune_cache.tgz" --null -T -)
grep -c "^AUTOTUNE" "$OUT/compile_log.txt" >>"$LOG" 2>&1
echo "end at $SECONDS s" >>"$LOG"
cat "$LOG"
