"""Shared fixtures: the offline tiny-model kit, built once per test run."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def kit(tmp_path_factory):
    from feallm_llava.tinykit import build_kit

    return build_kit(tmp_path_factory.mktemp("kit"))


@pytest.fixture(scope="session")
def tokenizer(kit):
    from feallm_llava.tinykit import load_tokenizer

    return load_tokenizer(kit.tokenizer)


def _describe_face(tokenizer, model, processor) -> str:
    """Upstream's greedy answer (5 new tokens, v1 template) to the FER question about a plain
    red picture, decoded: the smoke check that a loaded checkpoint generates."""
    from PIL import Image

    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    conv = conv_templates["v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nPlease describe the expression in this face.")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt").unsqueeze(0)
    images = process_images([Image.new("RGB", (60, 40), (200, 30, 30))], processor, model.config)
    out = model.generate(ids, images=images.to(model.dtype), do_sample=False, max_new_tokens=5, min_new_tokens=5)
    return tokenizer.decode(out[0])


def _load_lora_and_answer(run, base, **flags):
    """Load a LoRA checkpoint with upstream's loader (CPU), check that every weight of its
    non_lora_trainables.bin is in the model (in the model's dtype), and that it answers;
    returns the model."""
    import torch

    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(str(run), str(base), run.name, device="cpu",
                                                           device_map="cpu", **flags)
    saved = torch.load(run / "non_lora_trainables.bin", weights_only=True)
    state = model.state_dict()
    for key, value in saved.items():
        mine = key.replace("base_model.model.", "", 1)
        assert torch.equal(state[mine], value.to(state[mine].dtype)), f"{mine} not restored"
    text = _describe_face(tokenizer, model, processor)
    assert isinstance(text, str) and text.strip()
    return model


@pytest.fixture(scope="session")
def describe_face():
    return _describe_face


@pytest.fixture(scope="session")
def load_lora_and_answer():
    return _load_lora_and_answer


@pytest.fixture(scope="session")
def v1_checkpoint(kit, tmp_path_factory):
    """A full tiny FEALLM checkpoint for the serving tests, built once; "v1" in its name:
    upstream's UI and worker pick the llava_v1 template from the name."""
    from feallm_llava.tinykit import build_llava

    return build_llava(tmp_path_factory.mktemp("ckpt") / "feallm-llava-v1-tiny", kit)
