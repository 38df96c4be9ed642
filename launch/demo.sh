#!/usr/bin/env bash
# Set up (idempotently) and run the main job offline on CPU: `feallm demo`.
#   bash launch/demo.sh [feallm demo args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/bootstrap.sh"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$root"  # the run goes to runs/demo of this checkout unless --out says otherwise
exec "${FEALLM_VENV:-$root/.venv}/bin/python" -m feallm_llava.cli demo "$@"
