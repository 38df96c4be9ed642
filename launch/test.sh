#!/usr/bin/env bash
# Set up (idempotently) and run the test suite, offline, on CPU.
#   bash launch/test.sh [pytest args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/bootstrap.sh"
# lmms-eval runs from its own environment (tests/test_lmms_eval.py); FEALLM_LMMS=0 skips it
# (those tests then skip and say why).
[ "${FEALLM_LMMS:-1}" = 0 ] || bash "$root/launch/bootstrap.sh" --env lmms
# The browser test drives Debian's headless Chromium; install it when we may (root +
# apt). Elsewhere that test skips and says why. FEALLM_BROWSER=0 skips the install.
if [ "${FEALLM_BROWSER:-1}" != 0 ] && ! command -v chromedriver >/dev/null 2>&1 \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing chromium + chromium-driver for the browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
     chromium chromium-driver >/dev/null) || echo "[test] chromium install failed: the browser test will skip"
fi
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
exec "${FEALLM_VENV:-$root/.venv}/bin/python" -m pytest "${@:-tests}"
