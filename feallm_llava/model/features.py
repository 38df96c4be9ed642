"""What a CLIP tower hands the FEALLM projector, and how it is read off CLIP's hidden states.

FEALLM needs more of CLIP than LLaVA's one layer: the deep patch tokens LLaVA always
uses (`hidden_states[select_layer]`; LLaVA-1.5's -2 is the output of layer 23 of
ViT-L/14), the shallow layers the MPP attends to (paper 5.1: 3, 8, 13, 18) and the pixel
tensor the LCA crops. `tower_features` takes any CLIP's tuple of hidden states (index 0 =
embeddings, k = output of layer k), so every engine that runs a CLIP vision model can
feed the projector; llava's tower subclass (`integration.tower`) is one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class TowerFeatures:
    """Patch tokens only (no CLS), as the FEALLM projector takes them."""

    deep: Tensor  # (B, N, C): hidden_states[mm_vision_select_layer], N = grid H * W
    shallow: list[Tensor] = field(default_factory=list)  # L x (B, N, C): cfg.shallow_layers
    pixels: Tensor | None = None  # (B, 3, H_img, W_img): normalised pixels the tower saw
    grid: tuple[int, int] = (0, 0)  # patch grid (rows, cols), e.g. (24, 24) for ViT-L/14-336

    def to(self, *args, **kwargs) -> TowerFeatures:
        """Tensor.to on every tensor (device and/or dtype)."""
        return TowerFeatures(
            deep=self.deep.to(*args, **kwargs),
            shallow=[s.to(*args, **kwargs) for s in self.shallow],
            pixels=None if self.pixels is None else self.pixels.to(*args, **kwargs),
            grid=tuple(self.grid),
        )


def check_layers(num_layers: int, shallow_layers: Sequence[int], select_layer: int, where: str) -> None:
    """Every index must name one of the `num_layers + 1` hidden states (0 = embeddings)."""
    bad = [i for i in (*shallow_layers, select_layer) if not -(num_layers + 1) <= i <= num_layers]
    if bad:
        raise ValueError(
            f"{where}: layer index {bad} out of range for a {num_layers}-layer CLIP "
            f"(mm_feallm_shallow_layers={list(shallow_layers)}, mm_vision_select_layer={select_layer})"
        )


def patch_tokens(hidden: Tensor, select_feature: str) -> Tensor:
    """(B, 1 + N, C) -> (B, N, C): the patch tokens, as LLaVA's `patch` selection."""
    if select_feature == "patch":
        return hidden[:, 1:]
    if select_feature == "cls_patch":
        raise ValueError("the FEALLM projector needs patch tokens on a grid: use mm_vision_select_feature=patch")
    raise ValueError(f"Unexpected select feature: {select_feature}")


def tower_features(hidden_states: Sequence[Tensor], pixels: Tensor, *, select_layer: int,
                   shallow_layers: Sequence[int], grid: tuple[int, int],
                   select_feature: str = "patch") -> TowerFeatures:
    """TowerFeatures from CLIP's hidden states (each (B, 1 + N, C)), cast to the pixels' dtype."""
    return TowerFeatures(
        deep=patch_tokens(hidden_states[select_layer], select_feature).to(pixels.dtype),  # (B, N, C)
        shallow=[patch_tokens(hidden_states[i], select_feature).to(pixels.dtype) for i in shallow_layers],
        pixels=pixels,  # (B, 3, H, W), normalised as the processor left them
        grid=tuple(grid),
    )
