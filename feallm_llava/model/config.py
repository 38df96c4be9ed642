"""FEALLM architecture configuration (paper section 4; where its text lost a number, our default).

Every architecture number is a field here. On a LLaVA config each field `x` lives as the
attribute `mm_feallm_x`, so `from_pretrained` / `load_pretrained_model` rebuild exactly
the module that was trained:

    cfg = FeallmConfig.from_llava_config(llava_config)     # missing attribute -> default
    llava_config.update(cfg.to_llava_attrs())              # JSON-safe values (lists)

This module imports nothing heavy (no torch) so that argument parsing stays cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LLAVA_PREFIX = "mm_feallm_"

# LCA crop types (paper 4.2; ablation Fig. 5 removes one type at a time). The 8 crop
# directions split into the 4 sides (top, bottom, left, right: full length along the
# side, `fraction` of the other side) and the 4 corners (`fraction` of both sides),
# each at the two extents of the paper, 1/2 and 3/4 of the side length.
# name -> (family, fraction)
CROP_TYPES: dict[str, tuple[str, float]] = {
    "side_half": ("side", 0.5),
    "side_3q": ("side", 0.75),
    "corner_half": ("corner", 0.5),
    "corner_3q": ("corner", 0.75),
}


@dataclass(frozen=True)
class FeallmConfig:
    """Architecture of the FEALLM projector (LCA + MPP). Defaults = the paper's 7B model."""

    # -- switches (paper Tab. 4 and Fig. 6 ablations) --
    lca: bool = True  # Local Clue Aggregator on: adds its one F_local token (paper 4.2)
    mpp: bool = True  # Multi-perspective fusion on; off = upstream mlp2x_gelu on deep features
    use_local_in_mpp: bool = True  # MPP cross-attends to F'_local (Fig. 6); needs lca

    # -- LCA (paper 4.2, 5.1) --
    crop_types: tuple[str, ...] = tuple(CROP_TYPES)  # which crop types (4 crops each) are used
    crop_size: int = 112  # side of each resized crop, pixels (the paper's number is lost; a third of 336)
    lca_channels: int = 64  # conv channels, and width of a region vector (paper 5.1)
    lca_layers: int = 4  # conv3x3 stride-2 layers in the conv block (paper 4.2: four)
    lca_norm_groups: int = 8  # GroupNorm groups after each conv (batch-size independent)
    lca_heads: int = 4  # heads of the self-attention over the region vectors
    # Side of the grid each crop's feature map is average-pooled to (paper eq. 1: AvgPool
    # "compresses the spatial dimensions"): 1 = global, the paper's 64-wide regions;
    # p > 1 keeps a p x p layout (region_dim wide). Why: model/lca.py's docstring.
    lca_pool: int = 1

    # -- MPP (paper 4.3, 5.1) --
    shallow_layers: tuple[int, ...] = (3, 8, 13, 18)  # CLIP layers used as value levels (5.1)
    mpp_heads: int = 8  # heads of the three MPP attentions (deformable and local)
    mpp_points: int = 4  # deformable sampling points per head and level (Deformable-DETR: 4)
    mpp_dim: int = 256  # MPP attention width (Deformable-DETR's d_model); 0 = vision width

    @property
    def num_regions(self) -> int:
        """Number of LCA regions: 4 directions per crop type (16 for the 4 types)."""
        return 4 * len(self.crop_types)

    def __post_init__(self) -> None:
        # Normalise sequences coming from JSON (lists) or CLI strings ("3,8,13,18").
        object.__setattr__(self, "crop_types", _as_tuple(self.crop_types, str, "crop_types"))
        object.__setattr__(
            self, "shallow_layers", _as_tuple(self.shallow_layers, int, "shallow_layers")
        )
        for name in ("lca", "mpp", "use_local_in_mpp"):
            object.__setattr__(self, name, _as_bool(getattr(self, name), name))
        self._validate()

    def _validate(self) -> None:
        unknown = [t for t in self.crop_types if t not in CROP_TYPES]
        if unknown:
            raise ValueError(
                f"FeallmConfig.crop_types: unknown crop type(s) {unknown}; "
                f"choose from {list(CROP_TYPES)}"
            )
        if len(set(self.crop_types)) != len(self.crop_types):
            raise ValueError(f"FeallmConfig.crop_types: duplicate entries in {self.crop_types}")
        if self.lca and not self.crop_types:
            raise ValueError("FeallmConfig: lca=True needs at least one crop type (or set lca=False)")
        if self.mpp and not self.shallow_layers:
            raise ValueError(
                "FeallmConfig: mpp=True needs at least one shallow layer (or set mpp=False)"
            )
        if any(layer < 0 for layer in self.shallow_layers):
            raise ValueError(
                f"FeallmConfig.shallow_layers: {self.shallow_layers} must be hidden-state "
                "indices >= 0 (0 = embeddings, k = output of layer k)"
            )
        for name in ("crop_size", "lca_channels", "lca_layers", "lca_norm_groups",
                     "lca_heads", "lca_pool", "mpp_heads", "mpp_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"FeallmConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.mpp_dim < 0:
            raise ValueError(f"FeallmConfig.mpp_dim must be >= 0 (0 = vision width), got {self.mpp_dim}")
        if self.lca_channels % self.lca_norm_groups:
            raise ValueError(
                f"FeallmConfig: lca_channels={self.lca_channels} is not divisible by "
                f"lca_norm_groups={self.lca_norm_groups}"
            )
        if self.lca_channels % self.lca_heads:
            raise ValueError(
                f"FeallmConfig: lca_channels={self.lca_channels} is not divisible by "
                f"lca_heads={self.lca_heads}"
            )
        if self.mpp_dim and self.mpp_dim % self.mpp_heads:
            raise ValueError(
                f"FeallmConfig: mpp_dim={self.mpp_dim} is not divisible by mpp_heads={self.mpp_heads}"
            )
        if self.crop_size < 2 ** self.lca_layers:
            raise ValueError(
                f"FeallmConfig: crop_size={self.crop_size} is too small for {self.lca_layers} "
                f"stride-2 convs (needs >= {2 ** self.lca_layers})"
            )
        if self.lca_pool > self.lca_map_size:
            raise ValueError(
                f"FeallmConfig: lca_pool={self.lca_pool} exceeds the {self.lca_map_size} x "
                f"{self.lca_map_size} feature map that crop_size={self.crop_size} leaves after "
                f"{self.lca_layers} stride-2 convs"
            )

    @property
    def lca_map_size(self) -> int:
        """Side of a crop's feature map after the conv block (each conv halves, rounding up)."""
        side = self.crop_size
        for _ in range(self.lca_layers):
            side = (side + 1) // 2
        return side

    @property
    def region_dim(self) -> int:
        """Width of an LCA region vector: lca_channels x lca_pool x lca_pool."""
        return self.lca_channels * self.lca_pool ** 2

    def attn_dim(self, vision_hidden: int) -> int:
        """Width of the MPP attentions for a tower of width `vision_hidden`."""
        dim = self.mpp_dim or vision_hidden
        if dim % self.mpp_heads:
            raise ValueError(
                f"FeallmConfig: MPP attention width {dim} (mpp_dim={self.mpp_dim}, vision width "
                f"{vision_hidden}) is not divisible by mpp_heads={self.mpp_heads}"
            )
        return dim

    @property
    def uses_local_in_mpp(self) -> bool:
        """True when the MPP really cross-attends to F'_local (needs both LCA and MPP)."""
        return self.lca and self.mpp and self.use_local_in_mpp

    # -- LLaVA config round trip --

    @classmethod
    def from_llava_config(cls, cfg: Any) -> FeallmConfig:
        """Read `mm_feallm_<field>` attributes (or mapping keys) of `cfg`; missing -> default."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = LLAVA_PREFIX + f.name
            if isinstance(cfg, Mapping):
                present, value = key in cfg, cfg.get(key)
            else:
                present, value = hasattr(cfg, key), getattr(cfg, key, None)
            if present and value is not None:
                values[f.name] = value
        return cls(**values)

    def to_llava_attrs(self) -> dict[str, Any]:
        """{"mm_feallm_<field>": JSON-serialisable value}; sequences become lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[LLAVA_PREFIX + f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _as_tuple(value: Any, kind: type, name: str) -> tuple:
    """A tuple of `kind` from a tuple, list, or comma-separated string ("3,8,13,18")."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"FeallmConfig.{name}: expected a list, got {type(value).__name__} {value!r}")
    try:
        return tuple(kind(v) for v in value)
    except ValueError as err:
        raise ValueError(f"FeallmConfig.{name}: cannot read {value!r} as {kind.__name__}s") from err


def _as_bool(value: Any, name: str) -> bool:
    """A bool from a bool or the strings true/false/1/0 (CLI and hand-edited JSON)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"FeallmConfig.{name}: expected true/false, got {value!r}")
