"""ms_deform_attn and DeformableAttention (feallm_llava/model/deformable.py)."""

from __future__ import annotations

import math

import pytest
import torch

from feallm_llava.model import deformable
from feallm_llava.model.deformable import (
    DeformableAttention,
    grid_reference_points,
    initial_offsets,
    ms_deform_attn,
    register_fused_kernel,
)

SHAPES = [(3, 4), (2, 2), (5, 3)]  # (H, W) per level: non-square, different sizes


def naive_ms_deform_attn(value, spatial_shapes, locations, weights):
    """Independent reference: explicit loops, bilinear with zeros outside the map,
    pixel centres at ((i + 0.5) / W, (j + 0.5) / H) (align_corners=False)."""
    n, _, heads, dim = value.shape
    _, lq, _, levels, points, _ = locations.shape
    out = torch.zeros(n, lq, heads, dim, dtype=torch.float64)
    starts = [0]
    for h, w in spatial_shapes.tolist():
        starts.append(starts[-1] + h * w)
    for b in range(n):
        for q in range(lq):
            for m in range(heads):
                for lvl in range(levels):
                    h, w = spatial_shapes[lvl].tolist()
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0].item() * w - 0.5
                        y = locations[b, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(dim, dtype=torch.float64)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    idx = starts[lvl] + yy * w + xx
                                    acc += wy * wx * value[b, idx, m].double()
                        out[b, q, m] += weights[b, q, m, lvl, p].item() * acc
    return out.view(n, lq, heads * dim)


def random_inputs(n=2, lq=5, heads=2, dim=3, points=3, shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial = torch.tensor(shapes, dtype=torch.long)
    s = int((spatial[:, 0] * spatial[:, 1]).sum())
    value = torch.randn(n, s, heads, dim, generator=g, dtype=dtype)
    # Locations in [-0.3, 1.3]: a good share falls outside the map (partly or wholly).
    locations = (torch.rand(n, lq, heads, len(shapes), points, 2, generator=g) * 1.6 - 0.3).to(dtype)
    weights = torch.rand(n, lq, heads, len(shapes), points, generator=g).to(dtype)
    return value, spatial, locations, weights


@pytest.mark.parametrize("autograd", [False, True], ids=["embedding_bag", "grid_sample"])
def test_ms_deform_attn_matches_naive_bilinear_loops_in_fp32(autograd):
    """Both routes: embedding_bag at inference, grid_sample when a gradient is wanted."""
    value, spatial, locations, weights = random_inputs()
    outside = ((locations < 0) | (locations > 1)).any(-1)
    assert outside.any() and (~outside).any()  # both kinds of points are exercised
    got = ms_deform_attn(value.requires_grad_(autograd), spatial, locations, weights).detach()
    want = naive_ms_deform_attn(value, spatial, locations, weights)
    assert got.shape == (2, 5, 2 * 3) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,points", [(1, 1), (4, 2)])
def test_ms_deform_attn_matches_naive_for_other_head_and_point_counts(heads, points):
    value, spatial, locations, weights = random_inputs(heads=heads, points=points, seed=heads)
    got = ms_deform_attn(value, spatial, locations, weights)
    torch.testing.assert_close(
        got.double(), naive_ms_deform_attn(value, spatial, locations, weights), atol=1e-5, rtol=1e-5
    )


def test_points_far_outside_the_map_read_zero():
    value, spatial, locations, weights = random_inputs()
    locations = torch.full_like(locations, 2.0)
    assert ms_deform_attn(value, spatial, locations, weights).abs().max() == 0


def test_ms_deform_attn_gradcheck_float64():
    value, spatial, locations, weights = random_inputs(n=1, lq=2, heads=2, dim=2, points=2,
                                                       shapes=[(2, 3), (3, 2)], dtype=torch.float64)
    inputs = (value.requires_grad_(), spatial, locations.requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(ms_deform_attn, inputs, eps=1e-6, atol=1e-5)


def test_ms_deform_attn_runs_in_bf16_close_to_fp32():
    value, spatial, locations, weights = random_inputs()
    ref = ms_deform_attn(value, spatial, locations, weights)
    value16 = value.bfloat16().requires_grad_()
    got = ms_deform_attn(value16, spatial, locations.bfloat16(), weights.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=5e-2, rtol=5e-2)
    got.float().sum().backward()
    assert value16.grad is not None and value16.grad.dtype == torch.bfloat16


def test_ms_deform_attn_rejects_value_that_does_not_fit_spatial_shapes():
    value, spatial, locations, weights = random_inputs()
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value[:, :-1], spatial, locations, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, spatial, locations, weights[..., :-1])


def test_registered_fused_kernel_is_dispatched_for_its_device_and_removable():
    value, spatial, locations, weights = random_inputs()
    calls = []

    def fake_kernel(*args):
        calls.append(args)
        return deformable.ms_deform_attn_pytorch(*args) * 2

    register_fused_kernel("cpu", fake_kernel)
    try:
        doubled = ms_deform_attn(value, spatial, locations, weights)
    finally:
        register_fused_kernel("cpu", None)
    plain = ms_deform_attn(value, spatial, locations, weights)
    assert len(calls) == 1
    torch.testing.assert_close(doubled, plain * 2)


def test_reference_points_are_cell_centres_row_major():
    ref = grid_reference_points(2, 3)
    assert ref.shape == (6, 2)
    torch.testing.assert_close(ref[0], torch.tensor([1 / 6, 1 / 4]))  # row 0, col 0
    torch.testing.assert_close(ref[5], torch.tensor([5 / 6, 3 / 4]))  # row 1, col 2


def test_initial_offsets_fan_heads_over_the_eight_neighbours_at_growing_rings():
    off = initial_offsets(heads=8, levels=2, points=3)  # (8, 2, 3, 2)
    first = {tuple(v.tolist()) for v in off[:, 0, 0]}
    assert first == {(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)}
    torch.testing.assert_close(off[:, :, 2], off[:, :, 0] * 3)
    torch.testing.assert_close(off[:, 0], off[:, 1])  # same start pattern on every level


def test_deformable_attention_with_zero_offsets_reads_its_own_cell():
    """A query's reference point is exactly its cell centre: with one head, one point,
    zero offsets and identity projections, the output is the value at that cell."""
    dim, grid = 4, (3, 5)
    attn = DeformableAttention(dim, dim, dim, heads=1, levels=1, points=1)
    with torch.no_grad():
        attn.to_offsets.weight.zero_()
        attn.to_offsets.bias.zero_()
        for lin in (attn.value_in, attn.to_out):
            lin.weight.copy_(torch.eye(dim))
            lin.bias.zero_()
    value = torch.randn(2, 15, dim)
    query = torch.randn(2, 15, dim)
    out = attn(query, grid, value, [grid])
    torch.testing.assert_close(out, value, atol=1e-6, rtol=1e-6)


def test_deformable_attention_zero_out_adds_nothing_and_keeps_query_shape():
    attn = DeformableAttention(8, 6, 4, heads=2, levels=2, points=2, zero_out=True)
    query, value = torch.randn(2, 6, 8), torch.randn(2, 6 + 4, 6)
    out = attn(query, (2, 3), value, [(2, 3), (2, 2)])
    assert out.shape == (2, 6, 8) and out.abs().max() == 0


def test_deformable_attention_rejects_queries_that_do_not_fill_the_grid():
    attn = DeformableAttention(8, 8, 8, heads=2, levels=1, points=1)
    with pytest.raises(ValueError, match="query grid"):
        attn(torch.randn(1, 5, 8), (2, 3), torch.randn(1, 6, 8), [(2, 3)])


def test_deformable_attention_runs_in_bf16_and_keeps_its_dtype():
    torch.manual_seed(0)
    attn = DeformableAttention(8, 8, 8, heads=2, levels=2, points=2)
    query, value = torch.randn(1, 6, 8), torch.randn(1, 12, 8)
    ref = attn(query, (2, 3), value, [(2, 3), (2, 3)])
    out = attn.to(torch.bfloat16)(query.bfloat16(), (2, 3), value.bfloat16(), [(2, 3), (2, 3)])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("autograd", [False, True], ids=["embedding_bag", "grid_sample"])
@pytest.mark.parametrize("shapes", [[(4, 4), (4, 4)], [(3, 5), (3, 5), (3, 5)]])
def test_ms_deform_attn_matches_naive_when_levels_share_a_shape(shapes, autograd):
    """One shape for every level: sizes are plain numbers in the index arithmetic."""
    value, spatial, locations, weights = random_inputs(n=3, shapes=shapes, seed=5)
    got = ms_deform_attn(value.requires_grad_(autograd), spatial, locations, weights).detach()
    torch.testing.assert_close(got.double(), naive_ms_deform_attn(value, spatial, locations, weights),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_rows", [1, 200, 10 ** 9])
def test_ms_deform_attn_on_cpu_in_chunks_of_images_equals_one_call(chunk_rows, monkeypatch):
    value, spatial, locations, weights = random_inputs(n=5, seed=7)
    whole = deformable._gather(value, tuple(map(tuple, spatial.tolist())), locations, weights, torch.float32)
    monkeypatch.setattr(deformable, "CPU_CHUNK_ROWS", chunk_rows)  # 1 image, 2 images, all
    torch.testing.assert_close(ms_deform_attn(value, spatial, locations, weights), whole)


def test_ms_deform_attn_made_under_inference_mode_then_differentiated():
    """Constants are cached across calls: one made in inference mode must not break autograd."""
    value, spatial, locations, weights = random_inputs(seed=6)
    with torch.inference_mode():
        ms_deform_attn(value, spatial, locations, weights)
    value.requires_grad_()
    ms_deform_attn(value, spatial, locations.requires_grad_(), weights).sum().backward()
    assert value.grad.abs().sum() > 0 and locations.grad.abs().sum() > 0


def test_deformable_attention_takes_levels_as_a_list_or_concatenated():
    torch.manual_seed(0)
    attn = DeformableAttention(8, 6, 8, heads=2, levels=2, points=2)
    torch.nn.init.normal_(attn.to_out.weight)
    query = torch.randn(2, 6, 8)
    levels = [torch.randn(2, 6, 6), torch.randn(2, 4, 6)]
    shapes = [(2, 3), (2, 2)]
    torch.testing.assert_close(attn(query, (2, 3), levels, shapes),
                               attn(query, (2, 3), torch.cat(levels, 1), shapes), atol=1e-6, rtol=1e-6)


def test_deformable_attention_adds_into_a_scaled_residual():
    torch.manual_seed(0)
    attn = DeformableAttention(8, 8, 8, heads=2, levels=1, points=2)
    torch.nn.init.normal_(attn.to_out.weight)
    query, value, residual = torch.randn(2, 6, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    scale = torch.tensor([0.3])
    plain = attn(query, (2, 3), value, [(2, 3)])
    fused = attn(query, (2, 3), value, [(2, 3)], residual=residual, scale=scale)
    torch.testing.assert_close(fused, residual + scale * plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(attn(query, (2, 3), value, [(2, 3)], residual=residual), residual + plain)
