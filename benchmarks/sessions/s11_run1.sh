#!/usr/bin/env bash
# Session 11, device run 1 (H200): does Inductor's first-call autotuning of pointwise kernels explain
# the bimodal GELU bandwidth in trace_session9.txt (1.87-1.89 TB/s at 3 of 9 stages, 2.52-2.60 at
# the others)? DeiT-S, multi rho=0.87, interleaved rounds, each variant in its own process and
# Inductor cache; then a kernel trace, the autotune picks, and the GPU kernel tests.
set -u
export PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >"$LOG" 2>&1
python3 -c "import torch, triton, timm; print(torch.__version__, triton.__version__, timm.__version__, torch.cuda.get_device_name())" >>"$LOG" 2>&1
il() {  # il TAG ARGS...: one interleaved run in a fresh Inductor cache
  local tag=$1; shift
  echo "== interleaved $tag $*" >>"$LOG"
  TORCHINDUCTOR_CACHE_DIR=/tmp/ic_$tag timeout 200 python3 -m benchmarks.interleaved --models deit_small_patch16_224 \
    --configs "multi rho=0.87" --batches 1 64 256 --rounds 5 --out "$OUT/il_$tag.json" "$@" 2>&1 | grep -v "^W\|Warning" | tail -12 >>"$LOG"
}
il w1 --warmup-batch 1
il w256
il noatp --warmup-batch 1 --inductor triton.autotune_pointwise=False
echo "== kernel trace (cache of w256)" >>"$LOG"
TORCHINDUCTOR_CACHE_DIR=/tmp/ic_w256 timeout 120 python3 -m benchmarks.kernel_trace --configs "dense same-compile" "multi rho=0.87" \
  --batches 256 --out "$OUT/trace_w256.json" 2>&1 | grep "^==" >>"$LOG"
python3 - >"$OUT/picks.txt" 2>&1 <<'PY'
# Which config each cached pointwise kernel kept, per variant (kernel name from the source beside it).
import glob, json, os, re
for tag in ("w1", "w256", "noatp"):
    for f in sorted(glob.glob(f"/tmp/ic_{tag}/**/*.best_config", recursive=True)):
        src = f[: -len(".best_config")] + ".py"
        name = re.search(r"def (triton_\w+)", open(src).read()) if os.path.exists(src) else None
        if name and "gelu" in name.group(1):
            c = json.load(open(f))
            print(tag, name.group(1), {k: c.get(k) for k in ("XBLOCK", "num_warps", "num_stages")})
PY
echo "== GPU kernel tests" >>"$LOG"
timeout 110 python3 -m pytest tests/test_kernels.py -x -q -p no:cacheprovider >"$OUT/gputests.txt" 2>&1
tail -3 "$OUT/gputests.txt" >>"$LOG"
cat "$LOG"
