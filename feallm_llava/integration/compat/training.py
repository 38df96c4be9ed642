"""Shims for upstream's training code (`llava.train.*`) on the pinned transformers."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import sys
from types import ModuleType

from feallm_llava.integration.compat.shim import shim
from feallm_llava.integration.compat.versions import flash_attn_available, transformers_at_least
from feallm_llava.integration.marks import wrap

log = logging.getLogger(__name__)

_TRAINER = "llava.train.llava_trainer"
_TRAIN = "llava.train.train"


@shim(_TRAINER, versions="transformers >= 4.53", needed=transformers_at_least(4, 53), before=True)
def layernorm_layers(_module: ModuleType) -> None:
    """Without it: cannot import name 'ALL_LAYERNORM_LAYERS' from 'transformers.trainer'.

    Put `ALL_LAYERNORM_LAYERS` back where llava_trainer imports it from."""
    import transformers.trainer
    from transformers import pytorch_utils

    if not hasattr(transformers.trainer, "ALL_LAYERNORM_LAYERS"):
        layers = getattr(pytorch_utils, "ALL_LAYERNORM_LAYERS", None)
        if layers is None:  # 5.x dropped it from pytorch_utils too
            import torch.nn as nn

            layers = [nn.LayerNorm]
        transformers.trainer.ALL_LAYERNORM_LAYERS = layers


def _sampler_takes_dataset() -> bool:
    from transformers import Trainer

    return len(inspect.signature(Trainer._get_train_sampler).parameters) > 1


@shim(_TRAINER, replaces="LLaVATrainer._get_train_sampler",
      versions="transformers >= 4.52", needed=_sampler_takes_dataset)
def train_sampler(original):
    """Without it: _get_train_sampler() takes 1 positional argument but 2 were given.

    LLaVATrainer._get_train_sampler(self) vs a Trainer that passes the dataset."""
    from transformers import Trainer

    def _get_train_sampler(self, train_dataset=None):
        if train_dataset is None or train_dataset is self.train_dataset:
            if not self.args.group_by_modality_length:
                return Trainer._get_train_sampler(self, *([] if train_dataset is None else [train_dataset]))
            return original(self)
        return Trainer._get_train_sampler(self, train_dataset)  # an eval dataset: upstream's logic does not apply
    return _get_train_sampler


def _save_takes_no_metrics() -> bool:
    from transformers import Trainer

    return "metrics" not in inspect.signature(Trainer._save_checkpoint).parameters


@shim(_TRAINER, replaces="LLaVATrainer._save_checkpoint",
      versions="transformers >= 4.47", needed=_save_takes_no_metrics)
def save_checkpoint_metrics(original):
    """Without it: _save_checkpoint() takes 3 positional arguments but 4 were given (non-adapter runs).

    LLaVATrainer._save_checkpoint passes `metrics`, which the Trainer no longer takes."""
    from transformers import Trainer

    def _save_checkpoint(self, model, trial, metrics=None):
        if getattr(self.args, "tune_mm_mlp_adapter", False):
            return original(self, model, trial)
        return Trainer._save_checkpoint(self, model, trial)  # upstream's only other path: the base save
    return _save_checkpoint


@shim(_TRAINER, replaces="LLaVATrainer.__init__",
      versions="transformers >= 5.0", needed=transformers_at_least(5, 0))
def trainer_tokenizer(original):
    """Without it: Trainer.__init__() got an unexpected keyword argument 'tokenizer'.

    transformers 5.x: Trainer(tokenizer=...) is Trainer(processing_class=...)."""
    def __init__(self, *args, **kwargs):
        if "tokenizer" in kwargs:
            kwargs.setdefault("processing_class", kwargs.pop("tokenizer"))
        original(self, *args, **kwargs)
    return __init__


def _datasets_is_a_folder() -> bool:
    from transformers.utils import is_datasets_available

    spec = importlib.util.find_spec("datasets")
    # a real install is a module with a file; a bare folder is a namespace package
    return spec is not None and spec.origin in (None, "namespace") and is_datasets_available()


@shim(_TRAINER, versions="transformers >= 5.0, library `datasets` not installed", needed=_datasets_is_a_folder)
def datasets_namespace(_module: ModuleType) -> None:
    """Without it: train from the checkout's root: module 'datasets' has no attribute 'Dataset' (our
    datasets/ folder taken for the library).

    Tell the Trainer that `datasets` is absent when only a same-named folder is on sys.path.

    5.x's `is_datasets_available()` asks `find_spec("datasets")` alone (4.x also asked
    for the distribution's metadata). Run from a checkout's root (`python -m
    llava.train.train_mem`, cwd first on sys.path) our `datasets/` folder is found as a
    namespace package, and the Trainer's dataloader fails on `datasets.Dataset`.
    """
    import transformers.trainer

    wrap(transformers.trainer, "is_datasets_available", "datasets_namespace", lambda _original: lambda: False)


def _without_flash_attn() -> bool:
    return not flash_attn_available()


@shim(_TRAIN, replaces="train", versions="any, without flash-attn", needed=_without_flash_attn)
def flash_attn_fallback(original):
    """Without it: train_mem: flash_attention_2 requested but flash-attn / CUDA absent -> ImportError.

    train_mem asks for flash-attention 2, which CPUs and many GPUs lack: sdpa there."""
    def train(attn_implementation=None):
        if attn_implementation == "flash_attention_2" and not flash_attn_available():
            log.warning("flash-attn is not installed (or no CUDA): training with sdpa attention")
            attn_implementation = "sdpa"
        return original(attn_implementation=attn_implementation)
    return train


@shim(_TRAIN, replaces="train", versions="all")
def seed_model_init(original):
    """Without it: same flags, another run: the projector and LoRA are initialised before set_seed.

    Seed with the run's `--seed` before upstream's `train()` builds the model.

    `train()` creates the projector (`initialize_vision_modules`) and the LoRA adapters
    (`get_peft_model`) before `LLaVATrainer(...)` calls `set_seed(args.seed)`, so their
    random initialisation, and every run after it, changes from launch to launch with
    the same flags (the demo's stage 2 from one stage-1 checkpoint: FE 65 % in one
    launch, 85 % in the next). `--seed` is read from the command line (TrainingArguments'
    default 42 without it), as the Trainer will use it.
    """
    def train(*args, **kwargs):
        from transformers import set_seed

        set_seed(_seed_from_argv(sys.argv))
        return original(*args, **kwargs)
    return train


def _seed_from_argv(argv: list[str], default: int = 42) -> int:
    """`--seed` as HfArgumentParser will read it (either form; the last one wins)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--seed", type=int, default=default)
    return parser.parse_known_args(argv)[0].seed


def _no_warmup_ratio() -> bool:
    from transformers import TrainingArguments

    return "warmup_ratio" not in {f.name for f in dataclasses.fields(TrainingArguments)}


@shim(_TRAIN, replaces="TrainingArguments", versions="transformers >= 5.0", needed=_no_warmup_ratio)
def warmup_ratio(base):
    """Without it: Some specified arguments are not used by the HfArgumentParser: ['--warmup_ratio',
    '0.03'].

    Give upstream's TrainingArguments back `--warmup_ratio`, as a ratio-valued warmup_steps.

    LLaVA's scripts (and ours) pass `--warmup_ratio 0.03`; 5.x's HfArgumentParser rejects
    it as unused. 5.x reads a `warmup_steps` below 1 as the ratio of total steps, so the
    ratio is moved there unless steps were given too. `train()` looks
    `TrainingArguments` up at call time, so rebinding the name suffices.
    """
    def __post_init__(self):
        ratio = self.warmup_ratio
        if ratio is not None:
            if not 0 <= ratio < 1:
                raise ValueError(f"--warmup_ratio {ratio}: must be in [0, 1)")
            if not self.warmup_steps:
                self.warmup_steps = ratio
        base.__post_init__(self)

    cls = dataclasses.make_dataclass(
        "TrainingArguments",
        [("warmup_ratio", float | None, dataclasses.field(
            default=None, metadata={"help": "Warmup as a ratio of total steps (mapped to warmup_steps)."}))],
        bases=(base,), namespace={"__post_init__": __post_init__})
    cls.__module__ = base.__module__
    return cls


def _without_deepspeed() -> bool:
    return importlib.util.find_spec("deepspeed") is None


@shim(_TRAIN, versions="without deepspeed", needed=_without_deepspeed)
def deepspeed_optional(module: ModuleType) -> None:
    """Without it: first save of a run without DeepSpeed (projector, LoRA, non-LoRA): No module named
    'deepspeed'.

    `maybe_zero_3` without deepspeed: a parameter DeepSpeed never partitioned is copied.

    Upstream's `maybe_zero_3` (train.py and llava_trainer.py, used for every saved
    projector / LoRA / non-LoRA state) imports deepspeed first, so a run launched
    without DeepSpeed (one GPU, plain python) trains and then fails at its first save
    with `No module named 'deepspeed'`. Without deepspeed no parameter has a `ds_id`,
    and upstream's own branch for that case is a detached CPU copy. Applied when
    `llava.train.train` is imported, which has imported `llava.train.llava_trainer` first.
    """
    def make(original):
        def maybe_zero_3(param, ignore_status=False, name=None):
            if hasattr(param, "ds_id"):  # partitioned by ZeRO-3: only deepspeed can gather it
                return original(param, ignore_status=ignore_status, name=name)
            return param.detach().cpu().clone()
        return maybe_zero_3

    for target in (module, sys.modules.get(_TRAINER)):
        if getattr(target, "maybe_zero_3", None) is not None:
            wrap(target, "maybe_zero_3", "deepspeed_optional", make)
