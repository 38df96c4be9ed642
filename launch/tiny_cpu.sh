#!/usr/bin/env bash
# FEALLM's two training stages on the offline tiny kit, on CPU, through upstream
# LLaVA's own train script (`python -m llava.train.train_mem`, `--mm_projector_type
# feallm`). Minutes on 2 cores; the tests run it. Same flags as pretrain.sh /
# finetune_lora.sh, scaled down.
#   bash launch/tiny_cpu.sh                       # writes runs/tiny/
#   OUT=/tmp/x STEPS1=4 STEPS2=4 bash launch/tiny_cpu.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$root/.venv/bin/python}"
[ -x "$PY" ] || PY=python
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Tiny tensors: one thread is faster than two fighting over 2 cores (measured 10x).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
OUT="${OUT:-$root/runs/tiny}"
KIT="${KIT:-$OUT/kit}"
DATA="${DATA:-$OUT/data}"
MODEL="${MODEL:-$KIT/llm}"           # the LLM (model_name_or_path)
VISION="${VISION:-$KIT/clip}"        # the CLIP tower
STAGE1_JSON="${STAGE1_JSON:-$DATA/pretrain.json}"
STAGE2_JSON="${STAGE2_JSON:-$DATA/finetune.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA/images}"
STEPS1="${STEPS1:-4}"
STEPS2="${STEPS2:-4}"
BATCH="${BATCH:-4}"
LORA_R="${LORA_R:-16}"
LORA_ALPHA="${LORA_ALPHA:-32}"
LR1="${LR1:-1e-3}"          # stage 1: projector (LCA + MPP)
LR2="${LR2:-2e-4}"          # stage 2: LoRA
PROJ_LR="${PROJ_LR:-2e-5}"  # stage 2: LCA + MPP at their own rate
SAVE_STEPS="${SAVE_STEPS:-2}"
LOG_STEPS="${LOG_STEPS:-1}"      # loss lines every N steps (1: the tests read every step's loss)
PROJECTOR="${PROJECTOR:-feallm}"
STAGES="${STAGES:-1 2}"          # which stages to run
FEALLM_FLAGS="${FEALLM_FLAGS:---mm_feallm_crop_size 32 --mm_feallm_mpp_dim 0}"
[ "$PROJECTOR" = feallm ] || FEALLM_FLAGS=""
STAGE1_DIR="${STAGE1_DIR:-$OUT/llava-tiny-$PROJECTOR-pretrain}"
STAGE2_DIR="${STAGE2_DIR:-$OUT/llava-tiny-$PROJECTOR-lora}"

if [ ! -f "$STAGE1_JSON" ] || [ ! -f "$KIT/kit.json" ]; then
  "$PY" -m feallm_llava.cli tiny-kit --out "$KIT" --sample-data "$DATA"
fi

common=(
  --vision_tower "$VISION" --mm_projector_type "$PROJECTOR" $FEALLM_FLAGS
  --mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False
  --image_folder "$IMAGE_FOLDER" --image_aspect_ratio pad --lazy_preprocess True
  --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps 1
  --num_train_epochs 1 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine
  --logging_steps "$LOG_STEPS" --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit 2
  --model_max_length 512 --dataloader_num_workers 0 --report_to none --use_cpu True
  --seed 0 --data_seed 0
)

if [[ " $STAGES " == *" 1 "* ]] && [ ! -f "$STAGE1_DIR/mm_projector.bin" ]; then
  echo "[tiny] stage 1: projector alignment -> $STAGE1_DIR"
  "$PY" -m llava.train.train_mem --model_name_or_path "$MODEL" --version plain \
    --data_path "$STAGE1_JSON" --tune_mm_mlp_adapter True --learning_rate "$LR1" \
    --max_steps "$STEPS1" --output_dir "$STAGE1_DIR" "${common[@]}" ${STAGE1_ARGS:-}
fi

if [[ " $STAGES " == *" 2 "* ]] && [ ! -f "$STAGE2_DIR/non_lora_trainables.bin" ]; then
  echo "[tiny] stage 2: LoRA finetune -> $STAGE2_DIR"
  "$PY" -m llava.train.train_mem --model_name_or_path "$MODEL" --version v1 \
    --data_path "$STAGE2_JSON" --pretrain_mm_mlp_adapter "$STAGE1_DIR/mm_projector.bin" \
    --lora_enable True --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --mm_projector_lr "$PROJ_LR" \
    --learning_rate "$LR2" --max_steps "$STEPS2" --output_dir "$STAGE2_DIR" "${common[@]}" ${STAGE2_ARGS:-}
fi
echo "[tiny] stage 1: $STAGE1_DIR"
echo "[tiny] stage 2: $STAGE2_DIR  (load with model_base=$MODEL)"
