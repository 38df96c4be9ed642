"""Upstream LLaVA's own evaluation scripts score a FEALLM checkpoint, unchanged.

A tiny FEALLM LoRA checkpoint is trained through upstream's train module (the tiny
recipe), then `python -m llava.eval.model_vqa_loader` and `python -m llava.eval.model_vqa`
answer a question file as LLaVA's `scripts/v1_5/eval/*.sh` call them. On this CPU-only
machine the `eval_scripts_on_cpu` shim runs them on the CPU in float32; their answers
must be those of our LLaVA runner for the same prompts with greedy decoding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

MAX_NEW_TOKENS = 12
QUESTIONS = ["Please describe the expression in this face.", "Please describe the action units in this face.",
             "What is the emotion of this person?"]


@pytest.fixture(scope="module")
def checkpoint(kit, tmp_path_factory):
    from feallm_llava.recipe import TinyRecipe

    recipe = TinyRecipe(out=tmp_path_factory.mktemp("vqa"), kit=kit.root, steps1=4, steps2=6, lr2=2e-3,
                        save_steps=10)
    recipe.run()
    return recipe.stage_dir(2), kit.llm


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    folder = tmp_path_factory.mktemp("vqa-data")
    images = folder / "images"
    images.mkdir()
    lines = []
    for i in range(4):
        img = Image.new("RGB", (64, 48), (230, 230, 230))
        ImageDraw.Draw(img).ellipse((8 + 4 * i, 4, 48, 44), fill=(60 * i % 256, 120, 200))
        img.save(images / f"{i}.jpg")
        lines.append({"question_id": i, "image": f"{i}.jpg", "text": QUESTIONS[i % len(QUESTIONS)],
                      "category": "default"})
    question_file = folder / "questions.jsonl"
    question_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return question_file, images, lines


def run_script(module: str, checkpoint, questions, out: Path, *extra: str) -> list[dict]:
    path, base = checkpoint
    question_file, images, _ = questions
    cmd = [sys.executable, "-m", module, "--model-path", str(path), "--model-base", str(base),
           "--question-file", str(question_file), "--image-folder", str(images), "--answers-file", str(out),
           "--conv-mode", "llava_v1", "--temperature", "0", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def ours(checkpoint, questions) -> dict[int, str]:
    from feallm_llava.inference.llava_runner import LlavaBackend

    path, base = checkpoint
    _, images, lines = questions

    class Question:
        def __init__(self, line):
            self.id, self.question = str(line["question_id"]), line["text"]
            self.image = images / line["image"]

        def load_image(self):
            return Image.open(self.image).convert("RGB")

    backend = LlavaBackend(str(path), str(base), conv_mode="llava_v1", device="cpu", dtype="float32",
                           max_new_tokens=MAX_NEW_TOKENS)
    answers = {int(q.id): text for q, text in backend.answer([Question(line) for line in lines], batch_size=1)}
    assert all(answers.values()), answers  # a prefix check on empty answers would prove nothing
    return answers


def test_model_vqa_loader_answers_as_our_runner_does(checkpoint, questions, ours, tmp_path):
    answers = run_script("llava.eval.model_vqa_loader", checkpoint, questions, tmp_path / "loader.jsonl",
                         "--max_new_tokens", str(MAX_NEW_TOKENS))
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions[2]]
    assert {a["question_id"]: a["text"] for a in answers} == ours
    assert all(a["model_id"] == checkpoint[0].name and a["prompt"] for a in answers)


def test_model_vqa_answers_as_our_runner_does(checkpoint, questions, ours, tmp_path):
    # model_vqa has no --max_new_tokens (it generates up to 1024): greedy answers agree on
    # the tokens both generated, so ours (12 new tokens) opens each of its answers
    answers = run_script("llava.eval.model_vqa", checkpoint, questions, tmp_path / "vqa.jsonl")
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions[2]]
    for answer in answers:
        assert answer["text"].startswith(ours[answer["question_id"]]), (answer["text"], ours[answer["question_id"]])
