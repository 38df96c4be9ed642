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
#   MODEL            LLM to start from: lmsys/vicuna-7b-v1.5, the LLM of LLaVA-v1.5-7B,
#                    or a LLaVA-1.5 checkpoint (liuhaotian/llava-v1.5-7b, as the paper):
#                    FEALLM's tower and projector replace the checkpoint's, and its
#                    mlp2x_gelu projector starts the FEALLM projector's MLP.
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
#                    112 is a third of the 336 px input
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

# this stage's defaults; those both stages share are in launch/common.sh
DATA_PATH="${DATA_PATH:-$root/playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$root/playground/data/LLaVA-Pretrain/images}"
OUTPUT_DIR="${OUTPUT_DIR:-$root/checkpoints/feallm-llava-v1.5-7b-pretrain}"
GLOBAL_BATCH="${GLOBAL_BATCH:-64}"          # paper 5.1: pre-training batch size 64
LR="${LR:-1e-3}"                            # paper's number lost: LLaVA-1.5's pretrain rate
EPOCHS="${EPOCHS:-1}"                       # paper 5.1: one epoch
ZERO="${ZERO:-2}"
SAVE_STEPS="${SAVE_STEPS:-1000}"            # 558K / 64 = ~8.7K steps: a checkpoint every ~11%

# shared defaults, world size, batch arithmetic, DeepSpeed launcher (both stages)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# -- inputs -----------------------------------------------------------------------
[ -f "$DATA_PATH" ] || problems+=("DATA_PATH=$DATA_PATH does not exist (LLaVA-Pretrain's blip_laion_cc_sbu_558k.json, hub dataset liuhaotian/LLaVA-Pretrain)")
[ -d "$IMAGE_FOLDER" ] || problems+=("IMAGE_FOLDER=$IMAGE_FOLDER does not exist (LLaVA-Pretrain's images/: unzip its images.zip)")

train_cmd --version plain --tune_mm_mlp_adapter True
launch "saves $OUTPUT_DIR/mm_projector.bin (+ .safetensors): the whole FEALLM projector (LCA + MPP)"
