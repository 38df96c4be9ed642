"""Quantized loading keeps the FEALLM projector intact; bad training samples are named."""

from __future__ import annotations

import json

import pytest
import torch

from feallm_llava.tinykit import build_llava

SMALL = {"mm_feallm_crop_size": 32, "mm_feallm_mpp_dim": 0}


@pytest.mark.parametrize("flag", ["load_8bit", "load_4bit"])
def test_quantized_loading_skips_projector_and_tower(kit, tmp_path_factory, flag):
    pytest.importorskip("bitsandbytes")
    from llava.model.builder import load_pretrained_model

    path = build_llava(tmp_path_factory.mktemp("q") / "llava-q", kit, **SMALL)
    try:
        tok, model, _, _ = load_pretrained_model(str(path), None, "llava-q", device="cpu", device_map="cpu", **{flag: True})
    except (RuntimeError, NotImplementedError) as err:  # a bitsandbytes build without CPU kernels
        pytest.skip(f"bitsandbytes cannot run {flag} on this CPU: {err}")
    quantized = [n for n, m in model.named_modules() if type(m).__name__ in {"Linear8bitLt", "Linear4bit"}]
    assert quantized and all(n.startswith("model.layers.") for n in quantized)
    assert type(model.get_model().mm_projector.mlp[0]) is torch.nn.Linear
    ids = torch.tensor([[1, 396, 960, -200, 937]])
    out = model.generate(ids, images=torch.randn(1, 3, 56, 56, dtype=torch.float16), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 3


def test_missing_model_path_is_named_not_fetched(tmp_path):
    from llava.model.builder import load_pretrained_model

    missing = tmp_path / "llava-typo"
    with pytest.raises(FileNotFoundError, match="llava-typo"):
        load_pretrained_model(str(missing), None, "llava-typo", device="cpu")


def _dataset(kit, tokenizer, tmp_path, samples, skip=False):
    from llava.train.train import DataArguments, LazySupervisedDataset
    from transformers import CLIPImageProcessor

    tokenizer.pad_token = tokenizer.unk_token  # as upstream's train() sets it for v1
    (tmp_path / "data.json").write_text(json.dumps(samples))
    args = DataArguments(data_path=str(tmp_path / "data.json"), image_folder=str(tmp_path),
                         image_aspect_ratio="pad", skip_bad_samples=skip)
    args.image_processor = CLIPImageProcessor.from_pretrained(str(kit.clip))
    args.is_multimodal = True
    args.mm_use_im_start_end = False
    return LazySupervisedDataset(data_path=args.data_path, tokenizer=tokenizer, data_args=args)


def _sample(i, image="ok.jpg", text="<image>\nWhat is the expression?"):
    return {"id": f"s{i}", "image": image, "conversations": [
        {"from": "human", "value": text}, {"from": "gpt", "value": "Neutral."}]}


@pytest.fixture
def data_dir(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), (120, 20, 20)).save(tmp_path / "ok.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8not a jpeg")
    return tmp_path


def test_missing_image_is_named(kit, tokenizer, data_dir):
    with pytest.raises(ValueError, match=r"sample #1 \(id 's1'\): image file not found"):
        _dataset(kit, tokenizer, data_dir, [_sample(0), _sample(1, image="gone.jpg")])


def test_conversation_without_image_token_is_named(kit, tokenizer, data_dir):
    with pytest.raises(ValueError, match=r"id 's1'.*'<image>'"):
        _dataset(kit, tokenizer, data_dir, [_sample(0), _sample(1, text="no token here")])


def test_unreadable_image_is_named(kit, tokenizer, data_dir):
    from llava.conversation import conv_templates
    import llava.conversation as conversation_lib

    conversation_lib.default_conversation = conv_templates["v1"]
    ds = _dataset(kit, tokenizer, data_dir, [_sample(0), _sample(1, image="broken.jpg")])
    assert ds[0]["image"].shape[0] == 3
    with pytest.raises(RuntimeError, match=r"sample #1 \(id 's1', image 'broken.jpg'\)"):
        ds[1]


def test_skip_bad_samples_counts_and_keeps_the_rest(kit, tokenizer, data_dir):
    from llava.conversation import conv_templates
    import llava.conversation as conversation_lib

    conversation_lib.default_conversation = conv_templates["v1"]
    samples = [_sample(0), _sample(1, image="gone.jpg"), _sample(2, image="broken.jpg"), _sample(3)]
    ds = _dataset(kit, tokenizer, data_dir, samples, skip=True)
    assert len(ds) == 3 and len(ds.skipped) == 1
    items = [ds[i] for i in range(len(ds))]
    assert len(items) == 3 and len(ds.skipped) == 2  # the unreadable one, replaced by the next
