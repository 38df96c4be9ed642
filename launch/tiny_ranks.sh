#!/usr/bin/env bash
# The paper's two launchers (launch/pretrain.sh, launch/finetune_lora.sh) on CPU ranks with
# the offline tiny kit standing in for the 7B models: stage 1 under DeepSpeed ZeRO-2, stage 2
# (LoRA, --mm_projector_lr, bf16) under ZeRO-3, NUM_GPUS processes talking gloo on
# 127.0.0.1. The same commands as on GPUs, with DEVICE=cpu; minutes on 2 cores.
#   bash launch/tiny_ranks.sh                     # writes runs/tiny-ranks/
#   OUT=/tmp/x NUM_GPUS=4 ZERO2=2 bash launch/tiny_ranks.sh
#
# Environment: OUT (runs/tiny-ranks), NUM_GPUS (2 CPU ranks), STEPS (4 per stage), ZERO1
# (stage 1: 2), ZERO2 (stage 2: 3), LAUNCHER (deepspeed or torchrun), PY, and anything else
# the two launchers read (their headers list it). A rerun skips a finished stage and resumes
# an interrupted one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PY="${PY:-$root/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
OUT="${OUT:-$root/runs/tiny-ranks}"
STEPS="${STEPS:-4}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DEVICE=cpu
export NUM_GPUS="${NUM_GPUS:-2}"
# DeepSpeed's compiled shared-memory op (first run: about a minute of g++), kept between runs
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}"
[ -f "$OUT/kit/kit.json" ] || "$PY" -m feallm_llava.cli tiny-kit --out "$OUT/kit" --sample-data "$OUT/data"

# the tiny kit in place of Vicuna-7B and CLIP ViT-L/14-336; everything else as the recipe
export MODEL="$OUT/kit/llm" VISION_TOWER="$OUT/kit/clip" IMAGE_FOLDER="$OUT/data/images"
export GLOBAL_BATCH="${GLOBAL_BATCH:-4}" MAX_LEN=512 WORKERS=0 CROP_SIZE=32 SAVE_STEPS=2 LORA_R=16 LORA_ALPHA=32
export FEALLM_ARGS="--mm_feallm_mpp_dim 0" EXTRA_ARGS="--max_steps $STEPS ${EXTRA_ARGS:-}"
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
stage1="$OUT/llava-tiny-feallm-pretrain" stage2="$OUT/llava-tiny-feallm-lora"
if [ ! -f "$stage1/mm_projector.bin" ]; then
  ZERO="${ZERO1:-2}" DATA_PATH="$OUT/data/pretrain.json" OUTPUT_DIR="$stage1" bash "$root/launch/pretrain.sh"
fi
if [ ! -f "$stage2/non_lora_trainables.bin" ]; then
  ZERO="${ZERO2:-3}" DATA_PATH="$OUT/data/finetune.json" STAGE1_DIR="$stage1" OUTPUT_DIR="$stage2" \
    bash "$root/launch/finetune_lora.sh"
fi
echo "[tiny_ranks] stage 1: $stage1"
echo "[tiny_ranks] stage 2: $stage2  (load with model_base=$MODEL)"
