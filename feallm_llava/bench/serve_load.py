"""Upstream LLaVA's serving stack under concurrent load and faults, then a worker kill.

    python -m feallm_llava.bench serve-load --tiny [--requests 32] [--faulty 0.25]
    python -m feallm_llava.bench serve-load --model-path CKPT [--model-base BASE] [--device cuda]
    python -m feallm_llava.bench serve-load --controller http://127.0.0.1:21001 [--worker-pid PID]

Starts upstream's controller and model_worker (`feallm_llava.serve.stack`, no Gradio) with
the checkpoint (`--tiny`: the offline tiny FEALLM checkpoint, built on the spot), or uses
an already running controller (`--controller`). Then sends `--requests` requests at once
through upstream's own protocol: ask the controller for the worker's address
(`/get_worker_address`), POST `/worker_generate_stream` there, read the `\\0`-separated
JSON chunks. A `--faulty` share of them is broken on purpose, in turn:

    corrupt_image    random bytes as the base64 image
    oversized_image  a valid 12000x12000 PNG (144 Mpx; ~0.4 MB compressed, 432 MB decoded)
    overlong_prompt  a question longer than the model's context (`--context-tokens`)

Each request ends as `ok` (error_code 0 and generated text), `error` (error_code != 0;
`named_cause` says whether the message names what was wrong with the request) or
`failed` (no answer within `--timeout`, connection refused or reset, a broken stream).
Prints the counts, latency p50/p90/p99 per outcome and the worker's peak RSS (VmRSS
sampled every 50 ms during the burst, and the kernel's VmHWM), then SIGKILLs the worker,
measures how long the controller still hands it out (bounded by UNROUTE_WAIT; upstream
alone kept a dead worker listed for up to 2 x 30 s, FEALLM's integration drops it within
a second), asks the controller to drop it if it has not (`/refresh_all_workers`), starts
it again on a new port and waits until the controller routes to the new one and a
request is answered.

With `--controller`, the worker is not this program's: its RSS and the restart need
`--worker-pid` (the restart reuses that process's command line and working directory).
`--json PATH` writes the whole report. Every wait is bounded; every process started here
is stopped at the end, also on failure or Ctrl-C. Exit status 0 when nothing failed,
every faulty request got an error naming its cause, and the restart was answered.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

FAULTS = ("corrupt_image", "oversized_image", "overlong_prompt")

# What an error message must say for each faulty kind to count as naming its cause.
CAUSES = {
    "corrupt_image": "not an image file",
    "oversized_image": "over the limit",
    "overlong_prompt": "max token length",
}

QUESTION = "Please describe the expression in this face."
OVERSIZED_SIDE = 12000
DEFAULT_CONTEXT = 4096  # LLaVA-1.5's; used when the checkpoint's config cannot be read
CONNECT_TIMEOUT = 10.0
UNROUTE_WAIT = 10.0  # seconds the restart waits for the controller to drop the dead worker by itself


# ------------------------------------------------------------------------- inputs

def png_bytes(width: int, height: int, colour: tuple[int, int, int] = (190, 140, 110)) -> bytes:
    """A valid 8-bit RGB PNG of one colour, written row by row (never `width*height*3` in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    row = b"\0" + bytes(colour) * width  # filter byte 0, then the pixels
    packer = zlib.compressobj(6)
    parts = [packer.compress(row) for _ in range(height)]
    parts.append(packer.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def face_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (96, 80), (190, 140, 110)).save(buf, format="PNG")
    return buf.getvalue()


def prompt(question: str, model_name: str = "llava-v1") -> str:
    """Upstream's conversation template for `model_name` (llava_v1 for a "v1" name), one image."""
    from feallm_llava.inference.llava_runner import render_conversation
    from feallm_llava.integration.conv_template import name_rule

    return render_conversation([("<image>\n" + question, None)], name_rule(model_name))


def plan(n: int, faulty_share: float, kinds: tuple[str, ...] = FAULTS) -> list[str]:
    """`n` request kinds: round(n * share) faulty ones (the kinds in turn) spread evenly among valid ones."""
    faulty = min(n, round(n * faulty_share)) if kinds else 0
    order = ["valid"] * n
    for i in range(faulty):
        order[(i * n) // faulty] = kinds[i % len(kinds)]
    return order


class Payloads:
    """The request body for each kind (images encoded once, shared by every request)."""

    def __init__(self, model_name: str, context_tokens: int, max_new_tokens: int,
                 oversized_side: int = OVERSIZED_SIDE, seed: int = 0):
        import random

        rng = random.Random(seed)
        self.model_name = model_name
        self.max_new_tokens = max_new_tokens
        self.face = base64.b64encode(face_png()).decode()
        self.corrupt = base64.b64encode(bytes(rng.getrandbits(8) for _ in range(4096))).decode()
        self.oversized = base64.b64encode(png_bytes(oversized_side, oversized_side)).decode()
        # every word is at least one token: the prompt is longer than the context
        self.overlong_question = QUESTION + " Also" + " consider" * (context_tokens + 256)
        self.prompt = prompt(QUESTION, model_name)
        self.overlong_prompt = prompt(self.overlong_question, model_name)

    def __call__(self, kind: str) -> dict:
        text, image = self.prompt, self.face
        if kind == "corrupt_image":
            image = self.corrupt
        elif kind == "oversized_image":
            image = self.oversized
        elif kind == "overlong_prompt":
            text = self.overlong_prompt
        elif kind != "valid":
            raise ValueError(f"unknown request kind {kind!r}")
        return {"model": self.model_name, "prompt": text, "images": [image], "temperature": 0.0,
                "max_new_tokens": self.max_new_tokens, "stop": "</s>"}


def context_tokens(model_path: str | None, default: int = DEFAULT_CONTEXT) -> int:
    """The checkpoint's `max_position_embeddings` (what upstream's worker checks against)."""
    if model_path:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return int(json.loads((Path(model_path) / "config.json").read_text())["max_position_embeddings"])
    return default


# ------------------------------------------------------------------------- one request

@dataclass
class Outcome:
    index: int
    kind: str
    status: str  # ok | error | failed
    latency_s: float
    worker: str = ""
    error_code: int | None = None
    message: str = ""  # error text, answer text, or why it failed
    named_cause: bool = False  # an error naming what was wrong with this request's kind
    chunks: int = 0


def _post(url: str, payload: dict | None = None, timeout: float = 10.0) -> dict:
    import requests

    r = requests.post(url, json=payload or {}, timeout=timeout)
    r.raise_for_status()
    return r.json() if r.content else {}


def worker_address(controller_url: str, model_name: str, timeout: float = 10.0) -> str:
    return _post(controller_url + "/get_worker_address", {"model": model_name}, timeout)["address"]


def send(controller_url: str, kind: str, payload: dict, timeout: float, index: int = 0,
         prompt_text: str | None = None) -> Outcome:
    """One request the way upstream's UI sends it: address from the controller, then stream."""
    import requests

    start = time.monotonic()
    deadline = start + timeout

    def outcome(status: str, **kw) -> Outcome:
        return Outcome(index, kind, status, round(time.monotonic() - start, 3), **kw)

    try:
        address = worker_address(controller_url, payload["model"], min(timeout, 10.0))
    except (requests.RequestException, ValueError, KeyError) as err:
        return outcome("failed", message=f"controller: {type(err).__name__}: {err}"[:500])
    if not address:
        return outcome("failed", message="controller: no worker for the model")
    last, chunks = None, 0
    try:
        with requests.post(address + "/worker_generate_stream", json=payload, stream=True,
                           timeout=(CONNECT_TIMEOUT, timeout)) as r:
            if r.status_code != 200:
                return outcome("failed", worker=address, message=f"HTTP {r.status_code}: {r.text[:300]}")
            for raw in r.iter_lines(delimiter=b"\0"):
                if raw:
                    last, chunks = json.loads(raw), chunks + 1
                if time.monotonic() > deadline:
                    return outcome("failed", worker=address, chunks=chunks,
                                   message=f"hang: still streaming after {timeout:.0f} s")
    except requests.Timeout as err:
        return outcome("failed", worker=address, chunks=chunks, message=f"hang: {type(err).__name__}: {err}"[:500])
    except (requests.RequestException, ValueError) as err:
        return outcome("failed", worker=address, chunks=chunks, message=f"{type(err).__name__}: {err}"[:500])
    if last is None:
        return outcome("failed", worker=address, message="the stream ended without a chunk")
    code, text = int(last.get("error_code", -1)), str(last.get("text", ""))
    if code != 0:
        cause = CAUSES.get(kind)
        return outcome("error", worker=address, error_code=code, message=text[:1000], chunks=chunks,
                       named_cause=bool(cause) and cause in text)
    answer = text[len(prompt_text):] if prompt_text and text.startswith(prompt_text) else text
    return outcome("ok", worker=address, error_code=0, message=answer[-1000:], chunks=chunks)


# ------------------------------------------------------------------------- the worker's memory

def rss_kib(pid: int, field_name: str = "VmRSS") -> int | None:
    """`field_name` (VmRSS, VmHWM) of /proc/<pid>/status in KiB, or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """Samples a process's VmRSS every `interval` s in a thread; `peak_kib` is the largest seen."""

    def __init__(self, pid: int | None, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.peak_kib = rss_kib(pid) if pid else None
        self.start_kib = self.peak_kib
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            value = rss_kib(self.pid)
            if value is not None and (self.peak_kib is None or value > self.peak_kib):
                self.peak_kib = value

    def __enter__(self) -> RssSampler:
        if self.pid:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


# ------------------------------------------------------------------------- the burst

def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def burst(controller_url: str, payloads: Payloads, kinds: list[str], concurrency: int,
          timeout: float) -> list[Outcome]:
    """Send every request in `kinds` from `concurrency` threads, all released together."""
    gate = threading.Barrier(min(concurrency, len(kinds)) or 1)
    bodies = [payloads(kind) for kind in kinds]

    def one(i: int) -> Outcome:
        if i < gate.parties:
            with contextlib.suppress(threading.BrokenBarrierError):
                gate.wait(timeout=30)
        return send(controller_url, kinds[i], bodies[i], timeout, index=i, prompt_text=bodies[i]["prompt"])

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="load")
    try:
        futures = [pool.submit(one, i) for i in range(len(kinds))]
        # each request is bounded by its own timeout; this is a backstop for a stuck client thread
        done, _ = concurrent.futures.wait(futures, timeout=timeout * (len(kinds) / concurrency + 1) + 60)
        return [fut.result() if fut in done else
                Outcome(i, kinds[i], "failed", float(timeout), message="hang: client thread stuck")
                for i, fut in enumerate(futures)]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # never wait here for a stuck thread


def summarise(outcomes: list[Outcome]) -> dict:
    by_status = {s: [o for o in outcomes if o.status == s] for s in ("ok", "error", "failed")}
    latency = {}
    for name, group in (("all", outcomes), *by_status.items()):
        values = [o.latency_s for o in group]
        latency[name] = {f"p{q}": percentile(values, q) for q in (50, 90, 99)}
    kinds = {}
    for o in outcomes:
        k = kinds.setdefault(o.kind, {"sent": 0, "ok": 0, "error": 0, "failed": 0, "named_cause": 0})
        k["sent"] += 1
        k[o.status] += 1
        k["named_cause"] += o.named_cause
        if o.status != "ok" and "reply" not in k:
            k["reply"] = o.message[:300]  # the first error text of this kind, as the client saw it
    return {"sent": len(outcomes), "answered": len(by_status["ok"]), "errored": len(by_status["error"]),
            "failed": len(by_status["failed"]), "latency_s": latency, "kinds": kinds}


# ------------------------------------------------------------------------- kill and restart

@dataclass
class Restart:
    killed_pid: int
    old_address: str
    new_address: str = ""
    unrouted_after_s: float | None = None  # SIGKILL -> the controller stops naming it (None: not within UNROUTE_WAIT)
    listed_after_s: float | None = None  # SIGKILL -> the controller lists the model at the new worker
    answered_after_s: float | None = None  # SIGKILL -> a request answered by the new worker
    request: Outcome | None = None
    error: str = ""


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def kill_worker(pid: int) -> None:
    """SIGKILL the worker; its whole process group when it leads one (as the workers started here do)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:  # someone else's worker in a shared group (a shell's): that process only
            os.kill(pid, signal.SIGKILL)


def wait_gone(pid: int, process: subprocess.Popen | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (process.poll() is not None) if process is not None else not alive(pid):
            return
        time.sleep(0.05)
    raise TimeoutError(f"process {pid} still alive {timeout:.0f} s after SIGKILL")


def wait_routed(controller_url: str, model_name: str, address: str, service, timeout: float) -> None:
    """Until the controller lists `model_name`, hands out `address` for it, and the worker
    there answers: upstream's worker registers before its HTTP server listens."""
    from feallm_llava.serve import stack as serve

    def ready() -> bool:
        return (model_name in _post(controller_url + "/list_models")["models"]
                and worker_address(controller_url, model_name) == address
                and model_name in _post(address + "/worker_get_status")["model_names"])

    serve._wait(service, ready, timeout, f"the controller routing {model_name!r} to {address}")


# ------------------------------------------------------------------------- the run

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--tiny", action="store_true", help="build and serve the offline tiny FEALLM checkpoint")
    src.add_argument("--model-path", help="checkpoint to serve (starts controller + worker)")
    src.add_argument("--controller", help="URL of a running controller to load instead (starts nothing)")
    parser.add_argument("--model-base", default=None, help="base LLM for LoRA checkpoints")
    parser.add_argument("--model-name", default=None,
                        help="name the worker registers (default: checkpoint directory; with --controller: "
                             "the controller's only model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kit-dir", type=Path, default=None,
                        help="with --tiny: where the kit and checkpoint are built/reused (default: a temporary one)")
    parser.add_argument("--log-dir", type=Path, default=None, help="process logs (default: a temporary directory)")
    parser.add_argument("--requests", type=int, default=32, help="requests in the burst")
    parser.add_argument("--concurrency", type=int, default=None, help="client threads (default: --requests)")
    parser.add_argument("--faulty", type=float, default=0.25, help="share of faulty requests (0..1)")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help="faulty kinds, in turn: " + ", ".join(FAULTS))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one request may take before it counts as hung")
    parser.add_argument("--context-tokens", type=int, default=None,
                        help="the model's context (default: max_position_embeddings of the checkpoint, "
                             f"else {DEFAULT_CONTEXT})")
    parser.add_argument("--oversized-side", type=int, default=OVERSIZED_SIDE, help="side of the oversized PNG")
    parser.add_argument("--limit-model-concurrency", type=int, default=None,
                        help="passed to the worker (upstream's default: 5)")
    parser.add_argument("--worker-pid", type=int, default=None,
                        help="with --controller: the worker's pid (for its RSS and the kill/restart)")
    parser.add_argument("--no-restart", action="store_true", help="skip the kill/restart")
    parser.add_argument("--restart-timeout", type=float, default=600.0,
                        help="seconds for the restarted worker to be listed again")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--soak", type=float, default=None, metavar="MINUTES",
                        help="instead of one burst: steady load for MINUTES with faulty and unauthenticated "
                             "requests, the worker and the controller killed and restarted (bench.serve_soak; "
                             "the tiny checkpoint unless --model-path; --concurrency default 4)")


@dataclass
class Report:
    model_name: str
    controller: str
    worker_pid: int | None
    requests: int
    concurrency: int
    faulty_share: float
    summary: dict = field(default_factory=dict)
    rss_mib: dict = field(default_factory=dict)
    worker_alive_after_burst: bool | None = None
    restart: Restart | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    burst_s: float = 0.0
    started_pids: list[int] = field(default_factory=list)  # every process this run started (all stopped)

    def as_dict(self) -> dict:
        return asdict(self)

    def problems(self) -> list[str]:
        """Why this run does not pass (empty when it does)."""
        found = []
        if self.summary.get("failed"):
            found.append(f"{self.summary['failed']} request(s) failed (hang, dropped connection)")
        for o in self.outcomes:
            if o.kind != "valid" and not (o.status == "error" and o.named_cause):
                found.append(f"request {o.index} ({o.kind}): {o.status}, no error naming its cause: {o.message[:200]!r}")
            elif o.kind == "valid" and o.status != "ok":
                found.append(f"request {o.index} (valid): {o.status}: {o.message[:200]!r}")
        if self.worker_alive_after_burst is False:
            found.append("the worker died during the burst")
        if self.restart is not None and (self.restart.error or not self.restart.request
                                         or self.restart.request.status != "ok"):
            found.append(f"restart: {self.restart.error or self.restart.request}")
        return found


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def run(args: argparse.Namespace) -> Report:
    """The whole benchmark; every process it started is stopped before it returns or raises."""
    from feallm_llava.serve import stack as serve

    kinds_faulty = tuple(k.strip() for k in args.faults.split(",") if k.strip())
    unknown = set(kinds_faulty) - set(FAULTS)
    if unknown:
        raise ValueError(f"unknown --faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    concurrency = args.concurrency or args.requests
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started: list[serve.Service] = []
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: serve.stop_services(started))
        model_path, model_base = args.model_path, args.model_base
        if args.tiny:
            from feallm_llava.tinykit import build_kit, build_llava

            root = args.kit_dir or Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="feallm-load-")))
            kit = build_kit(Path(root) / "kit")
            model_path = str(build_llava(Path(root) / "feallm-llava-v1-tiny", kit))
        extra = []
        if args.limit_model_concurrency:
            extra += ["--limit-model-concurrency", str(args.limit_model_concurrency)]
        worker_service, worker_cmd = None, None
        if args.controller:
            controller_url = args.controller.rstrip("/")
            models = _post(controller_url + "/list_models")["models"]
            model_name = args.model_name or (models[0] if len(models) == 1 else None)
            if model_name not in models:
                raise SystemExit(f"error: the controller lists {models}; pass --model-name")
            worker_pid = args.worker_pid
        else:
            log_dir = args.log_dir or Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="feallm-load-logs-")))
            st = serve.start_stack(model_path, model_base=model_base, model_name=args.model_name,
                                   device=args.device, web=False, log_dir=log_dir, extra_worker_args=extra)
            started.extend(st.services)
            controller_url, model_name = st.controller.url, st.model_name
            worker_service, worker_pid = st.worker, st.worker.process.pid
            worker_cmd = (model_path, model_base, log_dir)
        context = args.context_tokens or context_tokens(model_path)
        payloads = Payloads(model_name, context, args.max_new_tokens, args.oversized_side)
        kinds = plan(args.requests, args.faulty, kinds_faulty)
        report = Report(model_name, controller_url, worker_pid, args.requests, concurrency, args.faulty)
        print(f"burst: {args.requests} requests ({sum(k != 'valid' for k in kinds)} faulty), "
              f"{concurrency} at once, to {model_name} via {controller_url}", flush=True)
        t0 = time.monotonic()
        with RssSampler(worker_pid) as rss:
            report.outcomes = burst(controller_url, payloads, kinds, concurrency, args.timeout)
        report.burst_s = round(time.monotonic() - t0, 2)
        report.summary = summarise(report.outcomes)
        report.rss_mib = {"before_burst": _mib(rss.start_kib), "peak_burst": _mib(rss.peak_kib),
                          "hwm": _mib(rss_kib(worker_pid, "VmHWM")) if worker_pid else None}
        if worker_service is not None:
            report.worker_alive_after_burst = worker_service.running
        elif worker_pid:
            report.worker_alive_after_burst = alive(worker_pid)
        print(format_summary(report), flush=True)
        if not args.no_restart and worker_pid:
            report.restart = restart(controller_url, model_name, payloads, worker_pid, worker_service,
                                     worker_cmd, args, extra, started)
            print(format_restart(report.restart), flush=True)
        elif not args.no_restart:
            print("restart: skipped (the worker is not ours; pass --worker-pid)", flush=True)
        report.started_pids = [svc.process.pid for svc in started]
        if args.json:
            args.json.write_text(json.dumps(report.as_dict(), indent=2))
        return report


def restart(controller_url: str, model_name: str, payloads: Payloads, pid: int, service, worker_cmd,
            args: argparse.Namespace, extra: list[str], started: list) -> Restart:
    """SIGKILL the worker, drop it at the controller, start it again, wait until it answers."""
    from feallm_llava.serve import stack as serve

    old_address = worker_address(controller_url, model_name)
    result = Restart(pid, old_address)
    foreign = None if service is not None else foreign_command(pid)
    t0 = time.monotonic()
    kill_worker(pid)
    wait_gone(pid, service.process if service else None)
    deadline = time.monotonic() + UNROUTE_WAIT
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if worker_address(controller_url, model_name) != old_address:
                result.unrouted_after_s = round(time.monotonic() - t0, 2)
                break
        time.sleep(0.05)
    if result.unrouted_after_s is None:
        # a controller without the integration keeps a silent worker for up to 2 x
        # CONTROLLER_HEART_BEAT_EXPIRATION; this endpoint drops those that do not answer
        _post(controller_url + "/refresh_all_workers", timeout=30)
    try:
        if service is not None:
            model_path, model_base, log_dir = worker_cmd
            new = serve.start_worker(controller_url, model_path, Path(log_dir), serve.service_env(),
                                     model_base=model_base, model_name=args.model_name, device=args.device,
                                     extra_args=extra)
            started.append(new)
        else:
            new = start_foreign(*foreign, address=old_address)
            started.append(new)
        result.new_address = new.url
        wait_routed(controller_url, model_name, new.url, new, args.restart_timeout)
        result.listed_after_s = round(time.monotonic() - t0, 2)
        result.request = send(controller_url, "valid", payloads("valid"), args.timeout,
                              prompt_text=payloads.prompt)
        if result.request.status == "ok":
            result.answered_after_s = round(time.monotonic() - t0, 2)
    except serve.StackError as err:
        result.error = str(err)[-3000:]
    return result


def foreign_command(pid: int) -> tuple[list[str], str]:
    """The command line and working directory of a worker this program did not start."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return [a.decode() for a in argv if a], os.readlink(f"/proc/{pid}/cwd")


def start_foreign(argv: list[str], cwd: str, *, address: str):
    """That worker again, same command line (same port, same address), this environment."""
    from feallm_llava.serve import stack as serve

    log = Path(tempfile.mkdtemp(prefix="feallm-load-restart-")) / "model_worker.out"
    with open(log, "ab") as out:
        process = subprocess.Popen(argv, cwd=cwd, env=serve.service_env(), stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    print(f"restarted the worker: pid {process.pid}, log {log}", flush=True)
    return serve.Service("model_worker", process, address, log)


def format_summary(report: Report) -> str:
    s = report.summary
    lat = s["latency_s"]

    def fmt(p: dict) -> str:
        return " / ".join("-" if p[k] is None else f"{p[k]:.2f}" for k in ("p50", "p90", "p99"))

    lines = [(f"sent {s['sent']}: answered {s['answered']}, errored {s['errored']}, failed {s['failed']} "
              f"(burst {report.burst_s:.1f} s)"),
             f"latency p50/p90/p99 s: all {fmt(lat['all'])}; answered {fmt(lat['ok'])}; errored {fmt(lat['error'])}"]
    for kind, k in s["kinds"].items():
        cause = f", {k['named_cause']} naming the cause" if kind != "valid" else ""
        lines.append(f"  {kind:16s} sent {k['sent']:3d}: ok {k['ok']}, error {k['error']}{cause}, failed {k['failed']}")
        if "reply" in k:
            lines.append(f"  {'':16s} {k['reply'][:150]!r}")
    r = report.rss_mib
    lines.append(f"worker RSS MiB: before {r.get('before_burst')}, peak during burst {r.get('peak_burst')}, "
                 f"VmHWM {r.get('hwm')}; alive after burst: {report.worker_alive_after_burst}")
    return "\n".join(lines)


def format_restart(r: Restart) -> str:
    if r.error:
        return f"restart: FAILED: {r.error}"
    req = r.request
    unrouted = f"after {r.unrouted_after_s} s" if r.unrouted_after_s is not None else f"not within {UNROUTE_WAIT:g} s"
    return (f"restart: SIGKILL {r.killed_pid} ({r.old_address}); the controller stopped routing there "
            f"{unrouted}; new worker {r.new_address} listed after "
            f"{r.listed_after_s} s; request {req.status if req else '-'} after {r.answered_after_s} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m feallm_llava.bench serve-load",
                                     description=__doc__.split("\n")[0])
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Entry point for `python -m feallm_llava.bench serve-load` (a Namespace) or an argv list."""
    if not isinstance(args, argparse.Namespace):
        args = build_parser().parse_args(sys.argv[1:] if args is None else args)
    if args.soak is not None:
        from feallm_llava.bench import serve_soak

        if args.controller:
            print("error: --soak starts its own stack (it kills and restarts it): drop --controller", file=sys.stderr)
            return 2
        if args.faults == ",".join(FAULTS):
            args.faults = ",".join(serve_soak.SOAK_FAULTS)
        return serve_soak.main(args)
    if not (args.tiny or args.model_path or args.controller):
        print("error: give one of --tiny, --model-path CKPT, --controller URL (or --soak MINUTES)", file=sys.stderr)
        return 2
    report = run(args)
    problems = report.problems()
    for p in problems:
        print("problem:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
