"""Shims that let upstream LLaVA (`llava-torch==1.2.2.post1`) run on the pinned stack.

Upstream pins torch 2.0 / transformers 4.36 and breaks on anything newer than 4.37.2
(measured; see README "Compatibility"). Each shim below is named, says what breaks and
on which versions, decides for itself whether the installed versions need it, and is a
no-op otherwise. Shims are applied lazily when the llava module they mend is imported
(see `autoload.py`), so importing this file costs nothing.

`python -m feallm_llava.compat` prints the table of shims and whether each is active.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import logging
import os
import sys
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


_TAG = "__feallm_shim__"


def _mark(fn, original, tag: str | None = None):
    """Record `original` on its wrapper `fn`; `tag` names the shim where two shims wrap
    the same function (train() has two)."""
    setattr(fn, _MARK, original)
    setattr(fn, _TAG, tag)  # also replaces the tag functools.wraps copied from `original`
    return fn


def _is_shimmed(fn, tag: str | None = None) -> bool:
    """Whether `fn` is a compat wrapper; with `tag`, whether that shim is one of the
    wrappers stacked on it, in any order."""
    if tag is None:
        return hasattr(fn, _MARK)
    while hasattr(fn, _MARK):
        if getattr(fn, _TAG, None) == tag:
            return True
        fn = getattr(fn, _MARK)
    return False


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


# -- LLaVATrainer._save_checkpoint passes `metrics`, which Trainer no longer takes -----

def _save_checkpoint_metrics(module: ModuleType) -> None:
    cls = module.LLaVATrainer
    if _is_shimmed(cls._save_checkpoint):
        return
    original = cls._save_checkpoint
    base = cls.__mro__[1]._save_checkpoint

    @functools.wraps(original)
    def _save_checkpoint(self, model, trial, metrics=None):
        if getattr(self.args, "tune_mm_mlp_adapter", False):
            return original(self, model, trial)
        return base(self, model, trial)  # upstream's only other path: the base save

    cls._save_checkpoint = _mark(_save_checkpoint, original)


def _needs_save_checkpoint_metrics() -> bool:
    from transformers import Trainer

    return "metrics" not in inspect.signature(Trainer._save_checkpoint).parameters


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
    if _is_shimmed(module.train, "flash_attn_fallback"):
        return
    original = module.train

    @functools.wraps(original)
    def train(attn_implementation=None):
        if attn_implementation == "flash_attention_2" and not flash_attn_available():
            log.warning("flash-attn is not installed (or no CUDA): training with sdpa attention")
            attn_implementation = "sdpa"
        return original(attn_implementation=attn_implementation)

    module.train = _mark(train, original, "flash_attn_fallback")


# -- train(): the model is built before anything seeds the RNG ------------------------

def _seed_model_init(module: ModuleType) -> None:
    """Seed with the run's `--seed` before upstream's `train()` builds the model.

    `train()` creates the projector (`initialize_vision_modules`) and the LoRA adapters
    (`get_peft_model`) before `LLaVATrainer(...)` calls `set_seed(args.seed)`, so their
    random initialisation, and every run after it, changes from launch to launch with
    the same flags. Measured: the demo's stage 2 from one stage-1 checkpoint, identical
    flags, FE 65.0 % in one launch and 85.0 % in the next. `--seed` is read from the
    command line (TrainingArguments' default 42 without it), as the Trainer will use it.
    """
    if _is_shimmed(module.train, "seed_model_init"):
        return
    original = module.train

    @functools.wraps(original)
    def train(*args, **kwargs):
        from transformers import set_seed

        set_seed(_seed_from_argv(sys.argv))
        return original(*args, **kwargs)

    module.train = _mark(train, original, "seed_model_init")


def _seed_from_argv(argv: list[str], default: int = 42) -> int:
    """`--seed` as HfArgumentParser will read it (either form; the last one wins)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--seed", type=int, default=default)
    return parser.parse_known_args(argv)[0].seed


# -- transformers 5.x: a folder named `datasets` passes for the `datasets` library -----

def _datasets_namespace(_module: ModuleType) -> None:
    """Tell the Trainer that `datasets` is absent when only a same-named folder is on sys.path.

    5.x's `is_datasets_available()` asks `find_spec("datasets")` alone (4.x also asked
    for the distribution's metadata). Run from a checkout's root (`python -m
    llava.train.train_mem`, cwd first on sys.path) our `datasets/` folder is found as a
    namespace package, and the Trainer's dataloader fails on `datasets.Dataset`.
    """
    import transformers.trainer

    original = transformers.trainer.is_datasets_available
    if _is_shimmed(original):
        return

    def is_datasets_available() -> bool:
        return False

    transformers.trainer.is_datasets_available = _mark(is_datasets_available, original)


def _needs_datasets_namespace() -> bool:
    from transformers.utils import is_datasets_available

    spec = importlib.util.find_spec("datasets")
    # a real install is a module with a file; a bare folder is a namespace package
    return spec is not None and spec.origin in (None, "namespace") and is_datasets_available()


# -- transformers 5.x: --warmup_ratio is gone (warmup_steps < 1 is the ratio) --------

def _warmup_ratio(module: ModuleType) -> None:
    """Give upstream's TrainingArguments back `--warmup_ratio`, as a ratio-valued warmup_steps.

    LLaVA's scripts (and ours, `launch/common.sh`) pass `--warmup_ratio 0.03`; 5.x's
    HfArgumentParser rejects it as unused. 5.x reads a `warmup_steps` below 1 as the
    ratio of total steps, so the ratio is moved there unless steps were given too.
    `train()` looks `TrainingArguments` up at call time, so rebinding the name suffices.
    """
    base = module.TrainingArguments
    if _is_shimmed(base):
        return

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
        bases=(base,),
        namespace={"__post_init__": __post_init__, _MARK: base},
    )
    cls.__module__ = base.__module__
    module.TrainingArguments = cls


def _needs_warmup_ratio() -> bool:
    from transformers import TrainingArguments

    return "warmup_ratio" not in {f.name for f in dataclasses.fields(TrainingArguments)}


# -- saving imports deepspeed even when training ran without it ----------------------

def _deepspeed_optional(module: ModuleType) -> None:
    """`maybe_zero_3` without deepspeed: a parameter DeepSpeed never partitioned is copied.

    Upstream's `maybe_zero_3` (train.py and llava_trainer.py, used for every saved
    projector / LoRA / non-LoRA state) imports deepspeed first, so a run launched
    without DeepSpeed (one GPU, plain python) trains and then fails at its first save
    with `No module named 'deepspeed'`. Without deepspeed no parameter has a `ds_id`,
    and upstream's own branch for that case is a detached CPU copy. Applied when
    `llava.train.train` is imported, which has imported `llava.train.llava_trainer` first.
    """
    for target in (module, sys.modules.get("llava.train.llava_trainer")):
        original = getattr(target, "maybe_zero_3", None)
        if original is None or _is_shimmed(original):
            continue

        @functools.wraps(original)
        def maybe_zero_3(param, ignore_status=False, name=None, __original=original):
            if hasattr(param, "ds_id"):  # partitioned by ZeRO-3: only deepspeed can gather it
                return __original(param, ignore_status=ignore_status, name=name)
            return param.detach().cpu().clone()

        target.maybe_zero_3 = _mark(maybe_zero_3, original)


def _needs_deepspeed_optional() -> bool:
    return importlib.util.find_spec("deepspeed") is None


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
        "save_checkpoint_metrics", "llava.train.llava_trainer",
        "_save_checkpoint() takes 3 positional arguments but 4 were given (non-adapter runs)",
        "transformers >= 4.47", _needs_save_checkpoint_metrics, _save_checkpoint_metrics,
    ),
    Shim(
        "trainer_tokenizer", "llava.train.llava_trainer",
        "Trainer.__init__() got an unexpected keyword argument 'tokenizer'",
        "transformers >= 5.0", _needs_trainer_tokenizer, _trainer_tokenizer,
    ),
    Shim(
        "datasets_namespace", "llava.train.llava_trainer",
        "train from the checkout's root: module 'datasets' has no attribute 'Dataset'"
        " (our datasets/ folder taken for the library)",
        "transformers >= 5.0, library `datasets` not installed", _needs_datasets_namespace, _datasets_namespace,
    ),
    Shim(
        "flash_attn_fallback", "llava.train.train",
        "train_mem: flash_attention_2 requested but flash-attn / CUDA absent -> ImportError",
        "any, without flash-attn", lambda: not flash_attn_available(), _flash_attn_fallback,
    ),
    Shim(
        "seed_model_init", "llava.train.train",
        "same flags, another run: the projector and LoRA are initialised before set_seed",
        "all", lambda: True, _seed_model_init,
    ),
    Shim(
        "warmup_ratio", "llava.train.train",
        "Some specified arguments are not used by the HfArgumentParser: ['--warmup_ratio', '0.03']",
        "transformers >= 5.0", _needs_warmup_ratio, _warmup_ratio,
    ),
    Shim(
        "deepspeed_optional", "llava.train.train",
        "first save of a run without DeepSpeed (projector, LoRA, non-LoRA): No module named 'deepspeed'",
        "without deepspeed", _needs_deepspeed_optional, _deepspeed_optional,
    ),
    Shim(
        "quantized_loading", "llava.model.builder",
        "load_4bit: ValueError (both load_in_4bit and quantization_config); projector quantized;"
        " a missing local path becomes a hub request",
        "transformers >= 4.38 (ValueError), all (skip list, path check)",
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


# -- serving (issue 7): worker errors with their cause; Gradio examples the wheel lacks ---
# Upstream's worker and Gradio server run as `python -m ...` (`__main__`), where no import
# hook sees their own module; these shims mend what they import (llava.mm_utils, the
# model class, gradio) before `from ... import` binds it.

class GenerationError(ValueError):
    """The model failed while generating for a streaming client (cause in the message).

    A ValueError so that upstream's worker reports it in its log as
    "Caught ValueError: <cause>" (its other branch prints only "Unknown Error").
    """


class _StreamFailure:
    """Put in a TextIteratorStreamer's queue when generate() fails in its thread.

    The consumer's `__next__` compares each value with the stop signal (`value ==
    None`): this object raises there, so the reader fails at once with the cause
    instead of waiting `timeout` s for text that never comes and reporting a bare
    queue.Empty ("NETWORK ERROR"). `+=` onto the text raises the same, for readers
    that use the value another way.
    """

    def __init__(self, error: BaseException):
        self.error = error

    def _raise(self, *_args):
        raise GenerationError(
            f"generation failed in the model: {type(self.error).__name__}: {self.error} "
            f"(traceback logged by feallm_llava.compat)") from self.error

    __eq__ = __ne__ = __radd__ = __add__ = _raise
    __hash__ = None


def _worker_generate_errors(module: ModuleType) -> None:
    """LlavaLlamaForCausalLM.generate: log a failure with its traceback, hand it to the stream.

    Upstream's worker runs generate() in a thread feeding a TextIteratorStreamer; an
    exception there (a FEALLM projector error, a bad sampling parameter) only ended the
    thread, the reader timed out 15 s later and the client got "NETWORK ERROR" with no
    cause in the worker log's request lines.
    """
    for cls_name in ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM"):
        cls = getattr(module, cls_name, None)
        if cls is None or _is_shimmed(cls.generate):
            continue
        original = cls.generate

        @functools.wraps(original)
        def generate(self, *args, __original=original, **kwargs):
            try:
                return __original(self, *args, **kwargs)
            except Exception as err:
                queue = getattr(kwargs.get("streamer"), "text_queue", None)
                if queue is None:
                    raise  # a direct caller sees the exception itself
                log.exception("generate() failed: %s: %s", type(err).__name__, err)
                queue.put(_StreamFailure(err))  # the reader raises GenerationError with the cause
                return None

        cls.generate = _mark(generate, original)


def _worker_image_errors(module: ModuleType) -> None:
    """llava.mm_utils.load_image_from_base64: decode safely, to RGB, or name what is wrong.

    Upstream returns `Image.open(...)` unchecked: a corrupt upload fails later as
    "cannot identify image file <_io.BytesIO object at 0x...>", a 20000x20000 PNG is
    decoded (1.2 GB), CMYK / 16-bit / RGBA reach the processor unconverted.
    `feallm_llava.data.images.load_rgb` refuses or converts each with a clear reason.
    """
    original = module.load_image_from_base64
    if _is_shimmed(original):
        return

    @functools.wraps(original)
    def load_image_from_base64(image):
        import base64
        import binascii

        from feallm_llava.data.images import ImageError, load_rgb

        label = "request image (base64)"
        if isinstance(image, str) and image.startswith("data:") and "," in image:
            image = image.split(",", 1)[1]  # a data URL
        try:
            data = base64.b64decode(image, validate=False)
        except (binascii.Error, TypeError, ValueError) as err:
            raise ImageError(label, f"not valid base64 ({err})") from err
        return load_rgb(data, name=f"{label}, {len(data)} bytes")

    module.load_image_from_base64 = _mark(load_image_from_base64, original)


SERVE_EXAMPLES = ("extreme_ironing.jpg", "waterview.jpg")  # what upstream's gradio_web_server names


def llava_examples_dir():
    """`llava/serve/examples` of the installed llava, or None when llava is not installed."""
    from pathlib import Path

    spec = importlib.util.find_spec("llava")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "serve" / "examples"


def _needs_serve_examples() -> bool:
    folder = llava_examples_dir()
    return folder is not None and not all((folder / name).is_file() for name in SERVE_EXAMPLES)


def serve_example_rows(directory=None) -> list[list[str]]:
    """[[image path, question], ...]: face examples for the chat page, written once to `directory`.

    A synthetic FACS face (happiness prototype) with the paper's emotion-summary
    question, and scikit-image's astronaut photo (public domain; a second synthetic face
    when scikit-image is absent) with the paper's movement question (section 3.2).
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from feallm_llava.data.labels import PROTOTYPES
    from feallm_llava.data.synthetic import Identity, render_face

    folder = Path(directory) if directory else (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "feallm_llava" / "serve_examples")
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, make) -> str:
        path = folder / name
        if not path.is_file():
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            make().save(tmp, format="JPEG", quality=92)
            os.replace(tmp, path)  # atomic: parallel servers never read a half-written file
        return str(path)

    def synthetic(expression: str, seed: int):
        rng = np.random.default_rng(seed)
        face = render_face({au: 0.9 for au in PROTOTYPES[expression]}, Identity.sample(rng, "example"), rng, size=336)
        return face.convert("RGB")

    def astronaut():
        try:
            from skimage import data
        except ImportError:
            return synthetic("Surprise", 2)
        return Image.fromarray(data.astronaut()).convert("RGB")

    return [
        [write("synthetic_happiness.jpg", lambda: synthetic("Happiness", 1)),
         "Please describe the expression in this face."],
        [write("astronaut.jpg", astronaut), "Please describe the action units in this face."],
    ]


def _serve_examples(module: ModuleType) -> None:
    """gradio.Examples: rows naming llava's missing example images get FEALLM face examples.

    The llava-torch wheel ships no `llava/serve/examples/*.jpg`, so upstream's
    gradio_web_server crashed at start with FileNotFoundError (measured). Only rows with
    a missing file in that folder are replaced; every other use of gr.Examples is untouched.
    """
    original = getattr(module, "Examples", None)
    if original is None or not inspect.isfunction(original) or _is_shimmed(original):
        return  # gradio 4.x exposes gr.Examples as the function create_examples
    folder = llava_examples_dir()

    def missing_upstream_file(cell) -> bool:
        if not isinstance(cell, str) or folder is None:
            return False
        path = os.path.abspath(cell)
        return os.path.dirname(path) == os.path.abspath(folder) and not os.path.exists(path)

    @functools.wraps(original)
    def Examples(examples, *args, **kwargs):
        if isinstance(examples, list) and any(
                isinstance(row, list) and any(missing_upstream_file(c) for c in row) for row in examples):
            ours = serve_example_rows()
            log.info("llava/serve/examples missing from the installed llava: showing FEALLM examples %s",
                     [row[0] for row in ours])
            examples = ours
        return original(examples, *args, **kwargs)

    module.Examples = _mark(Examples, original)


SHIMS += (
    Shim(
        "worker_generate_errors", "llava.model.language_model.llava_llama",
        "model_worker: an error in the generate thread surfaced 15 s later as 'NETWORK ERROR' "
        "with no cause in the request log",
        "all", lambda: True, _worker_generate_errors,
    ),
    Shim(
        "worker_image_errors", "llava.mm_utils",
        "model_worker: corrupt upload -> 'cannot identify image file <_io.BytesIO ...>'; "
        "20000x20000 PNG decoded; CMYK/16-bit unconverted",
        "all", lambda: True, _worker_image_errors,
    ),
    Shim(
        "serve_examples", "gradio",
        "gradio_web_server: FileNotFoundError llava/serve/examples/extreme_ironing.jpg at start",
        "llava-torch wheels without serve/examples", _needs_serve_examples, _serve_examples,
    ),
)


if __name__ == "__main__":
    print(table())
