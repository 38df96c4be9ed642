"""The pinned stack runs upstream LLaVA (stock mlp2x_gelu projector) with the shims."""

from __future__ import annotations

import pytest
import torch

from feallm_llava.tinykit import build_llava_model


def _prompt_ids(tokenizer, question="Please describe the expression in this face."):
    from llava.conversation import conv_templates
    from llava.mm_utils import tokenizer_image_token

    conv = conv_templates["v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt").unsqueeze(0)


def _image(kit, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = kit.spec.image_size
    return torch.randn(1, 3, size, size, generator=g)


def greedy_no_cache(model, input_ids, images, steps):
    """Reference decode: full forward at every step, no KV cache, argmax."""
    from llava.constants import IMAGE_TOKEN_INDEX

    assert (input_ids == IMAGE_TOKEN_INDEX).sum() == 1
    out = []
    ids = input_ids
    for _ in range(steps):
        logits = model(input_ids=ids, images=images, use_cache=False).logits
        nxt = logits[0, -1].argmax().item()
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.fixture(scope="module")
def mlp_model(kit):
    return build_llava_model(kit, "mlp2x_gelu").eval()


def test_stock_projector_is_upstream_mlp(mlp_model):
    proj = mlp_model.get_model().mm_projector
    assert isinstance(proj, torch.nn.Sequential) and len(proj) == 3


def test_generate_equals_manual_greedy(mlp_model, kit, tokenizer):
    ids, image = _prompt_ids(tokenizer), _image(kit)
    with torch.no_grad():
        generated = mlp_model.generate(ids, images=image, do_sample=False, max_new_tokens=8,
                                       min_new_tokens=8, use_cache=True, pad_token_id=0)
        reference = greedy_no_cache(mlp_model, ids, image, 8)
    assert generated[0].tolist()[-8:] == reference


def test_forward_backward_with_labels(kit, tokenizer):
    model = build_llava_model(kit, "mlp2x_gelu")
    ids = _prompt_ids(tokenizer)
    labels = ids.clone()
    labels[labels < 0] = -100
    out = model(input_ids=ids, labels=labels, images=_image(kit))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.get_model().mm_projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
