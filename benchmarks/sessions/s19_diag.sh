#!/usr/bin/env bash
# Session 19, device call 1: benchmarks/sessions/s19_autotune_profile.py on session 18's slow shapes, each
# variant from its own empty Inductor cache: proj (11008x384x384, 9 s of benchmarking in session 18) with
# and without the graph-replay stand-in, then fc2 (11008x1536x384, 45 s) without it.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
run() {  # NAME ARGS...
  local name=$1; shift
  echo "== $name at $SECONDS s"
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout 150 python3 benchmarks/sessions/s19_autotune_profile.py "$@" \
    >"$OUT/$name.txt" 2>&1
  echo "$name exit $?"; grep "benchmarking takes\|compile+first\|stand-in:" "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch; print(torch.__version__)"
run proj_replay --m 11008 --k 384 --n 384 --graph-replay
run proj_host --m 11008 --k 384 --n 384
run fc2_host --m 11008 --k 1536 --n 384
echo "end at $SECONDS s"
