"""LoRA's targets: the LLM's Linear layers by full name, never the projector's or the tower's."""

from __future__ import annotations

_NOT_LORA = ("mm_projector", "vision_tower", "vision_resampler", "lm_head")


def lora_target_modules(model) -> list[str]:
    """Full names of the LLM's Linear layers: LoRA's targets.

    Upstream's `find_all_linear_names` returns leaf names (`q_proj`, ...), which PEFT
    matches anywhere: a loaded CLIP tower's `q_proj/k_proj/v_proj` (or any projector
    Linear so named) would be wrapped too, saved as `...base_layer.weight` and silently
    dropped by the loader. Full names match only the LLM's layers.
    """
    import torch.nn as nn

    return sorted(
        name for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not any(part in _NOT_LORA for part in name.split("."))
    )
