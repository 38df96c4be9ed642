"""The one place where `feallm` is hooked into upstream LLaVA.

Upstream builds the tower and projector with `build_vision_tower(cfg)` and
`build_vision_projector(cfg)`, imported into `llava.model.llava_arch` with
`from ... import`: wrapping only the builder modules leaves llava_arch's own names
untouched (measured: `Unknown projector type: feallm`), so both places are wrapped.
When `mm_projector_type == "feallm"` the wrappers build `FeallmVisionTower` and
`FeallmProjector`; every other type goes to upstream untouched.

Also here, because they too touch llava's insides:
- `initialize_vision_modules` copies the `mm_feallm_*` fields of the train arguments
  onto the model config, so `from_pretrained` rebuilds exactly the trained module;
- `llava.train.train.ModelArguments` gains the `--mm_feallm_*` flags (upstream's
  `train()` looks the class up at call time);
- the compat shims (`compat.py`) are armed.

Nothing here imports torch or llava at import time: each hook runs when llava's module
is imported (see `autoload.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType

from feallm_llava import autoload, compat
from feallm_llava.model.config import LLAVA_PREFIX, FeallmConfig

PROJECTOR_TYPE = "feallm"

_ARCH = "llava.model.llava_arch"
_TOWER_BUILDER = "llava.model.multimodal_encoder.builder"
_PROJECTOR_BUILDER = "llava.model.multimodal_projector.builder"
_TRAIN = "llava.train.train"

_registered = False


def is_feallm(cfg) -> bool:
    return getattr(cfg, "mm_projector_type", None) == PROJECTOR_TYPE


def _tower_path(cfg) -> str:
    return getattr(cfg, "mm_vision_tower", getattr(cfg, "vision_tower", None))


def _wrap_tower_builder(original):
    if getattr(original, "__feallm__", False):
        return original

    @functools.wraps(original)
    def build_vision_tower(vision_tower_cfg, **kwargs):
        if not is_feallm(vision_tower_cfg):
            return original(vision_tower_cfg, **kwargs)
        from feallm_llava.model.tower import FeallmVisionTower

        path = _tower_path(vision_tower_cfg)
        compat.check_model_path(path, "vision tower")
        return FeallmVisionTower(path, args=vision_tower_cfg, **kwargs)

    build_vision_tower.__feallm__ = True
    return build_vision_tower


def _wrap_projector_builder(original):
    if getattr(original, "__feallm__", False):
        return original

    @functools.wraps(original)
    def build_vision_projector(config, *args, **kwargs):
        if not is_feallm(config):
            return original(config, *args, **kwargs)
        from feallm_llava.model.projector import FeallmProjector

        return FeallmProjector(
            FeallmConfig.from_llava_config(config),
            vision_hidden=config.mm_hidden_size,
            llm_hidden=config.hidden_size,
        )

    build_vision_projector.__feallm__ = True
    return build_vision_projector


def _wrap_initialize(original):
    if getattr(original, "__feallm__", False):
        return original

    @functools.wraps(original)
    def initialize_vision_modules(self, model_args, fsdp=None):
        if is_feallm(model_args):
            # Upstream writes only its own mm_* fields; ours must reach config.json too.
            for key, value in FeallmConfig.from_llava_config(model_args).to_llava_attrs().items():
                setattr(self.config, key, value)
        return original(self, model_args, fsdp=fsdp)

    initialize_vision_modules.__feallm__ = True
    return initialize_vision_modules


def _hook_builders(module: ModuleType) -> None:
    for name, wrap in (("build_vision_tower", _wrap_tower_builder), ("build_vision_projector", _wrap_projector_builder)):
        if hasattr(module, name):
            setattr(module, name, wrap(getattr(module, name)))


def _hook_arch(module: ModuleType) -> None:
    _hook_builders(module)
    cls = module.LlavaMetaModel
    cls.initialize_vision_modules = _wrap_initialize(cls.initialize_vision_modules)


# -- train flags ---------------------------------------------------------------------

def _flag_type(value):
    if isinstance(value, tuple):
        return list[type(value[0])] if value else list[str]
    return type(value)


def model_arguments_class(base=None):
    """Upstream's `ModelArguments` plus one `--mm_feallm_<field>` flag per FeallmConfig field."""
    if base is None:
        from llava.train import train as train_module

        base = train_module.ModelArguments
    if getattr(base, "__feallm__", False):
        return base
    defaults = FeallmConfig()
    fields = []
    for f in dataclasses.fields(FeallmConfig):
        value = getattr(defaults, f.name)
        if isinstance(value, tuple):
            spec = dataclasses.field(default_factory=functools.partial(list, value),
                                     metadata={"help": f"FEALLM {f.name} (default {' '.join(map(str, value))})"})
        else:
            spec = dataclasses.field(default=value, metadata={"help": f"FEALLM {f.name} (default {value})"})
        fields.append((LLAVA_PREFIX + f.name, _flag_type(value), spec))
    cls = dataclasses.make_dataclass("ModelArguments", fields, bases=(base,))
    cls.__module__ = base.__module__
    cls.__feallm__ = True

    original_post_init = getattr(base, "__post_init__", None)

    def __post_init__(self):
        if original_post_init is not None:
            original_post_init(self)
        compat.check_model_path(self.model_name_or_path, "--model_name_or_path")
        if self.vision_tower is not None:
            compat.check_model_path(self.vision_tower, "--vision_tower")
        if is_feallm(self):
            FeallmConfig.from_llava_config(self)  # validates the flags before the model loads

    cls.__post_init__ = __post_init__
    return cls


def _hook_train(module: ModuleType) -> None:
    module.ModelArguments = model_arguments_class(module.ModelArguments)


def register() -> None:
    """Arm all hooks (idempotent; each also runs at once if its module is loaded)."""
    global _registered
    if _registered:
        return
    _registered = True
    compat.install()
    autoload.after_import(_TOWER_BUILDER, _hook_builders)
    autoload.after_import(_PROJECTOR_BUILDER, _hook_builders)
    autoload.after_import(_ARCH, _hook_arch)
    autoload.after_import(_TRAIN, _hook_train)
