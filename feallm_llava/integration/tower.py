"""FEALLM's vision tower for llava: upstream's CLIP tower that also hands over shallow layers and pixels.

Upstream's `encode_images` is `mm_projector(vision_tower(images))`, so the tower may return
any object its projector understands. This one returns `model.features.TowerFeatures`
(read off CLIP's hidden states by `tower_features`). Loading, `delay_load`,
`image_processor` and `hidden_size` are upstream's.
"""

from __future__ import annotations

import torch
from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

from feallm_llava.model.config import FeallmConfig
from feallm_llava.model.features import TowerFeatures, check_layers, tower_features


class FeallmVisionTower(CLIPVisionTower):
    def __init__(self, vision_tower: str, args, delay_load: bool = False):
        self.feallm = FeallmConfig.from_llava_config(args)
        super().__init__(vision_tower, args, delay_load=delay_load)

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if not torch.is_tensor(images) or images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(
                f"FEALLM vision tower expects images of shape (B, 3, {size}, {size}) as produced by "
                f"its image_processor; got {got}"
            )

    @torch.no_grad()
    def forward(self, images) -> TowerFeatures:
        if isinstance(images, list):
            images = torch.stack([im if im.ndim == 3 else im.squeeze(0) for im in images])
        self._check_images(images)
        check_layers(self.config.num_hidden_layers, self.feallm.shallow_layers, self.select_layer,
                     self.vision_tower_name)
        out = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        side = self.num_patches_per_side
        return tower_features(out.hidden_states, images, select_layer=self.select_layer,
                              shallow_layers=self.feallm.shallow_layers, grid=(side, side),
                              select_feature=self.select_feature)

    @property
    def num_patches(self) -> int:
        """Tokens the FEALLM projector emits per image (upstream's worker budgets with this)."""
        return super().num_patches + (1 if self.feallm.lca else 0)
