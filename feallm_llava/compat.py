"""Shims that let upstream LLaVA (`llava-torch==1.2.2.post1`) run on the pinned stack.

Upstream pins torch 2.0 / transformers 4.36 and breaks on anything newer than 4.37.2
(measured; see README "Compatibility"). Each shim below is named, says what breaks and
on which versions, decides for itself whether the installed versions need it, and is a
no-op otherwise. Shims are applied lazily when the llava module they mend is imported
(see `autoload.py`), so importing this file costs nothing.

`python -m feallm_llava.compat` prints the table of shims and whether each is active.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from feallm_llava import autoload

log = logging.getLogger(__name__)

_MARK = "__feallm_compat__"


def transformers_version() -> tuple[int, int]:
    from importlib.metadata import version

    major, minor = version("transformers").split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


@dataclass(frozen=True)
class Shim:
    name: str
    module: str  # the llava module it mends
    breaks: str  # what fails without it
    versions: str  # where it is needed
    needed: Callable[[], bool]
    apply: Callable[[ModuleType], None]
    before: bool = False  # run before the module executes (it fails at import)


def _mark(fn, original):
    setattr(fn, _MARK, original)
    return fn


def _is_shimmed(fn) -> bool:
    return hasattr(fn, _MARK)


# -- generate(): forward() has a closed signature ------------------------------------

def _open_forward(module: ModuleType) -> None:
    """Let LLaVA's forward() take the keyword arguments newer generate() passes.

    transformers >= 4.38 passes `cache_position` (and later `logits_to_keep`), 5.x
    passes the cache as `cache=`. Upstream's forward lists its arguments explicitly,
    so each raises TypeError. The wrapper maps `cache` to `past_key_values` and drops
    what the forward does not know: LlamaModel recomputes `cache_position` from the
    cache length, and logits for every position are still correct.
    """
    for cls_name in ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM"):
        cls = getattr(module, cls_name, None)
        if cls is None or _is_shimmed(cls.forward):
            continue
        original = cls.forward
        known = set(inspect.signature(original).parameters)

        @functools.wraps(original)
        def forward(self, *args, __original=original, __known=known, **kwargs):
            if "cache" in kwargs and "cache" not in __known:
                kwargs.setdefault("past_key_values", kwargs.pop("cache"))
            kwargs = {k: v for k, v in kwargs.items() if k in __known}
            return __original(self, *args, **kwargs)

        cls.forward = _mark(forward, original)


def _needs_open_forward() -> bool:
    return transformers_version() >= (4, 38)


# -- llava_trainer imports ALL_LAYERNORM_LAYERS from transformers.trainer ------------

def _layernorm_layers(_module: ModuleType) -> None:
    import transformers.trainer
    from transformers import pytorch_utils

    if not hasattr(transformers.trainer, "ALL_LAYERNORM_LAYERS"):
        layers = getattr(pytorch_utils, "ALL_LAYERNORM_LAYERS", None)
        if layers is None:  # 5.x dropped it from pytorch_utils too
            import torch.nn as nn

            layers = [nn.LayerNorm]
        transformers.trainer.ALL_LAYERNORM_LAYERS = layers


def _needs_layernorm_layers() -> bool:
    return transformers_version() >= (4, 53)


# -- LLaVATrainer._get_train_sampler(self) vs Trainer calling it with a dataset -------

def _train_sampler(module: ModuleType) -> None:
    cls = module.LLaVATrainer
    if _is_shimmed(cls._get_train_sampler):
        return
    original = cls._get_train_sampler
    parent = cls.__mro__[1]._get_train_sampler

    @functools.wraps(original)
    def _get_train_sampler(self, train_dataset=None):
        if train_dataset is None or train_dataset is self.train_dataset:
            if not self.args.group_by_modality_length:
                return parent(self) if train_dataset is None else parent(self, train_dataset)
            return original(self)
        return parent(self, train_dataset)  # e.g. an eval dataset: upstream logic does not apply

    cls._get_train_sampler = _mark(_get_train_sampler, original)


def _needs_train_sampler() -> bool:
    from transformers import Trainer

    return len(inspect.signature(Trainer._get_train_sampler).parameters) > 1


# -- transformers 5.x: Trainer(tokenizer=...) is gone --------------------------------

def _trainer_tokenizer(module: ModuleType) -> None:
    cls = module.LLaVATrainer
    if _is_shimmed(cls.__init__):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if "tokenizer" in kwargs:
            kwargs.setdefault("processing_class", kwargs.pop("tokenizer"))
        original(self, *args, **kwargs)

    cls.__init__ = _mark(__init__, original)


def _needs_trainer_tokenizer() -> bool:
    return transformers_version() >= (5, 0)


# -- train_mem asks for flash-attention 2, which CPUs and many GPUs lack --------------

def _flash_attn_fallback(module: ModuleType) -> None:
    if _is_shimmed(module.train):
        return
    original = module.train

    @functools.wraps(original)
    def train(attn_implementation=None):
        if attn_implementation == "flash_attention_2" and not flash_attn_available():
            log.warning("flash-attn is not installed (or no CUDA): training with sdpa attention")
            attn_implementation = "sdpa"
        return original(attn_implementation=attn_implementation)

    module.train = _mark(train, original)


def flash_attn_available() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    import torch

    return torch.cuda.is_available()


# -- load_pretrained_model(load_4bit/8bit): conflicting arguments, projector quantized --

QUANT_SKIP_MODULES = ["mm_projector", "vision_tower", "lm_head"]


def _quantized_loading(module: ModuleType) -> None:
    if _is_shimmed(module.load_pretrained_model):
        return
    original = module.load_pretrained_model

    @functools.wraps(original)
    def load_pretrained_model(model_path, model_base, model_name, load_8bit=False, load_4bit=False, *args, **kwargs):
        check_model_path(model_path, "model_path")
        if model_base is not None:
            check_model_path(model_base, "model_base")
        if (load_8bit or load_4bit) and "quantization_config" not in kwargs:
            kwargs["quantization_config"] = quantization_config(load_8bit=load_8bit)
            load_8bit = load_4bit = False
        return original(model_path, model_base, model_name, load_8bit, load_4bit, *args, **kwargs)

    module.load_pretrained_model = _mark(load_pretrained_model, original)


def quantization_config(load_8bit: bool):
    """bitsandbytes config that leaves the FEALLM projector, CLIP and lm_head unquantized."""
    import torch
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANT_SKIP_MODULES)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=torch.float16,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
        llm_int8_skip_modules=QUANT_SKIP_MODULES,
    )


def _needs_quantized_loading() -> bool:
    return True  # upstream passes no skip list on any version


def looks_local(path: str) -> bool:
    """A hub id is `name` or `org/name`; an absolute, ./, ~ or deeper path is local."""
    if os.path.isabs(path) or path.startswith((".", "~")):
        return True
    return len([p for p in path.split("/") if p]) > 2 or path.endswith("/")


def check_model_path(path: str | None, what: str) -> None:
    """Refuse a missing local model path before transformers turns it into a hub request."""
    if path is None or os.path.exists(path):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in {"0", ""}
    if looks_local(path) or offline:
        raise FileNotFoundError(
            f"{what}: no such model directory: {path!r}"
            + (" (HF_HUB_OFFLINE is set, so hub ids are not fetched either)" if offline else "")
            + ". Check the path; build a local tiny kit with `feallm tiny-kit --out DIR`."
        )


SHIMS: tuple[Shim, ...] = (
    Shim(
        "open_forward", "llava.model.language_model.llava_llama",
        "generate(): forward() got an unexpected keyword argument 'cache_position' (5.x: 'cache')",
        "transformers >= 4.38", _needs_open_forward, _open_forward,
    ),
    Shim(
        "layernorm_layers", "llava.train.llava_trainer",
        "cannot import name 'ALL_LAYERNORM_LAYERS' from 'transformers.trainer'",
        "transformers >= 4.53", _needs_layernorm_layers, _layernorm_layers, before=True,
    ),
    Shim(
        "train_sampler", "llava.train.llava_trainer",
        "_get_train_sampler() takes 1 positional argument but 2 were given",
        "transformers >= 4.52", _needs_train_sampler, _train_sampler,
    ),
    Shim(
        "trainer_tokenizer", "llava.train.llava_trainer",
        "Trainer.__init__() got an unexpected keyword argument 'tokenizer'",
        "transformers >= 5.0", _needs_trainer_tokenizer, _trainer_tokenizer,
    ),
    Shim(
        "flash_attn_fallback", "llava.train.train",
        "train_mem: flash_attention_2 requested but flash-attn / CUDA absent -> ImportError",
        "any, without flash-attn", lambda: not flash_attn_available(), _flash_attn_fallback,
    ),
    Shim(
        "quantized_loading", "llava.model.builder",
        "load_4bit: ValueError (both load_in_4bit and quantization_config); projector quantized;"
        " a missing local path becomes a hub request",
        "transformers >= 4.47 (ValueError), all (skip list, path check)",
        _needs_quantized_loading, _quantized_loading,
    ),
)


def install() -> None:
    """Arm every needed shim on its module (now if imported, else at import). Idempotent."""
    for shim in SHIMS:
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


if __name__ == "__main__":
    print(table())
