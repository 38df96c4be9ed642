"""`feallm` in llava's tower and projector builders, and in `initialize_vision_modules`.

Upstream builds the tower and projector with `build_vision_tower(cfg)` and
`build_vision_projector(cfg)`, imported into `llava.model.llava_arch` with
`from ... import`: wrapping only the builder modules leaves llava_arch's own names
untouched (`Unknown projector type: feallm`), so both places are wrapped. When
`mm_projector_type == "feallm"` the wrappers build `FeallmVisionTower` and
`FeallmProjector`; every other type goes to upstream untouched.

`initialize_vision_modules` (the train path) also copies the `mm_feallm_*` fields of the
train arguments onto the model config, so `from_pretrained` rebuilds exactly the trained
module, and records the conversation template of `--version` (`conv_template.py`) for
every projector type; starting from a LLaVA checkpoint, its tower and mlp2x projector
make way for FEALLM's, the old MLP being the warm start.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from types import ModuleType

from feallm_llava.integration.conv_template import CONFIG_KEY, trained_template
from feallm_llava.integration.marks import wrap
from feallm_llava.integration.paths import check_model_path
from feallm_llava.model.config import FeallmConfig

log = logging.getLogger(__name__)

PROJECTOR_TYPE = "feallm"


def is_feallm(cfg) -> bool:
    return getattr(cfg, "mm_projector_type", None) == PROJECTOR_TYPE


def _tower_path(cfg) -> str:
    return getattr(cfg, "mm_vision_tower", getattr(cfg, "vision_tower", None))


def _tower_builder(original):
    def build_vision_tower(vision_tower_cfg, **kwargs):
        if not is_feallm(vision_tower_cfg):
            return original(vision_tower_cfg, **kwargs)
        from feallm_llava.integration.tower import FeallmVisionTower

        path = _tower_path(vision_tower_cfg)
        check_model_path(path, "vision tower")
        return FeallmVisionTower(path, args=vision_tower_cfg, **kwargs)
    return build_vision_tower


def _projector_builder(original):
    def build_vision_projector(config, *args, **kwargs):
        if not is_feallm(config):
            return original(config, *args, **kwargs)
        from feallm_llava.model.projector import FeallmProjector

        with _outside_zero_init():
            return FeallmProjector(FeallmConfig.from_llava_config(config), vision_hidden=config.mm_hidden_size,
                                   llm_hidden=config.hidden_size)
    return build_vision_projector


@contextlib.contextmanager
def _outside_zero_init():
    """Build modules whole, also inside DeepSpeed's `zero.Init` (ZeRO-3's `from_pretrained` of
    a FEALLM checkpoint). zero.Init partitions each submodule as soon as it is built, and the
    projector's own initialisation then writes into empty shards (the deformable offsets'
    fan: "The size of tensor a (0) must match ..."; other values silently lost). Built whole,
    the checkpoint's weights load into it on rank 0, and DeepSpeed partitions it when the
    engine starts, broadcasting rank 0's values first."""
    zero = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    if zero is None or getattr(zero, "top_level_context", None) is None:
        yield
        return
    zero.shutdown_init_context()
    try:
        yield
    finally:
        zero.restore_init_context()


def _initialize(original):
    def initialize_vision_modules(self, model_args, fsdp=None):
        # every checkpoint says how it must be prompted (the template its data were formatted with)
        setattr(self.config, CONFIG_KEY, trained_template(getattr(model_args, "version", "v0")))
        if not is_feallm(model_args):
            with gathered(getattr(self, "mm_projector", None)):
                return original(self, model_args, fsdp=fsdp)
        # Upstream writes only its own mm_* fields; ours must reach config.json too.
        for key, value in FeallmConfig.from_llava_config(model_args).to_llava_attrs().items():
            setattr(self.config, key, value)
        warm_mlp = _drop_upstream_modules(self)
        with gathered(getattr(self, "mm_projector", None)):  # a stage-1 mm_projector.bin loads into it
            result = original(self, model_args, fsdp=fsdp)
        if warm_mlp is not None and getattr(model_args, "pretrain_mm_mlp_adapter", None) is None:
            self.mm_projector.load_state_dict(warm_mlp)  # LLaVA-1.5's MLP as the warm start
            log.info("FEALLM projector: MLP warm-started from the checkpoint's mlp2x_gelu projector")
        return result
    return initialize_vision_modules


def _drop_upstream_modules(model):
    """Starting FEALLM from a LLaVA checkpoint (e.g. llava-v1.5-7b, as the paper does):
    upstream would keep the checkpoint's CLIP tower and mlp2x_gelu projector and silently
    train plain LLaVA. Drop both so FEALLM's are built; return the old MLP's weights
    (keys 0.*, 2.*) for the warm start, or None."""
    from feallm_llava.integration.tower import FeallmVisionTower
    from feallm_llava.model.projector import FeallmProjector

    warm = None
    old = getattr(model, "mm_projector", None)
    if old is not None and not isinstance(old, FeallmProjector):
        with gathered(old):
            state = {k: v.detach().clone() for k, v in old.state_dict().items()}
        if set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}:
            warm = state
        model.mm_projector = None
    tower = getattr(model, "vision_tower", None)
    tower = tower[0] if isinstance(tower, list) else tower
    if tower is not None and not isinstance(tower, FeallmVisionTower):
        model.vision_tower = None
    return warm


def gathered(module):
    """A context in which `module`'s parameters are whole, when DeepSpeed ZeRO-3 partitioned
    them (it does so to every module built inside `from_pretrained`: the tower and projector
    of a LLaVA or FEALLM checkpoint given as the model); changes made on rank 0 are kept.
    Upstream reads and loads such a projector as if it were whole (empty tensors, or a
    size mismatch, when it is not)."""
    params = [] if module is None else [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def hook_builders(module: ModuleType) -> None:
    """Wrap the builder names a llava module holds (the builder modules, llava_arch)."""
    for name, make in (("build_vision_tower", _tower_builder), ("build_vision_projector", _projector_builder)):
        if hasattr(module, name):
            wrap(module, name, name, make)


def hook_arch(module: ModuleType) -> None:
    """llava.model.llava_arch: its builder names and `initialize_vision_modules`."""
    hook_builders(module)
    wrap(module.LlavaMetaModel, "initialize_vision_modules", "initialize_vision_modules", _initialize)
