"""FeallmProjector = LCA + MPP: what llava holds as `model.mm_projector` (paper Fig. 4).

    TowerFeatures (deep, shallow layers, pixels, grid)
      -> MPP(deep, shallow, F'_local)          (B, N, llm_hidden)    N = grid H * W
      -> LCA(pixels).token                     (B, 1, llm_hidden)
      -> concat                                (B, N + 1, llm_hidden)

LLaVA's `encode_images` calls `mm_projector(vision_tower(images))`; FEALLM's tower returns
`TowerFeatures` and this module turns it into LLM tokens (N MPP tokens, then the local
token). With the LCA off it returns the N tokens only (`num_extra_tokens() == 0`).

Warm start from LLaVA-1.5: an upstream `mlp2x_gelu` `mm_projector.bin` holds only
`0.weight, 0.bias, 2.weight, 2.bias` (llava strips the `model.mm_projector.` prefix
before calling `load_state_dict`; a leftover `...mm_projector.` prefix is stripped here
too). `FeallmProjector.load_state_dict` recognises exactly that key set and loads it
strictly into the MLP (`mpp.mlp.*`), leaving the LCA and MPP at their initialisation;
the returned `missing_keys` lists those. Any other state dict (our own full one) loads
through the ordinary `nn.Module.load_state_dict`, strict by default.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from feallm_llava.model.config import FeallmConfig
from feallm_llava.model.features import TowerFeatures
from feallm_llava.model.fused import fusable
from feallm_llava.model.lca import LocalClueAggregator
from feallm_llava.model.mpp import MultiPerspectiveProjector

log = logging.getLogger(__name__)

UPSTREAM_MLP_KEYS = frozenset({"0.weight", "0.bias", "2.weight", "2.bias"})
# Output values per image from which the MLP writes straight into the result (below,
# a matmul per image costs more than the concatenation it saves).
DIRECT_MIN = 2 ** 16


class FeallmProjector(nn.Module):
    """LCA + MPP, `(TowerFeatures) -> (B, N + num_extra_tokens(), llm_hidden)`."""

    def __init__(self, cfg: FeallmConfig, vision_hidden: int, llm_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_hidden = vision_hidden
        self.llm_hidden = llm_hidden
        self.lca = (
            LocalClueAggregator(cfg, llm_hidden, vision_hidden if cfg.uses_local_in_mpp else None)
            if cfg.lca else None
        )
        self.mpp = MultiPerspectiveProjector(cfg, vision_hidden, llm_hidden)

    @property
    def mlp(self) -> nn.Sequential:
        """The upstream-layout MLP (Linear, GELU, Linear) at the end of the MPP."""
        return self.mpp.mlp

    def num_extra_tokens(self) -> int:
        """Tokens emitted beyond the N patch tokens: 1 (F_local) with the LCA, else 0."""
        return 1 if self.lca is not None else 0

    # CUDA graphs for inference on a GPU (model/graphs.py): None = FEALLM_CUDA_GRAPHS=1 turns them on.
    cuda_graphs: bool | None = None

    def forward(self, features: TowerFeatures) -> Tensor:
        self._check(features)
        if features.deep.is_cuda and not torch.is_grad_enabled() and self._use_cuda_graphs():
            if getattr(self, "_captured", None) is None:
                from feallm_llava.model.graphs import CapturedForward

                self._captured = CapturedForward(
                    self._forward, state=lambda: tuple(p.data_ptr() for p in self.parameters()))
            return self._captured(features)
        return self._forward(features)

    def _use_cuda_graphs(self) -> bool:
        return self.cuda_graphs if self.cuda_graphs is not None else os.environ.get("FEALLM_CUDA_GRAPHS") == "1"

    def _forward(self, features: TowerFeatures) -> Tensor:
        dtype = self.mlp[0].weight.dtype
        deep = features.deep.to(dtype)  # (B, N, C)
        shallow = [s.to(dtype) for s in features.shallow] if self.cfg.mpp else []
        local = self.lca(features.pixels) if self.lca is not None else None
        x = self.mpp(deep, shallow, tuple(features.grid), local.keys if local is not None else None,
                     project=False)  # (B, N, C)
        if local is None:
            return self.mlp(x)  # (B, N, D)
        return self._mlp_and_token(x, local.token)  # (B, N + 1, D)

    def _mlp_and_token(self, x: Tensor, token: Tensor) -> Tensor:
        """[mlp(x), token] along the tokens. Without autograd the MLP's last matmul writes
        straight into the (B, N + 1, D) result, image by image (no copy of the N tokens
        into a concatenation: 9 MB an image at LLaVA-1.5 widths); the same values as
        `self.mlp(x)` bit for bit (one addmm per image = the rows of one addmm over the
        batch)."""
        last = self.mlp[2]
        if torch.is_grad_enabled() or not fusable(last) or x.shape[1] * last.out_features < DIRECT_MIN:
            tokens = self.mlp(x)
            return torch.cat([tokens, token.to(tokens.dtype)], dim=1)
        hidden = self.mlp[1](self.mlp[0](x))  # (B, N, D), as nn.Sequential runs them
        b, n, _ = hidden.shape
        out = hidden.new_empty(b, n + 1, last.out_features)
        for i in range(b):
            if last.bias is None:
                torch.mm(hidden[i], last.weight.t(), out=out[i, :n])
            else:
                torch.addmm(last.bias, hidden[i], last.weight.t(), out=out[i, :n])
        out[:, n:] = token
        return out

    def _check(self, features: TowerFeatures) -> None:
        if not isinstance(features, TowerFeatures):
            raise TypeError(
                f"FeallmProjector expects TowerFeatures from the FEALLM vision tower, got "
                f"{type(features).__name__}; build the tower with mm_projector_type='feallm' "
                "(feallm_llava.register()) so it returns deep + shallow features and pixels"
            )
        deep = features.deep
        rows, cols = features.grid
        if deep.dim() != 3 or deep.shape[-1] != self.vision_hidden or deep.shape[1] != rows * cols:
            raise ValueError(
                f"FeallmProjector: deep features must be (B, {rows}*{cols}, {self.vision_hidden}) "
                f"for grid {tuple(features.grid)} and vision width {self.vision_hidden}, "
                f"got {tuple(deep.shape)}"
            )
        if self.cfg.mpp:
            want = len(self.cfg.shallow_layers)
            if len(features.shallow) != want:
                raise ValueError(
                    f"FeallmProjector: expected {want} shallow layers {list(self.cfg.shallow_layers)} "
                    f"(mm_feallm_shallow_layers), got {len(features.shallow)}"
                )
            for i, s in enumerate(features.shallow):
                if s.shape != deep.shape:
                    raise ValueError(
                        f"FeallmProjector: shallow layer {self.cfg.shallow_layers[i]} has shape "
                        f"{tuple(s.shape)}, expected the deep features' {tuple(deep.shape)}"
                    )
        if self.lca is not None:
            px = features.pixels
            if px is None or px.dim() != 4 or px.shape[1] != 3 or px.shape[0] != deep.shape[0]:
                raise ValueError(
                    f"FeallmProjector: the LCA needs pixels (B={deep.shape[0]}, 3, H, W), got "
                    f"{None if px is None else tuple(px.shape)}"
                )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load our own full state dict (strict by default), or warm-start the MLP.

        A state dict whose keys are exactly upstream `mlp2x_gelu`'s `0.weight, 0.bias,
        2.weight, 2.bias` (optionally behind a `...mm_projector.` prefix) is loaded
        strictly into `mpp.mlp`; every other parameter keeps its initialisation and is
        reported in `missing_keys`. A shape mismatch (another vision or LLM width) raises.
        """
        upstream = _upstream_mlp_state(state_dict)
        if upstream is None:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        w0 = upstream["0.weight"]
        if tuple(w0.shape) != tuple(self.mlp[0].weight.shape) or \
                tuple(upstream["2.weight"].shape) != tuple(self.mlp[2].weight.shape):
            raise ValueError(
                "FeallmProjector: the upstream mlp2x_gelu projector maps "
                f"{w0.shape[1]} -> {upstream['2.weight'].shape[0]}, this FEALLM projector's MLP "
                f"maps {self.vision_hidden} -> {self.llm_hidden}; use an mm_projector.bin made "
                "for the same vision tower and LLM"
            )
        self.mlp.load_state_dict(upstream, strict=True, assign=assign)
        log.info("FeallmProjector: warm start of the MLP from an upstream mlp2x_gelu projector")
        missing = [k for k in self.state_dict() if not k.startswith("mpp.mlp.")]
        return _IncompatibleKeys(missing_keys=missing, unexpected_keys=[])


def _upstream_mlp_state(state_dict) -> dict[str, Tensor] | None:
    """The state dict re-keyed as `0.weight` ... when it is exactly an upstream mlp2x_gelu."""
    keys = {k.rsplit("mm_projector.", 1)[-1]: k for k in state_dict}
    if len(keys) != len(state_dict) or set(keys) != UPSTREAM_MLP_KEYS:
        return None
    return {k: state_dict[orig] for k, orig in keys.items()}
