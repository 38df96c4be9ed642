"""Multi-perspective Projector, MPP (FEALLM paper section 4.3, Fig. 4b).

Deep ViT features carry semantics but lose edges and texture, which shallow layers keep
and which facial expressions live in. The MPP enriches the deep patch tokens before the
usual LLaVA MLP:

    x  = deep                                                   (B, N, C), N = H*W patches
    x  = x + DeformCrossAttn(x -> shallow layers as L levels)   eq. 4 (paper: plain residual)
    x  = x + alpha * CrossAttn(x -> F'_local, 16 LCA tokens)    eq. 6, alpha learnable
    x  = x + beta  * DeformSelfAttn(x)                          eq. 7, beta learnable
    out = Linear(GELU(Linear(x)))                               eq. 8  (B, N, llm_hidden)

The attentions are deformable (paper 5.1, Zhu et al. 2020) except the one to F'_local,
which has only 16 keys (dense attention is cheaper there). Each attention reads
pre-LayerNormed inputs. Every shallow level has its own LayerNorm (layers 3..18 of CLIP
have very different scales); its bias, initialised randomly, doubles as the learned
level embedding (a separate additive embedding would be the same parameter twice).

Initialisation, chosen so that a fresh MPP is *exactly* upstream `mlp2x_gelu(deep)` and
still learns:
- eq. 4 has no scale in the paper: its output projection `shallow_attn.to_out` starts at
  zero (weight and bias);
- eq. 6 and 7 start with alpha = beta = 0 and a normally initialised output projection.
  (Zeroing both the scale and the projection would be a saddle: both gradients are
  zero and neither ever moves.)
First backward, non-zero gradients reach: `shallow_attn.to_out`, `local_scale`,
`self_scale`, the MLP. Zero gradients reach everything behind those zeros (offsets,
weights, values, norms, the local and self attentions, and the LCA's
F'_local head). After one optimizer step the zeros have moved and every parameter gets
a gradient (tests/test_mpp.py checks both statements).

`cfg.mpp=False` builds only the MLP (= upstream `mlp2x_gelu`, ablation Tab. 4);
`cfg.use_local_in_mpp=False` (or no LCA) drops the eq. 6 block (ablation Fig. 6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from feallm_llava.model.config import FeallmConfig
from feallm_llava.model.deformable import DeformableAttention
from feallm_llava.model.lca import MultiHeadAttention


def mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Sequential:
    """LLaVA-1.5's projector layout: keys 0.weight, 0.bias, 2.weight, 2.bias."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class MultiPerspectiveProjector(nn.Module):
    """MPP: deep tokens enriched by shallow layers, local clues and self-attention, then MLP."""

    def __init__(self, cfg: FeallmConfig, vision_hidden: int, llm_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_hidden = vision_hidden
        self.levels = len(cfg.shallow_layers)
        if cfg.mpp:
            c, dim, heads, points = vision_hidden, cfg.attn_dim(vision_hidden), cfg.mpp_heads, cfg.mpp_points
            # (1) deep -> shallow levels, eq. 4
            self.query_norm = nn.LayerNorm(c)
            self.shallow_norms = nn.ModuleList(nn.LayerNorm(c) for _ in range(self.levels))
            for norm in self.shallow_norms:  # bias = level embedding: levels differ from the start
                nn.init.normal_(norm.bias, std=0.02)
            self.shallow_attn = DeformableAttention(c, c, dim, heads, self.levels, points, zero_out=True)
            # (2) -> F'_local, eq. 6
            if cfg.uses_local_in_mpp:
                self.local_norm = nn.LayerNorm(c)
                self.local_attn = MultiHeadAttention(c, heads, attn_dim=dim)
                self.local_scale = nn.Parameter(torch.zeros(1))  # alpha
            # (3) deformable self-attention on the patch grid, eq. 7
            self.self_norm = nn.LayerNorm(c)
            self.self_attn = DeformableAttention(c, c, dim, heads, 1, points)
            self.self_scale = nn.Parameter(torch.zeros(1))  # beta
        # (4) eq. 8
        self.mlp = mlp2x_gelu(vision_hidden, llm_hidden)

    @property
    def uses_local(self) -> bool:
        return hasattr(self, "local_attn")

    def forward(self, deep: Tensor, shallow: Sequence[Tensor], grid: tuple[int, int],
                local_keys: Tensor | None = None, *, project: bool = True) -> Tensor:
        """deep (B, N, C); shallow: L x (B, N, C) on the same (H, W) grid, N = H*W;
        local_keys F'_local (B, R, C) when the MPP uses local clues -> (B, N, llm_hidden),
        or with `project=False` the enriched tokens before the MLP, (B, N, C).

        Callers go through `forward` (not `enrich`): DeepSpeed ZeRO-3 gathers a module's
        own parameters (the residual scales) only while its forward runs."""
        x = self.enrich(deep, shallow, grid, local_keys)  # (B, N, C)
        return self.mlp(x) if project else x  # (B, N, llm_hidden)

    def enrich(
        self,
        deep: Tensor,
        shallow: Sequence[Tensor],
        grid: tuple[int, int],
        local_keys: Tensor | None = None,
    ) -> Tensor:
        """The deep tokens after eq. 4, 6 and 7, before the MLP: (B, N, C)."""
        x = deep
        if self.cfg.mpp:
            if len(shallow) != self.levels:
                raise ValueError(
                    f"MultiPerspectiveProjector: built for {self.levels} shallow layers "
                    f"{list(self.cfg.shallow_layers)}, got {len(shallow)}"
                )
            values = [norm(s) for norm, s in zip(self.shallow_norms, shallow)]  # L x (B, N, C)
            # x + attention: the output projections accumulate into x (model/fused.py)
            x = self.shallow_attn(self.query_norm(x), grid, values, [grid] * self.levels, residual=x)
            if self.uses_local:
                if local_keys is None:
                    raise ValueError(
                        "MultiPerspectiveProjector: built with use_local_in_mpp but got no F'_local"
                    )
                x = self.local_attn(self.local_norm(x), local_keys, residual=x, scale=self.local_scale)
            n = self.self_norm(x)
            x = self.self_attn(n, grid, n, [grid], residual=x, scale=self.self_scale)  # (B, N, C)
        return x
