"""A checkpoint knows how it must be prompted: the template its data were formatted with
is recorded at training time and used by `feallm eval`, upstream's model_worker and its
CLI, unless `--conv-mode` says otherwise.

The checkpoint is trained with `--version v1` into `llava-tiny-feallm-lora`, a folder
name from which upstream infers llava_v0 (no "v1" in it).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys

import pytest
import requests
from PIL import Image

from feallm_llava.integration.conv_template import (CONFIG_KEY, choose, name_rule, recorded_template, retemplate,
                                                     same_template)

QUESTION = "Please describe the expression in this face."


def render(template: str, messages: list[str | None]) -> str:
    from llava.conversation import conv_templates

    conv = conv_templates[template].copy()
    for i, message in enumerate(messages):
        conv.append_message(conv.roles[i % 2], message)
    return conv.get_prompt()


@pytest.fixture(scope="module")
def trained(kit, tmp_path_factory):
    from feallm_llava.recipe import TinyRecipe

    recipe = TinyRecipe(out=tmp_path_factory.mktemp("conv"), kit=kit.root, steps1=2, steps2=6, lr2=2e-3,
                        save_steps=10)
    recipe.run()
    return recipe


@pytest.fixture(scope="module")
def face(tmp_path_factory):
    path = tmp_path_factory.mktemp("face") / "face.png"
    Image.new("RGB", (64, 56), (200, 150, 120)).save(path)
    return path


# -- the record -------------------------------------------------------------------------

def test_training_records_each_stages_template(trained):
    assert name_rule(trained.stage_dir(2).name) == "llava_v0"  # what upstream would pick
    assert recorded_template(trained.stage_dir(1)) == "plain"
    assert recorded_template(trained.stage_dir(2)) == "v1"
    assert json.loads((trained.stage_dir(2) / "config.json").read_text())[CONFIG_KEY] == "v1"


def test_choose_prefers_explicit_then_recorded_then_the_name(trained, caplog):
    lora = trained.stage_dir(2)
    assert choose(lora, lora.name) == "v1"
    assert choose(lora.parent / "nowhere", "llava-v1.5-7b") == "llava_v1"
    with caplog.at_level(logging.WARNING):
        assert choose(lora, lora.name, "llava_v0") == "llava_v0"
    assert "llava_v0 differs from v1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert choose(lora, lora.name, "vicuna_v1") == "vicuna_v1"  # renders as v1: no warning
    assert caplog.text == ""


def test_retemplate_renders_any_chat_template_again_in_the_target():
    turns = ["<image>\n" + QUESTION, "Happiness.", "Which action units?", None]
    for source in ("llava_v0", "llava_v1", "mpt", "llava_llama_2", "chatml_direct"):
        new, found = retemplate(render(source, turns), "v1")
        assert (new, found) == (render("v1", turns), source)
    assert retemplate(render("vicuna_v1", turns), "v1") is None  # already there
    assert retemplate(render("llava_v0", turns), "plain") is None  # stage 1 has no turns
    assert same_template("v1", "vicuna_v1") and not same_template("v1", "llava_v1")


# -- our runner ---------------------------------------------------------------------------

def test_feallm_eval_prompts_with_the_recorded_template(trained, face, tmp_path):
    from feallm_llava.cli import main

    items = [{"id": f"f{i}", "image": str(face), "expression": "Happiness", "aus": [6, 12]} for i in range(2)]
    (tmp_path / "eval.json").write_text(json.dumps(items))
    common = ["eval", "--bench", "feabench", "--data", str(tmp_path), "--model-path", str(trained.stage_dir(2)),
              "--model-base", str(trained.kit_dir / "llm"), "--device", "cpu", "--max-new-tokens", "10"]
    assert main([*common, "--out", str(tmp_path / "recorded")]) == 0
    assert main([*common, "--conv-mode", "v1", "--out", str(tmp_path / "by-hand")]) == 0
    answers = {name: [json.loads(line)["answer"] for line in (tmp_path / name / "predictions.jsonl").open()]
               for name in ("recorded", "by-hand")}
    assert answers["recorded"] == answers["by-hand"] and all(answers["recorded"])


# -- upstream's model_worker and CLI ----------------------------------------------------------

def test_model_worker_answers_in_the_trained_template(trained, face, tmp_path):
    from feallm_llava.serve import stack as serve

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    image = base64.b64encode(face.read_bytes()).decode()
    with serve.start_stack(str(trained.stage_dir(2)), model_base=str(trained.kit_dir / "llm"), device="cpu",
                           web=False, log_dir=tmp_path / "logs", env=env) as st:
        def ask(template: str) -> tuple[str, str]:
            prompt = render(template, ["<image>\n" + QUESTION, None])
            payload = {"model": st.model_name, "prompt": prompt, "images": [image], "temperature": 0.0,
                       "max_new_tokens": 10, "stop": "###" if template == "llava_v0" else "</s>"}
            r = requests.post(st.worker.url + "/worker_generate_stream", json=payload, stream=True, timeout=120)
            chunks = [json.loads(c) for c in r.iter_lines(delimiter=b"\0") if c]
            assert chunks and chunks[-1]["error_code"] == 0, chunks[-1:]
            text = chunks[-1]["text"]
            assert text.startswith(prompt)  # the client cuts its own prompt off, as upstream's UI does
            return prompt, text[len(prompt):]

        _, by_name = ask("llava_v0")  # what upstream's chat page sends for this folder name
        _, trained_one = ask("v1")
    assert by_name == trained_one and by_name.strip()
    assert "rendered again in v1" in st.worker.log.read_text(errors="replace")


def _cli(trained, face, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "llava.serve.cli", "--model-path", str(trained.stage_dir(2)),
           "--model-base", str(trained.kit_dir / "llm"), "--image-file", str(face), "--device", "cpu",
           "--temperature", "0", "--max-new-tokens", "10", *extra]
    return subprocess.run(cmd, input=QUESTION + "\n", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _answer(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # the CLI ends on EOFError at the next prompt
    return proc.stdout.split("ASSISTANT:", 1)[1].split("USER:", 1)[0].strip()


def test_upstream_cli_prompts_in_the_trained_template(trained, face):
    recorded = _cli(trained, face)
    assert "prompting with 'v1'" in recorded.stderr
    by_hand = _cli(trained, face, "--conv-mode", "v1")
    assert "prompting with" not in by_hand.stderr
    assert _answer(recorded) == _answer(by_hand) and _answer(recorded)
