#!/usr/bin/env bash
# Serve an exported FEALLM (or LLaVA-1.5) folder with vLLM's OpenAI-compatible server.
#   feallm export-vllm --model-path CKPT [--model-base BASE] --out DIR     # in .venv
#   bash launch/serve_vllm.sh --model DIR [--port 8000] [--host 127.0.0.1] [--insecure]
#                             [--tensor-parallel-size N] [--pipeline-parallel-size N] [-- VLLM_FLAGS...]
#   feallm eval --bench feabench --data DATA --base-url http://127.0.0.1:8000/v1 --openai-model DIR ...
# Runs vLLM's OpenAI-compatible server from .venv-vllm (FEALLM_VLLM_VENV; made on first use by
# `bash launch/bootstrap.sh --env vllm`) with the FEALLM plugin and upstream LLaVA's
# tokenization (--tokenizer-mode feallm_llava). The served model's name is DIR as given
# (--served-model-name after -- changes it). Several GPUs: --tensor-parallel-size; several
# nodes: start a Ray cluster first (`ray start --head` here, `ray start --address HEAD:6379`
# on the others), then --pipeline-parallel-size (README "Serve with vLLM").
# Binds to 127.0.0.1. The API key is the serving stack's shared secret, read as it reads
# it (FEALLM_SERVE_SECRET, or the file FEALLM_SERVE_SECRET_FILE names; VLLM_API_KEY too),
# never from the command line (`ps` shows it); another --host is refused without one
# unless --insecure. On a CPU-only machine: each of the TP x PP workers gets its own
# cores (VLLM_CPU_OMP_THREADS_BIND, e.g. "0|1"), vLLM's internal addresses stay on
# loopback when serving on loopback (VLLM_HOST_IP), and the KV cache is sized from the
# memory free now (FEALLM_VLLM_KV_SHARE of MemAvailable, default 0.25, split among the
# workers: --kv-cache-memory-bytes); FEALLM_VLLM_CPU_MEMORY=F instead reserves a fraction F
# of the RAM (--gpu-memory-utilization). Each is kept when already set or given after --.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="[serve_vllm]"
die() { echo "$tag error: $*" >&2; exit 2; }

model="" port=8000 host="${FEALLM_SERVE_HOST:-127.0.0.1}" tp=1 pp=1 insecure=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) [ $# -ge 2 ] || die "--model needs a folder"; model="$2"; shift 2 ;;
    --port) [ $# -ge 2 ] || die "--port needs a number"; port="$2"; shift 2 ;;
    --host) [ $# -ge 2 ] || die "--host needs an address"; host="$2"; shift 2 ;;
    --api-key|--api-key=*) die "--api-key on the command line is visible to every user in ps: put the key in a file (chmod 600) and set FEALLM_SERVE_SECRET_FILE=FILE (or FEALLM_SERVE_SECRET)" ;;
    --insecure) insecure=1; shift ;;
    --tensor-parallel-size) [ $# -ge 2 ] || die "--tensor-parallel-size needs a number"; tp="$2"; shift 2 ;;
    --pipeline-parallel-size) [ $# -ge 2 ] || die "--pipeline-parallel-size needs a number"; pp="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
for a in "${extra[@]+"${extra[@]}"}"; do
  case "$a" in --api-key|--api-key=*) die "--api-key after -- is visible to every user in ps: use FEALLM_SERVE_SECRET_FILE" ;; esac
done
# the key, as the serving stack reads its secret (feallm_llava.integration.access)
api_key="${VLLM_API_KEY:-}"
if [ -n "${FEALLM_SERVE_SECRET:-}" ]; then
  api_key="$FEALLM_SERVE_SECRET"
elif [ -n "${FEALLM_SERVE_SECRET_FILE:-}" ]; then
  [ -r "$FEALLM_SERVE_SECRET_FILE" ] || die "FEALLM_SERVE_SECRET_FILE=$FEALLM_SERVE_SECRET_FILE: cannot read it"
  api_key="$(head -n 1 "$FEALLM_SERVE_SECRET_FILE" | tr -d '[:space:]')"
  [ -n "$api_key" ] || die "$FEALLM_SERVE_SECRET_FILE: empty (the key is its first line)"
fi
loopback=0
case "$host" in 127.0.0.1|localhost|::1) loopback=1 ;; esac
if ((!loopback)); then
  if [ -z "$api_key" ] && ((!insecure)); then
    die "refusing to serve on $host without an API key: set FEALLM_SERVE_SECRET_FILE=FILE (or FEALLM_SERVE_SECRET); put TLS in front with a reverse proxy (README); or pass --insecure"
  fi
  [ -n "$api_key" ] || echo "$tag WARNING: serving on $host without an API key (--insecure): anyone who reaches this port can use the model" >&2
fi

venv="${FEALLM_VLLM_VENV:-$root/.venv-vllm}"
[ -x "$venv/bin/python" ] || bash "$root/launch/bootstrap.sh" --env vllm
# the server module, not `vllm serve`: vllm-cpu's CLI looks up the version of a package named
# vllm and fails before parsing its arguments
cmd=("$venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" --host "$host" --port "$port" --tokenizer-mode feallm_llava
     --tensor-parallel-size "$tp" --pipeline-parallel-size "$pp" --limit-mm-per-prompt '{"image": 1}')
# vLLM reads the key from its environment: never on its command line
if [ -n "$api_key" ]; then export VLLM_API_KEY="$api_key"; else unset VLLM_API_KEY; fi
# the precision the export was written in (vLLM's "auto" would serve float32 weights in bf16);
# a --dtype after -- overrides it
dtype="$("$venv/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("torch_dtype", ""))' \
  "$model/config.json" 2>/dev/null || echo "")"
case "$dtype" in float32|float16|bfloat16) cmd+=(--dtype "$dtype") ;; esac
given() {  # whether a vLLM flag was given after --
  local a; for a in "${extra[@]+"${extra[@]}"}"; do case "$a" in "$1"|"$1"=*) return 0 ;; esac; done; return 1
}
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; }; then
  world=$((tp * pp))
  # vLLM's internal message queue on loopback, as the server
  ((loopback)) && export VLLM_HOST_IP="${VLLM_HOST_IP:-127.0.0.1}"
  if ((world > 1)) && [ -z "${VLLM_CPU_OMP_THREADS_BIND:-}" ]; then
    # vLLM binds workers by NUMA node and refuses more workers than nodes: give each its share of our cores
    VLLM_CPU_OMP_THREADS_BIND="$("$venv/bin/python" -c 'import os, sys
cpus, n = sorted(os.sched_getaffinity(0)), int(sys.argv[1])
if len(cpus) < n:
    sys.exit(f"{n} workers (tensor x pipeline parallel) need at least {n} cores; this process may use {len(cpus)}")
share = len(cpus) // n
print("|".join(",".join(map(str, cpus[i * share:(i + 1) * share])) for i in range(n)))' "$world")" \
      || die "cannot bind $world CPU workers"
    export VLLM_CPU_OMP_THREADS_BIND
  fi
  if given --kv-cache-memory-bytes || given --gpu-memory-utilization; then
    :
  elif [ -n "${FEALLM_VLLM_CPU_MEMORY:-}" ]; then
    cmd+=(--gpu-memory-utilization "$FEALLM_VLLM_CPU_MEMORY")
  else
    # vLLM's fraction counts other processes' memory against it (negative budgets on a busy
    # machine): an explicit size from what is free now, per worker
    kv="$("$venv/bin/python" -c 'import sys
free = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemAvailable:"))
print(int(free * float(sys.argv[1]) / int(sys.argv[2])))' "${FEALLM_VLLM_KV_SHARE:-0.25}" "$world")" \
      || die "cannot read MemAvailable from /proc/meminfo; set FEALLM_VLLM_CPU_MEMORY=FRACTION"
    cmd+=(--kv-cache-memory-bytes "$kv")
  fi
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
echo "$tag ${cmd[*]}$([ -z "$api_key" ] || echo " (API key from the environment)")$( ((${world:-1} > 1)) && [ -n "${VLLM_CPU_OMP_THREADS_BIND:-}" ] && echo " VLLM_CPU_OMP_THREADS_BIND=$VLLM_CPU_OMP_THREADS_BIND")"
exec "${cmd[@]}"
