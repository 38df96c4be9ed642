#!/usr/bin/env bash
# Set up (idempotently) and run the test suite, offline, on CPU.
#   bash launch/test.sh [pytest args...]
# Builds .venv (with upstream's legacy chat page, gradio 4.16.0, for its browser test;
# FEALLM_LEGACY_UI=0 leaves it out and those tests skip), .venv-ui (FEALLM's web UI;
# FEALLM_UI=0 leaves it out and its browser test skips), .venv-lmms (FEALLM_LMMS=0) and
# .venv-vllm (FEALLM_VLLM=0).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${FEALLM_LEGACY_UI:-1}" != 0 ]; then
  bash "$root/launch/bootstrap.sh" --legacy-ui
else
  bash "$root/launch/bootstrap.sh"
fi
if [ "${FEALLM_UI:-1}" != 0 ]; then
  bash "$root/launch/bootstrap.sh" --env ui
  export FEALLM_UI_PYTHON="${FEALLM_UI_VENV:-$root/.venv-ui}/bin/python"
fi
# lmms-eval runs from its own environment (tests/test_lmms_eval.py); FEALLM_LMMS=0 skips it
# (those tests then skip and say why).
[ "${FEALLM_LMMS:-1}" = 0 ] || bash "$root/launch/bootstrap.sh" --env lmms
# vLLM serves exported checkpoints from its own environment (tests/test_vllm.py); FEALLM_VLLM=0
# skips it (those tests then skip and say why).
[ "${FEALLM_VLLM:-1}" = 0 ] || bash "$root/launch/bootstrap.sh" --env vllm
# The browser tests drive Debian's headless Chromium; install it when we may (root +
# apt). Elsewhere those tests skip and say why. FEALLM_BROWSER=0 skips the install.
if [ "${FEALLM_BROWSER:-1}" != 0 ] && ! command -v chromedriver >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing chromium + chromium-driver for the browser tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
     chromium chromium-driver >/dev/null) || echo "[test] chromium install failed: the browser tests will skip"
fi
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
exec "${FEALLM_VENV:-$root/.venv}/bin/python" -m pytest "${@:-tests}"
