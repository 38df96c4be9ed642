#!/usr/bin/env bash
# Serve a FEALLM (or any LLaVA) checkpoint with upstream LLaVA's own stack:
# controller + model_worker + Gradio web UI, each on a free port of 127.0.0.1.
#
#   bash launch/serve.sh --model-path runs/feallm-llava-v1.5-7b --device cuda
#   bash launch/serve.sh --model-path runs/feallm-llava-v1.5-7b-lora --model-base lmsys/vicuna-7b-v1.5
#   FEALLM_MODEL_PATH=... FEALLM_MODEL_BASE=... FEALLM_DEVICE=cpu bash launch/serve.sh
#   bash launch/serve.sh --model-path ... --dry-run      # print the three commands only
#
# Environment (flags given on the command line win):
#   FEALLM_MODEL_PATH, FEALLM_MODEL_BASE, FEALLM_DEVICE (default cpu),
#   FEALLM_SERVE_HOST (default 127.0.0.1), FEALLM_WEB_PORT, FEALLM_SERVE_LOG_DIR,
#   FEALLM_VENV (default .venv of this repository).
#
# Security: every server binds to 127.0.0.1 unless you pass --host 0.0.0.0 (or set
# FEALLM_SERVE_HOST). Upstream's UI needs gradio 4.16.0, which has published
# path-traversal advisories fixed only in much later releases, and upstream's controller
# and model_worker have no authentication: anyone who reaches their ports can use the
# model and register workers (which the controller then routes requests to). A warning
# is printed when the stack is exposed. Prefer an SSH tunnel:
# ssh -L 7860:127.0.0.1:<web port> host.
# Ctrl-C (or SIGTERM) stops all three processes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${FEALLM_VENV:-$root/.venv}/bin/python"
[ -x "$python" ] || python="$(command -v python3)"

args=()
[ -n "${FEALLM_MODEL_PATH:-}" ] && args+=(--model-path "$FEALLM_MODEL_PATH")
[ -n "${FEALLM_MODEL_BASE:-}" ] && args+=(--model-base "$FEALLM_MODEL_BASE")
[ -n "${FEALLM_DEVICE:-}" ] && args+=(--device "$FEALLM_DEVICE")
[ -n "${FEALLM_WEB_PORT:-}" ] && args+=(--web-port "$FEALLM_WEB_PORT")
[ -n "${FEALLM_SERVE_LOG_DIR:-}" ] && args+=(--log-dir "$FEALLM_SERVE_LOG_DIR")
# FEALLM_SERVE_HOST is read by the stack itself (the --host default).

exec "$python" -m feallm_llava.serve.stack ${args[@]+"${args[@]}"} "$@"
