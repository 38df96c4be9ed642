"""`feallm demo`: the offline end-to-end smoke run (what `bash launch/demo.sh` runs).

Builds the tiny kit, trains FEALLM's two stages through upstream LLaVA's own train
script (`launch/tiny_cpu.sh`: `python -m llava.train.train_mem --mm_projector_type
feallm`), loads the LoRA checkpoint with upstream's `load_pretrained_model` and asks it
about an image. The model is tiny and random: this shows the machinery working, not
facial-emotion skill. Every stage's time is printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=str(ROOT / "runs" / "demo"), help="run directory (default runs/demo)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per stage")


class Stages:
    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    def run(self, name: str, fn):
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        result = fn()
        self.times.append((name, time.perf_counter() - start))
        print(f"   done in {self.times[-1][1]:.1f} s", flush=True)
        return result


def _train(out: Path, steps: int) -> None:
    env = {**os.environ, "OUT": str(out), "PY": sys.executable, "STEPS1": str(steps), "STEPS2": str(steps)}
    subprocess.run(["bash", str(ROOT / "launch" / "tiny_cpu.sh")], env=env, check=True)


def _ask(out: Path) -> str:
    import torch
    from PIL import Image

    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    run = out / "llava-tiny-feallm-lora"
    tokenizer, model, processor, _ = load_pretrained_model(
        str(run), str(out / "kit" / "llm"), run.name, device="cpu", device_map="cpu")
    conv = conv_templates["v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nPlease describe the expression in this face.")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt").unsqueeze(0)
    image = Image.open(out / "data" / "images" / "000.jpg").convert("RGB")
    with torch.inference_mode():
        answer = model.generate(ids, images=process_images([image], processor, model.config).to(model.dtype),
                                do_sample=False, max_new_tokens=16)
    return tokenizer.decode(answer[0], skip_special_tokens=True)


def main(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out).resolve()
    stages = Stages()
    stages.run(f"stage 1 + stage 2 through llava.train.train_mem ({args.steps} steps each) -> {out}",
               lambda: _train(out, args.steps))
    answer = stages.run("load the LoRA checkpoint with llava's load_pretrained_model and generate", lambda: _ask(out))
    print(f"\nanswer of the tiny, barely trained model (machinery check, not a result): {answer!r}")
    print("\nstage times:")
    for name, seconds in stages.times:
        print(f"  {seconds:7.1f} s  {name}")
    return 0
