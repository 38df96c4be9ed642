"""LLaVATrainer checkpoints: resumable in every mode, every weight file with a safetensors twin.

Upstream saves only `mm_projector.bin` + config in stage-1 checkpoints
(`--tune_mm_mlp_adapter`), which its own auto-resume cannot restart from; LoRA
checkpoints lack the projector. Here every `checkpoint-N` also gets the base Trainer's
optimizer, scheduler, RNG and trainer state, and the projector (or non-LoRA) weights
as `.safetensors`; a resume reloads them, from the newest complete checkpoint.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

from feallm_llava.integration.marks import wrap
from feallm_llava.integration.registry.train_flags import hook_argument_parser

log = logging.getLogger(__name__)


def _trainables(trainer, trainer_module: ModuleType) -> tuple[str, dict]:
    """(file stem, state) of what this run trains besides LoRA, gathered under ZeRO-3."""
    from feallm_llava.model.weights import NON_LORA_FILE, PROJECTOR_FILE

    named = list(trainer.model.named_parameters())
    if getattr(trainer.args, "tune_mm_mlp_adapter", False):
        return PROJECTOR_FILE, trainer_module.get_mm_adapter_state_maybe_zero_3(named, ["mm_projector"])
    if any("lora_" in n for n, _ in named):
        keep = [(n, p) for n, p in named if p.requires_grad and "lora_" not in n]
        return NON_LORA_FILE, {n: trainer_module.maybe_zero_3(p, ignore_status=True).cpu() for n, p in keep}
    return "", {}


def _write_trainables(trainer, trainer_module: ModuleType, out_dir: str) -> None:
    from feallm_llava.model.weights import save_weights

    stem, state = _trainables(trainer, trainer_module)
    if stem and state and trainer.args.should_save:
        save_weights(state, os.path.join(out_dir, stem + ".safetensors"))


def _load_trainables(model, checkpoint_dir: str) -> bool:
    """Load the projector / non-LoRA weights saved in a checkpoint; True if there were any."""
    from feallm_llava.model.weights import NON_LORA_FILE, PROJECTOR_FILE, load_weights

    for stem in (PROJECTOR_FILE, NON_LORA_FILE):
        found = [p for ext in (".safetensors", ".bin") if os.path.exists(p := os.path.join(checkpoint_dir, stem + ext))]
        if found:  # load_weights prefers the .safetensors twin of a .bin itself
            result = model.load_state_dict(load_weights(found[0]), strict=False)
            if result.unexpected_keys:
                raise ValueError(f"{found[0]}: keys that do not fit this model: {result.unexpected_keys[:5]}")
            log.info("resumed %s from %s", stem, found[0])
            return True
    return False


COMPLETE = "feallm_checkpoint_complete"  # written last into each checkpoint this trainer saves


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that was written to the end: it holds the
    `COMPLETE` marker (written after every other file), or, in a folder of checkpoints saved
    without markers, a `trainer_state.json` that parses. A run killed mid-save leaves its
    newest checkpoint torn (an empty trainer state was seen)."""
    import json
    import re

    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else ():
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match:
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    marked = [c for c in found if os.path.exists(os.path.join(c[1], COMPLETE))]
    if marked:
        return max(marked)[1]
    for _, path in sorted(found, reverse=True):
        try:
            with open(os.path.join(path, "trainer_state.json")) as f:
                json.load(f)
            return path
        except (OSError, ValueError):
            continue
    return None


def hook_trainer(module: ModuleType) -> None:
    """llava.train.llava_trainer: resumable checkpoints with safetensors twins (and the
    argument-parser hook: train.py imports this module however it is started)."""
    hook_argument_parser(module)
    from transformers import Trainer

    def saving(original):
        def _save_checkpoint(self, model, trial, *args, **kwargs):
            original(self, model, trial, *args, **kwargs)
            if getattr(self.args, "tune_mm_mlp_adapter", False):
                # Upstream saved only mm_projector.bin + config, which its own auto-resume
                # cannot restart from; the base Trainer adds optimizer, scheduler, RNG and
                # trainer state (its model save is upstream's no-op `_save` in this mode).
                Trainer._save_checkpoint(self, model, trial)
            out = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            _write_trainables(self, module, out)
            if self.args.should_save:
                open(os.path.join(out, COMPLETE), "w").close()
        return _save_checkpoint

    def loading(original):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            model = self.model if model is None else model
            if getattr(self.args, "tune_mm_mlp_adapter", False):
                if not _load_trainables(model, resume_from_checkpoint):
                    raise FileNotFoundError(f"{resume_from_checkpoint}: no mm_projector weights to resume from")
                return
            original(self, resume_from_checkpoint, model)
            _load_trainables(model, resume_from_checkpoint)  # LoRA runs: the projector too
        return _load_from_checkpoint

    def training(original):
        def train(self, *args, resume_from_checkpoint=None, **kwargs):
            if resume_from_checkpoint is True:
                # A run killed while writing its newest checkpoint leaves it torn;
                # resume from the newest one written to the end.
                resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or None
            result = original(self, *args, resume_from_checkpoint=resume_from_checkpoint, **kwargs)
            _write_trainables(self, module, self.args.output_dir)
            return result
        return train

    for name, make in (("_save_checkpoint", saving), ("_load_from_checkpoint", loading), ("train", training)):
        wrap(module.LLaVATrainer, name, "trainer_checkpoints", make)
