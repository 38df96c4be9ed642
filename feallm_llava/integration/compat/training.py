"""Shims for upstream's training code (`llava.train.*`) on the pinned transformers."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import logging
import os
import sys
from types import ModuleType
from typing import Self

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


@functools.cache
def _bnb_kwargs_refused() -> bool:
    """Whether the installed transformers refuses upstream's `--bits` load: `load_in_4bit`
    next to `quantization_config`.

    Asked of `from_pretrained` itself, on a one-layer Llama built from a config and an
    empty state dict (no file is read or written): 4.38-4.57 raise ValueError before
    anything is built, 5.x TypeError (`load_in_4bit` reaches the model's `__init__`). A
    transformers that takes both (4.37) builds the model, or fails for another reason
    (bitsandbytes), and the shim stays off.
    """
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1)
    try:
        LlamaForCausalLM.from_pretrained(None, config=config, state_dict={}, load_in_4bit=True,
                                         quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    except (ValueError, TypeError) as err:
        return "load_in_4bit" in str(err)
    except Exception:  # noqa: BLE001 - accepted the pair, then failed elsewhere: not this failure
        return False
    return False


def _bits_from_argv(argv: list[str]) -> int | None:
    """`--bits` as given on the command line (either form; the last one wins), else None."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--bits", default=None)
    value = parser.parse_known_args(argv)[0].bits
    return int(value) if value in ("4", "8") else None


@shim(_TRAIN, replaces="train", versions="transformers >= 4.38 (5.x: TypeError), with --bits 4/8",
      needed=_bnb_kwargs_refused)
def qlora_training(original):
    """Without it: `--bits 4/8` (QLoRA): ValueError (both load_in_4bit and quantization_config); that
    alone mended, the projector trains in bf16 / fp16 and the LoRA checkpoint does not load.

    A `train()` launched with `--bits 4` or `--bits 8` runs with three changes, all undone
    when it returns; any other run is upstream's `train()` untouched.

    1. One quantization config. Upstream passes `load_in_4bit`/`load_in_8bit` and a
       `BitsAndBytesConfig` to `from_pretrained`: ValueError on transformers >= 4.38
       (5.x: TypeError). Only `loading.quantization_config` is passed, with upstream's
       compute dtype (`--bf16` / `--fp16`, else float32), `--double_quant` and
       `--quant_type`, and `QUANT_SKIP_MODULES`: the projector, the CLIP tower and
       `lm_head` stay unquantized (upstream's list, `mm_projector` alone, made `lm_head`
       a Linear4bit). The LLM's decoder Linear layers load as bitsandbytes Linear4bit /
       Linear8bitLt; `prepare_model_for_kbit_training` and LoRA then run as upstream's.
    2. The projector keeps float32. Upstream casts it to the compute dtype
       (`mm_projector.to(dtype=compute_dtype)`); measured on the tiny kit, 2 steps at
       `--mm_projector_lr 2e-5`: under `--bf16` the stage-1 weights are rounded and 80 %
       of the projector's elements never move (Adam's step rounds away; 0.6 % in
       float32), under `--fp16` the second step's gradient norm is NaN and every saved
       projector tensor is NaN. Its `.to()` now moves devices only, so it trains in
       float32 (under autocast) at `--mm_projector_lr`, as in a 16-bit LoRA run, and
       `non_lora_trainables.bin` holds float32.
    3. The `config.json` saved with the LoRA adapter leaves out `quantization_config`
       (and `_pre_quantization_dtype`). With it, `load_pretrained_model` takes the
       unquantized base for pre-quantized weights and fails (`NotImplementedError: Cannot
       copy out of meta tensor`), `load_4bit` too; without it the checkpoint loads as any
       LoRA one (float16, or `load_4bit` / `load_8bit`).

    Nothing else needed mending: `prepare_model_for_kbit_training` (all weights frozen,
    the unquantized ones upcast to float32), upstream's later casts (LoRA layers to bf16
    under `--bf16`, norms to float32, the CLIP tower to bf16 / fp16 as in every run) and
    the `non_lora_trainables` save work once 1-3 hold. `--bits` without `--lora_enable`
    is refused by the Trainer itself ("cannot perform fine-tuning on purely quantized
    models"), as upstream. `--bits` is read from the command line, spelled out (`--bits
    4` or `--bits=4`).
    """
    def train(*args, **kwargs):
        bits = _bits_from_argv(sys.argv)
        if bits is None:
            return original(*args, **kwargs)
        with _QLoRARun(bits):
            return original(*args, **kwargs)
    return train


class _QLoRARun:
    """What `qlora_training` changes for one `train()` call; everything is put back on exit."""

    def __init__(self, bits: int):
        self.bits = bits
        self.model = None  # the quantized model upstream loaded
        self._undo: list = []

    def __enter__(self) -> Self:
        from transformers import PretrainedConfig, PreTrainedModel

        self._swap(PreTrainedModel, "from_pretrained",
                   classmethod(self._one_config(PreTrainedModel.from_pretrained.__func__)))
        self._swap(PretrainedConfig, "save_pretrained", self._unquantized_base(PretrainedConfig.save_pretrained))
        return self

    def __exit__(self, *_exc) -> bool:
        while self._undo:
            self._undo.pop()()
        return False

    def _swap(self, owner, name: str, value) -> None:
        own = vars(owner)
        had, old = name in own, own.get(name)
        setattr(owner, name, value)
        self._undo.append(lambda: setattr(owner, name, old) if had else delattr(owner, name))

    def _one_config(self, from_pretrained):
        """1: upstream's load_in_*bit + BitsAndBytesConfig become loading's one config."""
        from feallm_llava.integration.compat.loading import quantization_config

        @functools.wraps(from_pretrained)
        def one_config(cls, *args, **kwargs):
            given = kwargs.get("quantization_config")
            eight, four = kwargs.get("load_in_8bit"), kwargs.get("load_in_4bit")
            if given is None or not (eight or four):  # not upstream's --bits load (the CLIP tower, ...)
                return from_pretrained(cls, *args, **kwargs)
            kwargs.pop("load_in_8bit", None)
            kwargs.pop("load_in_4bit", None)
            kwargs["quantization_config"] = quantization_config(
                bool(eight), compute_dtype=given.bnb_4bit_compute_dtype,
                double_quant=given.bnb_4bit_use_double_quant, quant_type=given.bnb_4bit_quant_type)
            model = from_pretrained(cls, *args, **kwargs)
            self._loaded(model)
            return model
        return one_config

    def _loaded(self, model) -> None:
        self.model = model
        quantized = sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())
        log.info("--bits %d: %d Linear layers of the LLM quantized; mm_projector, vision_tower and lm_head are not",
                 self.bits, quantized)
        inner = model.get_model() if hasattr(model, "get_model") else None
        if inner is None or not hasattr(inner, "initialize_vision_modules"):
            return  # a plain LLM: no projector

        initialize = inner.initialize_vision_modules

        def initialize_vision_modules(*args, **kwargs):
            result = initialize(*args, **kwargs)
            self._keep_dtype(inner.mm_projector)
            return result
        self._swap(inner, "initialize_vision_modules", initialize_vision_modules)

    def _keep_dtype(self, projector) -> None:
        """2: the projector's `.to()` moves it between devices but keeps its dtype."""
        import torch

        move = projector.to

        def to(*args, **kwargs):
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
            if dtype is not None:
                log.info("--bits %d: the projector stays in %s (upstream casts it to %s)", self.bits,
                         next(projector.parameters()).dtype, dtype)
            return projector if device is None else move(device=device, non_blocking=non_blocking)
        self._swap(projector, "to", to)

    def _unquantized_base(self, save_pretrained):
        """3: the model's config, saved next to LoRA weights (not quantized ones), names no quantization."""
        @functools.wraps(save_pretrained)
        def save(config, *args, **kwargs):
            model = self.model
            if model is None or config is not model.config or not any(
                    "lora_" in name for name, _ in model.named_parameters()):
                return save_pretrained(config, *args, **kwargs)
            # _pre_quantization_dtype (a torch.dtype) is left out of the JSON only next to a
            # quantization_config: both go, both come back
            held = {key: vars(config).pop(key) for key in _QUANTIZATION_KEYS if key in vars(config)}
            try:
                return save_pretrained(config, *args, **kwargs)
            finally:
                for key, value in held.items():
                    setattr(config, key, value)
        return save


_QUANTIZATION_KEYS = ("quantization_config", "_pre_quantization_dtype")


def _deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


@shim(_TRAIN, replaces="TrainingArguments.__post_init__", versions="deepspeed, on CPU ranks (--use_cpu)",
      needed=_deepspeed_installed)
def deepspeed_cpu_start(original):
    """Without it: `--deepspeed` with `--use_cpu True` on several CPU ranks: ZeRO-3 fails at start,
    train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size (8 != 4 * 1 * 1).

    Start DeepSpeed's communication before anything asks it for the world size.

    On GPUs transformers hands the process group to accelerate's DeepSpeed branch, which
    starts `deepspeed.comm`; with `--use_cpu` it takes the CPU branch (a plain gloo group)
    and DeepSpeed's own layer stays down. ZeRO-2 starts it later, inside
    `deepspeed.initialize`; ZeRO-3 asks first, in the `zero.Init` around
    `from_pretrained`, and an uninitialised `deepspeed.comm` answers world size 1. Here
    `deepspeed.init_distributed()` runs as the arguments are parsed (DeepSpeed picks its
    CPU accelerator's backend, gloo), before transformers sets its devices; accelerate
    then finds the group started. One process (WORLD_SIZE unset or 1) is left alone.
    """
    def __post_init__(self):
        if self.deepspeed and self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import deepspeed

            deepspeed.init_distributed(dist_backend=self.ddp_backend)
        original(self)
    return __post_init__


@shim(_TRAINER, replaces="LLaVATrainer.create_optimizer", versions="deepspeed, with --mm_projector_lr",
      needed=_deepspeed_installed)
def empty_param_groups(original):
    """Without it: `--mm_projector_lr` under DeepSpeed (ZeRO-2 and 3), LoRA runs: zip() argument 2 is
    longer than argument 1 (the learning-rate scheduler's first step).

    Leave out the optimizer's parameter groups that hold no parameter.

    With `--mm_projector_lr` upstream builds four groups (decay / no decay, inside and
    outside the projector); in a LoRA run nothing outside the projector is trainable
    without weight decay, so one group is empty. DeepSpeed's ZeRO optimizers drop empty
    groups after the Trainer built its scheduler on all four, and the scheduler then
    walks four learning rates over three groups. Plain torch keeps the empty group
    (harmless), so dropping it changes no update anywhere.
    """
    def create_optimizer(self):
        optimizer = original(self)
        groups = optimizer.param_groups
        kept = [g for g in groups if g["params"]]
        if len(kept) != len(groups):
            log.info("optimizer: %d empty parameter group(s) left out", len(groups) - len(kept))
            groups[:] = kept
        return optimizer
    return create_optimizer


@shim(_TRAINER, replaces="LLaVATrainer.train", versions="deepspeed >= 0.18 with ZeRO-3 and --bf16 / --fp16",
      needed=_deepspeed_installed)
def zero3_half_precision(original):
    """Without it: ZeRO-3 with --bf16 (or --fp16): expected m1 and m2 to have the same dtype, but got:
    float != c10::BFloat16 (the projector and LoRA weights stay float32).

    Cast what upstream builds after `from_pretrained` to the run's half precision.

    Under ZeRO-3 the LLM is created inside `zero.Init` in the run's dtype and
    partitioned; the projector, the CLIP tower's leftovers and the LoRA adapters come
    later, as plain float32 parameters. DeepSpeed casts a model's parameters to bf16 /
    fp16 only when none of them is partitioned yet, so these stay float32 next to a
    bf16 LLM. All of them (not the projector alone: ZeRO-3 flattens each group into one
    dtype) are cast here before the engine is built; the ZeRO optimizer keeps float32
    master copies, as for every other parameter.
    """
    def train(self, *args, **kwargs):
        dtype = _zero3_half_dtype(self)
        if dtype is not None:
            cast = 0
            for p in self.model.parameters():
                if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
                    cast += 1
            if cast:
                log.info("ZeRO-3: %d parameters built after from_pretrained cast to %s", cast, dtype)
        return original(self, *args, **kwargs)
    return train


def _zero3_half_dtype(trainer):
    """bf16 / fp16 when the trainer runs ZeRO-3 in half precision on a ZeRO-Init model, else None."""
    import torch

    if not getattr(trainer, "is_deepspeed_enabled", False) or not (trainer.args.bf16 or trainer.args.fp16):
        return None
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled() or not any(hasattr(p, "ds_id") for p in trainer.model.parameters()):
        return None
    return torch.bfloat16 if trainer.args.bf16 else torch.float16
