"""Multi-scale deformable attention (Zhu et al. 2020, "Deformable DETR"), pure PyTorch.

The paper's MPP implements its attentions with deformable attention (FEALLM section
5.1). Each query looks at a few sampled points per head and level, around a reference
point, instead of at every key:

    out[q] = sum_{level, point} A[q, h, level, point] * V_level(p_q + offset[q, h, level, point])

Two pieces:

- `ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)`: the
  sampling core with Deformable-DETR's tensor layout. The pure-PyTorch implementation
  (`ms_deform_attn_pytorch`: every level and point in one `F.embedding_bag` at
  inference, a `grid_sample` per level under autograd) runs everywhere (CPU/GPU,
  fp32/bf16/fp16, differentiable). `register_fused_kernel("cuda", fn)` puts a fused kernel with the same
  signature behind the same call for one device type: that is the single dispatch point.
- `DeformableAttention`: the module around it (value / offset / weight / output
  projections), for queries that sit on a regular grid (ViT patch tokens): reference
  points are the cell centres of that grid. Its value levels may come as one
  concatenated tensor or as a list (each projected on its own: no concatenation of
  the wide inputs).

Coordinates follow `align_corners=False`: a map of width W has pixel centres at
x = (i + 0.5) / W, i = 0..W-1; locations are (x, y) in [0, 1]; points outside the map
read zeros (bilinear with zero padding).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feallm_llava.model.fused import add_projection, linear

FusedKernel = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# device type ("cuda", ...) -> fused kernel with the signature of `ms_deform_attn`.
_FUSED_KERNELS: dict[str, FusedKernel] = {}


def register_fused_kernel(device_type: str, kernel: FusedKernel | None) -> None:
    """Use `kernel` for every `ms_deform_attn` call on `device_type`; None removes it.

    The kernel receives the arguments of `ms_deform_attn` unchanged (shapes already
    checked) and must return the same `(N, Lq, heads * head_dim)` tensor and gradients
    as `ms_deform_attn_pytorch`, which stays the reference for its tests.
    """
    if kernel is None:
        _FUSED_KERNELS.pop(device_type, None)
    else:
        _FUSED_KERNELS[device_type] = kernel


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Deformable attention core, Deformable-DETR layout.

    value               (N, S, heads, head_dim), S = sum over levels of H_l * W_l,
                        levels concatenated in order, each flattened row-major
    spatial_shapes      (L, 2) long, (H_l, W_l) per level
    sampling_locations  (N, Lq, heads, L, points, 2), (x, y) normalised to [0, 1]; may be
                        fp32 while value is half precision (DeformableAttention does that)
    attention_weights   (N, Lq, heads, L, points)
    returns             (N, Lq, heads * head_dim)
    """
    _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    kernel = _FUSED_KERNELS.get(value.device.type)
    if kernel is not None:
        return kernel(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_pytorch(value, spatial_shapes, sampling_locations, attention_weights)


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Reference implementation of `ms_deform_attn`, by one of two routes to one function.

    Bilinear sampling with zero padding (`grid_sample`'s, align_corners=False) weighted by
    the attention (tests/test_deformable.py checks both routes against explicit loops):

    - without autograd, `_gather`: the 4 corners of a sampling point read one head_dim
      row of `value` each, with weight attention x bilinear weight (0 for a corner off
      its map), all levels and points of an (image, corner, query, head) in one bag of
      one `F.embedding_bag`, straight from the (N, S, heads, head_dim) layout. The index
      arithmetic runs on (N, corner, Lq, heads, L, P) tensors, contiguous and with scalar
      sizes when all levels have one shape; on a CPU a few images a call, so that they
      stay in cache. One thread, 4 levels of 24 x 24, 8 heads, 4 points: 1.2-1.4 ms an
      image where the other route takes 11-20.
    - with autograd, `_sample_levels`: a `F.grid_sample` per level, then the weighted sum:
      embedding_bag's backward sorts the gathered rows (5 ms of a training step at the
      demo's scale, against 0.3 ms for grid_sample's).

    Half-precision inputs are sampled and weighted in fp32 (sub-pixel locations would
    lose ~0.1 px in bf16 on a 24x24 map) and the result is cast back to `value.dtype`.
    """
    n, s, heads, head_dim = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    compute = torch.promote_types(value.dtype, torch.float32)
    shapes = tuple((int(h), int(w)) for h, w in spatial_shapes.tolist())
    if torch.is_grad_enabled() and (value.requires_grad or sampling_locations.requires_grad
                                    or attention_weights.requires_grad):
        return _sample_levels(value, shapes, sampling_locations, attention_weights, compute)
    per_image = 4 * lq * heads * levels * points  # gathered rows
    chunk = n if value.device.type != "cpu" else max(1, CPU_CHUNK_ROWS // per_image)
    if chunk >= n:
        return _gather(value, shapes, sampling_locations, attention_weights, compute)
    # CPU: a few images at a time, so that the index arithmetic and their value stay in
    # cache (8 images of 576 queries at once: 3.6x the time of 8 single ones).
    return torch.cat([
        _gather(value[b:b + chunk], shapes, sampling_locations[b:b + chunk], attention_weights[b:b + chunk],
                compute)
        for b in range(0, n, chunk)
    ])


# Rows gathered per call on a CPU (~2 MB of index and weight): an image of LLaVA-1.5's
# 24 x 24 grid (295k rows) goes alone; small grids go together (a call per image costs more).
CPU_CHUNK_ROWS = 2 ** 18


def _sample_levels(value: Tensor, shapes: tuple[tuple[int, int], ...], sampling_locations: Tensor,
                   attention_weights: Tensor, compute: torch.dtype) -> Tensor:
    """`ms_deform_attn_pytorch` with a `F.grid_sample` per level -> (N, Lq, M*D)."""
    n, _, heads, head_dim = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    out_dtype = value.dtype
    value = value.to(compute)
    # [0, 1] -> grid_sample's [-1, 1]; with align_corners=False, -1 and 1 are the outer
    # edges of the border pixels, so pixel centre i sits at (i + 0.5) / W as documented.
    grids = sampling_locations.to(compute) * 2 - 1  # (N, Lq, M, L, P, 2)
    sampled = []
    start = 0
    for level, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w]  # (N, H*W, M, D)
        start += h * w
        v = v.permute(0, 2, 3, 1).reshape(n * heads, head_dim, h, w)  # (N*M, D, H, W)
        g = grids[:, :, :, level].transpose(1, 2).reshape(n * heads, lq, points, 2)  # (N*M, Lq, P, 2)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (N*M, D, Lq, P)
    stacked = torch.cat(sampled, dim=-1)  # (N*M, D, Lq, L*P), level-major like the weights
    weights = attention_weights.to(compute).transpose(1, 2).reshape(n * heads, 1, lq, levels * points)
    out = (stacked * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(n, heads * head_dim, lq).transpose(1, 2).to(out_dtype)  # (N, Lq, M*D)


def _gather(value: Tensor, shapes: tuple[tuple[int, int], ...], sampling_locations: Tensor,
            attention_weights: Tensor, compute: torch.dtype) -> Tensor:
    """`ms_deform_attn_pytorch` on one block, in the `compute` dtype -> (N, Lq, M*D)."""
    n, s, heads, head_dim = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    if n * s * heads >= 2 ** 24:  # row numbers are computed in floating point: keep them exact
        compute = torch.float64
    width, height, base = _gather_constants(shapes, n, lq, heads, points, value.device, compute)
    x, y = sampling_locations.to(compute).unbind(-1)  # (N, Lq, M, L, P) each, in [0, 1]
    col, col_weight = _corners(x, width)  # (N, 2, Lq, M, L, P): left / right column, weight
    row, row_weight = _corners(y, height)  # top / bottom row
    # (N, 2 rows, 2 columns, Lq, M, L, P): value row of each corner, and its weight
    index = row[:, :, None] * (width * heads) + (col * heads + base[:, None])[:, None]
    weight = row_weight[:, :, None] * (col_weight * attention_weights.to(compute)[:, None])[:, None]
    bags = n * 4 * lq * heads
    out = F.embedding_bag(index.to(torch.int32 if n * s * heads < 2 ** 31 else torch.int64).view(bags, -1),
                          value.to(compute).reshape(n * s * heads, head_dim),
                          per_sample_weights=weight.reshape(bags, -1), mode="sum")  # (N*4*Lq*M, D)
    out = out.view(n, 4, lq, heads * head_dim).sum(1)  # the 4 corners
    return out.to(value.dtype)  # (N, Lq, M*D)


def _corners(coord: Tensor, size: Tensor | float) -> tuple[Tensor, Tensor]:
    """Bilinear corners along one axis of maps `size` pixels long (a number, or (L, 1) per
    level), coord (N, ..) in [0, 1] -> pixel index (N, 2, ..) of the lower and upper
    neighbour, clamped onto the map, and weight (N, 2, ..), 0 where it is off the map."""
    pixel = coord * size - 0.5  # pixel centres at (i + 0.5) / size
    low = pixel.detach().floor()
    frac = pixel - low
    corner = torch.stack((low, low + 1), dim=1)
    index = corner.clamp(min=0).minimum(size - 1) if isinstance(size, Tensor) else corner.clamp(0, size - 1)
    return index, torch.stack((1 - frac, frac), dim=1) * (index == corner)


@functools.lru_cache(maxsize=64)
def _gather_constants(shapes: tuple[tuple[int, int], ...], n: int, lq: int, heads: int, points: int,
                      device: torch.device, dtype: torch.dtype) -> tuple[Tensor | float, Tensor | float, Tensor]:
    """Constants of the gather, made once per shapes / sizes / device / dtype.

    width, height: the levels' W and H, numbers when all levels share one shape (the
    fast, scalar case), else (L, 1) tensors; base (N, Lq, M, L, P): the row of pixel
    (0, 0) of level l, head m, image b in `value.reshape(N * S * heads, head_dim)`,
    expanded to the index arithmetic's full shape so that adding it is a contiguous
    pass. Made outside inference mode (a cached tensor may meet autograd later) and on
    the data's device (no host copy per call: the forward can be captured in a CUDA graph).
    """
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    with torch.inference_mode(False), torch.no_grad():
        base = ((torch.arange(n, dtype=dtype)[:, None, None] * starts[-1]
                 + torch.tensor(starts[:-1], dtype=dtype)[None, None, :]) * heads
                + torch.arange(heads, dtype=dtype)[None, :, None])  # (N, M, L)
        base = base[:, None, :, :, None].expand(n, lq, heads, len(shapes), points).contiguous().to(device)
        if len(set(shapes)) == 1:
            return float(shapes[0][1]), float(shapes[0][0]), base
        width = torch.tensor([[w] for _, w in shapes], dtype=dtype).to(device)
        height = torch.tensor([[h] for h, _ in shapes], dtype=dtype).to(device)
        return width, height, base


def _check_shapes(value: Tensor, shapes: Tensor, locations: Tensor, weights: Tensor) -> None:
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, heads, head_dim), got {tuple(value.shape)}")
    n, s, heads, _ = value.shape
    if shapes.dim() != 2 or shapes.shape[1] != 2 or shapes.dtype != torch.long:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must be a (L, 2) long tensor of (H, W), got "
            f"{tuple(shapes.shape)} {shapes.dtype}"
        )
    levels = shapes.shape[0]
    if locations.dim() != 6 or locations.shape[0] != n or locations.shape[2] != heads \
            or locations.shape[3] != levels or locations.shape[5] != 2:
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be (N={n}, Lq, heads={heads}, L={levels}, "
            f"points, 2), got {tuple(locations.shape)}"
        )
    if tuple(weights.shape) != tuple(locations.shape[:5]):
        raise ValueError(
            f"ms_deform_attn: attention_weights must be {tuple(locations.shape[:5])} "
            f"(sampling_locations without the last axis), got {tuple(weights.shape)}"
        )
    total = int((shapes[:, 0] * shapes[:, 1]).sum())
    if total != s:
        raise ValueError(
            f"ms_deform_attn: value has S={s} positions but spatial_shapes "
            f"{shapes.tolist()} sum to {total}"
        )


def grid_reference_points(height: int, width: int, device=None, dtype=None) -> Tensor:
    """Cell centres of a height x width grid, row-major like ViT patches: (H*W, 2) as (x, y)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    y, x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
    return torch.stack([x, y], dim=-1).reshape(height * width, 2).to(dtype or torch.float32)


def initial_offsets(heads: int, levels: int, points: int) -> Tensor:
    """Initial sampling offsets, in cells of each level: (heads, levels, points, 2) as (x, y).

    Head h looks along direction angle 2*pi*h/heads, scaled so that the direction lands
    on the square ring of the 8-neighbourhood (8 heads = the 8 neighbours); point k sits
    at k + 1 rings out. So at start the heads fan out around the reference cell at
    growing distances, and every level starts with the same pattern.
    """
    angles = torch.arange(heads, dtype=torch.float64) * (2 * math.pi / heads)
    dirs = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (M, 2)
    dirs = dirs / dirs.abs().max(dim=-1, keepdim=True).values  # onto the unit square ring
    dirs = torch.where(dirs.abs() < 1e-9, torch.zeros_like(dirs), dirs)
    rings = torch.arange(1, points + 1, dtype=torch.float64)  # (P,)
    offsets = dirs[:, None, None, :] * rings[None, None, :, None]  # (M, 1, P, 2)
    return offsets.expand(heads, levels, points, 2).to(torch.float32).contiguous()


class DeformableAttention(nn.Module):
    """Deformable attention from grid queries to one or more value maps.

    Queries are tokens of a `query_grid` (H, W) map (row-major); each query's reference
    point is its cell centre, shared by all levels (coordinates are normalised). Offsets
    are predicted from the query in cells of each level; weights are a softmax over
    levels x points per head (Deformable-DETR's choice).

    Projections are named `value_in`, `to_offsets`, `to_weights`, `to_out` (never a LLaMA
    leaf name such as `v_proj`/`o_proj`: PEFT would wrap them with LoRA).
    `zero_out=True` starts `to_out` at zero, so the block initially adds nothing.
    """

    def __init__(
        self,
        query_dim: int,
        value_dim: int,
        attn_dim: int,
        heads: int,
        levels: int,
        points: int,
        zero_out: bool = False,
    ) -> None:
        super().__init__()
        if attn_dim % heads:
            raise ValueError(f"DeformableAttention: attn_dim={attn_dim} not divisible by heads={heads}")
        self.heads, self.levels, self.points = heads, levels, points
        self.head_dim = attn_dim // heads
        self.zero_out = zero_out
        self.to_offsets = nn.Linear(query_dim, heads * levels * points * 2)
        self.to_weights = nn.Linear(query_dim, heads * levels * points)
        self.value_in = nn.Linear(value_dim, attn_dim)
        self.to_out = nn.Linear(attn_dim, query_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start as the fan of `initial_offsets` (the pattern is in the bias) and
        # attention weights start uniform (zero bias). The query-dependent weights start
        # tiny but not zero (std 0.01 / sqrt(fan_in): ~0.01 cell, ~0.01 logit for unit-
        # variance queries): with exact zeros, the query's own LayerNorm would get no
        # gradient until two optimizer steps after the output projection moved.
        std = 0.01 / math.sqrt(self.to_offsets.in_features)
        nn.init.normal_(self.to_offsets.weight, std=std)
        with torch.no_grad():
            self.to_offsets.bias.copy_(initial_offsets(self.heads, self.levels, self.points).flatten())
        nn.init.normal_(self.to_weights.weight, std=std)
        nn.init.zeros_(self.to_weights.bias)
        nn.init.xavier_uniform_(self.value_in.weight)
        nn.init.zeros_(self.value_in.bias)
        if self.zero_out:
            nn.init.zeros_(self.to_out.weight)
        else:
            nn.init.xavier_uniform_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(
        self,
        query: Tensor,
        query_grid: tuple[int, int],
        value: Tensor | Sequence[Tensor],
        value_shapes: Sequence[tuple[int, int]],
        *,
        residual: Tensor | None = None,
        scale: Tensor | None = None,
    ) -> Tensor:
        """query (B, H*W, Cq) on `query_grid`; value (B, S, Cv), the levels of
        `value_shapes` [(H_l, W_l), ...] flattened and concatenated, or the list of those
        levels, each (B, H_l*W_l, Cv) -> (B, H*W, Cq); with `residual` (B, H*W, Cq):
        residual + scale * that (scale None = 1), the output projection accumulating into
        the residual (model/fused.py)."""
        b, lq, _ = query.shape
        gh, gw = query_grid
        if lq != gh * gw:
            raise ValueError(f"DeformableAttention: {lq} queries do not fill the {gh}x{gw} query grid")
        if len(value_shapes) != self.levels:
            raise ValueError(
                f"DeformableAttention: built for {self.levels} value levels, got {len(value_shapes)}"
            )
        m, lv, p = self.heads, self.levels, self.points
        if isinstance(value, Tensor):
            v = linear(value, self.value_in)  # (B, S, attn_dim)
        else:  # project each level, then concatenate the narrow projections
            v = torch.cat([linear(level, self.value_in) for level in value], dim=1)  # (B, S, attn_dim)
        v = v.view(b, v.shape[1], m, self.head_dim)  # (B, S, M, Dh)

        # Locations in fp32 whatever the module dtype: in bf16 a [0, 1] coordinate keeps
        # only ~3 significant digits, i.e. ~0.1 cell on a 24x24 map.
        shapes = tuple((int(h), int(w)) for h, w in value_shapes)
        ref, cells = _grid_constants((gh, gw), shapes, query.device)  # (Lq, 1, 1, 1, 2); (L, 1, 2) or a number
        offsets = linear(query, self.to_offsets).view(b, lq, m, lv, p, 2).float()
        locations = offsets / cells + ref  # offsets are in cells of each level
        weights = linear(query, self.to_weights).view(b, lq, m, lv * p).softmax(-1).view(b, lq, m, lv, p)

        # The pure-PyTorch path reads the shapes on the host: keep them there unless a
        # fused kernel for this device wants them next to the data (avoids a GPU sync).
        shapes_device = query.device if query.device.type in _FUSED_KERNELS else torch.device("cpu")
        out = ms_deform_attn(v, _shapes_tensor(shapes, shapes_device), locations, weights)  # (B, Lq, attn_dim)
        if residual is None:
            out = self.to_out(out)  # (B, Lq, Cq)
            return out if scale is None else scale * out
        return add_projection(residual, out, self.to_out, scale)


@functools.lru_cache(maxsize=64)
def _grid_constants(query_grid: tuple[int, int], shapes: tuple[tuple[int, int], ...],
                    device: torch.device) -> tuple[Tensor, Tensor | float]:
    """Reference points of the query grid (Lq, 1, 1, 1, 2) and the levels' (W, H) as
    (L, 1, 2), or as a number when every level is the same square (a division by a
    scalar is a plain pass; by a tensor broadcast over the last axis of 2, ~5x slower on
    CPU). fp32 on `device`, made once (outside inference mode: a cached tensor may meet
    autograd later; no host copy per forward, which a CUDA graph could not capture)."""
    with torch.inference_mode(False), torch.no_grad():
        ref = grid_reference_points(*query_grid, device=device)[:, None, None, None, :]
        if len(set(shapes)) == 1 and shapes[0][0] == shapes[0][1]:
            return ref, float(shapes[0][0])
        cells = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32).to(device)[:, None, :]
        return ref, cells


@functools.lru_cache(maxsize=64)
def _shapes_tensor(shapes: tuple[tuple[int, int], ...], device: torch.device) -> Tensor:
    """`spatial_shapes` (L, 2) long for `ms_deform_attn`, made once per shapes and device."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(shapes, dtype=torch.long).to(device)
