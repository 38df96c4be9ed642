"""Shims for loading a checkpoint and generating with it (`llava.model.*`)."""

from __future__ import annotations

import inspect

from feallm_llava.integration.compat.shim import shim
from feallm_llava.integration.compat.versions import transformers_at_least
from feallm_llava.integration.paths import check_model_path

# Quantized loading keeps these in full precision: the FEALLM projector (or
# LLaVA's MLP), the CLIP tower and lm_head.
QUANT_SKIP_MODULES = ["mm_projector", "vision_tower", "lm_head"]


@shim("llava.model.language_model.llava_llama", replaces="LlavaLlamaForCausalLM.forward",
      versions="transformers >= 4.38", needed=transformers_at_least(4, 38))
def open_forward(original):
    """Without it: generate(): forward() got an unexpected keyword argument 'cache_position' (5.x:
    'cache').

    Let LLaVA's forward() take the keyword arguments newer generate() passes.

    transformers >= 4.38 passes `cache_position` (and later `logits_to_keep`), 5.x
    passes the cache as `cache=`. Upstream's forward lists its arguments explicitly,
    so each raises TypeError. The wrapper maps `cache` to `past_key_values` and drops
    what the forward does not know: LlamaModel recomputes `cache_position` from the
    cache length, and logits for every position are still correct.
    """
    known = set(inspect.signature(original).parameters)

    def forward(self, *args, **kwargs):
        if "cache" in kwargs and "cache" not in known:
            kwargs.setdefault("past_key_values", kwargs.pop("cache"))
        return original(self, *args, **{k: v for k, v in kwargs.items() if k in known})
    return forward


@shim("llava.model.builder", replaces="load_pretrained_model",
      versions="transformers >= 4.38 (ValueError), all (skip list, path check)")
def quantized_loading(original):
    """Without it: load_4bit: ValueError (both load_in_4bit and quantization_config); projector
    quantized; a missing local path becomes a hub request.

    load_pretrained_model: one quantization config that skips the projector; paths checked."""
    def load_pretrained_model(model_path, model_base, model_name, load_8bit=False, load_4bit=False, *args, **kwargs):
        check_model_path(model_path, "model_path")
        if model_base is not None:
            check_model_path(model_base, "model_base")
        if (load_8bit or load_4bit) and "quantization_config" not in kwargs:
            kwargs["quantization_config"] = quantization_config(load_8bit=load_8bit)
            load_8bit = load_4bit = False
        return original(model_path, model_base, model_name, load_8bit, load_4bit, *args, **kwargs)
    return load_pretrained_model


def quantization_config(load_8bit: bool, *, compute_dtype=None, double_quant: bool = True, quant_type: str = "nf4"):
    """bitsandbytes config that leaves the FEALLM projector, CLIP and lm_head unquantized.

    4-bit: `quant_type` (nf4) with double quantization, computing in `compute_dtype`
    (float16 when None, as upstream's loader); 8-bit: LLM.int8(). Upstream's train.py
    `--bits 4/8` passes its own dtype and flags (`qlora_training`).
    """
    import torch
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(QUANT_SKIP_MODULES))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=torch.float16 if compute_dtype is None else compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_type=quant_type,
        llm_int8_skip_modules=list(QUANT_SKIP_MODULES),
    )


def _mask_built_with_vmap() -> bool:
    """transformers' sdpa mask is the vmapped one (masking_utils, torch >= 2.6)."""
    try:
        from transformers import masking_utils
    except ImportError:  # transformers < 4.53: masks were built otherwise
        return False
    from feallm_llava.integration.marks import original_of

    recent = getattr(masking_utils, "sdpa_mask_recent_torch", None)
    return recent is not None and original_of(getattr(masking_utils, "sdpa_mask", None)) is recent


@shim("llava.model.language_model.llava_llama", versions="transformers >= 4.53 with torch >= 2.6",
      needed=_mask_built_with_vmap)
def padded_batch_mask(_module):
    """Without it: every decoding step of a left-padded batch builds its (B, 1, q, kv) attention
    mask through four nested torch.vmap calls (~1.6 ms a step on CPU): generate() at batch 8
    answered 1.9x as many items per second as batch 1 on the tiny kit.

    transformers' `sdpa_mask` (also behind `eager_mask`) builds every mask from a mask
    function with `torch.vmap`, whose dispatch costs far more than the mask. LLaVA's LLaMA
    asks for the plain causal mask with the batch's padding; for that one function the
    replacement computes the same boolean tensor by broadcasting (kv <= position, and the
    padding mask), and hands every other mask function (sliding window, chunked, packed
    sequences, or/and overlays) to the original. Same masks (tested against the
    original), same answers.
    """
    import torch
    from transformers import masking_utils

    from feallm_llava.integration.marks import wrap

    def make(original):
        def sdpa_mask(batch_size, cache_position, kv_length, kv_offset=0,
                      mask_function=masking_utils.causal_mask_function, attention_mask=None,
                      local_size=None, allow_is_causal_skip=True, **kwargs):
            if mask_function is not masking_utils.causal_mask_function:  # by keyword: the originals differ
                return original(batch_size, cache_position, kv_length, kv_offset=kv_offset,
                                mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
                                allow_is_causal_skip=allow_is_causal_skip, **kwargs)
            padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
            if allow_is_causal_skip and masking_utils._ignore_causal_mask_sdpa(
                    padding, cache_position.shape[0], kv_length, kv_offset, local_size):
                return None
            kv_index = torch.arange(kv_length, device=cache_position.device) + kv_offset
            causal = kv_index[None, :] <= cache_position[:, None]  # (q, kv)
            if padding is None:
                return causal.expand(batch_size, 1, *causal.shape).contiguous()
            return causal[None, None] & padding[:, kv_index].bool()[:, None, None, :]  # (B, 1, q, kv)
        return sdpa_mask

    wrap(masking_utils, "sdpa_mask", "padded_batch_mask", make)
    registry = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    if registry.get("sdpa") is masking_utils.sdpa_mask_recent_torch:
        registry["sdpa"] = masking_utils.sdpa_mask
