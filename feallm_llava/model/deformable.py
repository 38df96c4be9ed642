"""Multi-scale deformable attention (Zhu et al. 2020, "Deformable DETR"), pure PyTorch.

The paper's MPP implements its attentions with deformable attention (FEALLM section
5.1). Each query looks at a few sampled points per head and level, around a reference
point, instead of at every key:

    out[q] = sum_{level, point} A[q, h, level, point] * V_level(p_q + offset[q, h, level, point])

Two pieces:

- `ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)`: the
  sampling core with Deformable-DETR's tensor layout. The pure-PyTorch implementation
  (`ms_deform_attn_pytorch`, `F.grid_sample`) runs everywhere (CPU/GPU, fp32/bf16/fp16,
  differentiable). `register_fused_kernel("cuda", fn)` puts a fused kernel with the same
  signature behind the same call for one device type: that is the single dispatch point.
- `DeformableAttention`: the module around it (value / offset / weight / output
  projections), for queries that sit on a regular grid (ViT patch tokens): reference
  points are the cell centres of that grid.

Coordinates follow `align_corners=False`: a map of width W has pixel centres at
x = (i + 0.5) / W, i = 0..W-1; locations are (x, y) in [0, 1]; points outside the map
read zeros (bilinear with zero padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    """Reference implementation of `ms_deform_attn` with `F.grid_sample` (one call per level).

    Half-precision inputs are sampled and weighted in fp32 (sub-pixel locations would
    lose ~0.1 px in bf16 on a 24x24 map) and the result is cast back to `value.dtype`.
    """
    n, _, heads, head_dim = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    out_dtype = value.dtype
    compute = torch.promote_types(value.dtype, torch.float32)
    value = value.to(compute)
    # [0, 1] -> grid_sample's [-1, 1]; with align_corners=False, -1 and 1 are the outer
    # edges of the border pixels, so pixel centre i sits at (i + 0.5) / W as documented.
    grids = sampling_locations.to(compute) * 2 - 1  # (N, Lq, M, L, P, 2)
    sampled = []
    start = 0
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
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
        value: Tensor,
        value_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        """query (B, H*W, Cq) on `query_grid`; value (B, S, Cv), the levels of
        `value_shapes` [(H_l, W_l), ...] flattened and concatenated -> (B, H*W, Cq)."""
        b, lq, _ = query.shape
        gh, gw = query_grid
        if lq != gh * gw:
            raise ValueError(f"DeformableAttention: {lq} queries do not fill the {gh}x{gw} query grid")
        if len(value_shapes) != self.levels:
            raise ValueError(
                f"DeformableAttention: built for {self.levels} value levels, got {len(value_shapes)}"
            )
        m, lv, p = self.heads, self.levels, self.points
        v = self.value_in(value).view(b, value.shape[1], m, self.head_dim)  # (B, S, M, Dh)

        # Locations in fp32 whatever the module dtype: in bf16 a [0, 1] coordinate keeps
        # only ~3 significant digits, i.e. ~0.1 cell on a 24x24 map.
        ref = grid_reference_points(gh, gw, query.device, torch.float32)  # (Lq, 2)
        cells = torch.tensor(
            [[w, h] for h, w in value_shapes], device=query.device, dtype=torch.float32
        )  # (L, 2) as (W, H): offsets are in cells of each level
        offsets = self.to_offsets(query).view(b, lq, m, lv, p, 2).float()
        locations = ref[None, :, None, None, None, :] + offsets / cells[None, None, None, :, None, :]
        weights = self.to_weights(query).view(b, lq, m, lv * p).softmax(-1).view(b, lq, m, lv, p)

        # The pure-PyTorch path reads the shapes on the host: keep them there unless a
        # fused kernel for this device wants them next to the data (avoids a GPU sync).
        shapes_device = query.device if query.device.type in _FUSED_KERNELS else "cpu"
        shapes = torch.tensor(list(value_shapes), dtype=torch.long, device=shapes_device)  # (L, 2)
        out = ms_deform_attn(v, shapes, locations, weights)  # (B, Lq, attn_dim)
        return self.to_out(out)  # (B, Lq, Cq)
