"""GPT-4o annotator (paper section 3.2): the face image plus its FE and AU labels go to
the model, which writes the three texts as structured JSON; every answer is validated
against the labels before it is kept.

Per image:
1. Cached? (annotation_cache: key = sha256 of image bytes + labels + PROMPT_VERSION)
   Then it is never sent again.
2. Send the request through the official `openai` client (`max_retries=0`: retries are
   ours). 429 / 5xx / 408 / 409 / timeouts / connection errors are retried up to
   `max_retries` times with exponential backoff and jitter, honouring `Retry-After`.
   401 / 403 / 404 stop the whole run (a bad key or model name affects every image).
3. Parse the JSON answer, put the reasoning together (one step per active AU in face
   order, then the conclusion: the paper's "reorganised for coherence") and validate it
   with `records.validate_annotation` (the FEABench parser). A failing answer is
   regenerated, with the problems fed back, up to `max_regenerations` times.
4. Still failing: the image gets the offline template annotator's texts and is flagged
   `fallback` (in annotations.jsonl and report.json), never silently kept. An image whose
   transport retries ran out is flagged the same way but NOT cached, so a later run
   tries the API again.
5. The finished entry is appended to the cache at once (fsync'd), so a killed run
   resumes without re-sending finished images.

Concurrency: a thread pool of `concurrency` workers sharing one client, behind a
requests-per-minute limiter. Token use and cost (configurable prices) are counted.

Batch API mode (large runs at half price): `write_batch_input` writes the requests of
the uncached images as Batch API .jsonl files; `submit_batch` uploads them and creates
the batches; `collect_batch` validates the finished outputs into the cache. Images whose
batch answer failed are then done by the normal path (with regeneration and fallback).
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from feallm_llava.data.annotate_template import TemplateAnnotator
from feallm_llava.data.annotation_cache import AnnotationCache
from feallm_llava.facs.labels import AU_NAMES, AUS, au_key
from feallm_llava.data.records import Annotation, FaceRecord, validate_annotation

# Bump when the prompt or the schema changes: cached answers of another version are not
# reused (they are part of the cache key).
PROMPT_VERSION = "fea-v1"

SYSTEM_PROMPT = (
    "You are an expert in the Facial Action Coding System (FACS) and in facial expression "
    "analysis. You write training descriptions for a face image whose facial expression "
    "and action units (AUs) were labelled by human experts. The labels are ground truth: "
    "follow them exactly, even where the image looks ambiguous to you."
)

# Structured output (response_format json_schema, strict): the reasoning comes as one step
# per active AU plus a conclusion, which the annotator orders (face order) and joins.
RESPONSE_SCHEMA: dict = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "summary": {"type": "string"},
        "movement": {"type": "string"},
        "reasoning_steps": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"au": {"type": "integer"}, "contribution": {"type": "string"}},
                "required": ["au", "contribution"],
            },
        },
        "conclusion": {"type": "string"},
    },
    "required": ["summary", "movement", "reasoning_steps", "conclusion"],
}
RESPONSE_FORMAT: dict = {"type": "json_schema",
                         "json_schema": {"name": "fea_annotation", "strict": True,
                                         "schema": RESPONSE_SCHEMA}}

_MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png",
         ".webp": "image/webp", ".bmp": "image/bmp"}


# ---------------------------------------------------------------- configuration -----

@dataclass(frozen=True)
class Prices:
    """USD per million tokens. Defaults: OpenAI's list price of gpt-4o (2024-08-06
    snapshot: $2.50 input, $10.00 output); the Batch API bills half (`batch_factor`).
    Check the current prices and pass your own."""

    input_per_million: float = 2.50
    output_per_million: float = 10.00
    batch_factor: float = 0.5

    def cost(self, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        usd = (prompt_tokens * self.input_per_million
               + completion_tokens * self.output_per_million) / 1e6
        return usd * (self.batch_factor if batch else 1.0)


@dataclass(frozen=True)
class OpenAIConfig:
    model: str = "gpt-4o"
    base_url: str | None = None          # any OpenAI-compatible server (vLLM, a proxy, ...)
    api_key: str | None = None           # default: the client reads OPENAI_API_KEY
    concurrency: int = 8                 # worker threads
    requests_per_minute: float = 0.0     # 0 = no limit
    max_retries: int = 5                 # transport retries per request (429/5xx/timeouts)
    max_regenerations: int = 2           # new answers after an invalid one
    timeout: float = 60.0                # seconds per request
    backoff_base: float = 1.0            # first backoff in seconds, doubled per retry
    backoff_max: float = 60.0            # longest wait, also caps Retry-After
    temperature: float = 0.7             # > 0 so a regenerated answer can differ
    image_detail: str = "auto"           # "low" | "high" | "auto" (OpenAI vision detail)
    prices: Prices = field(default_factory=Prices)

    def make_client(self):
        from openai import OpenAI

        key = self.api_key
        if key is None and self.base_url is not None:
            import os
            # Local OpenAI-compatible servers usually ignore the key but the client needs one.
            key = os.environ.get("OPENAI_API_KEY") or "EMPTY"
        return OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=self.timeout)


# ---------------------------------------------------------------- items and results -----

@dataclass(frozen=True)
class AnnotationItem:
    """What one request is about: an image and its labels."""

    id: str
    image: Path
    expression: str
    aus: dict[int, int]      # the labelled AUs (0/1); unlabelled AUs are unknown

    @classmethod
    def from_record(cls, record: FaceRecord) -> "AnnotationItem":
        if record.expression is None or record.aus is None:
            raise ValueError(f"{record.id}: only faces with both an expression and AU labels "
                             f"can be annotated")
        return cls(record.id, record.image, record.expression, dict(record.aus))

    @property
    def active(self) -> list[int]:
        return [au for au in AUS if self.aus.get(au) == 1]


@dataclass
class AnnotationResult:
    id: str
    key: str
    image_sha256: str
    annotation: Annotation
    status: str                      # "validated" | "fallback"
    answers: int = 0                 # answers received from the model
    problems: list[str] = field(default_factory=list)   # why answers were rejected
    prompt_tokens: int = 0
    completion_tokens: int = 0
    from_cache: bool = False
    batch: bool = False              # answered through the Batch API
    error: str | None = None         # the transport error behind an uncached fallback

    @property
    def regenerated(self) -> bool:
        return self.answers > 1

    def cache_entry(self, item: AnnotationItem, config: OpenAIConfig) -> dict:
        return {"key": self.key, "id": self.id, "image_sha256": self.image_sha256,
                "expression": item.expression,
                "aus": {str(au): v for au, v in sorted(item.aus.items())},
                "status": self.status, "annotation": self.annotation.to_dict(),
                "answers": self.answers, "problems": self.problems,
                "usage": {"prompt_tokens": self.prompt_tokens,
                          "completion_tokens": self.completion_tokens},
                "batch": self.batch, "model": config.model,
                "prompt_version": PROMPT_VERSION, "time": time.time()}

    @classmethod
    def from_cache_entry(cls, entry: dict) -> "AnnotationResult":
        usage = entry.get("usage") or {}
        return cls(id=entry["id"], key=entry["key"], image_sha256=entry["image_sha256"],
                   annotation=Annotation.from_dict(entry["annotation"]),
                   status=entry["status"], answers=int(entry.get("answers", 0)),
                   problems=list(entry.get("problems", [])),
                   prompt_tokens=int(usage.get("prompt_tokens", 0)),
                   completion_tokens=int(usage.get("completion_tokens", 0)),
                   from_cache=True, batch=bool(entry.get("batch", False)))


@dataclass
class AnnotatorStats:
    """Run totals for report.json (this run's requests; tokens include cached entries)."""

    images: int = 0
    from_cache: int = 0
    validated: int = 0
    fallback: int = 0
    fallback_transport: int = 0     # fallbacks because the API stayed unreachable
    regenerated_images: int = 0     # images that needed more than one answer
    rejected_answers: int = 0       # answers that failed parsing or validation
    requests: int = 0               # HTTP requests this run (retries included)
    retries: int = 0                # transport retries this run
    rate_limited: int = 0           # 429 answers
    server_errors: int = 0          # 5xx / 408 / 409 answers
    timeouts: int = 0               # timeouts and connection errors
    prompt_tokens: int = 0          # all answers of the dataset, cached ones included
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class AnnotatorFatalError(RuntimeError):
    """An error every further request would hit too (bad key, unknown model)."""


class TransportError(RuntimeError):
    """The API could not be reached / kept failing for one request after all retries."""


class AnswerError(ValueError):
    """A model answer that is not the JSON the schema asks for."""


# ---------------------------------------------------------------- prompt -----

def cache_key(image_bytes: bytes, expression: str, aus: dict[int, int]) -> str:
    """sha256 over image bytes, labels and PROMPT_VERSION (the annotation cache key)."""
    labels = json.dumps({"expression": expression,
                         "aus": {str(a): v for a, v in sorted(aus.items())}}, sort_keys=True)
    h = hashlib.sha256(image_bytes)
    h.update(b"\0" + labels.encode() + b"\0" + PROMPT_VERSION.encode())
    return h.hexdigest()


def user_prompt(expression: str, aus: dict[int, int]) -> str:
    active = [au for au in AUS if aus.get(au) == 1]
    inactive = [au for au in AUS if aus.get(au) == 0]
    unknown = [au for au in AUS if au not in aus]
    fmt = lambda group: ", ".join(f"{au_key(a)} ({AU_NAMES[a]})" for a in group) or "none"  # noqa: E731
    lines = [
        "Expert labels of this face:",
        f"- Facial expression: {expression}",
        f"- Active action units: {fmt(active)}",
        f"- Inactive action units: {fmt(inactive)}",
    ]
    if unknown:
        lines.append(f"- Action units without a label (do not mention them): {fmt(unknown)}")
    lines += [
        "",
        "Write three descriptions as JSON:",
        f'1. "summary": start with exactly "{expression}." and then summarise in one or two '
        "sentences how the face looks. Do not name any other expression.",
        '2. "movement": describe the facial movement of every active action unit, naming '
        'each one by its code and FACS name, e.g. "AU6 (Cheek Raiser)". Do not mention any '
        "action unit that is not active, not even to say it is absent."
        + (" There is no active action unit: describe the face as relaxed without naming "
           "action units." if not active else ""),
        '3. "reasoning_steps": one step per active action unit (field "au" = its number, '
        '"contribution" = one or two sentences, naming it as e.g. "AU6 (Cheek Raiser)", on '
        f"how it contributes to the {expression.lower()} expression). Mention only that "
        "action unit in its step.",
        f'4. "conclusion": one sentence that names the expression "{expression.lower()}" and '
        "draws the conclusion from the steps, without naming other action units or other "
        "expressions.",
        "Use plain, objective language; do not mention the labels or these instructions.",
    ]
    return "\n".join(lines)


def build_messages(image_bytes: bytes, suffix: str, expression: str, aus: dict[int, int],
                   detail: str = "auto", feedback: Sequence[str] = ()) -> list[dict]:
    """The chat messages of one request (feedback: problems of a rejected answer)."""
    mime = _MIME.get(suffix.lower(), "image/jpeg")
    url = f"data:{mime};base64,{base64.b64encode(image_bytes).decode('ascii')}"
    content: list[dict] = [{"type": "text", "text": user_prompt(expression, aus)},
                           {"type": "image_url", "image_url": {"url": url, "detail": detail}}]
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": content}]
    if feedback:
        messages.append({"role": "user", "content": (
            "Your previous answer was rejected because: " + "; ".join(feedback)
            + ". Write the JSON again, following the labels exactly.")})
    return messages


def parse_answer(content: str | None, aus: dict[int, int]) -> tuple[Annotation, list[str]]:
    """(Annotation, problems) from a model answer; AnswerError when it is not the schema's JSON.

    The reasoning is reorganised: steps sorted in labels.AUS (face) order, then the
    conclusion. `problems` says which active AUs lack a step and which steps are about
    AUs that are not active (the validator then names the rest).
    """
    if not content:
        raise AnswerError("empty answer")
    text = content.strip()
    if text.startswith("```"):  # some compatible servers wrap JSON in a code fence
        text = text.strip("`").removeprefix("json").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AnswerError(f"answer is not JSON ({err.msg} at char {err.pos})") from None
    if not isinstance(data, dict):
        raise AnswerError("answer is not a JSON object")
    for name in ("summary", "movement", "conclusion"):
        if not isinstance(data.get(name), str) or not data[name].strip():
            raise AnswerError(f"answer lacks a non-empty string {name!r}")
    steps = data.get("reasoning_steps")
    if not isinstance(steps, list):
        raise AnswerError("answer lacks the list 'reasoning_steps'")
    by_au: dict[int, str] = {}
    for step in steps:
        if (not isinstance(step, dict) or not isinstance(step.get("au"), int)
                or not isinstance(step.get("contribution"), str)):
            raise AnswerError(f"malformed reasoning step {step!r}")
        by_au[step["au"]] = step["contribution"].strip()
    active = {au for au, v in aus.items() if v == 1}
    problems = []
    if set(by_au) != active:
        got = ", ".join(au_key(a) for a in sorted(by_au)) or "none"
        want = ", ".join(au_key(a) for a in sorted(active)) or "none"
        problems.append(f"reasoning steps cover [{got}], active AUs are [{want}]")
    order = sorted(by_au, key=lambda au: (AUS.index(au) if au in AUS else len(AUS), au))
    reasoning = " ".join([by_au[au] for au in order] + [data["conclusion"].strip()])
    return Annotation(summary=data["summary"].strip(), movement=data["movement"].strip(),
                      reasoning=reasoning), problems


def _retry_after(headers) -> float | None:
    """Seconds from Retry-After / retry-after-ms (number or HTTP date), None when absent."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return max(0.0, email.utils.mktime_tz(parsed) - time.time())
    return None


class RateLimiter:
    """At most `per_minute` request starts per minute, spaced evenly (thread-safe)."""

    def __init__(self, per_minute: float, sleep: Callable[[float], None] = time.sleep):
        self.interval = 60.0 / per_minute if per_minute > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()
        self._sleep = sleep

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


# ---------------------------------------------------------------- the annotator -----

class OpenAIAnnotator:
    """Annotates items through an OpenAI-compatible chat endpoint (module docstring)."""

    name = "openai"

    def __init__(self, config: OpenAIConfig, cache: AnnotationCache, *,
                 fallback: TemplateAnnotator | None = None, client=None):
        import openai

        self._openai = openai
        self.config = config
        self.cache = cache
        self.fallback = fallback or TemplateAnnotator()
        self.client = client or config.make_client()
        self.stats = AnnotatorStats()
        self._limiter = RateLimiter(config.requests_per_minute)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + delta)

    # -- one request with transport retries --

    def _backoff(self, retry: int, headers=None) -> float:
        wait_s = _retry_after(headers)
        if wait_s is None:
            wait_s = self.config.backoff_base * (2 ** retry) * (0.5 + random.random())
        return min(wait_s, self.config.backoff_max)

    def request(self, messages: list[dict]) -> tuple[str | None, int, int]:
        """(content, prompt tokens, completion tokens); TransportError after the retries."""
        errors = self._openai
        last = ""
        for retry in range(self.config.max_retries + 1):
            if self._stop.is_set():
                raise TransportError("run stopped")
            if retry:
                self._count(retries=1)
            self._limiter.acquire()
            self._count(requests=1)
            try:
                response = self.client.chat.completions.create(
                    model=self.config.model, messages=messages,
                    response_format=RESPONSE_FORMAT, temperature=self.config.temperature)
            except (errors.AuthenticationError, errors.PermissionDeniedError,
                    errors.NotFoundError) as err:
                raise AnnotatorFatalError(
                    f"{type(err).__name__} from {self.client.base_url} (model "
                    f"{self.config.model!r}): {err}. Check the API key, --base-url and "
                    f"--model.") from err
            except errors.APIStatusError as err:
                code = err.status_code
                if code == 429:
                    self._count(rate_limited=1)
                elif code >= 500 or code in (408, 409):
                    self._count(server_errors=1)
                else:  # 400 / 422: this request will not get better by repeating it
                    raise TransportError(f"HTTP {code}: {err}") from err
                last = f"HTTP {code}: {err}"
                self._wait_before_retry(retry, err.response.headers)
                continue
            except errors.APIConnectionError as err:  # includes APITimeoutError
                self._count(timeouts=1)
                last = f"{type(err).__name__}: {err}"
                self._wait_before_retry(retry)
                continue
            except (errors.APIResponseValidationError, json.JSONDecodeError) as err:
                # The body itself was not a ChatCompletion (a broken proxy): retry.
                self._count(server_errors=1)
                last = f"malformed response body: {err}"
                self._wait_before_retry(retry)
                continue
            usage = response.usage
            prompt = usage.prompt_tokens if usage else 0
            completion = usage.completion_tokens if usage else 0
            content = response.choices[0].message.content if response.choices else None
            return content, prompt, completion
        raise TransportError(f"gave up after {self.config.max_retries + 1} attempts; last "
                             f"error: {last}")

    def _wait_before_retry(self, retry: int, headers=None) -> None:
        if retry < self.config.max_retries:  # no wait after the last attempt
            self._stop.wait(self._backoff(retry, headers))  # wakes early when stopped

    # -- one image --

    def annotate_one(self, item: AnnotationItem) -> AnnotationResult:
        """Validated answer, or flagged fallback; caches the result unless transport failed."""
        image_bytes = Path(item.image).read_bytes()
        key = cache_key(image_bytes, item.expression, item.aus)
        sha = hashlib.sha256(image_bytes).hexdigest()
        result = AnnotationResult(id=item.id, key=key, image_sha256=sha,
                                  annotation=Annotation("", "", ""), status="fallback")
        feedback: list[str] = []
        try:
            for _ in range(self.config.max_regenerations + 1):
                messages = build_messages(image_bytes, Path(item.image).suffix, item.expression,
                                          item.aus, self.config.image_detail, feedback)
                content, prompt, completion = self.request(messages)
                result.answers += 1
                result.prompt_tokens += prompt
                result.completion_tokens += completion
                try:
                    annotation, feedback = parse_answer(content, item.aus)
                    feedback += validate_annotation(annotation, item.expression, item.aus)
                except AnswerError as err:
                    feedback = [str(err)]
                if not feedback:
                    result.annotation, result.status = annotation, "validated"
                    break
                self._count(rejected_answers=1)
                result.problems.append(f"answer {result.answers}: " + "; ".join(feedback))
        except TransportError as err:
            result.error = str(err)
        if result.status != "validated":
            result.annotation = self.fallback.annotate(item.expression, item.aus, item.id)
        if result.error is None:
            self.cache.put(result.cache_entry(item, self.config))
        return result

    # -- many images --

    def annotate_all(self, items: Sequence[AnnotationItem], *,
                     progress: bool = True) -> list[AnnotationResult]:
        """Results in the order of `items`; cached images are not sent again."""
        results: list[AnnotationResult | None] = [None] * len(items)
        todo: list[int] = []
        for i, item in enumerate(items):
            cached = self._from_cache(item)
            if cached is not None:
                results[i] = cached
            else:
                todo.append(i)
        bar = tqdm(total=len(items), initial=len(items) - len(todo), disable=not progress,
                   desc=f"annotating ({self.config.model})", unit="img")
        self._stop.clear()
        with ThreadPoolExecutor(max_workers=max(1, self.config.concurrency),
                                thread_name_prefix="annotate") as pool:
            futures = {pool.submit(self.annotate_one, items[i]): i for i in todo}
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in done:
                        results[futures[future]] = future.result()  # re-raises fatal errors
                        bar.update(1)
            except BaseException:
                self._stop.set()  # let running workers finish quickly; their work is cached
                for future in pending:
                    future.cancel()
                raise
            finally:
                bar.close()
        final = [r for r in results if r is not None]
        self._tally(final)
        return final

    def _from_cache(self, item: AnnotationItem) -> AnnotationResult | None:
        image_bytes = Path(item.image).read_bytes()
        entry = self.cache.get(cache_key(image_bytes, item.expression, item.aus))
        if entry is None:
            return None
        result = AnnotationResult.from_cache_entry(entry)
        result.id = item.id
        if result.status == "validated" and validate_annotation(
                result.annotation, item.expression, item.aus):
            return None  # the validator got stricter since: annotate it again
        return result

    def _tally(self, results: Iterable[AnnotationResult]) -> None:
        stats = self.stats
        prompt = completion = 0
        cost = 0.0
        for r in results:
            stats.images += 1
            stats.from_cache += r.from_cache
            stats.validated += r.status == "validated"
            stats.fallback += r.status == "fallback"
            stats.fallback_transport += r.error is not None
            stats.regenerated_images += r.regenerated
            if r.from_cache:
                stats.rejected_answers += len(r.problems)
            prompt += r.prompt_tokens
            completion += r.completion_tokens
            cost += self.config.prices.cost(r.prompt_tokens, r.completion_tokens, r.batch)
        # Tokens and cost of the whole dataset, cached entries included (what it cost).
        stats.prompt_tokens, stats.completion_tokens = prompt, completion
        stats.cost_usd = round(cost, 6)


# ---------------------------------------------------------------- Batch API -----

# OpenAI Batch API limits per input file: 50,000 requests, 200 MB.
BATCH_MAX_REQUESTS = 50_000
BATCH_MAX_BYTES = 190 * 1024 * 1024


def batch_line(item: AnnotationItem, config: OpenAIConfig) -> tuple[str, dict]:
    """(cache key, one Batch API request line) for an item."""
    image_bytes = Path(item.image).read_bytes()
    key = cache_key(image_bytes, item.expression, item.aus)
    body = {"model": config.model, "temperature": config.temperature,
            "response_format": RESPONSE_FORMAT,
            "messages": build_messages(image_bytes, Path(item.image).suffix, item.expression,
                                       item.aus, config.image_detail)}
    return key, {"custom_id": key, "method": "POST", "url": "/v1/chat/completions", "body": body}


def write_batch_input(items: Sequence[AnnotationItem], out_dir: Path, config: OpenAIConfig,
                      cache: AnnotationCache) -> list[Path]:
    """Write the requests of uncached items as `batch_input_NNN.jsonl` files (split at the
    Batch API's per-file limits); returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    handle = None
    count = size = 0
    seen: set[str] = set()
    try:
        for item in items:
            key, line = batch_line(item, config)
            if key in cache or key in seen:
                continue
            seen.add(key)
            data = (json.dumps(line) + "\n").encode()
            if handle is None or count >= BATCH_MAX_REQUESTS or size + len(data) > BATCH_MAX_BYTES:
                if handle is not None:
                    handle.close()
                paths.append(out_dir / f"batch_input_{len(paths):03d}.jsonl")
                handle = open(paths[-1], "wb")
                count = size = 0
            handle.write(data)
            count += 1
            size += len(data)
    finally:
        if handle is not None:
            handle.close()
    return paths


def submit_batch(client, paths: Sequence[Path], state_path: Path) -> dict:
    """Upload the input files, create one batch each, write the ids to `state_path`."""
    state = {"prompt_version": PROMPT_VERSION, "batches": []}
    for path in paths:
        with open(path, "rb") as f:
            uploaded = client.files.create(file=f, purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id,
                                      endpoint="/v1/chat/completions", completion_window="24h")
        state["batches"].append({"input": str(path), "input_file_id": uploaded.id,
                                 "batch_id": batch.id, "status": batch.status})
    Path(state_path).write_text(json.dumps(state, indent=2))
    return state


def collect_batch(client, state_path: Path, items: Sequence[AnnotationItem],
                  config: OpenAIConfig, cache: AnnotationCache) -> dict:
    """Validate finished batch outputs into the cache.

    Returns {"pending": [batch ids not finished], "validated": n, "rejected": n}; a
    rejected answer is not cached, so the normal path redoes that image.
    """
    state = json.loads(Path(state_path).read_text())
    by_key: dict[str, tuple[AnnotationItem, str]] = {}
    for item in items:
        image_bytes = Path(item.image).read_bytes()
        by_key[cache_key(image_bytes, item.expression, item.aus)] = (
            item, hashlib.sha256(image_bytes).hexdigest())
    summary = {"pending": [], "validated": 0, "rejected": 0}
    for entry in state["batches"]:
        batch = client.batches.retrieve(entry["batch_id"])
        entry["status"] = batch.status
        if batch.status != "completed" or not batch.output_file_id:
            summary["pending"].append(batch.id)
            continue
        text = client.files.content(batch.output_file_id).text
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"batch {batch.id} output file {batch.output_file_id} line "
                                 f"{number}: not JSON ({err.msg}); collect again later") from None
            key = row.get("custom_id")
            if key not in by_key or key in cache:
                continue
            item, sha = by_key[key]
            body = (row.get("response") or {}).get("body")
            if not isinstance(body, dict) or not body.get("choices"):
                summary["rejected"] += 1
                continue
            usage = body.get("usage") or {}
            content = body["choices"][0]["message"].get("content")
            try:
                annotation, problems = parse_answer(content, item.aus)
                problems += validate_annotation(annotation, item.expression, item.aus)
            except AnswerError as err:
                problems = [str(err)]
            if problems:
                summary["rejected"] += 1
                continue
            result = AnnotationResult(
                id=item.id, key=key, image_sha256=sha, annotation=annotation,
                status="validated", answers=1, batch=True,
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)))
            cache.put(result.cache_entry(item, config))
            summary["validated"] += 1
    Path(state_path).write_text(json.dumps(state, indent=2))
    return summary
