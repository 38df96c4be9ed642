"""Upstream's train script learns FEALLM's flags, whichever way it is started.

`llava.train.train.ModelArguments` gains one `--mm_feallm_<field>` flag per
`FeallmConfig` field, `DataArguments` gains `--skip_bad_samples`, `find_all_linear_names`
gives LoRA the LLM's Linears by full name and `LazySupervisedDataset` names bad samples.
Upstream's `train()` looks all of these up at call time, so rebinding the module's
names suffices; for `python -m llava.train.train` (the file runs as `__main__`, which no
import hook sees) they are swapped where `train()` builds its `HfArgumentParser`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from types import ModuleType

from feallm_llava.integration.marks import is_marked, mark, wrap
from feallm_llava.integration.paths import check_model_path
from feallm_llava.integration.registry.builders import is_feallm
from feallm_llava.integration.registry.dataset_checks import check_dataset
from feallm_llava.integration.registry.lora import lora_target_modules
from feallm_llava.model.config import LLAVA_PREFIX, FeallmConfig


def _flag_type(value):
    if isinstance(value, tuple):
        return list[type(value[0])] if value else list[str]
    return type(value)


def model_arguments_class(base=None):
    """Upstream's `ModelArguments` plus one `--mm_feallm_<field>` flag per FeallmConfig field."""
    if base is None:
        from llava.train import train as train_module

        base = train_module.ModelArguments
    if is_marked(base, "feallm_flags"):
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
    original_post_init = getattr(base, "__post_init__", None)

    def __post_init__(self):
        if original_post_init is not None:
            original_post_init(self)
        check_model_path(self.model_name_or_path, "--model_name_or_path")
        if self.vision_tower is not None:
            check_model_path(self.vision_tower, "--vision_tower")
        if is_feallm(self):
            FeallmConfig.from_llava_config(self)  # validates the flags before the model loads

    cls = dataclasses.make_dataclass("ModelArguments", fields, bases=(base,),
                                     namespace={"__post_init__": __post_init__})
    cls.__module__ = base.__module__
    return mark(cls, base, "feallm_flags")


def data_arguments_class(base):
    """Upstream's `DataArguments` plus `--skip_bad_samples`."""
    if is_marked(base, "skip_bad_samples"):
        return base
    cls = dataclasses.make_dataclass("DataArguments", [(
        "skip_bad_samples", bool, dataclasses.field(default=False, metadata={
            "help": "skip (and count) samples with a missing/unreadable image or a malformed "
                    "conversation instead of stopping with an error naming the sample"}),
    )], bases=(base,))
    cls.__module__ = base.__module__
    return mark(cls, base, "skip_bad_samples")


def hook_train(module: ModuleType) -> None:
    """Everything done to upstream's train module (imported, or run as __main__)."""
    if is_marked(module.ModelArguments, "feallm_flags"):
        return
    wrap(module, "find_all_linear_names", "lora_targets", lambda _original: lambda model: lora_target_modules(model))
    module.ModelArguments = model_arguments_class(module.ModelArguments)
    module.DataArguments = data_arguments_class(module.DataArguments)
    check_dataset(module.LazySupervisedDataset)


def _is_upstream_arguments(cls) -> bool:
    fields = getattr(cls, "__dataclass_fields__", {})
    ours = is_marked(cls, "feallm_flags") or is_marked(cls, "skip_bad_samples")
    return not ours and (
        (cls.__name__ == "ModelArguments" and "mm_projector_type" in fields)
        or (cls.__name__ == "DataArguments" and "image_aspect_ratio" in fields)
    )


def hook_argument_parser(_trainer_module: ModuleType) -> None:
    """Catch `python -m llava.train.train`, where train.py runs as `__main__`.

    runpy executes the file without an import, so no import hook sees the module; but
    its `train()` builds `HfArgumentParser((ModelArguments, ...))` once every name of
    the module exists. The parser is where the train-module hooks are applied then.
    """
    import transformers

    def make(original):
        def __init__(self, dataclass_types=None, **kwargs):
            if dataclass_types is not None:
                types = list(dataclass_types) if isinstance(dataclass_types, (list, tuple)) else [dataclass_types]
                for i, t in enumerate(types):
                    if isinstance(t, type) and _is_upstream_arguments(t):
                        module = sys.modules.get(t.__module__)
                        if module is not None and getattr(module, t.__name__, None) is t:
                            hook_train(module)
                            types[i] = getattr(module, t.__name__)
                dataclass_types = types
            original(self, dataclass_types, **kwargs)
        return __init__

    wrap(transformers.HfArgumentParser, "__init__", "train_flags_parser", make)
