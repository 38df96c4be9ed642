#!/usr/bin/env bash
# FEALLM's two training stages on the offline tiny kit, on CPU, through upstream
# LLaVA's own train script (`python -m llava.train.train_mem`, `--mm_projector_type
# feallm`). Minutes on 2 cores; the tests run it. Same flags as pretrain.sh /
# finetune_lora.sh, scaled down (the recipe: `feallm train-tiny --help`).
#   bash launch/tiny_cpu.sh                       # writes runs/tiny/
#   OUT=/tmp/x STEPS1=4 STEPS2=4 bash launch/tiny_cpu.sh
#
# Environment (each maps to the `feallm train-tiny` flag of the same name; unset = its
# default): OUT KIT MODEL VISION DATA STAGE1_JSON STAGE2_JSON IMAGE_FOLDER STEPS1 STEPS2
# BATCH LORA_R LORA_ALPHA LR1 LR2 PROJ_LR (--projector-lr) SAVE_STEPS LOG_STEPS PROJECTOR
# FEALLM_FLAGS STAGE1_ARGS STAGE2_ARGS SEED STAGES ("1 2"), and PY (the python to use).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$root/.venv/bin/python}"
[ -x "$PY" ] || PY=python
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
args=(--out "${OUT:-$root/runs/tiny}")
for pair in KIT:kit MODEL:model VISION:vision DATA:data STAGE1_JSON:stage1-json STAGE2_JSON:stage2-json \
    IMAGE_FOLDER:image-folder STEPS1:steps1 STEPS2:steps2 BATCH:batch LORA_R:lora-r LORA_ALPHA:lora-alpha \
    LR1:lr1 LR2:lr2 PROJ_LR:projector-lr SAVE_STEPS:save-steps LOG_STEPS:log-steps PROJECTOR:projector \
    FEALLM_FLAGS:feallm-flags STAGE1_ARGS:stage1-args STAGE2_ARGS:stage2-args SEED:seed STAGES:stages; do
  var="${pair%%:*}"
  [ -z "${!var+x}" ] || args+=("--${pair#*:}=${!var}")
done
exec "$PY" -m feallm_llava.cli train-tiny "${args[@]}"
