"""Local Clue Aggregator, LCA (FEALLM paper section 4.2, Fig. 4a).

A face in the wild is hard to localise part by part, so the LCA looks at fixed crops of
the whole (padded, normalised) image instead: 8 directions (top, bottom, left, right and
the 4 corners) x 2 extents (1/2 and 3/4 of the side) = 16 regions. A side crop spans the
full length of its side and a fraction of the other one (the top crop: full width, top
1/2 or 3/4 of the height); a corner crop takes the fraction of both sides.

    pixels (B, 3, H, W)
      -> 16 crops, each resized to crop_size            (B*16, 3, 112, 112)
      -> 4 x [conv3x3 stride 2, GroupNorm, GELU]         (B*16, 64, 7, 7)
      -> average pool to p x p, flatten                  (B, 16, 64*p*p)      p = lca_pool
      -> + region embedding, self-attention over regions  (B, 16, 64*p*p)
      -> F_local  = Linear(flatten)                      (B, 1, llm_hidden)   to the LLM
      -> F'_local = Linear(64*p*p -> vision_hidden)      (B, 16, vision_hidden) to the MPP

p = 1 (default) is global pooling, the paper's 64-wide region vectors. p > 1 keeps a
coarse layout inside each crop (where in the crop a brow or a lip corner is), which a
globally pooled vector can only encode through dedicated shape detectors: on synthetic
faces a CNN with global pooling stayed at chance for 300 steps, the same CNN pooled to
3 x 3 reached 0.68 held-out accuracy (FeallmConfig.lca_pool).

Norm choice: GroupNorm, not BatchNorm. Inference runs at batch size 1; training batches
are small per device (16 over 2 GPUs in the paper); and llava saves only *parameters*
into `mm_projector.bin`, so BatchNorm's running statistics (buffers) would be lost
between the two training stages.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feallm_llava.model.config import CROP_TYPES, FeallmConfig
from feallm_llava.model.fused import add_projection, batched_matmul, fusable, linear

# Directions of each crop family, in the order their regions are stacked.
DIRECTIONS: dict[str, tuple[str, ...]] = {
    "side": ("top", "bottom", "left", "right"),
    "corner": ("top_left", "top_right", "bottom_left", "bottom_right"),
}

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), pixels, end exclusive


def _extent(size: int, fraction: float) -> int:
    """`fraction` of `size` pixels, rounded half up (336 -> 168 and 252), at least 1."""
    return max(1, int(size * fraction + 0.5))


def region_names(crop_types: tuple[str, ...] = tuple(CROP_TYPES)) -> list[str]:
    """Names of the regions in stacking order, e.g. 'top@side_half', 'top_left@corner_3q'."""
    return [f"{d}@{t}" for t in crop_types for d in DIRECTIONS[CROP_TYPES[t][0]]]


def crop_boxes(height: int, width: int, crop_types: tuple[str, ...] = tuple(CROP_TYPES)) -> list[Box]:
    """The LCA crop boxes (x0, y0, x1, y1) of a height x width image, in `region_names` order."""
    boxes: list[Box] = []
    for crop_type in crop_types:
        family, fraction = CROP_TYPES[crop_type]
        h, w = _extent(height, fraction), _extent(width, fraction)
        if family == "side":
            boxes += [
                (0, 0, width, h),  # top: full width, top fraction of the height
                (0, height - h, width, height),  # bottom
                (0, 0, w, height),  # left: full height, left fraction of the width
                (width - w, 0, width, height),  # right
            ]
        else:
            boxes += [
                (0, 0, w, h),  # top-left
                (width - w, 0, width, h),  # top-right
                (0, height - h, w, height),  # bottom-left
                (width - w, height - h, width, height),  # bottom-right
            ]
    return boxes


def crop_regions(pixels: Tensor, boxes: list[Box], size: int) -> Tensor:
    """Crop every box from every image and resize it: (B, 3, H, W) -> (B, R, 3, size, size).

    Batched over images (one slice + resize per box). Resizing is bilinear with
    antialiasing (the crops shrink 1.5x to 3x; without it fine texture aliases), done in
    fp32 because CPU antialiased interpolation has no bf16 kernel; the result keeps the
    input dtype. It is laid out channels-last ((B, R, size, size, 3) in memory), so that
    `.flatten(0, 1)` is the channels-last batch the conv stem takes, without a copy.
    """
    b = pixels.shape[0]
    src = pixels.float()
    out = pixels.new_empty(b, len(boxes), size, size, 3).permute(0, 1, 4, 2, 3)  # (B, R, 3, S, S)
    for r, (x0, y0, x1, y1) in enumerate(boxes):
        out[:, r] = F.interpolate(src[:, :, y0:y1, x0:x1], size=(size, size), mode="bilinear",
                                  align_corners=False, antialias=True)
    return out


class MultiHeadAttention(nn.Module):
    """Plain multi-head attention, self (context=None) or cross.

    Projections are `to_q`, `to_k`, `to_v`, `to_out`: never LLaMA's leaf names
    (`q_proj`, ...), which PEFT's LoRA target list would match.

    Many queries over few keys (the MPP's 576 patches over 16 local clues) take a
    cheaper route to the same function when heads x keys < attn_dim: the query
    projection is folded into the keys and the output projection into the values, so
    the two (N x dim x attn_dim) matmuls become two (N x dim x heads*keys) ones
    (`_few_keys`; equal to the plain route within rounding, tested).
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None,
                 attn_dim: int | None = None) -> None:
        super().__init__()
        attn_dim = attn_dim or dim
        if attn_dim % heads:
            raise ValueError(f"MultiHeadAttention: attn_dim={attn_dim} not divisible by heads={heads}")
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, attn_dim)
        # No key bias: it adds the same logit to every key of a query, which softmax
        # cancels, so it would be a parameter that never gets a gradient.
        self.to_k = nn.Linear(context_dim, attn_dim, bias=False)
        self.to_v = nn.Linear(context_dim, attn_dim)
        self.to_out = nn.Linear(attn_dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, *, residual: Tensor | None = None,
                scale: Tensor | None = None) -> Tensor:
        """x (B, N, dim), context (B, K, context_dim) or None (self-attention) -> (B, N, dim);
        with `residual` (B, N, dim): residual + scale * that (scale None = 1), the output
        projection accumulating into the residual (model/fused.py)."""
        context = x if context is None else context
        b, n, _ = x.shape
        keys = context.shape[1]
        k = linear(context, self.to_k).view(b, keys, self.heads, -1).transpose(1, 2)  # (B, h, K, d)
        v = linear(context, self.to_v).view(b, keys, self.heads, -1).transpose(1, 2)
        if self.heads * keys < self.to_q.out_features and keys < n and fusable(self.to_q, self.to_out):
            return self._few_keys(x, k, v, residual, scale)
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, h, N, d)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)  # (B, N, h*d)
        if residual is None:
            out = self.to_out(out)  # (B, N, dim)
            return out if scale is None else scale * out
        return add_projection(residual, out, self.to_out, scale)

    def _few_keys(self, x: Tensor, k: Tensor, v: Tensor, residual: Tensor | None,
                  scale: Tensor | None) -> Tensor:
        """The attention of `forward` through heads x keys columns: k, v (B, h, K, d).

        logits[i, h, j] = (W_q,h x_i + b_q,h) . k_hj / sqrt(d) = x_i . (W_q,h^T k_hj) / sqrt(d) + ...
        out_i = W_out (concat_h sum_j p_ihj v_hj) + b_out = sum_hj p_ihj (W_out,h v_hj) + b_out
        """
        b, n, _ = x.shape
        heads, keys, d = k.shape[1:]
        wq = self.to_q.weight.view(heads, d, -1)  # (h, d, dim)
        kq = torch.einsum("bhjd,hdc->bhjc", k, wq).reshape(b, heads * keys, -1) * d ** -0.5  # (B, h*K, dim)
        bias = torch.einsum("bhjd,hd->bhj", k, self.to_q.bias.view(heads, d)).reshape(b, heads * keys) * d ** -0.5
        probs = batched_matmul(x, kq, bias).view(b, n, heads, keys).softmax(-1)  # (B, N, h, K)
        wo = self.to_out.weight.view(-1, heads, d)  # (dim, h, d)
        if scale is not None:
            wo = wo * scale
        vo = torch.einsum("bhjd,chd->bchj", v, wo).reshape(b, -1, heads * keys)  # (B, dim, h*K)
        out_bias = self.to_out.bias if scale is None else self.to_out.bias * scale
        out = batched_matmul(probs.view(b, n, heads * keys), vo, out_bias)  # (B, N, dim)
        return out if residual is None else out.add_(residual)


class ConvStem(nn.Sequential):
    """`layers` x [conv 3x3 stride 2, GroupNorm, GELU]: (B, 3, S, S) -> (B, C, S/2^layers, ...).

    On a CPU the crops go through in blocks of at most CPU_BLOCK_BYTES of first feature
    map (5 crops of 112 px in fp32): GroupNorm and GELU are passes over memory, and a
    batch's whole first map (16 crops x 64 x 56 x 56 fp32 = 13 MB an image, 100 MB at
    batch 8) streams from RAM for each, where a block stays in cache. Same outputs
    (every crop is normalised on its own); one thread, 16 / 128 crops: 25 / 251 ms in
    one pass, 9-10 / 71-76 ms in blocks of 4-5 (single crops or 8: no better).
    """

    CPU_BLOCK_BYTES = 4 * 2 ** 20

    def __init__(self, channels: int, layers: int, groups: int) -> None:
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks += [
                nn.Conv2d(3 if i == 0 else channels, channels, 3, stride=2, padding=1),
                nn.GroupNorm(groups, channels),
                nn.GELU(),
            ]
        super().__init__(*blocks)

    def forward(self, crops: Tensor) -> Tensor:
        if crops.device.type != "cpu":
            return super().forward(crops)
        first = self[0]
        side = (crops.shape[-1] + 1) // 2
        per_block = max(1, self.CPU_BLOCK_BYTES // (first.out_channels * side * side * crops.element_size()))
        if crops.shape[0] <= per_block:
            return super().forward(crops)
        return torch.cat([super(ConvStem, self).forward(block) for block in crops.split(per_block)])


class LocalClues(NamedTuple):
    """LCA outputs. A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 looks into a module's
    tuple outputs to hook their tensors for backward (it re-gathers the module's
    partitioned parameters there); a dataclass it passes over, and the LCA's backward
    would then run on empty parameter shards."""

    token: Tensor  # F_local (B, 1, llm_hidden): the extra LLM token
    keys: Tensor | None  # F'_local (B, R, vision_hidden) for the MPP, None when unused
    regions: Tensor  # refined region vectors (B, R, region_dim)


class LocalClueAggregator(nn.Module):
    """LCA: directional crops -> conv features -> region self-attention -> F_local, F'_local.

    `vision_hidden=None` builds no F'_local head (MPP off or not using local clues), so no
    parameter is left without a gradient (DDP / DeepSpeed complain about those).
    """

    def __init__(self, cfg: FeallmConfig, llm_hidden: int, vision_hidden: int | None) -> None:
        super().__init__()
        self.cfg = cfg
        regions, dim = cfg.num_regions, cfg.region_dim
        self.stem = ConvStem(cfg.lca_channels, cfg.lca_layers, cfg.lca_norm_groups)
        self.region_embed = nn.Parameter(torch.empty(regions, dim))
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, cfg.lca_heads)
        self.out_norm = nn.LayerNorm(dim)
        self.to_token = nn.Linear(regions * dim, llm_hidden)  # F_local, paper eq. 3
        self.to_keys = nn.Linear(dim, vision_hidden) if vision_hidden else None  # F'_local, eq. 5
        nn.init.trunc_normal_(self.region_embed, std=0.02)

    def forward(self, pixels: Tensor) -> LocalClues:
        """pixels (B, 3, H, W), normalised as the vision tower sees them."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(
                f"LocalClueAggregator: expected pixels (B, 3, H, W), got {tuple(pixels.shape)}"
            )
        b, _, height, width = pixels.shape
        boxes = crop_boxes(height, width, self.cfg.crop_types)
        size = self.cfg.crop_size
        dtype = self.to_token.weight.dtype
        crops = crop_regions(pixels, boxes, size).to(dtype)  # (B, R, 3, S, S)
        # channels_last (as crop_regions lays them out): the 3-channel first conv is ~5x
        # faster on CPU (oneDNN) and the layout is the one cuDNN prefers in half
        # precision; results are unchanged.
        crops = crops.flatten(0, 1).contiguous(memory_format=torch.channels_last)  # (B*R, 3, S, S), no copy
        feats = self.stem(crops)  # (B*R, C, S/16, S/16)
        pooled = F.adaptive_avg_pool2d(feats, self.cfg.lca_pool)  # (B*R, C, p, p)
        regions = pooled.flatten(1).view(b, len(boxes), -1)  # (B, R, C*p*p)

        # Self-attention over the region vectors (paper eq. 2) with a residual path, so
        # a region keeps its own evidence while attending to the others.
        x = regions + self.region_embed  # (B, R, D)
        x = x + self.attn(self.attn_norm(x))
        x = self.out_norm(x)  # (B, R, D)

        token = self.to_token(x.flatten(1)).unsqueeze(1)  # (B, 1, llm_hidden)
        keys = self.to_keys(x) if self.to_keys is not None else None  # (B, R, vision_hidden)
        return LocalClues(token=token, keys=keys, regions=x)
