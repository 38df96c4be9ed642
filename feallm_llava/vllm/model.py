"""FeallmLlavaForConditionalGeneration: an exported FEALLM (or LLaVA-1.5) checkpoint in vLLM.

vLLM's own LLaVA class feeds its projector one CLIP layer's patch tokens; FEALLM's
projector also reads the shallow layers 3/8/13/18 and the pixels (the LCA cuts its face
crops from them) and emits N + 1 tokens. So the vision path here runs vLLM's CLIP
encoder keeping every hidden state, reads them with `model.features.tower_features` (the
same function llava's FEALLM tower uses) and calls `model.projector.FeallmProjector`, this
package's one implementation. The LLM is vLLM's own Llama (`init_vllm_registered_model`
on `text_config`), so paged attention, batching, tensor and pipeline parallelism are
vLLM's. This module does not import vLLM's `llava.py`: it pulls in Pixtral, whose image
processor needs torchvision, absent from a CPU install.

Weight names are those `feallm export-vllm` writes (HF LLaVA's older layout):
`language_model.{model,lm_head}.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`; a missing or unknown name fails the load.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (AutoWeightsLoader, WeightsMapper, init_vllm_registered_model,
                                              maybe_prefix)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from feallm_llava.model.config import FeallmConfig
from feallm_llava.model.features import check_layers, tower_features
from feallm_llava.model.projector import FeallmProjector
from feallm_llava.vllm.processing import (IMAGE_PLACEHOLDER, FeallmDummyInputsBuilder, FeallmMultiModalProcessor,
                                          FeallmProcessingInfo)


class MlpProjector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`, under HF's names (linear_1, linear_2)."""

    def __init__(self, vision_hidden: int, llm_hidden: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, llm_hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_hidden, llm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def _layer_list(value) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


@MULTIMODAL_REGISTRY.register_processor(FeallmMultiModalProcessor, info=FeallmProcessingInfo,
                                        dummy_inputs=FeallmDummyInputsBuilder)
class FeallmLlavaForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        # the newer HF LLaVA layout, should a folder carry it
        "model.language_model.": "language_model.model.",
        "model.vision_tower.": "vision_tower.",
        "model.multi_modal_projector.": "multi_modal_projector.",
        "lm_head.": "language_model.lm_head.",
    })

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_PLACEHOLDER
        raise ValueError("FEALLM takes images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.projector_type = getattr(config, "mm_projector_type", "feallm")
        vision = config.vision_config
        num_layers = vision.num_hidden_layers
        # the deep layer first, then the shallow ones (as the export writes them)
        layers = _layer_list(config.vision_feature_layer)
        self.feallm = FeallmConfig.from_llava_config(config) if self.projector_type == "feallm" else None
        shallow = list(self.feallm.shallow_layers) if self.feallm is not None else []
        check_layers(num_layers, shallow, layers[0], "exported config.json")
        # non-negative indices: only the layers read are built, so -k would count from the wrong end
        self.select_layer = layers[0] if layers[0] >= 0 else num_layers + 1 + layers[0]
        self.shallow_layers = [i if i >= 0 else num_layers + 1 + i for i in shallow]
        deepest = max([self.select_layer, *self.shallow_layers])
        self.grid = (vision.image_size // vision.patch_size,) * 2

        self._image_token_id = int(config.image_token_index)
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size,
                                         mm_token_ids=[config.image_token_index])
        with self._mark_tower_model(vllm_config, "image"):
            # only the layers read are built; their outputs are what CLIP's hidden_states hold
            self.vision_tower = CLIPVisionModel(vision, quant_config=vllm_config.quant_config,
                                                num_hidden_layers_override=deepest, require_post_norm=False,
                                                prefix=maybe_prefix(prefix, "vision_tower"))
            if self.feallm is not None:
                self.multi_modal_projector = FeallmProjector(self.feallm, vision_hidden=vision.hidden_size,
                                                             llm_hidden=config.text_config.hidden_size)
            elif self.projector_type == "mlp2x_gelu":
                self.multi_modal_projector = MlpProjector(vision.hidden_size, config.text_config.hidden_size)
            else:
                raise ValueError(f"mm_projector_type {self.projector_type!r}: FeallmLlavaForConditionalGeneration "
                                 "serves feallm and mlp2x_gelu")
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(vllm_config=vllm_config, hf_config=config.text_config,
                                                             prefix=maybe_prefix(prefix, "language_model"))
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # -- images -> LLM tokens ------------------------------------------------------------
    def _hidden_states(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """CLIP's hidden states as transformers numbers them (0 = embeddings, k = layer k)."""
        vm = self.vision_tower.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels))  # (B, 1 + N, C)
        return vm.encoder(inputs_embeds=x, return_all_hidden_states=True)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N [+ 1], D): what replaces each image's placeholders."""
        pixels = pixels.to(dtype=self.vision_tower.dtype)
        hidden = self._hidden_states(pixels)
        features = tower_features(hidden, pixels, select_layer=self.select_layer,
                                  shallow_layers=self.shallow_layers, grid=self.grid)
        if self.feallm is not None:
            return self.multi_modal_projector(features)
        return self.multi_modal_projector(features.deep)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixels = kwargs.pop("pixel_values", None)
        if pixels is None:
            return []
        if isinstance(pixels, (list, tuple)):
            pixels = torch.stack([p.squeeze(0) if p.dim() == 4 else p for p in pixels])
        return tuple(self.image_tokens(pixels))  # one (N [+ 1], D) tensor per image

    # -- the LLM ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The LLM's logits, widened to hold the image placeholder's id when the export
        added it past the LLM's vocabulary (LLaVA-1.5's tokenizer has no `<image>`): vLLM's
        `prompt_logprobs` reads a log-probability for every prompt token, placeholders
        included, and an id past the logits' width crashed the engine. The added columns
        sit at the dtype's lowest value, so every real token's probability is unchanged
        and greedy decoding never picks them."""
        logits = self.language_model.compute_logits(hidden_states)
        if logits is None or logits.shape[-1] > self._image_token_id:
            return logits
        extra = self._image_token_id + 1 - logits.shape[-1]
        return torch.nn.functional.pad(logits, (0, extra), value=torch.finfo(logits.dtype).min)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
