#!/usr/bin/env bash
# Set up (idempotently) and run the test suite, offline, on CPU.
#   bash launch/test.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/bootstrap.sh"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
exec "${FEALLM_VENV:-$root/.venv}/bin/python" -m pytest "${@:-tests}"
