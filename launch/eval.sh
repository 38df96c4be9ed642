#!/usr/bin/env bash
# Evaluate a FEALLM (or any LLaVA) checkpoint on FEABench and the zero-shot sets (paper
# sections 5.2, 5.3): one `feallm eval` per benchmark, then one `feallm score` over all
# of them (scores.json / scores.csv / table.md in the paper's layout / plots).
#
#   bash launch/eval.sh                                   # the stage-2 LoRA checkpoint
#   MODEL_PATH=checkpoints/feallm-llava-v1.5-7b-lora BENCHES="feabench rafdb" bash launch/eval.sh
#   MODEL_PATH=liuhaotian/llava-v1.5-7b bash launch/eval.sh        # the zero-shot LLaVA-1.5 row
#   OPENAI_MODEL=Qwen2-VL-7B BASE_URL=http://127.0.0.1:8000/v1 bash launch/eval.sh   # an endpoint
#   DRY_RUN=1 bash launch/eval.sh                         # print the commands, run nothing
#
# With several GPUs each benchmark is split into one chunk per GPU, run in parallel
# (CUDA_VISIBLE_DEVICES=<gpu> ... --num-chunks N --chunk-idx i), then merged. A rerun
# resumes: items already in a predictions file are not asked again.
#
# Environment:
#   MODEL_PATH       checkpoints/feallm-llava-v1.5-7b-lora (launch/finetune_lora.sh's output)
#   MODEL_BASE       base LLM of a LoRA or projector-only checkpoint; default
#                    lmsys/vicuna-7b-v1.5 when MODEL_PATH's name contains "lora", else none.
#                    MODEL_BASE= (set, empty) forces none (a full checkpoint).
#   OPENAI_MODEL     evaluate an OpenAI-compatible endpoint instead of MODEL_PATH;
#   BASE_URL         its URL (default: OpenAI); the key comes from OPENAI_API_KEY
#   BENCHES          "feabench rafdb affectnet bp4d disfa" (default: those whose data exist;
#                    a benchmark named here explicitly must have its data). LLaVA's own
#                    textvqa, pope and sqa run upstream's eval scripts on the checkpoint
#                    (model_vqa_loader / model_vqa_science, then eval_textvqa / eval_pope /
#                    eval_science_qa) on the files its scripts/v1_5/eval/*.sh read under
#                    DATA_ROOT (textvqa/, pope/, scienceqa/), --conv-mode vicuna_v1 unless CONV_MODE
#   FEABENCH_DATA    playground/data/fea (`feallm build-dataset --out`, holds eval.json)
#   FEABENCH_IMAGES  eval.json's image root when it moved (default: the folder eval.json names)
#   DATA_ROOT        playground/data/eval: default parent of the four zero-shot sets
#   RAFDB_DATA       $DATA_ROOT/RAF-DB        AFFECTNET_DATA  $DATA_ROOT/AffectNet
#   BP4D_DATA        $DATA_ROOT/BP4D          DISFA_DATA      $DATA_ROOT/DISFA
#   <BENCH>_IMAGES, <BENCH>_FRAME_PATTERN     --image-folder / --frame-pattern of one
#                    benchmark (e.g. BP4D_IMAGES, DISFA_FRAME_PATTERN; see `feallm eval -h`)
#   SAMPLE_EVERY     50: BP4D / DISFA keep every 50th frame, the paper's 2% (section 5.3)
#   OUT              runs/eval/<model name>: <bench>/predictions.jsonl, scores/
#   GPU_LIST         GPUs to spread chunks over, e.g. "0,1,2,3" (default: CUDA_VISIBLE_DEVICES,
#                    else every GPU nvidia-smi lists; none = one process)
#   DEVICE, DTYPE, BATCH_SIZE (8), MAX_NEW_TOKENS (256), CONV_MODE, LIMIT, SEED (0)
#   NAME             model name in the score tables (default: the checkpoint's folder name)
#   EVAL_ARGS        more `feallm eval` flags for every benchmark (split on whitespace)
#   PY               python of the environment (default: .venv of this repository)
#   DRY_RUN=1        print the commands and exit
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="[eval]"
PY="${PY:-$root/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3 || command -v python)"
dry=0
case "${DRY_RUN:-0}" in ""|0|false|no) ;; *) dry=1 ;; esac
die() { echo "$tag error: $*" >&2; exit 2; }
note() { echo "$tag $*"; }
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }

OPENAI_MODEL="${OPENAI_MODEL:-}"
MODEL_PATH="${MODEL_PATH:-$root/checkpoints/feallm-llava-v1.5-7b-lora}"
if [ -z "${MODEL_BASE+set}" ]; then
  case "$(basename "$MODEL_PATH")" in
    *[Ll][Oo][Rr][Aa]*) MODEL_BASE=lmsys/vicuna-7b-v1.5 ;;
    *) MODEL_BASE= ;;
  esac
fi
FEABENCH_DATA="${FEABENCH_DATA:-$root/playground/data/fea}"
FEABENCH_IMAGES="${FEABENCH_IMAGES:-}"
DATA_ROOT="${DATA_ROOT:-$root/playground/data/eval}"
RAFDB_DATA="${RAFDB_DATA:-$DATA_ROOT/RAF-DB}"
AFFECTNET_DATA="${AFFECTNET_DATA:-$DATA_ROOT/AffectNet}"
BP4D_DATA="${BP4D_DATA:-$DATA_ROOT/BP4D}"
DISFA_DATA="${DISFA_DATA:-$DATA_ROOT/DISFA}"
SAMPLE_EVERY="${SAMPLE_EVERY:-50}"          # paper 5.3: 2% uniform sampling of BP4D / DISFA
BATCH_SIZE="${BATCH_SIZE:-8}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-256}"
SEED="${SEED:-0}"
if [ -n "$OPENAI_MODEL" ]; then label="$OPENAI_MODEL"; else label="$(basename "$MODEL_PATH")"; fi
OUT="${OUT:-$root/runs/eval/${label//\//_}}"
all_benches="feabench rafdb affectnet bp4d disfa"
llava_benches="textvqa pope sqa"   # LLaVA's own benchmarks, through upstream's eval scripts
explicit=0; [ -n "${BENCHES:-}" ] && explicit=1
BENCHES="${BENCHES:-$all_benches}"

# -- the model ----------------------------------------------------------------------
model_args=()
if [ -n "$OPENAI_MODEL" ]; then
  model_args=(--openai-model "$OPENAI_MODEL")
  [ -z "${BASE_URL:-}" ] || model_args+=(--base-url "$BASE_URL")
else
  # a local path must exist; "org/name" is a model-hub id (e.g. liuhaotian/llava-v1.5-7b)
  if [ ! -e "$MODEL_PATH" ] && ! ((dry)) && [[ "$MODEL_PATH" == /* || "$MODEL_PATH" == .* || "$MODEL_PATH" == */*/* ]]; then
    die "MODEL_PATH=$MODEL_PATH does not exist (train it with launch/finetune_lora.sh, or set MODEL_PATH / OPENAI_MODEL)"
  fi
  model_args=(--model-path "$MODEL_PATH" --batch-size "$BATCH_SIZE")
  [ -z "$MODEL_BASE" ] || model_args+=(--model-base "$MODEL_BASE")
  [ -z "${CONV_MODE:-}" ] || model_args+=(--conv-mode "$CONV_MODE")
  [ -z "${DEVICE:-}" ] || model_args+=(--device "$DEVICE")
  [ -z "${DTYPE:-}" ] || model_args+=(--dtype "$DTYPE")
fi
model_args+=(--max-new-tokens "$MAX_NEW_TOKENS" --seed "$SEED")
[ -z "${LIMIT:-}" ] || model_args+=(--limit "$LIMIT")
read -ra extra <<<"${EVAL_ARGS:-}"

# -- GPUs to spread the chunks over (a LLaVA checkpoint only) ---------------------------
if [ -z "${GPU_LIST+set}" ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then GPU_LIST="$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    GPU_LIST="$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | paste -sd, - || true)"
  else GPU_LIST=""; fi
fi
IFS=',' read -ra gpus <<<"$GPU_LIST"
[ -z "$OPENAI_MODEL" ] || gpus=()   # an endpoint parallelises by itself (--concurrency)

# -- per-benchmark arguments -----------------------------------------------------------
bench_args() {  # bench_args BENCH -> fills `args`; returns 1 when its data are missing
  local bench="$1" up data images pattern
  up="$(tr '[:lower:]' '[:upper:]' <<<"$bench")"
  data="${up}_DATA"; data="${!data}"
  images="${up}_IMAGES"; images="${!images:-}"
  pattern="${up}_FRAME_PATTERN"; pattern="${!pattern:-}"
  args=(--bench "$bench" --data "$data")
  [ -z "$images" ] || args+=(--image-folder "$images")
  [ -z "$pattern" ] || args+=(--frame-pattern "$pattern")
  case "$bench" in bp4d|disfa) args+=(--sample-every "$SAMPLE_EVERY") ;; esac
  [ -e "$data" ]
}

# -- LLaVA's own benchmarks: upstream's generation script, then its scorer, on the files
# its scripts/v1_5/eval/<bench>.sh reads under DATA_ROOT (downloaded as LLaVA's docs say)
llava_bench() {  # llava_bench BENCH; returns 1 when its data are missing
  local bench="$1" dir answers gen score
  answers="$OUT/$bench/answers.jsonl"
  case "$bench" in
    textvqa) dir="$DATA_ROOT/textvqa"
      gen=(llava.eval.model_vqa_loader --question-file "$dir/llava_textvqa_val_v051_ocr.jsonl"
           --image-folder "$dir/train_images")
      score=(llava.eval.eval_textvqa --annotation-file "$dir/TextVQA_0.5.1_val.json" --result-file "$answers") ;;
    pope) dir="$DATA_ROOT/pope"
      gen=(llava.eval.model_vqa_loader --question-file "$dir/llava_pope_test.jsonl" --image-folder "$dir/val2014")
      score=(llava.eval.eval_pope --annotation-dir "$dir/coco" --question-file "$dir/llava_pope_test.jsonl"
             --result-file "$answers") ;;
    sqa) dir="$DATA_ROOT/scienceqa"
      gen=(llava.eval.model_vqa_science --question-file "$dir/llava_test_CQM-A.json"
           --image-folder "$dir/images/test" --single-pred-prompt)
      score=(llava.eval.eval_science_qa --base-dir "$dir" --result-file "$answers"
             --output-file "$OUT/$bench/output.jsonl" --output-result "$OUT/$bench/result.json") ;;
  esac
  [ -z "$OPENAI_MODEL" ] || die "$bench runs upstream's eval script on a checkpoint: set MODEL_PATH, not OPENAI_MODEL"
  args=(x x x "${gen[2]}")  # where its data should be, for the message of a missing set
  gen=("$PY" -m "${gen[@]}" --model-path "$MODEL_PATH" --answers-file "$answers" --temperature 0
       --conv-mode "${CONV_MODE:-vicuna_v1}")
  [ -z "$MODEL_BASE" ] || gen+=(--model-base "$MODEL_BASE")
  (( ${#gpus[@]} == 0 )) || gen=(env "CUDA_VISIBLE_DEVICES=${gpus[0]}" "${gen[@]}")
  show "${gen[@]}"
  show "$PY" -m "${score[@]}"
  [ -e "${args[3]}" ] || return 1
  ((dry)) && return 0
  mkdir -p "$OUT/$bench"
  "${gen[@]}" || die "$bench: upstream's generation script failed"
  "$PY" -m "${score[@]}" | tee "$OUT/$bench/score.txt" || die "$bench: upstream's scorer failed"
}

feallm=("$PY" -m feallm_llava.cli)
predictions=()
ran=()
skipped=()
for bench in $BENCHES; do
  case " $all_benches $llava_benches " in *" $bench "*) ;; *)
    die "unknown benchmark '$bench' in BENCHES (choose from: $all_benches $llava_benches)" ;; esac
  case " $llava_benches " in *" $bench "*)
    if llava_bench "$bench"; then ran+=("$bench")
    else
      msg="$bench: no data at ${args[3]} (upstream LLaVA's docs/Evaluation.md says where to get it)"
      if ((dry)); then note "$msg; a real run stops or skips here"; ran+=("$bench")
      elif ((explicit)); then die "$msg"
      else note "$msg: skipped"; skipped+=("$bench"); fi
    fi
    continue ;;
  esac
  if ! bench_args "$bench"; then
    msg="$bench: no data at ${args[3]} (set $(tr '[:lower:]' '[:upper:]' <<<"$bench")_DATA)"
    if ((dry)); then
      if ((explicit)); then note "$msg; a real run stops here"; else note "$msg; a real run skips it"; fi
    elif ((explicit)); then die "$msg"
    else note "$msg: skipped"; skipped+=("$bench"); continue
    fi
  fi
  out="$OUT/$bench"
  cmd=("${feallm[@]}" eval "${args[@]}" "${model_args[@]}" --out "$out" ${extra[@]+"${extra[@]}"})
  predictions+=("$out/predictions.jsonl")
  ran+=("$bench")
  if (( ${#gpus[@]} <= 1 )); then
    if (( ${#gpus[@]} == 1 )); then cmd=(env "CUDA_VISIBLE_DEVICES=${gpus[0]}" "${cmd[@]}"); fi
    show "${cmd[@]}"
    ((dry)) || "${cmd[@]}" || die "$bench: feallm eval failed (rerun to resume)"
    continue
  fi
  # One chunk per GPU, in parallel, then merged into $out/predictions.jsonl.
  n=${#gpus[@]}
  pids=()
  ((dry)) || mkdir -p "$out"
  for i in "${!gpus[@]}"; do
    chunk=(env "CUDA_VISIBLE_DEVICES=${gpus[$i]}" "${cmd[@]}" --num-chunks "$n" --chunk-idx "$i")
    show "${chunk[@]}"
    ((dry)) || { "${chunk[@]}" >"$out/chunk$i.log" 2>&1 & pids+=($!); }
  done
  failed=0
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { failed=1; echo "$tag $bench chunk $i failed; last lines of $out/chunk$i.log:" >&2
                            tail -n 20 "$out/chunk$i.log" >&2; }
  done
  ((failed == 0)) || die "$bench: a chunk failed (rerun to resume; answered items are kept)"
  merge=("${cmd[@]}" --num-chunks "$n" --merge)
  show "${merge[@]}"
  ((dry)) || "${merge[@]}" || die "$bench: merging the chunks failed"
done
(( ${#ran[@]} )) || die "no benchmark has data (set FEABENCH_DATA, RAFDB_DATA, ...; skipped: ${skipped[*]})"
(( ${#predictions[@]} )) || { ((dry)) || note "LLaVA benchmark scores: $OUT/<bench>/score.txt"; exit 0; }

# -- one score table over every benchmark that ran --------------------------------------
score=("${feallm[@]}" score "${predictions[@]}" --out "$OUT/scores")
if [ -n "${NAME:-}" ]; then score+=(--name); for _ in "${predictions[@]}"; do score+=("$NAME"); done; fi
show "${score[@]}"
((dry)) && exit 0
"${score[@]}"
note "scores: $OUT/scores/table.md (ran: ${ran[*]}${skipped[*]:+; skipped: ${skipped[*]}})"
