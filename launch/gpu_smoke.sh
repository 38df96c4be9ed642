#!/usr/bin/env bash
# GPU smoke test of the training path, a few minutes on one GPU: the
# two FEALLM stages on the offline tiny kit through the same launch the 7B recipe uses
# (`deepspeed --num_gpus 1 --module llava.train.train_mem`, stage 1 under launch/zero2.json
# and stage 2 under launch/zero3.json as the recipe, bf16, gradient checkpointing,
# flash-attn when installed else sdpa), then upstream's loader on
# the LoRA checkpoint with device='cuda' and a generation, then QLoRA stage 2 (the 24 GB
# route: `--bits 4`, one plain python process on one GPU, no DeepSpeed) and its checkpoint
# loaded in 4-bit with a generation, upstream's eval script llava.eval.model_vqa_loader on
# the LoRA checkpoint as LLaVA's scripts call it, then the projector and throughput
# benchmarks on the GPU. Prints one PASS/FAIL (or SKIP) line per step; exits 1 when any
# step fails. The benchmarks end with their verdicts, e.g.
#   FEALLM projector / tower = N% at batch 1, bfloat16, CUDA graph (target <= 10%: met; eager N%, CUDA graph N%)
#   feallm (sampled prompts) batch 8 / batch 1 = Nx (target >= 4x: met; CPU time Nx)
#
#   bash launch/gpu_smoke.sh                  # writes runs/gpu_smoke/
#   OUT=/tmp/smoke ZERO=3 ZERO2=2 bash launch/gpu_smoke.sh   # the other ZeRO stage for each
#   DEVICE=cpu bash launch/gpu_smoke.sh       # check the script itself without a GPU:
#                                             # plain python, fp32, no DeepSpeed (slow)
#
# Environment: OUT (runs/gpu_smoke), PY (.venv python), STEPS (4 per stage), ZERO (stage 1: 2),
# ZERO2 (stage 2: 3),
# DEVICE (cuda), BUDGET_S (300: the time step fails above it), DEEPSPEED (launcher).
# Each run retrains from scratch (the stage folders are replaced; the kit is reused).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$root/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3 || command -v python)"
OUT="${OUT:-$root/runs/gpu_smoke}"
STEPS="${STEPS:-4}"
ZERO="${ZERO:-2}"
ZERO2="${ZERO2:-3}"
DEVICE="${DEVICE:-cuda}"
BUDGET_S="${BUDGET_S:-300}"
KIT="$OUT/kit"
DATA="$OUT/data"
STAGE1="$OUT/llava-tiny-feallm-pretrain"
STAGE2="$OUT/llava-tiny-feallm-lora"   # "llava" + "lora": upstream's loader merges LoRA
STAGE2Q="$OUT/llava-tiny-feallm-qlora"  # stage 2 again, with --bits 4
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$root"
mkdir -p "$OUT"

failures=0
start_all=$SECONDS
result() {  # result STATUS NAME [DETAIL]
  printf '%-4s %-10s %s\n' "$1" "$2" "${3:-}"
  [ "$1" != FAIL ] || failures=$(( failures + 1 ))
}
# step NAME CMD...: run, log to $OUT/NAME.log, PASS/FAIL with its duration.
step() {
  local name="$1" t0=$SECONDS rc=0
  shift
  echo "---- $name: $*" >"$OUT/$name.log"
  "$@" >>"$OUT/$name.log" 2>&1 || rc=$?
  if (( rc == 0 )); then
    result PASS "$name" "$(( SECONDS - t0 ))s"
  else
    result FAIL "$name" "$(( SECONDS - t0 ))s, exit $rc; last lines of $OUT/$name.log:"
    tail -n 25 "$OUT/$name.log" | sed 's/^/     | /'
    return 1
  fi
}

# -- environment --------------------------------------------------------------------
info="$("$PY" - "$DEVICE" <<'EOF' 2>&1
import importlib.util, sys
import torch
device = sys.argv[1]
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit(f"torch {torch.__version__}: CUDA is not available (DEVICE=cpu checks the script without a GPU)")
    name = torch.cuda.get_device_name(0)
    bf16 = torch.cuda.is_bf16_supported()
else:
    name, bf16 = "cpu", False
flash = importlib.util.find_spec("flash_attn") is not None and device == "cuda"
print(f"torch {torch.__version__}, {name}, bf16 {'yes' if bf16 else 'no'}, "
      f"attention {'flash_attention_2' if flash else 'sdpa (flash-attn not installed)'}")
print("BF16=" + ("1" if bf16 else "0"))
EOF
)" && env_ok=1 || env_ok=0
if ((env_ok)); then
  result PASS env "$(head -n 1 <<<"$info")"
else
  result FAIL env "$info"
  echo "FAIL gpu smoke: no usable $DEVICE"
  exit 1
fi
bf16=0; grep -q '^BF16=1' <<<"$info" && bf16=1

# -- launcher: deepspeed (one process, one GPU) or plain python -------------------------
DEEPSPEED="${DEEPSPEED:-}"
if [ -z "$DEEPSPEED" ]; then
  if [ -x "$(dirname "$PY")/deepspeed" ]; then DEEPSPEED="$(dirname "$PY")/deepspeed"
  else DEEPSPEED="$(command -v deepspeed || true)"; fi
fi
port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
device_args=()
stage1_ds=()   # the DeepSpeed config of each stage, when DeepSpeed runs
stage2_ds=()
if [ "$DEVICE" = cpu ]; then
  launch=("$PY" -m llava.train.train_mem)
  device_args=(--use_cpu True)
  result SKIP deepspeed "DEVICE=cpu: plain python, fp32"
elif [ -n "$DEEPSPEED" ]; then
  launch=("$DEEPSPEED" --num_gpus 1 --master_port "$port" --module llava.train.train_mem)
  stage1_ds=(--deepspeed "$root/launch/zero$ZERO.json")
  stage2_ds=(--deepspeed "$root/launch/zero$ZERO2.json")
  result PASS deepspeed "launcher $DEEPSPEED, stage 1 ZeRO-$ZERO, stage 2 ZeRO-$ZERO2"
else
  # No launcher: one plain process; DeepSpeed (when importable) still runs in-process.
  launch=(env RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT="$port"
          "$PY" -m llava.train.train_mem)
  if "$PY" -c 'import deepspeed' >/dev/null 2>&1; then
    stage1_ds=(--deepspeed "$root/launch/zero$ZERO.json")
    stage2_ds=(--deepspeed "$root/launch/zero$ZERO2.json")
    result SKIP deepspeed "no deepspeed launcher on PATH: plain python, stage 1 ZeRO-$ZERO, stage 2 ZeRO-$ZERO2 in-process"
  else
    result SKIP deepspeed "deepspeed not installed: plain python without DeepSpeed"
  fi
fi
# bf16 as the 7B recipe; GPUs without it (pre-Ampere) train in fp16 with loss scaling
precision_args=()
if ((bf16)); then precision_args=(--bf16 True); elif [ "$DEVICE" != cpu ]; then precision_args=(--fp16 True); fi
device_args+=("${precision_args[@]}")
# QLoRA: one plain process on one GPU (bitsandbytes layers under DataParallel would not do)
if [ "$DEVICE" = cpu ]; then
  qlora_launch=("$PY" -m llava.train.train_mem)
  qlora_args=(--bits 4 --use_cpu True)
else
  gpu="${CUDA_VISIBLE_DEVICES:-0}"
  qlora_launch=(env CUDA_VISIBLE_DEVICES="${gpu%%,*}" "$PY" -m llava.train.train_mem)
  qlora_args=(--bits 4 "${precision_args[@]}")
fi

# -- tiny kit, stage 1, stage 2 ---------------------------------------------------------
shared=(
  --vision_tower "$KIT/clip" --mm_projector_type feallm
  --mm_feallm_crop_size 32 --mm_feallm_mpp_dim 0
  --mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False
  --image_folder "$DATA/images" --image_aspect_ratio pad --lazy_preprocess True
  --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --num_train_epochs 1
  --max_steps "$STEPS" --save_strategy steps --save_steps 2 --save_total_limit 1
  --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1
  --model_max_length 512 --gradient_checkpointing True --dataloader_num_workers 0
  --report_to none --seed 0 --data_seed 0
)
common=("${shared[@]}" "${device_args[@]}")
step kit "$PY" -m feallm_llava.cli tiny-kit --out "$KIT" --sample-data "$DATA" || true

check_stage1() {
  "$PY" - "$STAGE1" <<'EOF'
import sys
from pathlib import Path
import torch
from feallm_llava.model.weights import load_weights
run = Path(sys.argv[1])
saved = torch.load(run / "mm_projector.bin", weights_only=True)
twin = load_weights(run / "mm_projector.safetensors")
assert any(".lca." in k for k in saved) and any(".mpp." in k for k in saved), sorted(saved)[:8]
assert set(twin) == set(saved) and all(torch.equal(twin[k], saved[k]) for k in saved), "safetensors twin differs"
print(f"mm_projector.bin: {len(saved)} tensors (LCA + MPP), safetensors twin equal")
EOF
}
check_lora() {  # check_lora RUN [qlora]: the LoRA adapter and the projector beside it
  "$PY" - "$1" "${2:-}" <<'EOF'
import json, sys
from pathlib import Path
import torch
run, qlora = Path(sys.argv[1]), sys.argv[2] == "qlora"
assert (run / "adapter_model.safetensors").is_file() or (run / "adapter_model.bin").is_file(), "no LoRA adapter"
non_lora = torch.load(run / "non_lora_trainables.bin", weights_only=True)
assert any("mm_projector.lca." in k for k in non_lora) and any("mm_projector.mpp." in k for k in non_lora)
assert not any("lora_" in k or "base_layer" in k for k in non_lora), "LoRA wrapped the projector"
assert all(".mm_projector." in k for k in non_lora), sorted(k for k in non_lora if ".mm_projector." not in k)[:5]
assert (run / "non_lora_trainables.safetensors").is_file(), "no non_lora_trainables.safetensors twin"
if qlora:
    dtypes = {str(v.dtype) for v in non_lora.values()}
    assert dtypes == {"torch.float32"}, f"projector saved in {dtypes}, not float32"
    config = json.loads((run / "config.json").read_text())
    assert "quantization_config" not in config, "config.json names a quantization: the loader takes the base for 4-bit"
print(f"adapter + non_lora_trainables.bin: {len(non_lora)} {'float32 ' if qlora else ''}projector tensors")
EOF
}

if [ -f "$KIT/kit.json" ]; then
  rm -rf "$STAGE1" "$STAGE2"
  if step stage1 "${launch[@]}" --model_name_or_path "$KIT/llm" --version plain \
       --data_path "$DATA/pretrain.json" --tune_mm_mlp_adapter True --learning_rate 1e-3 \
       --output_dir "$STAGE1" "${common[@]}" ${stage1_ds[@]+"${stage1_ds[@]}"}; then
    step stage1-out check_stage1 || true
  fi
  if [ -f "$STAGE1/mm_projector.bin" ]; then
    if step stage2 "${launch[@]}" --model_name_or_path "$KIT/llm" --version v1 \
         --data_path "$DATA/finetune.json" --pretrain_mm_mlp_adapter "$STAGE1/mm_projector.bin" \
         --lora_enable True --lora_r 16 --lora_alpha 32 --mm_projector_lr 2e-5 \
         --learning_rate 2e-4 --group_by_modality_length True \
         --output_dir "$STAGE2" "${common[@]}" ${stage2_ds[@]+"${stage2_ds[@]}"}; then
      step stage2-out check_lora "$STAGE2" || true
    fi
    rm -rf "$STAGE2Q"
    if step qlora "${qlora_launch[@]}" --model_name_or_path "$KIT/llm" --version v1 \
         --data_path "$DATA/finetune.json" --pretrain_mm_mlp_adapter "$STAGE1/mm_projector.bin" \
         --lora_enable True --lora_r 16 --lora_alpha 32 --mm_projector_lr 2e-5 \
         --learning_rate 2e-4 --output_dir "$STAGE2Q" "${shared[@]}" "${qlora_args[@]}"; then
      step qlora-out check_lora "$STAGE2Q" qlora || true
    fi
  else
    result SKIP stage2 "no stage-1 projector"
    result SKIP qlora "no stage-1 projector"
  fi
else
  result SKIP stage1 "no tiny kit"
  result SKIP stage2 "no tiny kit"
  result SKIP qlora "no tiny kit"
fi

# -- upstream's loader on the LoRA checkpoint, on the device, and a generation ----------
load_and_generate() {  # load_and_generate RUN [4bit]
  "$PY" - "$1" "$KIT/llm" "$DEVICE" "${2:-}" <<'EOF'
import sys
from pathlib import Path
import torch
from PIL import Image
from llava.conversation import conv_templates
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model

run, base, device, quant = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
# device_map as a plain string: upstream also moves the tower with `.to(device=device_map)`
tokenizer, model, processor, _ = load_pretrained_model(str(run), base, run.name, device=device, device_map=device,
                                                       load_4bit=quant == "4bit")
assert type(model.get_model().mm_projector).__name__ == "FeallmProjector", type(model.get_model().mm_projector)
if quant == "4bit":
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.startswith("model.layers.")}
    assert "Linear4bit" in kinds, f"load_4bit: no Linear4bit in the LLM ({sorted(kinds)})"
state = model.state_dict()
saved = torch.load(run / "non_lora_trainables.bin", weights_only=True)
for key, value in saved.items():
    mine = key.replace("base_model.model.", "", 1)
    assert torch.equal(state[mine].cpu(), value.to(state[mine].dtype)), f"projector tensor {mine} not restored"
conv = conv_templates["v1"].copy()
conv.append_message(conv.roles[0], "<image>\nPlease describe the expression in this face.")
conv.append_message(conv.roles[1], None)
ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt").unsqueeze(0).to(device)
images = process_images([Image.new("RGB", (60, 40), (200, 30, 30))], processor, model.config)
with torch.inference_mode():
    out = model.generate(ids, images=images.to(device, model.dtype), do_sample=False,
                         max_new_tokens=8, min_new_tokens=8)
print(f"device {next(model.parameters()).device}, dtype {model.dtype}, {len(saved)} projector tensors "
      f"restored; generated: {tokenizer.decode(out[0], skip_special_tokens=True)!r}")
EOF
}
if [ -f "$STAGE2/non_lora_trainables.bin" ]; then
  step load load_and_generate "$STAGE2" && tail -n 1 "$OUT/load.log" | sed 's/^/     | /' || true
else
  result SKIP load "no stage-2 checkpoint"
fi
if [ -f "$STAGE2Q/non_lora_trainables.bin" ]; then
  step qlora-load load_and_generate "$STAGE2Q" 4bit && tail -n 1 "$OUT/qlora-load.log" | sed 's/^/     | /' || true
else
  result SKIP qlora-load "no QLoRA checkpoint"
fi

# -- upstream's own eval script on the LoRA checkpoint, as LLaVA's scripts/v1_5/eval call it --
# (on a CUDA machine it runs exactly as upstream wrote it: fp16, .cuda(); on CPU the
# eval_scripts_on_cpu shim keeps it there)
vqa_questions() {
  "$PY" - "$DATA" "$OUT/vqa_questions.jsonl" <<'EOF'
import json, sys
from pathlib import Path
data, out = Path(sys.argv[1]), Path(sys.argv[2])
images = sorted(p.name for p in (data / "images").iterdir())[:4]
out.write_text("".join(json.dumps({"question_id": i, "image": name, "text": "Please describe the expression in "
                                   "this face.", "category": "default"}) + "\n" for i, name in enumerate(images)))
EOF
}
check_vqa() {
  "$PY" - "$OUT/vqa_questions.jsonl" "$OUT/vqa_answers.jsonl" <<'EOF'
import json, sys
questions = [json.loads(line) for line in open(sys.argv[1])]
answers = [json.loads(line) for line in open(sys.argv[2])]
assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions], "one answer per question"
assert all(isinstance(a["text"], str) for a in answers)
print(f"{len(answers)} answers, e.g. {answers[0]['text'][:60]!r}")
EOF
}
if [ -f "$STAGE2/non_lora_trainables.bin" ] && vqa_questions; then
  if step vqa "$PY" -m llava.eval.model_vqa_loader --model-path "$STAGE2" --model-base "$KIT/llm" \
       --question-file "$OUT/vqa_questions.jsonl" --image-folder "$DATA/images" \
       --answers-file "$OUT/vqa_answers.jsonl" --temperature 0 --conv-mode vicuna_v1 --max_new_tokens 16; then
    step vqa-out check_vqa && tail -n 1 "$OUT/vqa-out.log" | sed 's/^/     | /' || true
  fi
else
  result SKIP vqa "no stage-2 checkpoint"
fi

# -- benchmarks on the device -----------------------------------------------------------
# projector: CLIP tower vs mlp2x_gelu vs FEALLM (eager and, on CUDA, replayed from CUDA
# graphs) at batch 1 and 8; the bench spells its dtypes bfloat16 / float16 / float32
if ((bf16)); then bench_args=(--device "$DEVICE" --dtype bfloat16)
elif [ "$DEVICE" != cpu ]; then bench_args=(--device "$DEVICE" --dtype float16)
else bench_args=(--device cpu --dtype float32 --reps 1 --warmup 1 --batch 1); fi
step bench "$PY" -m feallm_llava.bench projector "${bench_args[@]}" \
  && grep -E '^(FEALLM projector.* = |CLIP)' "$OUT/bench.log" | sed 's/^/     | /' || true
# throughput: the eval runner on the tiny kit, batch 8 vs batch 1, feallm, sampled (padded)
# prompts, in the runner's dtype (float16 on CUDA); fails when batched answers differ
if [ "$DEVICE" = cpu ]; then tp_args=(--items 16 --repeats 1); else tp_args=(--batch-size 8 16 --repeats 1); fi
step throughput "$PY" -m feallm_llava.bench throughput --device "$DEVICE" --projector feallm --prompts sampled \
    --kit-dir "$OUT" "${tp_args[@]}" \
  && tail -n 1 "$OUT/throughput.log" | sed 's/^/     | /' || true

elapsed=$(( SECONDS - start_all ))
if (( elapsed <= BUDGET_S )); then result PASS time "${elapsed}s (budget ${BUDGET_S}s)"
else result FAIL time "${elapsed}s (over the ${BUDGET_S}s budget)"; fi
if (( failures )); then echo "FAIL gpu smoke: $failures step(s) failed (logs in $OUT)"; exit 1; fi
echo "PASS gpu smoke (logs in $OUT)"
