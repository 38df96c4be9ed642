#!/usr/bin/env bash
# Serve a FEALLM (or any LLaVA) checkpoint: upstream LLaVA's controller + model_worker and
# FEALLM's web UI (chat + per-face analysis, a current Gradio), each on a free port of 127.0.0.1.
#
#   bash launch/serve.sh --model-path runs/feallm-llava-v1.5-7b --device cuda
#   bash launch/serve.sh --model-path runs/feallm-llava-v1.5-7b-lora --model-base lmsys/vicuna-7b-v1.5
#   FEALLM_MODEL_PATH=... FEALLM_MODEL_BASE=... FEALLM_DEVICE=cpu bash launch/serve.sh
#   bash launch/serve.sh --model-path ... --dry-run      # print the three commands only
#   bash launch/serve.sh --model-path ... --legacy-ui    # upstream's own chat page instead (see below)
#
# Controller and worker run in .venv (FEALLM_VENV); the UI runs in .venv-ui (FEALLM_UI_VENV),
# which is created on first use (bash launch/bootstrap.sh --env ui: gradio, no torch).
# --legacy-ui starts upstream's gradio_web_server from .venv instead; it needs gradio
# 4.16.0, installed only on request (bash launch/bootstrap.sh --legacy-ui).
#
# Environment (flags given on the command line win):
#   FEALLM_MODEL_PATH, FEALLM_MODEL_BASE, FEALLM_DEVICE (default cpu),
#   FEALLM_SERVE_HOST (default 127.0.0.1), FEALLM_WEB_PORT, FEALLM_SERVE_LOG_DIR,
#   FEALLM_VENV (default .venv of this repository), FEALLM_UI_VENV (default .venv-ui),
#   FEALLM_SERVE_SECRET_FILE (or FEALLM_SERVE_SECRET), FEALLM_UI_USERS_FILE.
#
# Security: every server binds to 127.0.0.1 unless you pass --host 0.0.0.0 (or set
# FEALLM_SERVE_HOST), which is refused without access control:
#   python -c 'import secrets; print(secrets.token_urlsafe(32))' > secret && chmod 600 secret
#   python -m feallm_llava.integration.access add-user users alice      # the UI's logins
#   FEALLM_SERVE_SECRET_FILE=secret bash launch/serve.sh --host 0.0.0.0 --users-file users ...
# The controller, worker and UI then demand the secret of every request (401 otherwise) and
# send it to each other; it travels in their environment, never on a command line. Put TLS
# in front with a reverse proxy (README). --insecure exposes the stack without any of this.
# Upstream's UI (--legacy-ui) has no login, cannot send the secret, and needs gradio 4.16.0
# (published path-traversal advisories).
# Ctrl-C (or SIGTERM) stops all three processes; if this script's process is killed
# (SIGKILL, the OOM killer), the kernel kills them too.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${FEALLM_VENV:-$root/.venv}/bin/python"
[ -x "$python" ] || python="$(command -v python3)"
ui_venv="${FEALLM_UI_VENV:-$root/.venv-ui}"

args=()
[ -n "${FEALLM_MODEL_PATH:-}" ] && args+=(--model-path "$FEALLM_MODEL_PATH")
[ -n "${FEALLM_MODEL_BASE:-}" ] && args+=(--model-base "$FEALLM_MODEL_BASE")
[ -n "${FEALLM_DEVICE:-}" ] && args+=(--device "$FEALLM_DEVICE")
[ -n "${FEALLM_WEB_PORT:-}" ] && args+=(--web-port "$FEALLM_WEB_PORT")
[ -n "${FEALLM_SERVE_LOG_DIR:-}" ] && args+=(--log-dir "$FEALLM_SERVE_LOG_DIR")
# FEALLM_SERVE_HOST is read by the stack itself (the --host default).

ours=1  # FEALLM's UI, from .venv-ui (not with --no-web, --legacy-ui or an explicit --ui-python)
dry=0
for arg in "$@"; do
  case "$arg" in
    --legacy-ui|--no-web|--ui-python|--ui-python=*) ours=0 ;;
    --dry-run) dry=1 ;;
  esac
done
if ((ours)); then
  # the UI's own environment, created or updated on demand (a no-op when up to date)
  ((dry)) || FEALLM_UI_VENV="$ui_venv" bash "$root/launch/bootstrap.sh" --env ui >&2
  args+=(--ui-python "$ui_venv/bin/python")
fi

exec "$python" -m feallm_llava.serve.stack ${args[@]+"${args[@]}"} "$@"
