# shellcheck shell=bash
# Sourced by launch/pretrain.sh and launch/finetune_lora.sh (never run on its own): the
# defaults, world size, batch arithmetic and DeepSpeed launcher both training stages share.
#
# Expects from the sourcing script: `set -euo pipefail`, root (repository root), tag
# (message prefix), OUTPUT_DIR, GLOBAL_BATCH, ZERO, and the launcher environment its
# header documents (DEVICE, LAUNCHER, NUM_GPUS, NNODES, NODE_RANK, HOSTFILE, WORLD_SIZE,
# MASTER_ADDR, MASTER_PORT, PER_DEVICE_BATCH, DS_CONFIG, DEEPSPEED, TORCHRUN, DRY_RUN).
#
# Where the ranks run:
#   DEVICE=cuda (default)  GPUs; NUM_GPUS processes per node, one per GPU
#   DEVICE=cpu             CPU ranks, e.g. to try the recipe on a laptop or in CI: NUM_GPUS
#                          processes (default 2) on this machine, gloo between them,
#                          `--use_cpu True --tf32 False`, OMP_NUM_THREADS = cores / ranks;
#                          nothing else changes (same DeepSpeed configs, same flags)
#   LAUNCHER=deepspeed (default) or torchrun (one `torchrun` per node: NNODES nodes,
#                          this one NODE_RANK, rendezvous at MASTER_ADDR:MASTER_PORT)
#   ZERO=2 | 3 | 3_offload (launch/zero$ZERO.json) | 0 (plain DDP, no DeepSpeed);
#   DS_CONFIG=file.json    another DeepSpeed config
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
DEVICE="${DEVICE:-cuda}"
LAUNCHER="${LAUNCHER:-deepspeed}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
case "$DEVICE" in cuda|cpu) ;; *) die "DEVICE must be cuda or cpu, got '$DEVICE'" ;; esac
case "$LAUNCHER" in deepspeed|torchrun) ;; *) die "LAUNCHER must be deepspeed or torchrun, got '$LAUNCHER'" ;; esac
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] && (( NODE_RANK < NNODES )) || die "NODE_RANK must be in 0..NNODES-1, got '$NODE_RANK'"
[ "$NNODES" = 1 ] || [ "$LAUNCHER" = torchrun ] \
  || die "NNODES=$NNODES is torchrun's (LAUNCHER=torchrun); DeepSpeed's launcher takes a HOSTFILE"
[ -z "${HOSTFILE:-}" ] || [ "$LAUNCHER" = deepspeed ] \
  || die "HOSTFILE is DeepSpeed's launcher's; with LAUNCHER=torchrun run one command per node (NNODES, NODE_RANK)"
launcher=()
if [ "$DEVICE" = cpu ]; then
  NUM_GPUS="${NUM_GPUS:-2}"   # on CPU: the number of rank processes on this machine
  [[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS (CPU ranks) must be a positive integer, got '$NUM_GPUS'"
  cores="$(nproc 2>/dev/null || echo 1)"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / NUM_GPUS > 0 ? cores / NUM_GPUS : 1 ))}"
  WORLD_SIZE=$(( NNODES * NUM_GPUS ))
  [ "$LAUNCHER" = torchrun ] || launcher+=(--num_gpus "$NUM_GPUS")
elif [ "$LAUNCHER" = torchrun ]; then
  if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS="$(visible_gpus)"
    (( NUM_GPUS >= 1 )) || { NUM_GPUS=2; note "no GPU found; assuming the paper's 2 (set NUM_GPUS)"; }
  fi
  WORLD_SIZE=$(( NNODES * NUM_GPUS ))
elif [ -n "${HOSTFILE:-}" ]; then
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
if [ "$LAUNCHER" = torchrun ]; then
  launcher=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NUM_GPUS"
            --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}")
else
  [ -z "${MASTER_ADDR:-}" ] || launcher+=(--master_addr "$MASTER_ADDR")
  [ -z "${MASTER_PORT:-}" ] || launcher+=(--master_port "$MASTER_PORT")
fi
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
case "$ZERO" in 0|2|3|3_offload) ;; *) die "ZERO must be 0 (DDP), 2, 3 or 3_offload, got '$ZERO'" ;; esac
ds_args=()
if [ -n "${DS_CONFIG:-}" ]; then
  ds_config="$DS_CONFIG"
elif [ "$ZERO" = 0 ]; then
  ds_config=""
  # plain DDP: LLaVA's model is wrapped by PEFT (not a PreTrainedModel), so the Trainer asks
  # DDP to look for unused parameters, which breaks on gradient checkpointing's re-entrant
  # backward ("Expected to mark a variable ready only once"); every parameter is used
  ds_args=(--ddp_find_unused_parameters False)
else
  ds_config="$root/launch/zero$ZERO.json"
fi
if [ -n "$ds_config" ]; then
  [ -f "$ds_config" ] || die "missing DeepSpeed config $ds_config"
  ds_args=(--deepspeed "$ds_config")
fi
# the launcher: `deepspeed ... --module M` or `torchrun ... -m M`, the one next to PY by default
find_launcher() {  # $1 name -> its path next to PY, else on PATH
  if [ -x "$(dirname "$PY")/$1" ]; then echo "$(dirname "$PY")/$1"; else command -v "$1" || echo "$1"; fi
}
problems=()
if [ "$LAUNCHER" = torchrun ]; then
  TORCHRUN="${TORCHRUN:-$(find_launcher torchrun)}"
  read -ra deepspeed_cmd <<<"$TORCHRUN"
  module_flag=-m
  command -v "${deepspeed_cmd[0]}" >/dev/null 2>&1 \
    || problems+=("torchrun '$TORCHRUN' not found: it comes with torch (or set TORCHRUN)")
else
  DEEPSPEED="${DEEPSPEED:-$(find_launcher deepspeed)}"
  read -ra deepspeed_cmd <<<"$DEEPSPEED"
  module_flag=--module
  command -v "${deepspeed_cmd[0]}" >/dev/null 2>&1 \
    || problems+=("deepspeed launcher '$DEEPSPEED' not found: pip install deepspeed (or set DEEPSPEED)")
fi
[ -z "${HOSTFILE:-}" ] || [ -f "$HOSTFILE" ] || problems+=("HOSTFILE=$HOSTFILE does not exist")
# what CPU ranks need (transformers' --use_cpu: one rank per process, not per GPU; tf32 is
# an Ampere GPU setting; gloo carries their collectives)
device_args=(--tf32 True)
[ "$DEVICE" = cuda ] || device_args=(--use_cpu True --tf32 False --ddp_backend gloo)
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
    "${deepspeed_cmd[@]}" ${launcher[@]+"${launcher[@]}"} "$module_flag" llava.train.train_mem
    ${ds_args[@]+"${ds_args[@]}"}
    "$@"
    --model_name_or_path "$MODEL"
    --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER"
    --vision_tower "$VISION_TOWER" --mm_vision_select_layer "$SELECT_LAYER"
    --mm_projector_type feallm --mm_feallm_shallow_layers "${shallow[@]}"
    --mm_feallm_lca_channels "$LCA_CHANNELS" --mm_feallm_crop_size "$CROP_SIZE"
    ${feallm_extra[@]+"${feallm_extra[@]}"}
    --mm_use_im_start_end False --mm_use_im_patch_token False --image_aspect_ratio pad
    --bf16 True "${device_args[@]}"
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
  local ranks="GPUs"
  [ "$DEVICE" = cuda ] || ranks="CPU ranks"
  note "global batch $GLOBAL_BATCH = $WORLD_SIZE $ranks x $PER_DEVICE_BATCH per device x $ACCUM accumulation steps; $(
    if [ -n "${DS_CONFIG:-}" ]; then echo "DeepSpeed $DS_CONFIG"; elif [ "$ZERO" = 0 ]; then echo "DDP, no DeepSpeed"; else echo "ZeRO-$ZERO"; fi)"
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
