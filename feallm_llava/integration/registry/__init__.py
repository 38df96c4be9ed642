"""Where `feallm` is hooked into upstream LLaVA, one job per module:

    builders         `feallm` in llava's tower / projector builders and in
                     `initialize_vision_modules` (config fields, LLaVA-1.5 warm start)
    train_flags      `--mm_feallm_*` and `--skip_bad_samples` on upstream's train
                     arguments, however train.py is started
    dataset_checks   bad samples named, or skipped and counted
    lora             LoRA's targets: the LLM's Linears only
    trainer          resumable checkpoints with safetensors twins

Nothing here imports torch or llava at import time: each hook runs when llava's module
is imported (`feallm_llava.autoload`).
"""

from __future__ import annotations

from feallm_llava import autoload
from feallm_llava.integration import compat, serving_features
from feallm_llava.integration.registry.builders import PROJECTOR_TYPE, hook_arch, hook_builders, is_feallm
from feallm_llava.integration.registry.train_flags import hook_train
from feallm_llava.integration.registry.trainer import hook_trainer

__all__ = ["PROJECTOR_TYPE", "is_feallm", "register"]

# llava module -> what is done to it when it is imported
HOOKS = (
    ("llava.model.multimodal_encoder.builder", hook_builders),
    ("llava.model.multimodal_projector.builder", hook_builders),
    ("llava.model.llava_arch", hook_arch),
    ("llava.train.train", hook_train),
    ("llava.train.llava_trainer", hook_trainer),  # imported by train.py however it is started
)

_registered = False


def register() -> None:
    """Arm all hooks and the compat shims (idempotent; each runs at once if its module is loaded)."""
    global _registered
    if _registered:
        return
    _registered = True
    compat.install()
    serving_features.install()  # failover and access control of upstream's controller / worker
    for module, hook in HOOKS:
        autoload.after_import(module, hook)
