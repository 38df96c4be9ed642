"""Shims for upstream's serving stack: worker errors with their cause, example images.

Upstream's worker and Gradio server run as `python -m ...` (`__main__`), where no import
hook sees their own module; these shims mend what they import (llava.mm_utils, the
model class, the model loader, gradio) before `from ... import` binds it.
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


WORKER_MODULE = "llava.serve.model_worker"
# What upstream's worker answers, with error_code 0, when prompt + image tokens fill the context.
OVERLONG_REPLY = "Exceeds max token length. Please start a new conversation, thanks."
REPLY_LIMIT = 1000  # characters of an exception message sent back to the client


def worker_modules() -> list[ModuleType]:
    """Upstream's model_worker module wherever it runs: imported, or as `__main__` (python -m)."""
    import sys

    found = []
    for name in ("__main__", WORKER_MODULE):
        module = sys.modules.get(name)
        spec = getattr(module, "__spec__", None)
        if (module is not None and module not in found and getattr(spec, "name", None) == WORKER_MODULE
                and isinstance(getattr(module, "ModelWorker", None), type)):
            found.append(module)
    return found


def error_reply(err: BaseException) -> str:
    """The client's error text: what failed and why, instead of upstream's "NETWORK ERROR DUE TO
    HIGH TRAFFIC" for every failure. A ValueError is the request's fault or the model's, named as
    it is; other errors (CUDA, out of memory) keep upstream's advice to retry, with their cause."""
    from llava.utils import server_error_msg

    cause = f"{type(err).__name__}: {err}"
    if len(cause) > REPLY_LIMIT:
        cause = cause[:REPLY_LIMIT] + " ..."
    return cause if isinstance(err, ValueError) else f"{server_error_msg} ({cause})"


def overlong_reply(context: int | None) -> str:
    size = f"the model's context of {context} tokens" if context else "the model's context"
    return (f"Exceeds max token length: the prompt and its image tokens leave no room to answer in "
            f"{size}. Please start a new conversation, thanks.")


def _mend_gate(original):
    """ModelWorker.generate_stream_gate that names the cause of a failed request to the client."""
    import json

    def generate_stream_gate(self, params):
        prompt = params.get("prompt") if isinstance(params, dict) else None
        first = True
        try:
            for chunk in self.generate_stream(params):
                if first and prompt is not None and OVERLONG_REPLY.encode() in chunk:
                    data = json.loads(chunk.rstrip(b"\0"))
                    if data.get("error_code") == 0 and data.get("text") == prompt + OVERLONG_REPLY:
                        context = getattr(self.model.config, "max_position_embeddings", None)
                        print("Refused: prompt over the context of", context, "tokens")
                        yield json.dumps({"text": overlong_reply(context), "error_code": 1}).encode() + b"\0"
                        return
                first = False
                yield chunk
        except Exception as err:  # noqa: BLE001 - upstream's gate catches every error of a request too
            import torch

            # upstream's log lines, word for word
            if isinstance(err, ValueError):
                print("Caught ValueError:", err)
            elif isinstance(err, torch.cuda.CudaError):
                print("Caught torch.cuda.CudaError:", err)
            else:
                print("Caught Unknown Error", err)
            yield json.dumps({"text": error_reply(err), "error_code": 1}).encode() + b"\0"
    return generate_stream_gate


def mend_worker_replies() -> None:
    """Mend the reply gate of upstream's worker module(s) loaded now; once each."""
    for module in worker_modules():
        wrap(module.ModelWorker, "generate_stream_gate", "worker_error_replies", _mend_gate)


@shim("llava.model.builder", replaces="load_pretrained_model", versions="all")
def worker_error_replies(original):
    """Without it: model_worker: a corrupt or oversized image, a failed generation: the client
    gets "NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE" (no cause); a prompt over the
    context is answered with error_code 0, as if the model had said it.

    ModelWorker.generate_stream_gate: error replies (error_code 1) that name the cause.

    Upstream's gate catches every exception of a request, prints it to the worker's log and
    answers the same `server_error_msg`: a client (or the Gradio page) is told to retry a
    request that will fail again, and cannot say which of many concurrent requests was
    wrong or why. A prompt whose tokens plus image tokens fill the context is answered
    "<prompt>Exceeds max token length..." with error_code 0, which API clients take for an
    answer. Mended: the reply names the exception (`ImageError: request image (base64),
    4096 bytes: not an image file ...`; other than ValueError: upstream's message plus the
    cause) and an over-long prompt gets error_code 1 with the context size; log lines and
    successful streams are upstream's, byte for byte.

    The worker runs as `__main__` (python -m), where no import hook sees it; its
    `ModelWorker.__init__` calls `load_pretrained_model` once every name of the module
    exists, so that call is where the gate is mended (an imported llava.serve.model_worker
    is mended the same way).
    """
    def load_pretrained_model(*args, **kwargs):
        mend_worker_replies()
        return original(*args, **kwargs)
    return load_pretrained_model


@shim("llava.model.builder", replaces="load_pretrained_model", versions="all")
def worker_conv_template(original):
    """Without it: model_worker: a client (upstream's chat page) templates the prompt by
    the model's folder name, so a checkpoint trained with `--version v1` in a folder
    without "v1" in its name is prompted with llava_v0 and answers wrongly, without error.

    ModelWorker.generate_stream: a prompt in another chat template is rendered again in
    the template the checkpoint records it was trained with (`conv_template.retemplate`),
    with that template's stop text; the streamed text still opens with the client's own
    prompt, which clients cut off. A checkpoint without the record is served as upstream
    serves it. Mended where `ModelWorker.__init__` calls the loader, as `worker_error_replies`.
    """
    def load_pretrained_model(*args, **kwargs):
        for module in worker_modules():
            wrap(module.ModelWorker, "generate_stream", "worker_conv_template", _in_trained_template)
        return original(*args, **kwargs)
    return load_pretrained_model


def _in_trained_template(original):
    """ModelWorker.generate_stream that prompts in the checkpoint's recorded template."""
    import json

    from feallm_llava.integration.conv_template import CONFIG_KEY, retemplate, stop_text

    def generate_stream(self, params):
        target = getattr(self.model.config, CONFIG_KEY, None)
        prompt = params.get("prompt") if isinstance(params, dict) else None
        found = retemplate(prompt, target) if target and isinstance(prompt, str) else None
        if found is None:
            yield from original(self, params)
            return
        new, source = found
        log.info("prompt in %s rendered again in %s, the template this checkpoint was trained with", source, target)
        for chunk in original(self, {**params, "prompt": new, "stop": stop_text(target)}):
            data = json.loads(chunk.rstrip(b"\0"))
            if isinstance(data.get("text"), str) and data["text"].startswith(new):
                data["text"] = prompt + data["text"][len(new):]  # the client cuts off its own prompt
            yield json.dumps(data).encode() + b"\0"
    return generate_stream


@shim("llava.model.builder", replaces="load_pretrained_model", versions="all")
def worker_context_check(original):
    """Without it: model_worker: the context check counts each `<image>` placeholder on top
    of the image's own tokens, so a prompt one token under the context is refused and an
    answer bound by the context is cut a token short; a refusal names no sizes.

    ModelWorker.generate_stream: the prompt's length counted as the model sees it, each
    image as the tokens its projector emits (the tower's `num_patches`: N + 1 for
    `feallm`, N for `mlp2x_gelu`) in place of its placeholder; a prompt that leaves no
    room to answer is refused (ValueError: error_code 1 with the counts), one that does is
    answered up to the context's last position. Mended where `ModelWorker.__init__` calls
    the loader, after `worker_conv_template`, so it counts the prompt the model is given.
    """
    def load_pretrained_model(*args, **kwargs):
        for module in worker_modules():
            wrap(module.ModelWorker, "generate_stream", "worker_context_check", _exact_context)
        return original(*args, **kwargs)
    return load_pretrained_model


class ContextError(ValueError):
    """A prompt (with its image tokens) that leaves the model no room to answer."""


def prompt_length(worker, prompt: str, n_images: int) -> tuple[int, int]:
    """(tokens the model is given for `prompt`, tokens of each image) on `worker`."""
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    if getattr(worker.model.config, "mm_use_im_start_end", False):
        prompt = prompt.replace(DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN)
    ids = tokenizer_image_token(prompt, worker.tokenizer, IMAGE_TOKEN_INDEX)
    per_image = int(worker.model.get_vision_tower().num_patches)
    # each placeholder id is replaced by the image's tokens
    return len(ids) - n_images + n_images * per_image, per_image


def _exact_context(original):
    """ModelWorker.generate_stream that refuses, with its counts, a prompt that fills the context."""
    def generate_stream(self, params):
        from llava.constants import DEFAULT_IMAGE_TOKEN

        prompt = params.get("prompt") if isinstance(params, dict) else None
        images = params.get("images") if isinstance(params, dict) else None
        n_images = len(images) if images and self.is_multimodal else 0
        if not isinstance(prompt, str) or n_images != prompt.count(DEFAULT_IMAGE_TOKEN):
            yield from original(self, params)  # upstream's own errors for these
            return
        length, per_image = prompt_length(self, prompt, n_images)
        context = getattr(self.model.config, "max_position_embeddings", 2048)
        if context - length < 1:
            images_part = f", {n_images} image(s) x {per_image} tokens" if n_images else ""
            raise ContextError(f"Exceeds max token length: the prompt is {length} tokens{images_part}, the "
                               f"model's context {context}: no room to answer. Please start a new conversation "
                               f"or shorten the prompt.")
        yield from original(_ExactCount(self) if n_images else self, params)
    return generate_stream


class _ExactCount:
    """The worker as upstream's generate_stream sees it, its image count without the placeholder.

    Upstream budgets `len(input_ids) + images x num_patches`, where input_ids already holds
    one placeholder per image: each image is counted one token too many. Through this view
    `num_patches` reads one less, for this call only; everything else is the worker's.
    """

    def __init__(self, worker):
        self._worker = worker
        self.model = _ModelCount(worker.model)

    def __getattr__(self, name):
        return getattr(self._worker, name)


class _ModelCount:
    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def get_vision_tower(self):
        return _TowerCount(self._model.get_vision_tower().num_patches - 1)


class _TowerCount:
    def __init__(self, num_patches: int):
        self.num_patches = num_patches


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
