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
from typing import Callable, Iterable, Iterator, Sequence

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

    def _messages(self, item: Query) -> list[dict]:
        return [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(item)}},
            {"type": "text", "text": item.question},
        ]}]

    def ask(self, item: Query) -> str:
        """One item's answer text (retrying transient failures)."""
        response = self._create(item, messages=self._messages(item), max_tokens=self.max_new_tokens)
        if not response.choices:
            raise BackendError(f"item {item.id!r}: {self.model} returned no choices")
        # stripped as the LLaVA runner strips its own: vLLM's detokenizer keeps the space
        # the answer's first piece carries after "ASSISTANT:"
        return (response.choices[0].message.content or "").strip()

    # -- scoring ---------------------------------------------------------------------
    def _prompt_logprobs(self, item: Query, messages: list[dict], continued: bool, complete: bool = False) -> list:
        """The prompt's log-probabilities, one entry per prompt token (vLLM's extension).
        `continued`: the last (assistant) message is left open, or closed with its end of
        turn when `complete`."""
        extra: dict = {"prompt_logprobs": 0}
        if continued:
            extra.update(continue_final_message=not complete, add_generation_prompt=False)
        response = self._create(item, messages=messages, max_tokens=1, extra_body=extra)
        logprobs = getattr(response, "prompt_logprobs", None)
        if logprobs is None and getattr(response, "model_extra", None):
            logprobs = response.model_extra.get("prompt_logprobs")
        if not isinstance(logprobs, list) or not logprobs:
            raise BackendError(
                f"item {item.id!r}: {self.model} at {self.where} returned no prompt log-probabilities; "
                "probabilities (--scores) need a server that returns them for a continued assistant message "
                "(vLLM's `prompt_logprobs` with `continue_final_message`: launch/serve_vllm.sh)")
        return logprobs

    def continuation_logprobs(self, item: Query, texts: Sequence[str], complete: bool = False) -> list[float]:
        """Summed log-probability of each answer text right after the item's prompt.

        The chat protocol has no scoring call; vLLM's extension does it: the answer is
        sent as an assistant message that the model continues (`continue_final_message`)
        with `prompt_logprobs`, and the answer's tokens are the last ones of that prompt,
        as many as it grew past the open prompt (asked the same way). A server that
        returns no prompt log-probabilities is refused, never read as zeros. `complete`:
        whole answers, closed by the chat template's end of turn (scored with it).
        """
        messages = self._messages(item)
        start = len(self._prompt_logprobs(item, messages, continued=False))
        out = []
        for text in texts:
            logprobs = self._prompt_logprobs(item, messages + [{"role": "assistant", "content": text}], continued=True,
                                             complete=complete)
            if len(logprobs) <= start:
                raise BackendError(f"item {item.id!r}: {self.model} at {self.where}: the answer {text!r} gave "
                                   f"{len(logprobs)} prompt tokens after an open prompt of {start}; cannot find "
                                   "the answer's tokens")
            summed = 0.0
            for position in logprobs[start:]:
                if not isinstance(position, dict) or len(position) != 1:
                    raise BackendError(f"item {item.id!r}: {self.model} at {self.where} returned prompt "
                                       f"log-probabilities that are not one per token: {str(position)[:80]}")
                (entry,) = position.values()
                summed += float(entry["logprob"] if isinstance(entry, dict) else entry)
            out.append(summed)
        return out

    def score(self, items: Iterable[Query], continuations: Sequence[str] | Callable[[Query], Sequence[str]],
              batch_size: int = 8, complete: bool = False) -> Iterator[tuple[Query, list[float]]]:
        """(item, summed log-probabilities of its continuations) pairs as they complete,
        `concurrency` items at a time (`batch_size` is the runner's; unused here)."""
        pick = continuations if callable(continuations) else (lambda _item: continuations)
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai-score") as pool:
            futures = {pool.submit(self.continuation_logprobs, item, list(pick(item)), complete): item for item in items}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            finally:
                for f in futures:
                    f.cancel()

    @property
    def where(self) -> str:
        return self.base_url or "api.openai.com"

    def _create(self, item: Query, **kwargs):
        """One chat-completions call at temperature 0, retrying transient failures."""
        for attempt in range(self.max_attempts):
            try:
                return self.client.chat.completions.create(model=self.model, temperature=0, **kwargs)
            except openai.OpenAIError as e:
                if not _retryable(e):
                    raise BackendError(f"item {item.id!r}: {self.model} at {self.base_url or 'api.openai.com'} "
                                       f"refused the request: {e}") from e
                if attempt + 1 == self.max_attempts:
                    raise BackendError(f"item {item.id!r}: {self.model} at {self.base_url or 'api.openai.com'} "
                                       f"still failing after {self.max_attempts} attempts: {e}") from e
                time.sleep(self._sleep_before(attempt, e))
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
