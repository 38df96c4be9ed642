"""An upstream `LlavaLlamaForCausalLM` assembled as llava's train script assembles it.

`train()` loads the LLM with the LLaVA class, then calls `initialize_vision_modules`
with its `ModelArguments`; these two functions do the same from paths, so a FEALLM (or
any projector type) model exists without a training run: the tiny kit's checkpoints,
and tests that need a model as stage 1 would start it.
"""

from __future__ import annotations

from pathlib import Path


def llava_model_args(llm: Path | str, vision_tower: Path | str, projector_type: str = "feallm", **overrides):
    """The `ModelArguments` upstream's train script would parse (with FEALLM's flags)."""
    from feallm_llava.integration.registry.train_flags import model_arguments_class

    args = model_arguments_class()(
        model_name_or_path=str(llm),
        version="v1",
        vision_tower=str(vision_tower),
        mm_vision_select_layer=-2,
        mm_projector_type=projector_type,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
    )
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def build_llava_model(llm: Path | str, vision_tower: Path | str, projector_type: str = "feallm", seed: int = 0,
                      max_length: int = 1024, **overrides):
    """An upstream `LlavaLlamaForCausalLM` on `llm` and `vision_tower`, fp32, built as train.py builds it."""
    import torch
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    from feallm_llava.integration import register

    register()
    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM.from_pretrained(str(llm), torch_dtype=torch.float32)
    args = llava_model_args(llm, vision_tower, projector_type, **overrides)
    model.get_model().initialize_vision_modules(model_args=args)
    model.config.mm_use_im_start_end = False
    model.config.mm_use_im_patch_token = False
    model.config.image_aspect_ratio = "pad"
    model.config.tokenizer_padding_side = "right"
    model.config.tokenizer_model_max_length = max_length
    return model
