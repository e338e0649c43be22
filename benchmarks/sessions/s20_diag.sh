#!/usr/bin/env bash
# For the next device session (written in session 19, not run yet): why a Triton template's first timed call
# takes 0.3-8.8 s inside a compile (session19.md, section 3). Runs the chain of the block's four GEMMs at
# 11008 rows (s19_autotune_profile.py --chain), without the graph-replay stand-in, each run from an empty
# Inductor cache:
#   stacks      all threads' Python stacks dumped every second (benchmarks/stack_dump.py): which thread tunes
#               fc1/fc2 (cProfile of the main thread saw only qkv and proj) and what it waits on;
#   threads1    TORCHINDUCTOR_COMPILE_THREADS=1: no compile worker pool;
#   noprologue  TORCHINDUCTOR_PROLOGUE_FUSION=0: fc1 and fc2 are the GEMMs beside the gelu.
# Compare each run's "benchmarking takes" lines with session 19's (fc1 10.6 s, fc2 50.1 s; alone 0.7 s).
#   device run: bash benchmarks/sessions/s20_diag.sh   (~5 min)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
run() {  # NAME ENV... -- ARGS...
  local name=$1; shift
  local envs=(); while [ "$1" != -- ]; do envs+=("$1"); shift; done; shift
  echo "== $name at $SECONDS s"
  env "${envs[@]}" TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout 170 python3 "$@" >"$OUT/$name.txt" 2>&1
  echo "$name exit $?"; grep "^AUTOTUNE\|benchmarking takes\|compile+first" "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch; print(torch.__version__)"
CHAIN=(--m 11008 --k 384 --chain --top 30)
run stacks X=1 -- -m benchmarks.stack_dump "$OUT/stacks_dump.txt" 1 benchmarks.sessions.s19_autotune_profile "${CHAIN[@]}"
run threads1 TORCHINDUCTOR_COMPILE_THREADS=1 -- benchmarks/sessions/s19_autotune_profile.py "${CHAIN[@]}"
run noprologue TORCHINDUCTOR_PROLOGUE_FUSION=0 -- benchmarks/sessions/s19_autotune_profile.py "${CHAIN[@]}"
echo "end at $SECONDS s"
