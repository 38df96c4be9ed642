#!/usr/bin/env bash
# FEALLM stage 2, FEA instruction tuning (paper section 5.1), through upstream LLaVA's own
# train script: LoRA (rank 128) on the frozen LLM, the FEALLM projector (LCA + MPP) from
# stage 1 trained on at its own learning rate, CLIP frozen; the FEA instruction set
# (`feallm build-dataset` -> train.json) on Aff-Wild2's cropped_aligned faces, conversation
# version `v1`, one epoch, global batch 16.
#
#   bash launch/finetune_lora.sh                     # every GPU of this node
#   NUM_GPUS=8 bash launch/finetune_lora.sh          # global batch stays 16
#   HOSTFILE=hostfile bash launch/finetune_lora.sh   # several nodes (DeepSpeed hostfile)
#   DRY_RUN=1 bash launch/finetune_lora.sh           # print the command, run nothing
#
# Saves in OUTPUT_DIR: the LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`),
# `non_lora_trainables.bin` (+ its `non_lora_trainables.safetensors` twin) holding the
# trained LCA + MPP, and `config.json` with every `mm_feallm_*` field; and `checkpoint-*`
# folders every SAVE_STEPS steps, from which a rerun resumes (upstream auto-resumes when
# one exists in OUTPUT_DIR). Load it with its base LLM:
#   load_pretrained_model(OUTPUT_DIR, "lmsys/vicuna-7b-v1.5", "feallm-llava-v1.5-7b-lora")
# the name must contain both "llava" and "lora" (upstream's loader picks the LoRA path so).
#
# Environment (defaults = the paper's 7B setting):
#   MODEL            base LLM: lmsys/vicuna-7b-v1.5, or the LLaVA-1.5 checkpoint stage 1
#                    started from (the same MODEL as stage 1; it is the base to load with)
#   VISION_TOWER     openai/clip-vit-large-patch14-336
#   STAGE1_DIR       checkpoints/feallm-llava-v1.5-7b-pretrain (launch/pretrain.sh's output)
#   MM_PROJECTOR     $STAGE1_DIR/mm_projector.bin (-> --pretrain_mm_mlp_adapter)
#   DATA_PATH        playground/data/fea/train.json (feallm build-dataset --out playground/data/fea)
#   IMAGE_FOLDER     playground/data/Aff-Wild2/cropped_aligned (train.json's image root)
#   OUTPUT_DIR       checkpoints/feallm-llava-v1.5-7b-lora (keep "llava" AND "lora" in the name)
#   NUM_GPUS, HOSTFILE, WORLD_SIZE, MASTER_ADDR, MASTER_PORT   as in launch/pretrain.sh
#   GLOBAL_BATCH     16 (paper 5.1); PER_DEVICE_BATCH, MAX_PER_DEVICE_BATCH (16) as in pretrain.sh
#   LR               2e-4, the LoRA rate       PROJ_LR  2e-5, the LCA + MPP rate (see below)
#   LORA_R           128 (paper 5.1)           LORA_ALPHA 256 (2 x r, LLaVA-1.5's LoRA recipe)
#   LORA_DROPOUT     0.05 (upstream's default)
#   EPOCHS           1 (paper 5.1)
#   ZERO             3 (default) or 2: launch/zero$ZERO.json
#   SELECT_LAYER, SHALLOW_LAYERS, LCA_CHANNELS, CROP_SIZE, FEALLM_ARGS: as in pretrain.sh,
#                    and they must be the same as stage 1's (the projector is rebuilt from
#                    them, then MM_PROJECTOR loads into it strictly)
#   MAX_LEN 2048, WORKERS 4, SAVE_STEPS 500, SAVE_TOTAL_LIMIT 1, REPORT_TO none (or wandb)
#   PY, DEEPSPEED, EXTRA_ARGS, DRY_RUN=1   as in pretrain.sh
#
# Learning rates: the paper's text lost both numbers. LoRA 2e-4 and projector 2e-5 are
# LLaVA-1.5's LoRA recipe (upstream scripts/v1_5/finetune_lora.sh: --learning_rate 2e-4
# --mm_projector_lr 2e-5); EmoLA, the closest prior FEA work, also trains its projector
# at 2e-5. `--mm_projector_lr` puts every parameter named mm_projector (the whole LCA +
# MPP) in its own optimizer group.
#
# Attention: train_mem asks for flash_attention_2 and falls back to sdpa without
# flash-attn (feallm_llava's compat shim), as in pretrain.sh.
#
# Differences from upstream's scripts/v1_5/finetune_lora.sh, on purpose: no
# `--evaluation_strategy` (renamed in newer transformers; "no" is the default); gradient
# clipping at 1.0 through the DeepSpeed configs (`--max_grad_norm 0` in EXTRA_ARGS turns
# it off, as upstream runs); `--module` launch of the installed package.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="[finetune_lora]"

# this stage's defaults; those both stages share are in launch/common.sh
STAGE1_DIR="${STAGE1_DIR:-$root/checkpoints/feallm-llava-v1.5-7b-pretrain}"
MM_PROJECTOR="${MM_PROJECTOR:-$STAGE1_DIR/mm_projector.bin}"
DATA_PATH="${DATA_PATH:-$root/playground/data/fea/train.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$root/playground/data/Aff-Wild2/cropped_aligned}"
OUTPUT_DIR="${OUTPUT_DIR:-$root/checkpoints/feallm-llava-v1.5-7b-lora}"
GLOBAL_BATCH="${GLOBAL_BATCH:-16}"          # paper 5.1: fine-tuning batch size 16
LR="${LR:-2e-4}"                            # paper's number lost: LLaVA-1.5 LoRA rate
PROJ_LR="${PROJ_LR:-2e-5}"                  # paper's number lost: LLaVA-1.5 LoRA / EmoLA projector rate
LORA_R="${LORA_R:-128}"                     # paper 5.1: LoRA rank 128
LORA_ALPHA="${LORA_ALPHA:-256}"             # LLaVA-1.5's LoRA recipe: alpha = 2 x rank
LORA_DROPOUT="${LORA_DROPOUT:-0.05}"
EPOCHS="${EPOCHS:-1}"                       # paper 5.1: one epoch
ZERO="${ZERO:-3}"
SAVE_STEPS="${SAVE_STEPS:-500}"             # ~45K samples / 16 = ~2.8K steps: one every ~18%

# shared defaults, world size, batch arithmetic, DeepSpeed launcher (both stages)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# -- inputs -----------------------------------------------------------------------
[ -f "$DATA_PATH" ] || problems+=("DATA_PATH=$DATA_PATH does not exist: build the FEA instruction set with \`feallm build-dataset --root <Aff-Wild2> --out $(dirname "$DATA_PATH")\`")
[ -d "$IMAGE_FOLDER" ] || problems+=("IMAGE_FOLDER=$IMAGE_FOLDER does not exist (Aff-Wild2's cropped_aligned/, the root of train.json's image paths)")
[ -f "$MM_PROJECTOR" ] || problems+=("MM_PROJECTOR=$MM_PROJECTOR does not exist: run launch/pretrain.sh first (or set STAGE1_DIR / MM_PROJECTOR)")
case "$(basename "$OUTPUT_DIR")" in
  *[Ll][Oo][Rr][Aa]*) ;;
  *) note "warning: OUTPUT_DIR name '$(basename "$OUTPUT_DIR")' lacks 'lora': load_pretrained_model will not merge the LoRA adapter" ;;
esac

train_cmd --version v1 --pretrain_mm_mlp_adapter "$MM_PROJECTOR" \
  --lora_enable True --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --lora_dropout "$LORA_DROPOUT" \
  --mm_projector_lr "$PROJ_LR" --group_by_modality_length True
launch "saves $OUTPUT_DIR: LoRA adapter + non_lora_trainables.bin (+ .safetensors: LCA + MPP); load with model_base=$MODEL"
