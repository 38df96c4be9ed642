"""Shims for upstream's serving stack: worker errors with their cause, example images.

Upstream's worker and Gradio server run as `python -m ...` (`__main__`), where no import
hook sees their own module; these shims mend what they import (llava.mm_utils, the
model class, gradio) before `from ... import` binds it.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from types import ModuleType

from feallm_llava.integration.compat.shim import shim
from feallm_llava.integration.marks import wrap

log = logging.getLogger(__name__)


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
            f"(traceback logged by feallm_llava.integration.compat)") from self.error

    __eq__ = __ne__ = __radd__ = __add__ = _raise
    __hash__ = None


@shim("llava.model.language_model.llava_llama", replaces="LlavaLlamaForCausalLM.generate", versions="all")
def worker_generate_errors(original):
    """Without it: model_worker: an error in the generate thread surfaced 15 s later as 'NETWORK ERROR'
    with no cause in the request log.

    LlavaLlamaForCausalLM.generate: log a failure with its traceback, hand it to the stream.

    Upstream's worker runs generate() in a thread feeding a TextIteratorStreamer; an
    exception there (a FEALLM projector error, a bad sampling parameter) only ended the
    thread, the reader timed out 15 s later and the client got "NETWORK ERROR" with no
    cause in the worker log's request lines.
    """
    def generate(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        except Exception as err:
            queue = getattr(kwargs.get("streamer"), "text_queue", None)
            if queue is None:
                raise  # a direct caller sees the exception itself
            log.exception("generate() failed: %s: %s", type(err).__name__, err)
            queue.put(_StreamFailure(err))  # the reader raises GenerationError with the cause
            return None
    return generate


@shim("llava.mm_utils", replaces="load_image_from_base64", versions="all")
def worker_image_errors(_original):
    """Without it: model_worker: corrupt upload -> 'cannot identify image file <_io.BytesIO ...>';
    20000x20000 PNG decoded; CMYK/16-bit unconverted.

    llava.mm_utils.load_image_from_base64: decode safely, to RGB, or name what is wrong.

    Upstream returns `Image.open(...)` unchecked: a corrupt upload fails later as
    "cannot identify image file <_io.BytesIO object at 0x...>", a 20000x20000 PNG is
    decoded (1.2 GB), CMYK / 16-bit / RGBA reach the processor unconverted.
    `feallm_llava.data.images.load_rgb` refuses or converts each with a clear reason.
    """
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
    return load_image_from_base64


SERVE_EXAMPLES = ("extreme_ironing.jpg", "waterview.jpg")  # what upstream's gradio_web_server names


def llava_examples_dir():
    """`llava/serve/examples` of the installed llava, or None when llava is not installed."""
    from pathlib import Path

    spec = importlib.util.find_spec("llava")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "serve" / "examples"


def needs_serve_examples() -> bool:
    folder = llava_examples_dir()
    return folder is not None and not all((folder / name).is_file() for name in SERVE_EXAMPLES)


# [[image, question], ...] for upstream's chat page: the paper's emotion-summary and
# facial-movement questions (section 3.2) on the two packaged example faces.
EXAMPLE_ROWS = (
    ("synthetic_happiness.jpg", "Please describe the expression in this face."),
    ("astronaut.jpg", "Please describe the action units in this face."),
)


def serve_example_rows() -> list[list[str]]:
    """[[image path, question], ...]: the packaged face examples for the chat page."""
    from feallm_llava.resources import resource_path

    return [[str(resource_path("serve_examples", name)), question] for name, question in EXAMPLE_ROWS]


@shim("gradio", versions="llava-torch wheels without serve/examples", needed=needs_serve_examples)
def serve_examples(module: ModuleType) -> None:
    """Without it: gradio_web_server: FileNotFoundError llava/serve/examples/extreme_ironing.jpg at
    start.

    gradio.Examples: rows naming llava's missing example images get FEALLM face examples.

    The llava-torch wheel ships no `llava/serve/examples/*.jpg`, so upstream's
    gradio_web_server crashed at start with FileNotFoundError. Only rows with a missing
    file in that folder are replaced; every other use of gr.Examples is untouched.
    """
    if not inspect.isfunction(getattr(module, "Examples", None)):
        return  # gradio 4.x exposes gr.Examples as the function create_examples
    folder = llava_examples_dir()

    def missing_upstream_file(cell) -> bool:
        if not isinstance(cell, str) or folder is None:
            return False
        path = os.path.abspath(cell)
        return os.path.dirname(path) == os.path.abspath(folder) and not os.path.exists(path)

    def make(original):
        def Examples(examples, *args, **kwargs):
            if isinstance(examples, list) and any(
                    isinstance(row, list) and any(missing_upstream_file(c) for c in row) for row in examples):
                ours = serve_example_rows()
                log.info("llava/serve/examples missing from the installed llava: showing FEALLM examples %s",
                         [row[0] for row in ours])
                examples = ours
            return original(examples, *args, **kwargs)
        return Examples

    wrap(module, "Examples", "serve_examples", make)
