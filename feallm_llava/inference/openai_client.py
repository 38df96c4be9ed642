"""Answer eval items with any OpenAI-compatible chat endpoint that takes images.

The paper's baselines (Qwen-VL, InternVL, MiniCPM, GPT-4o, ...: Tab. 1, 2, 5) are served
by vLLM, LMDeploy, SGLang or an API, all speaking the chat-completions protocol. One
request per item: the image as a base64 data URL, then the question; temperature 0.

Concurrency is bounded by a thread pool (`concurrency` requests in flight). Requests
that fail transiently (429, 408, 409, 5xx, timeouts, dropped connections) are retried
with exponential backoff and jitter, honouring a server's Retry-After; the client's own
retries are off so that these are the only ones. Anything else (400 bad request, 401,
404 unknown model, ...) stops the run at once with the item and the server's message.
"""

from __future__ import annotations

import base64
import io
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Iterable, Iterator

import openai
from PIL import Image

from feallm_llava.errors import FeallmError
from feallm_llava.inference import Query

RETRY_STATUS = {408, 409, 429}  # plus every 5xx; the statuses openai's client retries itself
RAW_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


class BackendError(FeallmError, RuntimeError):
    """A request failed for good; names the item and the server's answer."""


def image_data_url(item: Query) -> str:
    """The item's image as a data URL: the file's own bytes when it is sent whole in a
    format every server decodes, else the (cropped) RGB image re-encoded as PNG."""
    path = getattr(item, "image", None)
    if isinstance(path, (str, os.PathLike)) and getattr(item, "crop", None) is None:
        try:
            with Image.open(path) as im:
                mime = RAW_FORMATS.get(im.format or "")
        except (OSError, ValueError) as e:  # missing, unreadable or not an image
            raise ValueError(f"item {item.id!r}: cannot read image {path}: {e}") from e
        if mime is not None:
            with open(path, "rb") as f:
                return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"
    buf = io.BytesIO()
    item.load_image().save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _retryable(error: Exception) -> bool:
    if isinstance(error, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRY_STATUS or error.status_code >= 500
    return False


def _retry_after(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class OpenAIBackend:
    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 concurrency: int = 8, max_new_tokens: int = 256, max_attempts: int = 6,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0, timeout_s: float = 120.0):
        if concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if api_key is None:
            if base_url is None:
                raise ValueError("no API key: set OPENAI_API_KEY, or pass --base-url for a local server")
            api_key = "EMPTY"  # local servers (vLLM, LMDeploy) ignore the key but the client needs one
        self.model = model
        self.base_url = base_url
        self.concurrency = concurrency
        self.max_new_tokens = max_new_tokens
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
        self._jitter = random.Random()
        self._lock = threading.Lock()

    def _sleep_before(self, attempt: int, error: Exception) -> float:
        delay = _retry_after(error)
        if delay is None:
            with self._lock:
                delay = self.backoff_s * (2 ** attempt) * self._jitter.uniform(0.5, 1.0)
        return min(delay, self.max_backoff_s)

    def ask(self, item: Query) -> str:
        """One item's answer text (retrying transient failures)."""
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(item)}},
            {"type": "text", "text": item.question},
        ]}]
        for attempt in range(self.max_attempts):
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=0, max_tokens=self.max_new_tokens)
            except openai.OpenAIError as e:
                if not _retryable(e):
                    raise BackendError(f"item {item.id!r}: {self.model} at {self.base_url or 'api.openai.com'} "
                                       f"refused the request: {e}") from e
                if attempt + 1 == self.max_attempts:
                    raise BackendError(f"item {item.id!r}: {self.model} at {self.base_url or 'api.openai.com'} "
                                       f"still failing after {self.max_attempts} attempts: {e}") from e
                time.sleep(self._sleep_before(attempt, e))
                continue
            if not response.choices:
                raise BackendError(f"item {item.id!r}: {self.model} returned no choices")
            # stripped as the LLaVA runner strips its own: vLLM's detokenizer keeps the space
            # the answer's first piece carries after "ASSISTANT:"
            return (response.choices[0].message.content or "").strip()
        raise AssertionError("unreachable")

    def generate(self, items: list[Query]) -> list[str]:
        """The answers of `items`, in item order (the LLaVA runner's batch interface)."""
        answers = {id(item): text for item, text in self.answer(items)}
        return [answers[id(item)] for item in items]

    def answer(self, items: Iterable[Query]) -> Iterator[tuple[Query, str]]:
        """(item, answer) pairs as they complete, `concurrency` requests at a time.

        On a failure the queued items are cancelled, the requests in flight finish and
        are yielded, then the error is raised: no answer already paid for is lost.
        """
        failure: BaseException | None = None
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai") as pool:
            futures = {pool.submit(self.ask, item): item for item in items}
            try:
                for future in as_completed(futures):
                    if future.cancelled():
                        continue
                    error = future.exception()
                    if error is not None:
                        if failure is None:
                            failure = error
                            for f in futures:
                                f.cancel()
                        continue
                    yield futures[future], future.result()
            finally:
                for f in futures:
                    f.cancel()
        if failure is not None:
            raise failure
