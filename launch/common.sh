# shellcheck shell=bash
# Sourced by launch/pretrain.sh and launch/finetune_lora.sh (never run on its own): the
# defaults, world size, batch arithmetic and DeepSpeed launcher both training stages share.
#
# Expects from the sourcing script: `set -euo pipefail`, root (repository root), tag
# (message prefix), OUTPUT_DIR, GLOBAL_BATCH, ZERO, and the launcher environment its
# header documents (NUM_GPUS, HOSTFILE, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
# PER_DEVICE_BATCH, DEEPSPEED, DRY_RUN).
# Leaves: the defaults below, die, note, train_cmd (builds `cmd`), launch (prints `cmd`,
# then execs it unless DRY_RUN), launcher (deepspeed's own flags), WORLD_SIZE,
# PER_DEVICE_BATCH, ACCUM, ds_config, deepspeed_cmd, and problems (to which the script
# adds its own input checks before calling launch).

# -- defaults both stages share ------------------------------------------------------
# The projector's settings (VISION_TOWER .. CROP_SIZE) must agree between the stages:
# stage 2 rebuilds the projector from its flags and loads stage 1's weights strictly.
PY="${PY:-$root/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3 || command -v python)"
MODEL="${MODEL:-lmsys/vicuna-7b-v1.5}"
VISION_TOWER="${VISION_TOWER:-openai/clip-vit-large-patch14-336}"
MAX_PER_DEVICE_BATCH="${MAX_PER_DEVICE_BATCH:-16}"
SELECT_LAYER="${SELECT_LAYER:--2}"
SHALLOW_LAYERS="${SHALLOW_LAYERS:-3 8 13 18}"
LCA_CHANNELS="${LCA_CHANNELS:-64}"
CROP_SIZE="${CROP_SIZE:-112}"
MAX_LEN="${MAX_LEN:-2048}"
WORKERS="${WORKERS:-4}"
SAVE_TOTAL_LIMIT="${SAVE_TOTAL_LIMIT:-1}"
REPORT_TO="${REPORT_TO:-none}"

dry=0
case "${DRY_RUN:-0}" in ""|0|false|no) ;; *) dry=1 ;; esac

die() { echo "$tag error: $*" >&2; exit 2; }
note() { echo "$tag $*"; }

# -- world size and the launcher ---------------------------------------------------
visible_gpus() {  # GPUs this process may use: CUDA_VISIBLE_DEVICES, else nvidia-smi
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c '[^[:space:]]' || true
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}
launcher=()
if [ -n "${HOSTFILE:-}" ]; then
  if [ -z "${WORLD_SIZE:-}" ]; then
    [ -f "$HOSTFILE" ] || die "HOSTFILE=$HOSTFILE does not exist (set WORLD_SIZE to skip reading it)"
    WORLD_SIZE="$(awk '!/^[[:space:]]*(#|$)/ { for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) {
      split($i, kv, "="); n += kv[2] } } END { print n + 0 }' "$HOSTFILE")"
  fi
  launcher+=(--hostfile "$HOSTFILE")
else
  visible="$(visible_gpus)"
  if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS="$visible"
    if [ "$NUM_GPUS" -lt 1 ]; then
      NUM_GPUS=2
      note "no GPU found; assuming the paper's 2 (set NUM_GPUS)"
    fi
  fi
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    # deepspeed ignores CUDA_VISIBLE_DEVICES once --num_gpus is given (it then takes GPUs
    # 0..N-1): name the visible ones with --include instead.
    [ "$NUM_GPUS" = "$visible" ] \
      || die "NUM_GPUS=$NUM_GPUS but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES names $visible GPUs; make them agree"
    launcher+=(--include "localhost:$CUDA_VISIBLE_DEVICES")
  else
    launcher+=(--num_gpus "$NUM_GPUS")
  fi
  WORLD_SIZE="$NUM_GPUS"
fi
[ -z "${MASTER_ADDR:-}" ] || launcher+=(--master_addr "$MASTER_ADDR")
[ -z "${MASTER_PORT:-}" ] || launcher+=(--master_port "$MASTER_PORT")
[[ "$WORLD_SIZE" =~ ^[1-9][0-9]*$ ]] || die "world size must be a positive integer, got '$WORLD_SIZE'"

# -- batch arithmetic: GLOBAL_BATCH = WORLD_SIZE x PER_DEVICE_BATCH x ACCUM ------------
[[ "$GLOBAL_BATCH" =~ ^[1-9][0-9]*$ ]] || die "GLOBAL_BATCH must be a positive integer, got '$GLOBAL_BATCH'"
(( GLOBAL_BATCH % WORLD_SIZE == 0 )) \
  || die "GLOBAL_BATCH=$GLOBAL_BATCH is not divisible by the $WORLD_SIZE GPUs; use a GPU count that divides it, or set GLOBAL_BATCH"
per_gpu=$(( GLOBAL_BATCH / WORLD_SIZE ))
if [ -z "${PER_DEVICE_BATCH:-}" ]; then
  PER_DEVICE_BATCH="$MAX_PER_DEVICE_BATCH"
  (( PER_DEVICE_BATCH <= per_gpu )) || PER_DEVICE_BATCH="$per_gpu"
  while (( per_gpu % PER_DEVICE_BATCH )); do PER_DEVICE_BATCH=$(( PER_DEVICE_BATCH - 1 )); done
fi
[[ "$PER_DEVICE_BATCH" =~ ^[1-9][0-9]*$ ]] || die "PER_DEVICE_BATCH must be a positive integer, got '$PER_DEVICE_BATCH'"
(( per_gpu % PER_DEVICE_BATCH == 0 )) \
  || die "PER_DEVICE_BATCH=$PER_DEVICE_BATCH does not divide GLOBAL_BATCH / GPUs = $per_gpu"
ACCUM=$(( per_gpu / PER_DEVICE_BATCH ))

# -- DeepSpeed config and launcher ------------------------------------------------
case "$ZERO" in 2|3) ;; *) die "ZERO must be 2 or 3, got '$ZERO'" ;; esac
ds_config="$root/launch/zero$ZERO.json"
[ -f "$ds_config" ] || die "missing DeepSpeed config $ds_config"
DEEPSPEED="${DEEPSPEED:-}"
if [ -z "$DEEPSPEED" ]; then
  if [ -x "$(dirname "$PY")/deepspeed" ]; then DEEPSPEED="$(dirname "$PY")/deepspeed"
  else DEEPSPEED="$(command -v deepspeed || echo deepspeed)"; fi
fi
read -ra deepspeed_cmd <<<"$DEEPSPEED"
problems=()
[ -z "${HOSTFILE:-}" ] || [ -f "$HOSTFILE" ] || problems+=("HOSTFILE=$HOSTFILE does not exist")
command -v "${deepspeed_cmd[0]}" >/dev/null 2>&1 \
  || problems+=("deepspeed launcher '$DEEPSPEED' not found: pip install deepspeed (or set DEEPSPEED)")
case "$(basename "$OUTPUT_DIR")" in
  *[Ll][Ll][Aa][Vv][Aa]*) ;;
  *) note "warning: OUTPUT_DIR name '$(basename "$OUTPUT_DIR")' lacks 'llava': load_pretrained_model will not load it as LLaVA" ;;
esac
# A LLaVA checkpoint (local: its config names a projector; hub: "llava" in the id) is a
# valid start: the plugin replaces its tower and projector (say so, it is easy to miss).
if { [ -f "$MODEL/config.json" ] && grep -q '"mm_projector_type"' "$MODEL/config.json"; } \
   || { [ ! -e "$MODEL" ] && [[ "$MODEL" == *[Ll][Ll][Aa][Vv][Aa]* ]]; }; then
  note "MODEL=$MODEL is a LLaVA checkpoint: FEALLM's tower and projector replace its own; its mlp2x_gelu projector starts the FEALLM MLP in stage 1"
fi

# The train_mem command both stages run: `train_cmd STAGE_FLAGS...` sets cmd to the
# launcher, the stage's own flags, the shared ones, then FEALLM_ARGS and EXTRA_ARGS
# (last, so they override: argparse keeps a flag's last value).
train_cmd() {
  local shallow feallm_extra extra
  read -ra shallow <<<"$SHALLOW_LAYERS"
  read -ra feallm_extra <<<"${FEALLM_ARGS:-}"
  read -ra extra <<<"${EXTRA_ARGS:-}"
  cmd=(
    "${deepspeed_cmd[@]}" "${launcher[@]}" --module llava.train.train_mem
    --deepspeed "$ds_config"
    "$@"
    --model_name_or_path "$MODEL"
    --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER"
    --vision_tower "$VISION_TOWER" --mm_vision_select_layer "$SELECT_LAYER"
    --mm_projector_type feallm --mm_feallm_shallow_layers "${shallow[@]}"
    --mm_feallm_lca_channels "$LCA_CHANNELS" --mm_feallm_crop_size "$CROP_SIZE"
    ${feallm_extra[@]+"${feallm_extra[@]}"}
    --mm_use_im_start_end False --mm_use_im_patch_token False --image_aspect_ratio pad
    --bf16 True --tf32 True
    --output_dir "$OUTPUT_DIR" --num_train_epochs "$EPOCHS"
    --per_device_train_batch_size "$PER_DEVICE_BATCH" --per_device_eval_batch_size 4
    --gradient_accumulation_steps "$ACCUM"
    --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit "$SAVE_TOTAL_LIMIT"
    --learning_rate "$LR" --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine
    --logging_steps 1 --model_max_length "$MAX_LEN" --gradient_checkpointing True
    --dataloader_num_workers "$WORKERS" --lazy_preprocess True --report_to "$REPORT_TO"
    ${extra[@]+"${extra[@]}"}
  )
}

# Print the command; run it unless DRY_RUN. $1 = what the run saves.
launch() {
  note "global batch $GLOBAL_BATCH = $WORLD_SIZE GPUs x $PER_DEVICE_BATCH per device x $ACCUM accumulation steps; ZeRO-$ZERO"
  note "$1"
  local p
  for p in ${problems[@]+"${problems[@]}"}; do
    if ((dry)); then echo "$tag note: $p" >&2; else echo "$tag error: $p" >&2; fi
  done
  printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'
  ((dry)) && exit 0
  (( ${#problems[@]} == 0 )) || die "fix the above (or DRY_RUN=1 to only print the command)"
  export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
  mkdir -p "$OUTPUT_DIR"
  exec "${cmd[@]}"
}
