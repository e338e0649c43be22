#!/usr/bin/env bash
# Sessions 19-20: why max-autotune's GEMM benchmarking is slow inside a compile, with
# benchmarks/sessions/s19_autotune_profile.py, each run in its own process from an empty Inductor cache.
#   PART=single (session 19, call 1): session 18's slow shapes alone. proj (11008x384x384, 9 s of
#     benchmarking in session 18) with and without the graph-replay stand-in, fc2 (11008x1536x384, 45 s)
#     without. Result: 0.7 s each.
#   PART=chain (session 19, call 3): the block's four GEMMs at 11008 rows in one compile, with and without
#     the stand-in. Result: fc1 10 s and fc2 50 s in both.
#   PART=next (written in session 19, not run yet, ~5 min): the chain without the stand-in three ways:
#     stacks      every thread's Python stacks each second (benchmarks/stack_dump.py): which thread tunes
#                 fc1/fc2 (cProfile of the main thread saw only qkv and proj) and what it waits on;
#     threads1    TORCHINDUCTOR_COMPILE_THREADS=1: no compile worker pool;
#     noprologue  TORCHINDUCTOR_PROLOGUE_FUSION=0: fc1 and fc2 are the GEMMs beside the gelu.
#   Compare each run's "benchmarking takes" lines with PART=chain's (session19.md, section 3).
#   Session 20 ran PART=next (session20.md): with the env var at 1, fc2's 21 choices take 0.3 s of benchmarking
#   and 42.7 s of "precompiling" (80 ptxas runs, 56 s, all in the main process), so the time is template
#   compilation, not timing. With the pool on, the compiles seem to be redone serially at the first timed call.
#   PART=cure (written in session 20, not run yet, ~3 min): the chain with Inductor's config compile_threads=1
#     (its worker-process pool off) but the env var unset, so select_algorithm precompiles each shape's choices
#     on one thread per CPU in this process, where the benchmark finds them compiled. If fc2's "precompiling"
#     drops well under 42 s, s15_run.sh's points get INDUCTOR_EXTRA=compile_threads=1.
#   Session 21 ran PART=cure (session22.md, section 1): fc2 0.43 s benchmarking + 7.0 s precompiling, the whole
#     chain 29.9 s; prologue fusion off changed nothing. The cure is now backend='ats''s max-autotune default.
#   device run: PART=single|chain|next|cure bash benchmarks/sessions/s19_diag.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
PROFILE=benchmarks/sessions/s19_autotune_profile.py
run() {  # NAME [ENV=VALUE ...] -- COMMAND ARGS...
  local name=$1; shift
  local envs=(); while [ "$1" != -- ]; do envs+=("$1"); shift; done; shift
  echo "== $name at $SECONDS s"
  env ${envs[@]+"${envs[@]}"} TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)" timeout 200 python3 "$@" >"$OUT/$name.txt" 2>&1
  echo "$name exit $?"; grep "^AUTOTUNE\|benchmarking takes\|compile+first\|stand-in:" "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch; print(torch.__version__)"
CHAIN=(--m 11008 --k 384 --chain --top 45)
case ${PART:-next} in
  single)
    run proj_replay -- "$PROFILE" --m 11008 --k 384 --n 384 --graph-replay
    run proj_host -- "$PROFILE" --m 11008 --k 384 --n 384
    run fc2_host -- "$PROFILE" --m 11008 --k 1536 --n 384 ;;
  chain)
    run chain_replay -- "$PROFILE" "${CHAIN[@]}" --graph-replay
    run chain_host -- "$PROFILE" "${CHAIN[@]}" ;;
  next)
    run stacks -- -m benchmarks.stack_dump "$OUT/stacks_dump.txt" 1 benchmarks.sessions.s19_autotune_profile "${CHAIN[@]}"
    run threads1 TORCHINDUCTOR_COMPILE_THREADS=1 -- "$PROFILE" "${CHAIN[@]}"
    run noprologue TORCHINDUCTOR_PROLOGUE_FUSION=0 -- "$PROFILE" "${CHAIN[@]}" ;;
  cure)
    run pool_off -- "$PROFILE" "${CHAIN[@]}" --inductor compile_threads=1
    run pool_off_noprologue TORCHINDUCTOR_PROLOGUE_FUSION=0 -- "$PROFILE" "${CHAIN[@]}" --inductor compile_threads=1 ;;
  *) echo "PART=${PART}: single, chain, next or cure"; exit 2 ;;
esac
echo "end at $SECONDS s"
