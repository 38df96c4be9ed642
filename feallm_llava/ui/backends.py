"""The two backends the web UI talks to, over HTTP only (no torch, no llava here).

- `ControllerBackend`: upstream LLaVA's controller + model_worker protocol. Models from
  `POST /list_models`; a model's worker from `POST /get_worker_address {"model"}`;
  answers from `POST <worker>/worker_generate_stream` with `{model, prompt, temperature,
  top_p, max_new_tokens, stop, images: [base64]}`, read as `\\0`-separated JSON whose
  `text` repeats the prompt before the answer so far (`answer_of` strips it). The prompt is
  rendered in upstream's `llava_v1` form with `<image>` (`llava_v1_prompt`); the worker
  renders it again in the template the checkpoint was trained with.
- `OpenAIChatBackend`: any OpenAI-compatible chat-completions server (vLLM, SGLang, an
  API): the image as a data URL in the user turn, the answer streamed.

Both have `models()`, `stream(model, turns, image, ...)` yielding the answer so far, and
`for_model(model)`: an object with `generate(queries)`, the batch interface through which
`serve.analyzer.Analyzer` asks the FER, AU and reasoning questions.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from feallm_llava.errors import FeallmError
from feallm_llava.integration import access

# upstream llava.conversation's conv_llava_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>")
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA_V1_ROLES = ("USER", "ASSISTANT")
LLAVA_V1_STOP = "</s>"
IMAGE_TOKEN = "<image>"
# the model sees 336 px; a larger upload only makes the request bigger
MAX_SENT_SIDE = 1024


class BackendError(FeallmError, RuntimeError):
    """The server could not answer; the message says which server and why."""


@dataclass(frozen=True)
class Turn:
    """One exchange of a conversation: what the user asked, what the model answered (None:
    the answer being asked for)."""

    question: str
    answer: str | None = None


def llava_v1_prompt(turns: Sequence[Turn], image: bool) -> str:
    """The prompt upstream's chat page sends for `turns` in the llava_v1 template, the image
    placeholder opening the first question when there is an image."""
    parts = [LLAVA_V1_SYSTEM + " "]
    for i, turn in enumerate(turns):
        question = f"{IMAGE_TOKEN}\n{turn.question}" if i == 0 and image else turn.question
        parts.append(f"{LLAVA_V1_ROLES[0]}: {question} ")
        if turn.answer is None:
            parts.append(f"{LLAVA_V1_ROLES[1]}:")
        else:
            parts.append(f"{LLAVA_V1_ROLES[1]}: {turn.answer}{LLAVA_V1_STOP}")
    return "".join(parts)


def answer_of(text: str, prompt: str) -> str:
    """The answer in a worker's streamed `text`, which repeats the prompt first."""
    if text.startswith(prompt):
        text = text[len(prompt):]
    return text.strip()


def image_bytes(img: Image.Image, max_side: int = MAX_SENT_SIDE) -> bytes:
    """`img` as PNG bytes, its longer side at most `max_side` pixels."""
    img = img.convert("RGB")
    if max(img.size) > max_side:
        img = img.copy()
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class ControllerBackend:
    """Upstream LLaVA's controller and its model workers."""

    kind = "controller"

    def __init__(self, url: str, *, max_new_tokens: int = 512, temperature: float = 0.2, top_p: float = 0.7,
                 timeout_s: float = 300.0, concurrency: int = 2):
        self.url = url.rstrip("/")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.timeout_s = timeout_s
        self.concurrency = max(1, concurrency)
        # the stack's shared secret (from this process's environment), sent with every request
        self.headers = access.auth_headers(access.read_secret())

    def describe(self) -> str:
        return f"upstream LLaVA controller {self.url}"

    def _post(self, path: str, payload: dict | None = None) -> dict:
        import requests

        try:
            r = requests.post(self.url + path, json=payload or {}, timeout=30, headers=self.headers)
            r.raise_for_status()
            return r.json()
        except (requests.RequestException, ValueError) as err:
            raise BackendError(f"controller {self.url}{path}: {type(err).__name__}: {err}") from err

    def models(self) -> list[str]:
        return sorted(self._post("/list_models").get("models") or [])

    def worker_of(self, model: str) -> str:
        address = self._post("/get_worker_address", {"model": model}).get("address") or ""
        if not address:
            raise BackendError(f"no worker serves {model!r} (controller {self.url}); known models: "
                               f"{', '.join(self.models()) or 'none'}")
        return address.rstrip("/")

    def stream(self, model: str, turns: Sequence[Turn], image: Image.Image | None = None, *,
               max_new_tokens: int | None = None, temperature: float | None = None) -> Iterator[str]:
        """The answer to the last turn so far, once per chunk the worker sends."""
        import requests

        prompt = llava_v1_prompt(turns, image is not None)
        payload = {
            "model": model, "prompt": prompt,
            "temperature": self.temperature if temperature is None else temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            "stop": LLAVA_V1_STOP,
            "images": [base64.b64encode(image_bytes(image)).decode("ascii")] if image is not None else [],
        }
        worker = self.worker_of(model)
        try:
            with requests.post(worker + "/worker_generate_stream", json=payload, stream=True,
                               timeout=self.timeout_s, headers=self.headers) as r:
                r.raise_for_status()
                for chunk in r.iter_lines(delimiter=b"\0"):
                    if not chunk:
                        continue
                    data = json.loads(chunk)
                    if data.get("error_code", 0) != 0:
                        raise BackendError(f"worker {worker} ({model}): {answer_of(str(data.get('text', '')), prompt)}"
                                           f" (error_code {data.get('error_code')})")
                    yield answer_of(str(data.get("text", "")), prompt)
        except (requests.RequestException, ValueError) as err:
            raise BackendError(f"worker {worker} ({model}): {type(err).__name__}: {err}") from err

    def ask(self, model: str, question: str, image: Image.Image | None) -> str:
        """One question, greedy, the whole answer."""
        answer = ""
        for answer in self.stream(model, [Turn(question)], image, temperature=0.0):
            pass
        return answer

    def for_model(self, model: str) -> _Asker:
        """What `serve.analyzer.Analyzer` asks its questions through, for `model`."""
        return _Asker(self, model)


@dataclass(frozen=True)
class _Asker:
    """`generate(queries)` for one model of a controller: answers in order, `concurrency`
    requests in flight."""

    backend: ControllerBackend
    model: str

    def generate(self, queries: list) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.backend.concurrency, thread_name_prefix="worker") as pool:
            return list(pool.map(lambda q: self.backend.ask(self.model, q.question, q.load_image()), queries))


class OpenAIChatBackend:
    """An OpenAI-compatible chat-completions server; analysis through the package's client
    (`inference.openai_client.OpenAIBackend`: retries, bounded concurrency)."""

    kind = "openai"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, max_new_tokens: int = 512,
                 temperature: float = 0.2, timeout_s: float = 300.0, concurrency: int = 2):
        import openai

        from feallm_llava.inference.openai_client import OpenAIBackend

        api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"  # local servers ignore it
        self.base_url = base_url
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=2)
        self._batch = OpenAIBackend(model, base_url=base_url, api_key=api_key, concurrency=max(1, concurrency),
                                    max_new_tokens=max_new_tokens, timeout_s=timeout_s, max_attempts=3)

    def describe(self) -> str:
        return f"OpenAI-compatible server {self.base_url} (model {self.model})"

    def models(self) -> list[str]:
        return [self.model]

    def stream(self, model: str, turns: Sequence[Turn], image: Image.Image | None = None, *,
               max_new_tokens: int | None = None, temperature: float | None = None) -> Iterator[str]:
        import openai

        messages = []
        for i, turn in enumerate(turns):
            content: list[dict] = [{"type": "text", "text": turn.question}]
            if i == 0 and image is not None:
                url = "data:image/png;base64," + base64.b64encode(image_bytes(image)).decode("ascii")
                content.insert(0, {"type": "image_url", "image_url": {"url": url}})
            messages.append({"role": "user", "content": content})
            if turn.answer is not None:
                messages.append({"role": "assistant", "content": turn.answer})
        answer = ""
        try:
            stream = self.client.chat.completions.create(
                model=model or self.model, messages=messages, stream=True,
                temperature=self.temperature if temperature is None else temperature,
                max_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens)
            for chunk in stream:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    answer += delta
                    yield answer
        except openai.OpenAIError as err:
            raise BackendError(f"{self.model} at {self.base_url}: {type(err).__name__}: {err}") from err
        if not answer:
            yield answer

    def for_model(self, model: str):
        """What `serve.analyzer.Analyzer` asks its questions through (the server's one model)."""
        return self._batch
