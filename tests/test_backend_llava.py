"""The LLaVA backend on the offline tiny kit: upstream loading, batched greedy decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from feallm_llava.cli import main as cli
from feallm_llava.inference.llava_runner import LlavaBackend
from feallm_llava.integration.conv_template import name_rule as default_conv_mode
from feallm_llava.eval.items import EvalItem

QUESTIONS = [
    "Please describe the expression in this face.",
    "Which action units are active?",
    "Look closely at the brows, the eyes and the mouth of this person, then tell me which facial "
    "muscles move and what emotion results from them.",
    "Emotion?",
]


@pytest.fixture(scope="module")
def one_thread():
    # Tiny kernels on a shared CPU: more threads than free cores only adds waiting.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(kit, tmp_path_factory):
    from feallm_llava.tinykit import build_llava

    return build_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava-feallm", kit)


@pytest.fixture(scope="module")
def backend(checkpoint, one_thread):
    return LlavaBackend(str(checkpoint), conv_mode="llava_v1", device="cpu", max_new_tokens=12)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    out = []
    for i in range(10):
        path = root / f"face{i}.png"
        h, w = 40 + 6 * (i % 3), 56 - 4 * (i % 4)  # non-square, varied sizes
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        out.append(EvalItem(id=f"f{i}", image=str(path), task="fer", question=QUESTIONS[i % 4], bench="t",
                            gt_expression="Neutral", crop=(2, 2, 30, 30) if i == 5 else None))
    return out


def test_batch_of_8_gives_the_greedy_answers_of_batch_1(backend, items):
    single = {item.id: text for item, text in backend.answer(items, batch_size=1)}
    batched = {item.id: text for item, text in backend.answer(items, batch_size=8)}  # 8 + a batch of 2
    assert len(set(single.values())) > 1  # the answers depend on the input: the comparison can fail
    assert batched == single


def test_a_batch_with_padding_gives_the_answers_of_batch_1(backend, items):
    """generate() itself, no length bucketing: rows of different prompt lengths, left-padded."""
    batch = items[:4]
    assert len({backend.prompt_length(i) for i in batch}) > 1
    assert backend.generate(batch) == [backend.generate([i])[0] for i in batch]


def test_padded_batch_builds_its_masks_without_vmap(backend, items, monkeypatch):
    """Compat shim padded_batch_mask: transformers' sdpa_mask vmaps a mask function four
    times at every decoding step (~1.6 ms on CPU); the shim builds the same masks by
    broadcasting, for the plain causal mask with padding that LLaMA asks for."""
    import itertools

    from transformers import masking_utils

    from feallm_llava.integration.marks import is_marked, original_of

    assert is_marked(masking_utils.sdpa_mask, "padded_batch_mask")
    assert masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is masking_utils.sdpa_mask
    original = original_of(masking_utils.sdpa_mask)
    for batch, q, kv, offset, padded, skip in itertools.product([1, 3], [1, 4], [4, 9], [0, 2], [None, False, True],
                                                                 [True, False]):
        mask = None if padded is None else torch.ones(batch, kv + offset, dtype=torch.bool)
        if padded:
            for row in range(batch):
                mask[row, :row + 1] = False  # left padding, another length per row
        kwargs = dict(batch_size=batch, cache_position=torch.arange(kv - q, kv) + offset, kv_length=kv,
                      kv_offset=offset, attention_mask=mask, allow_is_causal_skip=skip)
        want, got = original(**kwargs), masking_utils.sdpa_mask(**kwargs)
        assert (want is None and got is None) or (want.dtype == got.dtype and torch.equal(want, got)), kwargs
    # any other mask function goes to the original, called positionally as transformers does
    window = masking_utils.sliding_window_causal_mask_function(3)
    args = (2, torch.arange(2, 6), 6, 0, window, torch.ones(2, 6, dtype=torch.bool), None, False)
    assert torch.equal(masking_utils.sdpa_mask(*args), original(*args))

    vmapped = []
    real = masking_utils._vmap_for_bhqkv
    monkeypatch.setattr(masking_utils, "_vmap_for_bhqkv", lambda *a, **k: vmapped.append(1) or real(*a, **k))
    batch = items[:4]
    assert len({backend.prompt_length(i) for i in batch}) > 1  # padded
    assert backend.generate(batch) == [backend.generate([i])[0] for i in batch]
    assert vmapped == []


def test_right_padding_would_change_the_answers(backend, items):
    """Why the backend sets tokenizer_padding_side='left': upstream's default ('right')
    leaves short rows ending in padding, and generation continues after it."""
    left = backend.generate(items[:4])
    backend.model.config.tokenizer_padding_side = "right"
    try:
        right = backend.generate(items[:4])
    finally:
        backend.model.config.tokenizer_padding_side = "left"
    assert right != left


def test_answers_hold_no_prompt_text(backend, items):
    answers = backend.generate(items[:4])
    assert not any("ASSISTANT" in a or "curious human" in a for a in answers)


def test_prompt_follows_the_conversation_template(backend):
    prompt = backend.prompt("Which AUs are active?")
    assert prompt.startswith("A chat between a curious human")
    assert prompt.endswith("USER: <image>\nWhich AUs are active? ASSISTANT:")


def test_plain_prompt_is_the_stage1_training_text(checkpoint, one_thread):
    # upstream preprocess_plain trains on "<image>" + caption + "\n": a caption model is
    # asked with the image token alone, and its answer ends at the newline
    plain = LlavaBackend(str(checkpoint), conv_mode="plain", device="cpu", max_new_tokens=4)
    assert plain.prompt("") == "<image>"
    assert plain.prompt("<image>\na drawn") == "<image>a drawn"
    assert plain._stop_text() == "\n"


@pytest.mark.parametrize("name, mode", [
    ("llava-v1.5-7b", "llava_v1"), ("llava-v1.5-7b-feallm-lora", "llava_v1"),
    ("llava-llama-2-13b-chat", "llava_llama_2"), ("llava-v1.6-mistral-7b", "mistral_instruct"),
    ("llava-v1.6-34b", "chatml_direct"), ("tiny-llava-feallm", "llava_v0"),
])
def test_default_conv_mode_is_inferred_from_the_model_name(name, mode):
    assert default_conv_mode(name) == mode


def test_eval_cli_runs_a_llava_checkpoint(checkpoint, one_thread, tmp_path):
    data = tmp_path / "raf"
    (data / "EmoLabel").mkdir(parents=True)
    (data / "EmoLabel" / "list_patition_label.txt").write_text("test_0001.jpg 4\ntest_0002.jpg 6\ntest_0003.jpg 7\n")
    for i in (1, 2, 3):
        path = data / "Image" / "aligned" / f"test_{i:04d}_aligned.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (40 * i, 30, 60)).save(path)
    code = cli(["eval", "--bench", "rafdb", "--data", str(data), "--model-path", str(checkpoint),
                "--conv-mode", "llava_v1", "--out", str(tmp_path / "out"), "--batch-size", "2",
                "--device", "cpu", "--max-new-tokens", "6"])
    assert code == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["test_0001", "test_0002", "test_0003"]
    assert {r["model"] for r in lines} == {"tiny-llava-feallm"}
    assert all(isinstance(r["answer"], str) for r in lines)


def test_batches_are_cut_from_equal_length_prompts_first(backend):
    short, long = QUESTIONS[0], QUESTIONS[2]
    assert backend.prompt_length(_q(short)) != backend.prompt_length(_q(long))
    items = [_q(short, "s1"), _q(long, "l1"), _q(short, "s2"), _q(long, "l2"), _q(short, "s3"), _q(long, "l3")]
    plan = [[i.id for i in batch] for batch in backend._plan(items, 2)]
    assert plan == [["s1", "s2"], ["l1", "l2"], ["s3", "l3"]]  # unpadded first, then the leftovers


def _q(question: str, item_id: str = "q") -> EvalItem:
    return EvalItem(id=item_id, image="unused.png", task="fer", question=question, bench="t", gt_expression="Neutral")
