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
  starting from a LLaVA checkpoint, its tower and mlp2x projector make way for
  FEALLM's (the old MLP is the warm start);
- `llava.train.train.ModelArguments` gains the `--mm_feallm_*` flags, `DataArguments`
  gains `--skip_bad_samples` (upstream's `train()` looks both up at call time; for
  `python -m llava.train.train` they are swapped where it builds its parser);
- `LazySupervisedDataset` names bad samples; LoRA targets the LLM's Linears by full name;
- `LLaVATrainer` checkpoints are resumable in every mode and get `.safetensors` twins;
- the compat shims (`compat.py`) are armed.

Nothing here imports torch or llava at import time: each hook runs when llava's module
is imported (see `autoload.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from types import ModuleType

from feallm_llava import autoload, compat
from feallm_llava.model.config import LLAVA_PREFIX, FeallmConfig

log = logging.getLogger(__name__)

PROJECTOR_TYPE = "feallm"

_ARCH = "llava.model.llava_arch"
_TOWER_BUILDER = "llava.model.multimodal_encoder.builder"
_PROJECTOR_BUILDER = "llava.model.multimodal_projector.builder"
_TRAIN = "llava.train.train"
_TRAINER = "llava.train.llava_trainer"  # imported by train.py however it is started

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
        if not is_feallm(model_args):
            return original(self, model_args, fsdp=fsdp)
        # Upstream writes only its own mm_* fields; ours must reach config.json too.
        for key, value in FeallmConfig.from_llava_config(model_args).to_llava_attrs().items():
            setattr(self.config, key, value)
        warm_mlp = _drop_upstream_modules(self)
        result = original(self, model_args, fsdp=fsdp)
        if warm_mlp is not None and getattr(model_args, "pretrain_mm_mlp_adapter", None) is None:
            self.mm_projector.load_state_dict(warm_mlp)  # LLaVA-1.5's MLP as the warm start
            log.info("FEALLM projector: MLP warm-started from the checkpoint's mlp2x_gelu projector")
        return result

    initialize_vision_modules.__feallm__ = True
    return initialize_vision_modules


def _drop_upstream_modules(model):
    """Starting FEALLM from a LLaVA checkpoint (e.g. llava-v1.5-7b, as the paper does):
    upstream would keep the checkpoint's CLIP tower and mlp2x_gelu projector and silently
    train plain LLaVA. Drop both so FEALLM's are built; return the old MLP's weights
    (keys 0.*, 2.*) for the warm start, or None."""
    from feallm_llava.model.projector import FeallmProjector
    from feallm_llava.model.tower import FeallmVisionTower

    warm = None
    old = getattr(model, "mm_projector", None)
    if old is not None and not isinstance(old, FeallmProjector):
        state = old.state_dict()
        if set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}:
            warm = {k: v.detach().clone() for k, v in state.items()}
        model.mm_projector = None
    tower = getattr(model, "vision_tower", None)
    tower = tower[0] if isinstance(tower, list) else tower
    if tower is not None and not isinstance(tower, FeallmVisionTower):
        model.vision_tower = None
    return warm


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


def data_arguments_class(base):
    """Upstream's `DataArguments` plus `--skip_bad_samples`."""
    if getattr(base, "__feallm__", False):
        return base
    cls = dataclasses.make_dataclass("DataArguments", [(
        "skip_bad_samples", bool, dataclasses.field(default=False, metadata={
            "help": "skip (and count) samples with a missing/unreadable image or a malformed "
                    "conversation instead of stopping with an error naming the sample"}),
    )], bases=(base,))
    cls.__module__ = base.__module__
    cls.__feallm__ = True
    return cls


def _check_dataset(cls) -> None:
    """Make upstream's `LazySupervisedDataset` name bad samples (or skip and count them).

    Its methods are wrapped in place: upstream calls `super(LazySupervisedDataset, self)`
    with the module-level name, so a subclass bound to that name would recurse.
    """
    if getattr(cls, "__feallm__", False):
        return
    from feallm_llava.data.llava_json import check_samples

    init, getitem = cls.__init__, cls.__getitem__

    def __init__(self, data_path, tokenizer, data_args):
        init(self, data_path=data_path, tokenizer=tokenizer, data_args=data_args)
        self.skip_bad = bool(getattr(data_args, "skip_bad_samples", False))
        self.skipped = []
        bad = check_samples(self.list_data_dict, getattr(data_args, "image_folder", None))
        if bad and not self.skip_bad:
            listing = "\n  ".join(str(b) for b in bad[:10])
            raise ValueError(
                f"{data_path}: {len(bad)} bad sample(s):\n  {listing}\n"
                "Fix them, or pass --skip_bad_samples True to skip and count them."
            )
        if bad:
            drop = {b.index for b in bad}
            self.list_data_dict = [s for i, s in enumerate(self.list_data_dict) if i not in drop]
            self.skipped = [str(b) for b in bad]
            log.warning("%s: skipped %d bad sample(s), e.g. %s", data_path, len(bad), bad[0])
        if not self.list_data_dict:
            raise ValueError(f"{data_path}: no usable sample left")

    def __getitem__(self, i):
        for attempt in range(len(self.list_data_dict)):
            j = (i + attempt) % len(self.list_data_dict)
            try:
                return getitem(self, j)
            except Exception as err:  # an unreadable image etc.: name the sample
                sample = self.list_data_dict[j]
                where = f"sample #{j} (id {sample.get('id', j)!r}, image {sample.get('image')!r})"
                if not self.skip_bad:
                    raise RuntimeError(f"{where}: {type(err).__name__}: {err}. "
                                       "Pass --skip_bad_samples True to skip and count such samples.") from err
                self.skipped.append(f"{where}: {err}")
                log.warning("skipping %s: %s (%d skipped so far)", where, err, len(self.skipped))
        raise RuntimeError("every sample of the dataset failed to load")

    cls.__init__ = functools.wraps(init)(__init__)
    cls.__getitem__ = functools.wraps(getitem)(__getitem__)
    cls.__feallm__ = True


_NOT_LORA = ("mm_projector", "vision_tower", "vision_resampler", "lm_head")


def lora_target_modules(model) -> list[str]:
    """Full names of the LLM's Linear layers: LoRA's targets.

    Upstream's `find_all_linear_names` returns leaf names (`q_proj`, ...), which PEFT
    matches anywhere: a loaded CLIP tower's `q_proj/k_proj/v_proj` (or any projector
    Linear so named) would be wrapped too, saved as `...base_layer.weight` and silently
    dropped by the loader (measured). Full names match only the LLM's layers.
    """
    import torch.nn as nn

    return sorted(
        name for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not any(part in _NOT_LORA for part in name.split("."))
    )


def _hook_train(module: ModuleType) -> None:
    """Everything done to upstream's train module (imported, or run as __main__)."""
    if getattr(module.ModelArguments, "__feallm__", False):
        return
    module.find_all_linear_names = functools.wraps(module.find_all_linear_names)(lora_target_modules)
    module.ModelArguments = model_arguments_class(module.ModelArguments)
    module.DataArguments = data_arguments_class(module.DataArguments)
    _check_dataset(module.LazySupervisedDataset)


def _is_upstream_arguments(cls) -> bool:
    fields = getattr(cls, "__dataclass_fields__", {})
    return not getattr(cls, "__feallm__", False) and (
        (cls.__name__ == "ModelArguments" and "mm_projector_type" in fields)
        or (cls.__name__ == "DataArguments" and "image_aspect_ratio" in fields)
    )


def _hook_argument_parser(_trainer_module: ModuleType) -> None:
    """Catch `python -m llava.train.train`, where train.py runs as `__main__`.

    runpy executes the file without an import, so no import hook sees the module; but
    its `train()` builds `HfArgumentParser((ModelArguments, ...))` once every name of
    the module exists. The parser is where the train-module hooks are applied then.
    """
    import transformers

    cls = transformers.HfArgumentParser
    if getattr(cls.__init__, "__feallm__", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, dataclass_types=None, **kwargs):
        if dataclass_types is not None:
            types = list(dataclass_types) if isinstance(dataclass_types, (list, tuple)) else [dataclass_types]
            for i, t in enumerate(types):
                if isinstance(t, type) and _is_upstream_arguments(t):
                    module = sys.modules.get(t.__module__)
                    if module is not None and getattr(module, t.__name__, None) is t:
                        _hook_train(module)
                        types[i] = getattr(module, t.__name__)
            dataclass_types = types
        original(self, dataclass_types, **kwargs)

    __init__.__feallm__ = True
    cls.__init__ = __init__


# -- checkpoints: safetensors twins, and resumable stage-1 / LoRA checkpoints --------

def _trainables(trainer, trainer_module: ModuleType) -> tuple[str, dict]:
    """(file stem, state) of what this run trains besides LoRA, gathered under ZeRO-3."""
    from feallm_llava.checkpoint import NON_LORA_FILE, PROJECTOR_FILE

    named = list(trainer.model.named_parameters())
    if getattr(trainer.args, "tune_mm_mlp_adapter", False):
        return PROJECTOR_FILE, trainer_module.get_mm_adapter_state_maybe_zero_3(named, ["mm_projector"])
    if any("lora_" in n for n, _ in named):
        keep = [(n, p) for n, p in named if p.requires_grad and "lora_" not in n]
        return NON_LORA_FILE, {n: trainer_module.maybe_zero_3(p, ignore_status=True).cpu() for n, p in keep}
    return "", {}


def _write_trainables(trainer, trainer_module: ModuleType, out_dir: str) -> None:
    from feallm_llava.checkpoint import save_weights

    stem, state = _trainables(trainer, trainer_module)
    if stem and state and trainer.args.should_save:
        save_weights(state, os.path.join(out_dir, stem + ".safetensors"))


def _load_trainables(model, checkpoint_dir: str) -> bool:
    """Load the projector / non-LoRA weights saved in a checkpoint; True if there were any."""
    from feallm_llava.checkpoint import NON_LORA_FILE, PROJECTOR_FILE, load_weights

    for stem in (PROJECTOR_FILE, NON_LORA_FILE):
        found = [p for ext in (".safetensors", ".bin") if os.path.exists(p := os.path.join(checkpoint_dir, stem + ext))]
        if found:  # load_weights prefers the .safetensors twin of a .bin itself
            result = model.load_state_dict(load_weights(found[0]), strict=False)
            if result.unexpected_keys:
                raise ValueError(f"{found[0]}: keys that do not fit this model: {result.unexpected_keys[:5]}")
            log.info("resumed %s from %s", stem, found[0])
            return True
    return False


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that holds its `trainer_state.json`."""
    import re

    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else ():
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.exists(os.path.join(output_dir, name, "trainer_state.json")):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return max(found)[1] if found else None


def _hook_trainer(module: ModuleType) -> None:
    _hook_argument_parser(module)
    cls = module.LLaVATrainer
    if getattr(cls, "__feallm__", False):
        return
    from transformers import Trainer

    save_checkpoint, load_checkpoint, train = cls._save_checkpoint, cls._load_from_checkpoint, cls.train

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        save_checkpoint(self, model, trial, *args, **kwargs)
        if getattr(self.args, "tune_mm_mlp_adapter", False):
            # Upstream saved only mm_projector.bin + config, which its own auto-resume
            # cannot restart from; the base Trainer adds optimizer, scheduler, RNG and
            # trainer state (its model save is upstream's no-op `_save` in this mode).
            Trainer._save_checkpoint(self, model, trial)
        out = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        _write_trainables(self, module, out)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        if getattr(self.args, "tune_mm_mlp_adapter", False):
            if not _load_trainables(model, resume_from_checkpoint):
                raise FileNotFoundError(f"{resume_from_checkpoint}: no mm_projector weights to resume from")
            return
        load_checkpoint(self, resume_from_checkpoint, model)
        _load_trainables(model, resume_from_checkpoint)  # LoRA runs: the projector too

    def train_(self, *args, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:
            # A run killed while writing its newest checkpoint leaves it incomplete;
            # resume from the newest one whose trainer state was written (it is last).
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or None
        result = train(self, *args, resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        _write_trainables(self, module, self.args.output_dir)
        return result

    cls._save_checkpoint = functools.wraps(save_checkpoint)(_save_checkpoint)
    cls._load_from_checkpoint = functools.wraps(load_checkpoint)(_load_from_checkpoint)
    cls.train = functools.wraps(train)(train_)
    cls.__feallm__ = True


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
    autoload.after_import(_TRAINER, _hook_trainer)
