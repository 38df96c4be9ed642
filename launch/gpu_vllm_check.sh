#!/usr/bin/env bash
# FEALLM on vLLM, checked on a machine with a GPU in one run (about ten minutes, most of it
# installing vLLM the first time): builds .venv and .venv-vllm (`vllm==0.33.0` where
# nvidia-smi works), then
#   1. the export + serve + equivalence tests (tests/test_vllm.py: a tiny FEALLM trained
#      through upstream's train script, exported, served by launch/serve_vllm.sh on the GPU;
#      greedy tokens on 16 images and `feallm eval --base-url` answers equal the LLaVA
#      runner's, token for token);
#   2. `python -m feallm_llava.bench vllm --device cuda`: the tiny FEALLM exported and served
#      by vLLM against the LLaVA runner at batch 8 and 1 on the GPU, in float32 (answers
#      must agree) and in float16 (reported only); items/s, ratios, agreement.
# Prints one PASS/FAIL line per step and exits 1 when any step fails. Logs and results in
# OUT (default runs/gpu_vllm_check). Environment: OUT, ITEMS (bench items, 256),
# BUDGET_S (900: a step over it fails).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$root/runs/gpu_vllm_check}"
ITEMS="${ITEMS:-256}"
BUDGET_S="${BUDGET_S:-900}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$root"
mkdir -p "$OUT"
nvidia-smi -L || echo "[gpu_vllm_check] WARNING: nvidia-smi found no GPU; this runs vLLM's CPU build" >&2

failures=0
step() {  # step NAME COMMAND...: runs it, logs to OUT/NAME.log, prints PASS/FAIL and the seconds
  local name="$1"; shift
  local start=$SECONDS rc=0
  "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  local took=$((SECONDS - start))
  if [ "$rc" = 0 ] && [ "$took" -le "$BUDGET_S" ]; then
    echo "PASS $name (${took} s)"
  else
    echo "FAIL $name (exit $rc, ${took} s; log: $OUT/$name.log)"; tail -20 "$OUT/$name.log"
    failures=$((failures + 1))
  fi
}

step bootstrap bash -c "bash launch/bootstrap.sh && bash launch/bootstrap.sh --env vllm"
step equivalence .venv/bin/python -m pytest tests/test_vllm.py -q -p no:cacheprovider -rs
# float32: equal answers are the check; float16 for the speed a deployment would see (its
# answers may part at near-ties between the two engines' half-precision kernels)
step bench .venv/bin/python -m feallm_llava.bench vllm --device cuda --dtype float32 --items "$ITEMS" \
  --work-dir "$OUT/bench"
step bench_fp16 bash -c ".venv/bin/python -m feallm_llava.bench vllm --device cuda --dtype float16 \
  --items $ITEMS --work-dir $OUT/bench || true"
grep -h "items_per_s\|answers agree" "$OUT/bench.log" "$OUT/bench_fp16.log" || true
[ "$failures" = 0 ] || { echo "[gpu_vllm_check] $failures step(s) failed"; exit 1; }
echo "[gpu_vllm_check] all steps passed"
