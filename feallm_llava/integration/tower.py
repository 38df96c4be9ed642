"""FEALLM's vision tower: upstream's CLIP tower that also hands over shallow layers and pixels.

Upstream's `encode_images` is `mm_projector(vision_tower(images))`, so the tower may return
any object its projector understands. This one returns `TowerFeatures`: the deep patch
tokens LLaVA always uses (`hidden_states[mm_vision_select_layer]`, i.e. the output of
layer 23 of ViT-L/14 for LLaVA-1.5's -2), the shallow layers the MPP attends to (paper
5.1: layers 3, 8, 13, 18) and the pixel tensor the LCA crops. Loading, `delay_load`,
`image_processor` and `hidden_size` are upstream's.
"""

from __future__ import annotations

import torch
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

from feallm_llava.model.config import FeallmConfig
from feallm_llava.model.projector import TowerFeatures


class FeallmVisionTower(CLIPVisionTower):
    def __init__(self, vision_tower: str, args, delay_load: bool = False):
        self.feallm = FeallmConfig.from_llava_config(args)
        super().__init__(vision_tower, args, delay_load=delay_load)

    def _check_layers(self) -> None:
        n = self.config.num_hidden_layers  # hidden_states has n + 1 entries (0 = embeddings)
        bad = [i for i in (*self.feallm.shallow_layers, self.select_layer) if not -(n + 1) <= i <= n]
        if bad:
            raise ValueError(
                f"{self.vision_tower_name}: layer index {bad} out of range for a {n}-layer CLIP "
                f"(mm_feallm_shallow_layers={list(self.feallm.shallow_layers)}, "
                f"mm_vision_select_layer={self.select_layer})"
            )

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if not torch.is_tensor(images) or images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(
                f"FEALLM vision tower expects images of shape (B, 3, {size}, {size}) as produced by "
                f"its image_processor; got {got}"
            )

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.select_feature == "patch":
            return hidden[:, 1:]
        if self.select_feature == "cls_patch":
            raise ValueError("the FEALLM projector needs patch tokens on a grid: use mm_vision_select_feature=patch")
        raise ValueError(f"Unexpected select feature: {self.select_feature}")

    @torch.no_grad()
    def forward(self, images) -> TowerFeatures:
        if isinstance(images, list):
            images = torch.stack([im if im.ndim == 3 else im.squeeze(0) for im in images])
        self._check_images(images)
        self._check_layers()
        out = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        hidden = out.hidden_states
        side = self.num_patches_per_side
        return TowerFeatures(
            deep=self._select(hidden[self.select_layer]).to(images.dtype),  # (B, N, C)
            shallow=[self._select(hidden[i]).to(images.dtype) for i in self.feallm.shallow_layers],
            pixels=images,  # (B, 3, H, W), normalised as the processor left them
            grid=(side, side),
        )

    @property
    def num_patches(self) -> int:
        """Tokens the FEALLM projector emits per image (upstream's worker budgets with this)."""
        return super().num_patches + (1 if self.feallm.lca else 0)
