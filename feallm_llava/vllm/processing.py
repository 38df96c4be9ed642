"""Images and prompts for FEALLM on vLLM: LLaVA-1.5's padding, CLIP's preprocessing, N + 1 tokens.

LLaVA-1.5 (`image_aspect_ratio: pad`) pads a photo to a square in the CLIP mean colour
before CLIP's resize and centre crop; transformers' LLaVA processor only crops, which
cuts the sides of a wide face photo away. The preprocessing is transformers' PIL CLIP
processor (its default one needs torchvision, which a CPU install of vLLM lacks), the
numbers of upstream's.

vLLM puts one `<image>` in the prompt per image (`get_placeholder_str`) and this
processor widens it to the image-token count the export recorded (`feallm_image_tokens`:
the patch grid, plus 1 for the LCA's local token).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

import torch
from PIL import Image
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        PromptReplacement)

IMAGE_PLACEHOLDER = "<image>"


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """`image` centred on a square canvas of its longer side, `fill` around it (LLaVA-1.5's pad)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class FeallmProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "images_kwargs": set()}  # nothing per request: the export fixes it

    @cached_property
    def image_processor(self):
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return CLIPImageProcessorPil(**self.ctx.get_hf_image_processor_config())

    def image_token_id(self) -> int:
        return int(self.get_hf_config().image_token_index)

    def get_num_image_tokens(self) -> int:
        return int(self.get_hf_config().feallm_image_tokens)

    def image_side(self) -> int:
        return int(self.get_hf_config().vision_config.image_size)

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, 3, S, S) CLIP input, each image padded to a square first when the checkpoint was trained so."""
        processor = self.image_processor
        if getattr(self.get_hf_config(), "image_aspect_ratio", "pad") == "pad":
            fill = tuple(int(x * 255) for x in processor.image_mean)
            images = [expand_to_square(im.convert("RGB"), fill) for im in images]
        out = processor(images=list(images), return_tensors="pt")
        return out["pixel_values"]


class FeallmDummyInputsBuilder(BaseDummyInputsBuilder[FeallmProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE_PLACEHOLDER * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        side = self.info.image_side()
        overrides = mm_options.get("image") if mm_options else None
        return {"image": self._get_dummy_images(width=side, height=side, num_images=mm_counts.get("image", 0),
                                                overrides=overrides)}


class FeallmMultiModalProcessor(BaseMultiModalProcessor[FeallmProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = hf_data.get("images") or []
        if not isinstance(images, (list, tuple)):
            images = [images]
        return BatchFeature({"pixel_values": self.info.pixels(images)})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        token = self.info.image_token_id()
        count = self.info.get_num_image_tokens()
        return [PromptReplacement(modality="image", target=[token], replacement=[token] * count)]
