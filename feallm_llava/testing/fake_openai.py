"""A local OpenAI-compatible HTTP server for tests (no network, no extra dependencies).

It speaks the real wire protocol over real HTTP on 127.0.0.1, so the official `openai`
client is tested unchanged: `POST /v1/chat/completions` (JSON in, ChatCompletion JSON
out, OpenAI's error shape and `retry-after` header on errors; with `"stream": true` the
answer comes as server-sent `chat.completion.chunk` events, one word each, then `data:
[DONE]`), plus the few calls the
Batch API needs (`POST /v1/files`, `POST /v1/batches`, `GET /v1/batches/{id}`,
`GET /v1/files/{id}/content`) and `GET /v1/models`.

Interface (shared by the dataset annotator tests and the OpenAI eval-runner tests):

    from feallm_llava.testing.fake_openai import Fault, Reply, RequestInfo, per_image, start_fake_openai

    def responder(req: RequestInfo) -> str | Reply:
        # req.image_hashes: sha256 hex of each image sent as a data URL (decoded bytes)
        # req.text: the text parts of all messages; req.body: the JSON request
        return "Happiness. The person smiles."           # the assistant message content

    with start_fake_openai(responder, faults=per_image({0: Fault.status(429, retry_after=0.05)}),
                           latency=0.0) as server:
        client = OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        ...
        server.requests.count(sha)   # requests that carried this image (thread-safe)
        server.requests.total        # all chat requests
    # leaving the block stops the server; or call server.stop()

`faults` decides, per request, whether to misbehave: None; a callable
`(RequestInfo) -> Fault | None`; or a sequence of `Fault | None` applied to the first
requests by arrival order (`RequestInfo.index`). `per_image({attempt: Fault})` builds a
callable that misbehaves on a given attempt of each image (attempt 0 = the first request
that carried that image), optionally only for images that `select(image_hash)` accepts;
it is deterministic under concurrency, unlike arrival order.

Faults: `Fault.status(429 | 500 | ..., retry_after=s)` answers an HTTP error;
`Fault.delay(s)` waits `s` seconds before answering normally (a client timeout shorter
than `s` sees a timeout); `Fault.content(text)` answers 200 with `text` as the message
content instead of the responder's (e.g. malformed JSON content);
`Fault.malformed_body()` answers 200 with a body that is not JSON at all.
Label-inconsistent answers are the responder's business (it knows the labels).

A pytest fixture is a three-liner:

    @pytest.fixture
    def fake_openai():
        with start_fake_openai(my_responder) as server:
            yield server
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import itertools
import json
import re
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_DATA_URL = re.compile(r"^data:[\w/+.-]+;base64,(.*)$", re.S)


def image_hash(data: bytes) -> str:
    """The key the server counts an image under: sha256 hex of its bytes."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Fault:
    """One way to misbehave on one request; build with the class methods."""

    kind: str                        # "status" | "delay" | "content" | "malformed_body"
    code: int = 200                  # HTTP status of a "status" fault
    retry_after: float | None = None
    seconds: float = 0.0
    text: str = ""

    @classmethod
    def status(cls, code: int, retry_after: float | None = None, message: str = "") -> "Fault":
        return cls("status", code=code, retry_after=retry_after,
                   text=message or f"injected HTTP {code}")

    @classmethod
    def delay(cls, seconds: float) -> "Fault":
        return cls("delay", seconds=seconds)

    @classmethod
    def content(cls, text: str) -> "Fault":
        return cls("content", text=text)

    @classmethod
    def malformed_body(cls) -> "Fault":
        return cls("malformed_body")


@dataclass(frozen=True)
class Reply:
    """A responder's answer with explicit token counts (defaults are estimated)."""

    content: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True)
class RequestInfo:
    index: int                        # 0-based arrival order among chat requests
    path: str                         # "/v1/chat/completions" (also for batch lines)
    body: dict                        # the JSON request
    model: str
    image_hashes: tuple[str, ...]     # sha256 hex of each data-URL image, in order
    text: str                         # text parts of all messages, newline-joined
    attempt: int                      # earlier requests with the same image(s) / text
    batch: bool = False               # True for a line of a Batch API input file

    @property
    def key(self) -> str:
        return _request_key(self.image_hashes, self.text)


def _request_key(image_hashes: tuple[str, ...], text: str) -> str:
    return ",".join(image_hashes) if image_hashes else "text:" + image_hash(text.encode())


def per_image(schedule: Mapping[int, Fault], select: Callable[[str], bool] | None = None
              ) -> Callable[[RequestInfo], Fault | None]:
    """Faults by attempt number of each image: `{0: Fault.status(500)}` fails every first try.

    `select(image_hash)` limits it to some images (e.g. `lambda h: int(h, 16) % 3 == 0`).
    """
    def decide(req: RequestInfo) -> Fault | None:
        if select is not None and not any(select(h) for h in req.image_hashes):
            return None
        return schedule.get(req.attempt)
    return decide


class RequestLog:
    """Thread-safe record of the chat requests the server received."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_image: Counter = Counter()
        self._by_key: Counter = Counter()
        self._entries: list[RequestInfo] = []

    def _admit(self, make: Callable[[int, int], RequestInfo], key: str,
               image_hashes: tuple[str, ...]) -> RequestInfo:
        with self._lock:
            info = make(len(self._entries), self._by_key[key])
            self._by_key[key] += 1
            self._by_image.update(image_hashes)
            self._entries.append(info)
            return info

    @property
    def total(self) -> int:
        with self._lock:
            return len(self._entries)

    def count(self, image_sha: str) -> int:
        """Requests that carried the image with this sha256 hex."""
        with self._lock:
            return self._by_image[image_sha]

    def counts(self) -> Counter:
        """A snapshot: image sha256 -> number of requests."""
        with self._lock:
            return Counter(self._by_image)

    def entries(self) -> list[RequestInfo]:
        with self._lock:
            return list(self._entries)


def _images_and_text(body: dict) -> tuple[tuple[str, ...], str]:
    hashes: list[str] = []
    texts: list[str] = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                texts.append(part.get("text", ""))
            elif part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                match = _DATA_URL.match(url)
                hashes.append(image_hash(base64.b64decode(match.group(1))) if match
                              else image_hash(url.encode()))
    return tuple(hashes), "\n".join(texts)


def _error_body(status: int, message: str) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_exceeded"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


class FakeServer:
    """The running server; see the module docstring. Stop it with `.stop()` or `with`."""

    def __init__(self, responder: Callable[[RequestInfo], str | Reply], faults=None,
                 latency: float = 0.0, host: str = "127.0.0.1", stream_interval: float = 0.0):
        self.responder = responder
        self.faults = faults
        self.latency = latency
        self.stream_interval = stream_interval
        self.requests = RequestLog()
        self.errors: list[str] = []          # responder exceptions (answered as HTTP 500)
        self.files: dict[str, dict] = {}     # file id -> {"bytes", "filename", "purpose"}
        self.batches: dict[str, dict] = {}   # batch id -> Batch object
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._httpd = _HTTPServer((host, 0), _Handler)
        self._httpd.fake = self
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name=f"fake-openai:{self.port}")
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def stop(self) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "FakeServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request handling (called from the handler threads) --------------------------

    def _fault_for(self, info: RequestInfo) -> Fault | None:
        if self.faults is None:
            return None
        if callable(self.faults):
            return self.faults(info)
        seq: Sequence = self.faults
        return seq[info.index] if info.index < len(seq) else None

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def chat(self, body: dict, *, batch: bool = False) -> tuple[int, dict, dict | bytes]:
        """(status, extra headers, JSON body or raw bytes) for one chat request."""
        hashes, text = _images_and_text(body)
        info = self.requests._admit(
            lambda index, attempt: RequestInfo(
                index=index, path="/v1/chat/completions", body=body,
                model=str(body.get("model", "")), image_hashes=hashes, text=text,
                attempt=attempt, batch=batch),
            _request_key(hashes, text), hashes)
        if self.latency:
            self._stopping.wait(self.latency)
        fault = self._fault_for(info)
        if fault is not None and fault.kind == "delay":
            self._stopping.wait(fault.seconds)
        if fault is not None and fault.kind == "status":
            headers = {} if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
            return fault.code, headers, _error_body(fault.code, fault.text)
        if fault is not None and fault.kind == "malformed_body":
            return 200, {}, b'{"id": "chatcmpl-broken", "choices": [ {"mess'
        if fault is not None and fault.kind == "content":
            reply = Reply(fault.text)
        else:
            try:
                answer = self.responder(info)
            except Exception:  # the responder is test code: report its bug as a 500
                self.errors.append(traceback.format_exc())
                return 500, {}, _error_body(500, "responder raised:\n" + traceback.format_exc())
            reply = answer if isinstance(answer, Reply) else Reply(str(answer))
        prompt = (reply.prompt_tokens if reply.prompt_tokens is not None
                  else len(text.split()) + 85 * len(hashes))  # 85 = a low-detail image
        completion = (reply.completion_tokens if reply.completion_tokens is not None
                      else len(reply.content.split()))
        return 200, {}, {
            "id": self._next_id("chatcmpl-fake"), "object": "chat.completion",
            "created": int(time.time()), "model": info.model,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": reply.content,
                                     "refusal": None}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }

    def stream_events(self, completion: dict, include_usage: bool = False) -> Iterator[bytes]:
        """A chat completion as the server-sent events of a streamed answer: the role, one
        chunk per word (with its trailing space), the finish reason, [usage,] [DONE]."""
        message = completion["choices"][0]["message"]
        head = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
                "model": completion["model"]}

        def event(delta: dict, finish: str | None = None, **extra) -> bytes:
            choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            return b"data: " + json.dumps({**head, "choices": choices, **extra}).encode() + b"\n\n"

        yield event({"role": "assistant", "content": ""})
        for i, piece in enumerate(re.findall(r"\s*\S+\s*|\s+", message["content"] or "")):
            if i and self.stream_interval:
                self._stopping.wait(self.stream_interval)
            yield event({"content": piece})
        yield event({}, "stop")
        if include_usage:
            yield b"data: " + json.dumps({**head, "choices": [], "usage": completion["usage"]}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    def upload(self, content_type: str, raw: bytes) -> tuple[int, dict]:
        parser = email.parser.BytesParser(policy=email.policy.HTTP)
        message = parser.parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        fields: dict[str, bytes] = {}
        filename = "upload"
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = part.get_payload(decode=True) or b""
            if name == "file":
                filename = part.get_filename() or filename
        if "file" not in fields:
            return 400, _error_body(400, "multipart upload without a 'file' field")
        file_id = self._next_id("file")
        purpose = fields.get("purpose", b"").decode()
        self.files[file_id] = {"bytes": fields["file"], "filename": filename, "purpose": purpose}
        return 200, self._file_object(file_id)

    def _file_object(self, file_id: str) -> dict:
        f = self.files[file_id]
        return {"id": file_id, "object": "file", "bytes": len(f["bytes"]),
                "created_at": int(time.time()), "filename": f["filename"],
                "purpose": f["purpose"], "status": "processed"}

    def create_batch(self, body: dict) -> tuple[int, dict]:
        """Runs every line at once (a real batch takes up to 24 h) and stores the output."""
        source = self.files.get(body.get("input_file_id", ""))
        if source is None:
            return 404, _error_body(404, f"no file {body.get('input_file_id')!r}")
        out_lines = []
        for line in source["bytes"].decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            status, _, answer = self.chat(item["body"], batch=True)
            out_lines.append(json.dumps({
                "id": self._next_id("batch_req"), "custom_id": item["custom_id"],
                "response": {"status_code": status, "request_id": self._next_id("req"),
                             "body": answer if isinstance(answer, dict) else answer.decode()},
                "error": None}))
        output_id = self._next_id("file")
        self.files[output_id] = {"bytes": ("\n".join(out_lines) + "\n").encode(),
                                 "filename": "batch_output.jsonl", "purpose": "batch_output"}
        batch_id = self._next_id("batch")
        now = int(time.time())
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": body.get("endpoint"),
            "input_file_id": body["input_file_id"], "completion_window": "24h",
            "status": "completed", "output_file_id": output_id, "error_file_id": None,
            "created_at": now, "completed_at": now, "metadata": body.get("metadata"),
            "request_counts": {"total": len(out_lines), "completed": len(out_lines), "failed": 0},
        }
        return 200, self.batches[batch_id]


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops connections under 16+ concurrent clients
    fake: FakeServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client (httpx) expects
    server: _HTTPServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - base signature
        pass  # quiet: tests read the RequestLog, not stderr

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _send(self, status: int, payload: dict | bytes, headers: Mapping[str, str] | None = None,
              content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (a timeout test): nothing to send

    def _send_stream(self, events: Iterable[bytes]) -> None:
        """200 with `events` as a chunked text/event-stream body, each written as it comes."""
        try:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for data in events:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        fake = self.server.fake
        path = self.path.split("?")[0]
        if path == "/v1/models":
            return self._send(200, {"object": "list", "data": [
                {"id": "fake-model", "object": "model", "created": 0, "owned_by": "tests"}]})
        match = re.fullmatch(r"/v1/batches/([\w-]+)", path)
        if match and match.group(1) in fake.batches:
            return self._send(200, fake.batches[match.group(1)])
        match = re.fullmatch(r"/v1/files/([\w-]+)/content", path)
        if match and match.group(1) in fake.files:
            return self._send(200, fake.files[match.group(1)]["bytes"],
                              content_type="application/octet-stream")
        match = re.fullmatch(r"/v1/files/([\w-]+)", path)
        if match and match.group(1) in fake.files:
            return self._send(200, fake._file_object(match.group(1)))
        self._send(404, _error_body(404, f"unknown path {path}"))

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        fake = self.server.fake
        path = self.path.split("?")[0]
        raw = self._read_body()
        if path == "/v1/files":
            status, payload = fake.upload(self.headers.get("content-type", ""), raw)
            return self._send(status, payload)
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as err:
            return self._send(400, _error_body(400, f"request body is not JSON: {err}"))
        if path == "/v1/chat/completions":
            status, headers, payload = fake.chat(body)
            if body.get("stream") and status == 200 and isinstance(payload, dict):
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                return self._send_stream(fake.stream_events(payload, usage))
            return self._send(status, payload, headers)
        if path == "/v1/batches":
            status, payload = fake.create_batch(body)
            return self._send(status, payload)
        self._send(404, _error_body(404, f"unknown path {path}"))


def start_fake_openai(responder: Callable[[RequestInfo], str | Reply], faults=None, *,
                      latency: float = 0.0, stream_interval: float = 0.0) -> FakeServer:
    """Start a fake OpenAI server on a free port of 127.0.0.1 (see the module docstring).

    latency: seconds added to every chat request (the concurrency benchmark uses 0.2).
    stream_interval: seconds between the chunks of a streamed answer.
    """
    return FakeServer(responder, faults=faults, latency=latency, stream_interval=stream_interval)

