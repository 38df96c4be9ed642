"""Local Clue Aggregator (feallm_llava/model/lca.py), tiny dimensions."""

from __future__ import annotations

import pytest
import torch

from feallm_llava.model.config import FeallmConfig
from feallm_llava.model.lca import LocalClueAggregator, crop_boxes, crop_regions, region_names

TINY = {"crop_size": 32, "lca_channels": 16, "lca_norm_groups": 4, "lca_heads": 2}
LLM, VISION = 48, 32


def make_lca(seed=0, **overrides) -> LocalClueAggregator:
    torch.manual_seed(seed)
    return LocalClueAggregator(FeallmConfig(**{**TINY, **overrides}), LLM, VISION)


def test_crop_boxes_are_the_16_boxes_of_the_spec_on_a_non_square_image():
    # H=336, W=280: half height 168, 3/4 height 252; half width 140, 3/4 width 210.
    assert crop_boxes(336, 280) == [
        # side, 1/2: top, bottom, left, right (side crops span the full other side)
        (0, 0, 280, 168), (0, 168, 280, 336), (0, 0, 140, 336), (140, 0, 280, 336),
        # side, 3/4
        (0, 0, 280, 252), (0, 84, 280, 336), (0, 0, 210, 336), (70, 0, 280, 336),
        # corner, 1/2: top-left, top-right, bottom-left, bottom-right (both fractions)
        (0, 0, 140, 168), (140, 0, 280, 168), (0, 168, 140, 336), (140, 168, 280, 336),
        # corner, 3/4
        (0, 0, 210, 252), (70, 0, 280, 252), (0, 84, 210, 336), (70, 84, 280, 336),
    ]


def test_region_names_follow_crop_box_order_and_are_unique():
    names = region_names()
    assert len(names) == 16 == len(set(names))
    assert names[0] == "top@side_half" and names[-1] == "bottom_right@corner_3q"


def test_removing_a_crop_type_removes_its_four_regions():
    cfg_types = ("side_half", "side_3q", "corner_3q")  # Fig. 5: corner_half removed
    assert len(crop_boxes(56, 56, cfg_types)) == 12
    lca = make_lca(crop_types=cfg_types)
    out = lca(torch.randn(2, 3, 56, 56))
    assert out.keys.shape == (2, 12, VISION) and out.token.shape == (2, 1, LLM)
    assert lca.to_token.in_features == 12 * 16


def test_lca_outputs_one_llm_token_and_one_vision_token_per_region():
    out = make_lca()(torch.randn(2, 3, 56, 70))
    assert out.token.shape == (2, 1, LLM)
    assert out.keys.shape == (2, 16, VISION)
    assert out.regions.shape == (2, 16, 16)


def test_lca_without_vision_width_builds_no_local_key_head():
    lca = LocalClueAggregator(FeallmConfig(**TINY), LLM, None)
    assert lca.to_keys is None and lca(torch.randn(1, 3, 56, 56)).keys is None


def test_crops_resize_every_box_to_crop_size_for_the_whole_batch():
    pixels = torch.randn(3, 3, 84, 56)
    boxes = crop_boxes(84, 56)
    crops = crop_regions(pixels, boxes, 32)
    assert crops.shape == (3, 16, 3, 32, 32)
    # A constant image gives constant crops: the resize only re-samples the box.
    flat = crop_regions(torch.full((1, 3, 84, 56), 0.25), boxes, 32)
    torch.testing.assert_close(flat, torch.full_like(flat, 0.25))


def test_changing_pixels_in_one_region_changes_only_the_crops_that_hold_them_and_f_local():
    lca = make_lca().eval()
    height = width = 56
    pixels = torch.randn(1, 3, height, width)
    edited = pixels.clone()
    edited[:, :, 50:, 50:] += 3.0  # bottom-right corner only
    boxes = crop_boxes(height, width)
    before, after = crop_regions(pixels, boxes, 32), crop_regions(edited, boxes, 32)
    for r, (x0, y0, x1, y1) in enumerate(boxes):
        holds_edit = x1 > 50 and y1 > 50
        assert torch.equal(before[:, r], after[:, r]) != holds_edit, region_names()[r]
    with torch.no_grad():
        assert not torch.allclose(lca(pixels).token, lca(edited).token)


def test_lca_is_batch_independent_thanks_to_group_norm():
    lca = make_lca().train()  # GroupNorm: same output in train mode, any batch size
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        batched = lca(pixels).token
        single = torch.cat([lca(pixels[i:i + 1]).token for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_lca_runs_in_bf16():
    lca = make_lca().to(torch.bfloat16)
    out = lca(torch.randn(1, 3, 56, 56, dtype=torch.bfloat16))
    assert out.token.dtype == torch.bfloat16 and torch.isfinite(out.token.float()).all()


def test_lca_rejects_pixels_without_three_channels():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        make_lca()(torch.randn(1, 1, 56, 56))


def test_pooling_to_a_grid_keeps_the_layout_inside_each_crop():
    # crop 32 -> 16 -> 8 -> 4 -> 2 after 4 convs: a 2 x 2 pool is no pooling at all
    lca = make_lca(lca_pool=2)
    out = lca(torch.randn(2, 3, 56, 56))
    assert out.regions.shape == (2, 16, 16 * 2 * 2)
    assert lca.to_token.in_features == 16 * 64 and lca.to_keys.in_features == 64
    assert out.token.shape == (2, 1, LLM) and out.keys.shape == (2, 16, VISION)
    # a global pool is blind to mirroring each crop's feature map left-right; a 2 x 2
    # grid is not: the same features in another place give another region vector
    feats = torch.randn(3, 16, 2, 2)
    pooled = torch.nn.functional.adaptive_avg_pool2d
    assert torch.allclose(pooled(feats, 1), pooled(feats.flip(-1), 1), atol=1e-6)
    assert not torch.allclose(pooled(feats, 2), pooled(feats.flip(-1), 2), atol=1e-3)


@pytest.mark.parametrize("pool, crop, message", [(0, 32, "lca_pool must be >= 1"),
                                                 (3, 32, "exceeds the 2 x 2 feature map")])
def test_lca_pool_is_validated_against_the_feature_map(pool, crop, message):
    with pytest.raises(ValueError, match=message):
        FeallmConfig(**{**TINY, "crop_size": crop, "lca_pool": pool})


def test_conv_stem_in_cpu_blocks_equals_one_pass():
    from feallm_llava.model.lca import ConvStem

    torch.manual_seed(0)
    stem = ConvStem(16, 3, 4)
    crops = torch.randn(7, 3, 32, 32)
    whole = stem(crops)  # 7 crops of 16 x 16 x 16 fp32 = 16 KB each: one block
    stem.CPU_BLOCK_BYTES = 3 * 16 * 16 * 16 * 4  # blocks of 3, 3, 1
    torch.testing.assert_close(stem(crops), whole, atol=1e-5, rtol=1e-5)  # conv kernels differ by batch size


@pytest.mark.parametrize("residual", [False, True])
def test_attention_over_few_keys_equals_the_plain_route(residual):
    """576 patches over 16 local clues: the folded route (heads x keys < attn_dim) is the
    same function as sdpa between the projections."""
    from feallm_llava.model.lca import MultiHeadAttention

    torch.manual_seed(0)
    attn = MultiHeadAttention(24, heads=2, attn_dim=16).double()  # 2 heads x 3 keys < 16
    x, context = torch.randn(2, 10, 24, dtype=torch.float64), torch.randn(2, 3, 24, dtype=torch.float64)
    k = attn.to_k(context).view(2, 3, 2, -1).transpose(1, 2)
    v = attn.to_v(context).view(2, 3, 2, -1).transpose(1, 2)
    q = attn.to_q(x).view(2, 10, 2, -1).transpose(1, 2)
    plain = attn.to_out(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 10, -1))
    scale = torch.tensor([0.7], dtype=torch.float64)
    if residual:
        base = torch.randn(2, 10, 24, dtype=torch.float64)
        torch.testing.assert_close(attn(x, context, residual=base, scale=scale), base + scale * plain)
    else:
        torch.testing.assert_close(attn(x, context), plain)


def test_attention_over_few_keys_has_the_plain_routes_gradients():
    from feallm_llava.model.lca import MultiHeadAttention

    torch.manual_seed(0)
    attn = MultiHeadAttention(24, heads=2, attn_dim=16).double()
    x = torch.randn(2, 10, 24, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 3, 24, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.7], dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 10, 24, dtype=torch.float64)
    params = [x, context, scale, *attn.parameters()]
    few = torch.autograd.grad(attn(x, context, residual=base, scale=scale).square().sum(), params)

    def plain():
        k = attn.to_k(context).view(2, 3, 2, -1).transpose(1, 2)
        v = attn.to_v(context).view(2, 3, 2, -1).transpose(1, 2)
        q = attn.to_q(x).view(2, 10, 2, -1).transpose(1, 2)
        heads = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 10, -1)
        return base + scale * attn.to_out(heads)

    for got, want in zip(few, torch.autograd.grad(plain().square().sum(), params)):
        torch.testing.assert_close(got, want)
