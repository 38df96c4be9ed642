#!/usr/bin/env bash
# Create/update a virtual environment of the project, idempotently.
#   bash launch/bootstrap.sh              # .venv in the repository root
#   bash launch/bootstrap.sh --env lmms   # .venv-lmms: the stack and lmms-eval (the lmms extra)
#   FEALLM_VENV=/path/venv bash launch/bootstrap.sh       # FEALLM_LMMS_VENV for --env lmms
# A second run with unchanged setup files is a no-op (a stamp holds their hash).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
kind=main
while [ $# -gt 0 ]; do
  case "$1" in
    --env) [ $# -ge 2 ] || { echo "[bootstrap] error: --env needs main or lmms" >&2; exit 2; }; kind="$2"; shift 2 ;;
    --env=*) kind="${1#--env=}"; shift ;;
    *) echo "[bootstrap] error: unknown argument '$1' (use --env main|lmms)" >&2; exit 2 ;;
  esac
done
case "$kind" in
  main) venv="${FEALLM_VENV:-$root/.venv}"; extras="${FEALLM_EXTRAS:-test,serve}" ;;
  # lmms-eval cannot share .venv: its HF `datasets` (and filelock < 4) would change how the
  # stack behaves there (`import datasets` finds the checkout's datasets/ folder in .venv:
  # compat shim datasets_namespace, patch 0008, tests/test_patches.py).
  lmms) venv="${FEALLM_LMMS_VENV:-$root/.venv-lmms}"; extras=lmms ;;
  *) echo "[bootstrap] error: --env must be main or lmms, got '$kind'" >&2; exit 2 ;;
esac
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

stamp_of() {
  cat setup.cfg setup.py pyproject.toml launch/bootstrap.sh feallm_llava_autoload.pth | sha256sum | cut -c1-16
  echo "$extras"
}
want="$(stamp_of | tr '\n' ' ')"
if [ -f "$venv/.feallm-bootstrap" ] && [ "$(cat "$venv/.feallm-bootstrap")" = "$want" ]; then
  echo "[bootstrap] $venv is up to date"
  exit 0
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[bootstrap] installing into $venv (first run: several minutes)"
# torch first and pinned: a looser requirement pulled in later would fetch a CUDA build.
$pip install -q "torch==2.13.0"
# deepspeed builds against the installed torch; no CUDA ops here (DS_BUILD_OPS=0). Not for
# lmms-eval's environment: it only answers questions.
[ "$kind" = lmms ] || DS_BUILD_OPS=0 $pip install -q --no-build-isolation "deepspeed==0.19.8"
# upstream LLaVA without its 2023 pins (torch 2.0 / transformers 4.36); feallm_llava.integration.compat mends it.
$pip install -q --no-deps "llava-torch==1.2.2.post1"
$pip install -q --no-build-isolation -e ".[${extras}]"
case ",$extras," in
  # gradio 4.16.0's declared pins (numpy~=1.0, pillow<11, ...) conflict with the stack
  # it runs on fine (tested); its other requirements come with the serve extra.
  *,serve,*) $pip install -q --no-deps "gradio==4.16.0" ;;
esac
case ",$extras," in
  # lmms-eval declares wandb, torchvision (PyPI's is a CUDA build), yt-dlp and more that
  # neither our tasks nor its llava model import; what they do import is the lmms extra.
  *,lmms,*) $pip install -q --no-deps "lmms-eval==0.7.3" ;;
esac
# Editable installs do not run build_py, so place the autoload hook by hand.
purelib="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp feallm_llava_autoload.pth "$purelib/"
echo "$want" > "$venv/.feallm-bootstrap"
echo "[bootstrap] done"
