"""Shims that let upstream LLaVA (`llava-torch==1.2.2.post1`) run on the pinned stack.

Upstream pins torch 2.0 / transformers 4.36 and breaks on anything newer than 4.37.2.
Each shim in `SHIMS` is named, says what breaks and on which versions, decides for
itself whether the installed versions need it, and is a no-op otherwise. Shims are
applied lazily when the llava module they mend is imported (`feallm_llava.autoload`),
so importing this package costs nothing. One module per concern:

    training   llava.train.*: trainer and train() on newer transformers, without
               flash-attn or DeepSpeed, seeded
    loading    llava.model.*: forward() keywords of newer generate(), quantized loading,
               padded batches' attention masks without vmap
    serving    the worker's errors with their cause (in its log and its replies), the
               chat page's example images, prompts in the checkpoint's trained template
    scripts    upstream's eval scripts on a machine without CUDA; they and the chat CLI
               prompt in the template a checkpoint records it was trained with

`python -m feallm_llava.integration.compat` prints the table and whether each is active.
"""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

from feallm_llava import autoload
from feallm_llava.integration.compat import loading, scripts, serving, training
from feallm_llava.integration.compat.shim import Shim

log = logging.getLogger(__name__)

# Every shim, in the order they are armed; each module's shims are defined there, with
# what breaks without them and where they are needed.
SHIMS: tuple[Shim, ...] = (
    loading.open_forward,
    loading.padded_batch_mask,
    training.layernorm_layers,
    training.train_sampler,
    training.save_checkpoint_metrics,
    training.trainer_tokenizer,
    training.datasets_namespace,
    training.flash_attn_fallback,
    training.seed_model_init,
    training.warmup_ratio,
    training.deepspeed_optional,
    training.qlora_training,
    training.deepspeed_cpu_start,
    training.empty_param_groups,
    training.zero3_half_precision,
    loading.quantized_loading,
    serving.worker_generate_errors,
    serving.worker_image_errors,
    serving.worker_error_replies,
    serving.serve_examples,
    serving.worker_conv_template,
    serving.worker_context_check,
    scripts.eval_scripts_on_cpu,
    scripts.scripts_conv_template,
)


SKIP_ENV = "FEALLM_COMPAT_SKIP"  # comma-separated shim names left off (to see upstream's own failure)


def install() -> None:
    """Arm every needed shim on its module (now if imported, else at import). Idempotent.

    Shims named in `FEALLM_COMPAT_SKIP` stay off in this process (and its children)."""
    skip = {name.strip() for name in os.environ.get(SKIP_ENV, "").split(",") if name.strip()}
    unknown = skip - {shim.name for shim in SHIMS}
    if unknown:
        log.warning("%s names no compat shim: %s (python -m feallm_llava.integration.compat lists them)",
                    SKIP_ENV, ", ".join(sorted(unknown)))
    for shim in SHIMS:
        if shim.name in skip:
            log.warning("compat shim %s left off (%s)", shim.name, SKIP_ENV)
            continue
        hook = autoload.before_import if shim.before else autoload.after_import
        hook(shim.module, functools.partial(_apply_if_needed, shim))


def _apply_if_needed(shim: Shim, module: ModuleType) -> None:
    if shim.needed():
        shim.apply(module)


def table() -> str:
    rows = ["| shim | mends | fails without it | needed on | active here |", "|---|---|---|---|---|"]
    for s in SHIMS:
        rows.append(f"| `{s.name}` | `{s.module}` | {s.breaks} | {s.versions} | {'yes' if s.needed() else 'no'} |")
    return "\n".join(rows)
