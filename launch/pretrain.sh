#!/usr/bin/env bash
# FEALLM stage 1, feature alignment (paper section 5.1), through upstream LLaVA's own
# train script: LLM and CLIP frozen, the FEALLM projector (LCA + MPP) trained on
# LLaVA-LCS-558K with conversation version `plain`, one epoch, global batch 64.
#
#   bash launch/pretrain.sh                          # every GPU of this node
#   NUM_GPUS=8 bash launch/pretrain.sh               # global batch stays 64
#   HOSTFILE=hostfile bash launch/pretrain.sh        # several nodes (DeepSpeed hostfile)
#   DRY_RUN=1 bash launch/pretrain.sh                # print the command, run nothing
#
# Saves in OUTPUT_DIR: `mm_projector.bin` (+ its `mm_projector.safetensors` twin) holding
# the WHOLE FEALLM projector (LCA + MPP, not only an MLP) and `config.json`; and
# `checkpoint-*` folders every SAVE_STEPS steps, from which a rerun of this script
# resumes (upstream auto-resumes when one exists in OUTPUT_DIR). Stage 2
# (launch/finetune_lora.sh) starts from OUTPUT_DIR/mm_projector.bin.
#
# Environment (defaults = the paper's 7B setting):
#   MODEL            LLM to start from: lmsys/vicuna-7b-v1.5, the LLM of LLaVA-v1.5-7B.
#                    A plain LLM, not a LLaVA checkpoint: upstream keeps a projector it
#                    finds in the checkpoint, and the FEALLM projector would never be built.
#   VISION_TOWER     openai/clip-vit-large-patch14-336 (CLIP ViT-L/14-336, paper 5.1)
#   DATA_PATH        blip_laion_cc_sbu_558k.json of LLaVA-Pretrain (LLaVA-LCS-558K)
#   IMAGE_FOLDER     its images/ folder
#   OUTPUT_DIR       checkpoints/feallm-llava-v1.5-7b-pretrain (keep "llava" in the name:
#                    load_pretrained_model only builds a LLaVA model for such names)
#   NUM_GPUS         GPUs on this node (default: CUDA_VISIBLE_DEVICES, else nvidia-smi,
#                    else the paper's 2)
#   HOSTFILE         DeepSpeed hostfile ("host slots=N" lines) for several nodes; the world
#                    size is the sum of its slots (WORLD_SIZE overrides)
#   MASTER_ADDR, MASTER_PORT   passed to the deepspeed launcher when set
#   GLOBAL_BATCH     64 (paper 5.1). PER_DEVICE_BATCH default: the largest divisor of
#                    GLOBAL_BATCH / world size that is <= MAX_PER_DEVICE_BATCH (16);
#                    gradient accumulation = GLOBAL_BATCH / (world size x PER_DEVICE_BATCH)
#   LR               1e-3 (see below)      EPOCHS   1 (paper 5.1)
#   ZERO             2 (default) or 3: launch/zero$ZERO.json
#   SELECT_LAYER     -2 = output of layer 23 of CLIP's 24, the deep features (paper 5.1)
#   SHALLOW_LAYERS   "3 8 13 18" (paper 5.1)   LCA_CHANNELS 64 (paper 5.1)
#   CROP_SIZE        112: side of the resized LCA crops; the paper's text lost the number,
#                    112 is DESIGN.md's default
#   FEALLM_ARGS      more --mm_feallm_* flags (ablations, e.g. "--mm_feallm_lca False").
#                    Stage 2 must get the same FEALLM settings as stage 1: it rebuilds the
#                    projector from its flags and then loads mm_projector.bin strictly.
#   MAX_LEN 2048, WORKERS 4, SAVE_STEPS 1000, SAVE_TOTAL_LIMIT 1, REPORT_TO none (or wandb)
#   PY               python of the environment (default: .venv of this repository)
#   DEEPSPEED        deepspeed launcher command (default: the one next to PY, else PATH)
#   EXTRA_ARGS       appended to the train command (split on whitespace); later flags win
#   DRY_RUN=1        print the resolved command and exit
#
# Learning rate: the paper's text lost the number. 1e-3 is LLaVA-1.5's pretrain rate
# (upstream scripts/v1_5/pretrain.sh), the stage FEALLM's stage 1 mirrors.
#
# Attention: `python -m llava.train.train_mem` asks transformers for flash_attention_2;
# feallm_llava's compat shim falls back to sdpa when flash-attn (or CUDA) is absent, so
# train_mem is the entry point everywhere (pip install flash-attn for the fast kernel).
#
# Differences from upstream's scripts/v1_5/pretrain.sh, on purpose: `--image_aspect_ratio
# pad` (the LCA crops the padded square that stage 2 and inference see); no
# `--evaluation_strategy` (renamed in newer transformers; "no" is the default); the
# DeepSpeed configs clip gradients at --max_grad_norm 1.0 ("gradient_clipping": "auto";
# upstream's do not clip: add `--max_grad_norm 0` to EXTRA_ARGS for that); `--module`
# launch of the installed package instead of a source checkout's train.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="[pretrain]"
PY="${PY:-$root/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3 || command -v python)"

MODEL="${MODEL:-lmsys/vicuna-7b-v1.5}"
VISION_TOWER="${VISION_TOWER:-openai/clip-vit-large-patch14-336}"
DATA_PATH="${DATA_PATH:-$root/playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$root/playground/data/LLaVA-Pretrain/images}"
OUTPUT_DIR="${OUTPUT_DIR:-$root/checkpoints/feallm-llava-v1.5-7b-pretrain}"
GLOBAL_BATCH="${GLOBAL_BATCH:-64}"          # paper 5.1: pre-training batch size 64
MAX_PER_DEVICE_BATCH="${MAX_PER_DEVICE_BATCH:-16}"
LR="${LR:-1e-3}"                            # paper's number lost: LLaVA-1.5's pretrain rate
EPOCHS="${EPOCHS:-1}"                       # paper 5.1: one epoch
ZERO="${ZERO:-2}"
SELECT_LAYER="${SELECT_LAYER:--2}"
SHALLOW_LAYERS="${SHALLOW_LAYERS:-3 8 13 18}"
LCA_CHANNELS="${LCA_CHANNELS:-64}"
CROP_SIZE="${CROP_SIZE:-112}"
MAX_LEN="${MAX_LEN:-2048}"
WORKERS="${WORKERS:-4}"
SAVE_STEPS="${SAVE_STEPS:-1000}"            # 558K / 64 = ~8.7K steps: a checkpoint every ~11%
SAVE_TOTAL_LIMIT="${SAVE_TOTAL_LIMIT:-1}"
REPORT_TO="${REPORT_TO:-none}"

# >>> shared with finetune_lora.sh (tests/test_launchers.py keeps the two copies equal)
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
if [ -f "$MODEL/config.json" ] && grep -q '"mm_projector_type"' "$MODEL/config.json"; then
  problems+=("MODEL=$MODEL is a LLaVA checkpoint: upstream would keep its projector and never build FEALLM's; give the plain LLM (lmsys/vicuna-7b-v1.5)")
fi

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
# <<< shared

# -- inputs -----------------------------------------------------------------------
[ -f "$DATA_PATH" ] || problems+=("DATA_PATH=$DATA_PATH does not exist (LLaVA-Pretrain's blip_laion_cc_sbu_558k.json, hub dataset liuhaotian/LLaVA-Pretrain)")
[ -d "$IMAGE_FOLDER" ] || problems+=("IMAGE_FOLDER=$IMAGE_FOLDER does not exist (LLaVA-Pretrain's images/: unzip its images.zip)")

read -ra shallow <<<"$SHALLOW_LAYERS"
read -ra feallm_extra <<<"${FEALLM_ARGS:-}"
read -ra extra <<<"${EXTRA_ARGS:-}"
cmd=(
  "${deepspeed_cmd[@]}" "${launcher[@]}" --module llava.train.train_mem
  --deepspeed "$ds_config"
  --model_name_or_path "$MODEL" --version plain
  --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER"
  --vision_tower "$VISION_TOWER" --mm_vision_select_layer "$SELECT_LAYER"
  --mm_projector_type feallm --mm_feallm_shallow_layers "${shallow[@]}"
  --mm_feallm_lca_channels "$LCA_CHANNELS" --mm_feallm_crop_size "$CROP_SIZE"
  ${feallm_extra[@]+"${feallm_extra[@]}"}
  --tune_mm_mlp_adapter True
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
launch "saves $OUTPUT_DIR/mm_projector.bin (+ .safetensors): the whole FEALLM projector (LCA + MPP)"
