#!/usr/bin/env bash
# Serve an exported FEALLM (or LLaVA-1.5) folder with vLLM's OpenAI-compatible server.
#   feallm export-vllm --model-path CKPT [--model-base BASE] --out DIR     # in .venv
#   bash launch/serve_vllm.sh --model DIR [--port 8000] [--host 127.0.0.1] [--api-key KEY]
#                             [--tensor-parallel-size N] [--pipeline-parallel-size N] [-- VLLM_FLAGS...]
#   feallm eval --bench feabench --data DATA --base-url http://127.0.0.1:8000/v1 --openai-model DIR ...
# Runs vLLM's OpenAI-compatible server from .venv-vllm (FEALLM_VLLM_VENV; made on first use by
# `bash launch/bootstrap.sh --env vllm`) with the FEALLM plugin and upstream LLaVA's
# tokenization (--tokenizer-mode feallm_llava). The served model's name is DIR as given
# (--served-model-name after -- changes it). Several GPUs: --tensor-parallel-size; several
# nodes: start a Ray cluster first (`ray start --head` here, `ray start --address HEAD:6379`
# on the others), then --pipeline-parallel-size (README "Serve with vLLM").
# Binds to 127.0.0.1: the server has no login unless --api-key is given; another --host
# prints a warning. On a CPU-only machine the engine reserves FEALLM_VLLM_CPU_MEMORY
# (default 0.2) of the RAM (vLLM's --gpu-memory-utilization, as vLLM's CPU backend reads it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="[serve_vllm]"
die() { echo "$tag error: $*" >&2; exit 2; }

model="" port=8000 host="${FEALLM_SERVE_HOST:-127.0.0.1}" api_key="" tp=1 pp=1
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) [ $# -ge 2 ] || die "--model needs a folder"; model="$2"; shift 2 ;;
    --port) [ $# -ge 2 ] || die "--port needs a number"; port="$2"; shift 2 ;;
    --host) [ $# -ge 2 ] || die "--host needs an address"; host="$2"; shift 2 ;;
    --api-key) [ $# -ge 2 ] || die "--api-key needs a value"; api_key="$2"; shift 2 ;;
    --tensor-parallel-size) [ $# -ge 2 ] || die "--tensor-parallel-size needs a number"; tp="$2"; shift 2 ;;
    --pipeline-parallel-size) [ $# -ge 2 ] || die "--pipeline-parallel-size needs a number"; pp="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help; vLLM's own flags go after --)" ;;
  esac
done
[ -n "$model" ] || die "--model DIR is required (a folder written by feallm export-vllm)"
[ -f "$model/config.json" ] || die "$model/config.json: not found; export the checkpoint first (feallm export-vllm)"
grep -q '"FeallmLlavaForConditionalGeneration"' "$model/config.json" \
  || die "$model/config.json: not a feallm export-vllm folder (architectures lacks FeallmLlavaForConditionalGeneration)"
for n in "$port" "$tp" "$pp"; do
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] || die "port and parallel sizes must be positive integers, got '$n'"
done
if [ "$host" != 127.0.0.1 ] && [ "$host" != localhost ] && [ "$host" != ::1 ]; then
  echo "$tag WARNING: serving on $host: anyone who reaches this port can use the model" \
       "$([ -n "$api_key" ] && echo "with the API key" || echo "(no --api-key given)"); prefer an SSH tunnel" >&2
fi

venv="${FEALLM_VLLM_VENV:-$root/.venv-vllm}"
[ -x "$venv/bin/python" ] || bash "$root/launch/bootstrap.sh" --env vllm
# the server module, not `vllm serve`: vllm-cpu's CLI looks up the version of a package named
# vllm and fails before parsing its arguments
cmd=("$venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" --host "$host" --port "$port" --tokenizer-mode feallm_llava
     --tensor-parallel-size "$tp" --pipeline-parallel-size "$pp" --limit-mm-per-prompt '{"image": 1}')
[ -z "$api_key" ] || cmd+=(--api-key "$api_key")
# the precision the export was written in (vLLM's "auto" would serve float32 weights in bf16);
# a --dtype after -- overrides it
dtype="$("$venv/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("torch_dtype", ""))' \
  "$model/config.json" 2>/dev/null || echo "")"
case "$dtype" in float32|float16|bfloat16) cmd+=(--dtype "$dtype") ;; esac
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; }; then
  cmd+=(--gpu-memory-utilization "${FEALLM_VLLM_CPU_MEMORY:-0.2}")
  # vLLM's CPU attention has kernels for these head sizes only (v1/attention/backends/cpu_attn.py);
  # another fails minutes later inside the engine
  head="$("$venv/bin/python" -c 'import json, sys
t = json.load(open(sys.argv[1]))["text_config"]
print(t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"])' "$model/config.json" 2>/dev/null || echo "")"
  case " 32 64 80 96 112 128 160 192 224 256 512 " in
    *" $head "*) ;;
    *) [ -z "$head" ] || die "$model/config.json: the LLM's head size $head has no CPU attention in vLLM (32, 64, 80, 96, 112, 128, ...); serve it on a GPU" ;;
  esac
fi
cmd+=("${extra[@]}")
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
shown="${cmd[*]}"; [ -z "$api_key" ] || shown="${shown//$api_key/***}"
echo "$tag $shown"
exec "${cmd[@]}"
