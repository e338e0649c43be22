#!/usr/bin/env bash
# Session 19, device call 2: one GEMM tuned alone took 0.7 s of benchmarking (call 1), 9-45 s inside the
# DeiT-S compile. A chain of the block's four GEMMs at 11008 rows in one compile, with and without the
# graph-replay stand-in, each from an empty cache: are the later shapes slow, and is it the stand-in?
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
run() {  # NAME ARGS...
  local name=$1; shift
  echo "== $name at $SECONDS s"
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout 200 python3 benchmarks/sessions/s19_autotune_profile.py "$@" \
    >"$OUT/$name.txt" 2>&1
  echo "$name exit $?"; grep "^AUTOTUNE\|benchmarking takes\|compile+first\|stand-in:" "$OUT/$name.txt"
}
run chain_replay --m 11008 --k 384 --chain --graph-replay --top 45
run chain_host --m 11008 --k 384 --chain --top 45
echo "end at $SECONDS s"
