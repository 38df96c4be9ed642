"""A soak of upstream LLaVA's serving stack: steady load with faults, kills and restarts.

    python -m feallm_llava.bench serve-load --soak 10 [--tiny | --model-path CKPT] [--concurrency 4]

Starts the controller and a worker (`serve.stack`, the tiny FEALLM checkpoint unless
`--model-path`) with a fresh shared secret, then for `--soak` minutes `--concurrency`
clients send requests the way upstream's UI does (the worker's address from the
controller, then a stream from the worker). A `--faulty` share is broken, in turn: a
corrupt image, a giant image, a prompt over the context, a request without the secret
(to the controller or the worker, in turn). Meanwhile the worker is SIGKILLed and started
again on a new port (at 7.5 % of the time) and the controller is SIGKILLed and started
again on its port (at 15 %), so that from minute 2 on the stack runs undisturbed.

Every request ends as one of
    answered   the model's text
    refused    a refusal that states its cause: an error reply naming it (the corrupt or
               giant image, the context), HTTP 401, "no worker" from the controller, a
               refused connection (the controller or a worker is down: the OS says so)
    failed     no stated cause: a timeout, a stream cut or empty, an error without a cause
(a request in flight on the worker when it was killed is counted apart: the kill is its
cause). Reported: the counts by cause, latency p50/p99 of answered requests per minute,
the worker's RSS and open file descriptors per minute (medians of samples every 5 s),
when the controller last handed out the dead worker, and one verdict line against the
targets: no failure without a cause, every unauthenticated request 401, no request routed
to the dead worker more than 5 s after its death, RSS and descriptors growing <= 5 %
from minute 2 to the last minute.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SOAK_FAULTS = ("corrupt_image", "oversized_image", "overlong_prompt", "unauthenticated")
ROUTE_LIMIT_S = 5.0  # no request routed to a dead worker later than this after its death
GROWTH_LIMIT = 0.05  # RSS and descriptors, minute 2 -> last minute
SAMPLE_S = 5.0
WORKER_KILL_AT, CONTROLLER_KILL_AT = 0.075, 0.15  # shares of the soak
STEADY_FROM_MIN = 2
RETRY_S = 0.5  # a client's pause after finding a server down
GENERIC_ERRORS = ("NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.",)


@dataclass
class Request:
    index: int
    kind: str
    start: float  # seconds since the soak began
    latency_s: float
    status: str  # answered | refused | failed | killed
    cause: str
    worker: str = ""
    routed_at: float | None = None  # when the controller handed out `worker`
    detail: str = ""  # the client's exception, for a failure


@dataclass
class Sample:
    t: float
    pid: int
    rss_kib: int | None
    fds: int | None


@dataclass
class Event:
    t: float
    what: str
    detail: str = ""


@dataclass
class SoakReport:
    minutes: float
    concurrency: int
    faulty_share: float
    model_name: str = ""
    requests: list[Request] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    dead_worker: str = ""
    dead_at: float | None = None  # the worker's SIGKILL
    dead_gone_at: float | None = None  # its exit (the kernel resets connections until then)
    controller_killed_at: float | None = None
    controller_gone_at: float | None = None

    # -- figures

    def counts(self) -> dict:
        out: dict[str, dict[str, int]] = {}
        for r in self.requests:
            out.setdefault(r.status, {}).setdefault(r.cause, 0)
            out[r.status][r.cause] += 1
        return out

    def unauthenticated(self) -> tuple[int, int]:
        """(unauthenticated requests a server received, those it refused with 401); one sent
        while its server was down is refused by the OS instead, counted under its cause."""
        sent = [r for r in self.requests if r.kind == "unauthenticated" and not r.cause.startswith("connection refused")]
        return len(sent), sum(r.status == "refused" and r.cause == "HTTP 401" for r in sent)

    def late_routes(self) -> tuple[int, float | None]:
        """(requests routed to the dead worker more than ROUTE_LIMIT_S after its death, the
        latest such hand-out in seconds after the death)."""
        if self.dead_at is None:
            return 0, None
        routed = [r.routed_at - self.dead_at for r in self.requests
                  if r.worker == self.dead_worker and r.routed_at is not None and r.routed_at >= self.dead_at]
        return sum(d > ROUTE_LIMIT_S for d in routed), (round(max(routed), 2) if routed else None)

    def per_minute(self) -> list[dict]:
        rows = []
        for m in range(int(-(-self.minutes // 1))):
            reqs = [r for r in self.requests if m * 60 <= r.start < (m + 1) * 60]
            lat = sorted(r.latency_s for r in reqs if r.status == "answered")
            samp = [s for s in self.samples if m * 60 <= s.t < (m + 1) * 60]
            rss = [s.rss_kib for s in samp if s.rss_kib is not None]
            fds = [s.fds for s in samp if s.fds is not None]
            rows.append({
                "minute": m + 1, "sent": len(reqs),
                **{k: sum(r.status == k for r in reqs) for k in ("answered", "refused", "failed", "killed")},
                "p50_s": _pct(lat, 50), "p99_s": _pct(lat, 99),
                "worker_rss_mib": round(statistics.median(rss) / 1024, 1) if rss else None,
                "worker_fds": statistics.median(fds) if fds else None})
        return rows

    def growth(self) -> dict:
        """Relative growth of the worker's RSS and descriptors from minute STEADY_FROM_MIN + 1
        to the last minute (one worker: the one serving then)."""
        rows = self.per_minute()
        if len(rows) <= STEADY_FROM_MIN + 1:
            return {"rss": None, "fds": None}
        first, last = rows[STEADY_FROM_MIN], rows[-1]
        return {key: (None if not first[col] or last[col] is None else round(last[col] / first[col] - 1, 4))
                for key, col in (("rss", "worker_rss_mib"), ("fds", "worker_fds"))}

    def problems(self) -> list[str]:
        found = []
        failed = self.counts().get("failed", {})
        if failed:
            found.append(f"{sum(failed.values())} request(s) failed without a stated cause: {failed}")
        sent, refused = self.unauthenticated()
        if refused != sent:
            found.append(f"{sent - refused} of {sent} unauthenticated request(s) not refused with 401")
        late, _ = self.late_routes()
        if late:
            found.append(f"{late} request(s) routed to the dead worker more than {ROUTE_LIMIT_S:g} s after its death")
        for key, g in self.growth().items():
            if g is None:
                found.append(f"worker {key}: not enough minutes to measure growth")
            elif g > GROWTH_LIMIT:
                found.append(f"worker {key} grew {g:.1%} from minute {STEADY_FROM_MIN + 1} to the last")
        return found

    def verdict(self) -> str:
        sent, refused = self.unauthenticated()
        late, last = self.late_routes()
        g = self.growth()
        counts = self.counts()
        pct = lambda v: "-" if v is None else f"{v:+.1%}"  # noqa: E731
        problems = self.problems()
        return (f"soak {self.minutes:g} min, {len(self.requests)} requests: answered "
                f"{sum(counts.get('answered', {}).values())}, refused with cause "
                f"{sum(counts.get('refused', {}).values())}, killed in flight {sum(counts.get('killed', {}).values())}, "
                f"failed without cause {sum(counts.get('failed', {}).values())}; unauthenticated 401 {refused}/{sent}; "
                f"dead worker routed {'never' if last is None else f'last {last} s'} after its death ({late} later "
                f"than {ROUTE_LIMIT_S:g} s); worker RSS "
                f"{pct(g['rss'])}, fds {pct(g['fds'])} minute {STEADY_FROM_MIN + 1} -> last (target <= "
                f"{GROWTH_LIMIT:.0%}): {'met' if not problems else 'not met'}")

    def as_dict(self) -> dict:
        return {**asdict(self), "counts": self.counts(), "per_minute": self.per_minute(), "growth": self.growth(),
                "late_routes": self.late_routes(), "unauthenticated": self.unauthenticated(),
                "problems": self.problems()}


def _pct(values: list[float], q: float) -> float | None:
    from feallm_llava.bench.serve_load import percentile

    p = percentile(values, q)
    return None if p is None else round(p, 3)


# ------------------------------------------------------------------------- one request

def classify_error(kind: str, text: str) -> tuple[str, str]:
    """(status, cause) of an error reply (error_code != 0)."""
    from feallm_llava.bench.serve_load import CAUSES

    if kind in CAUSES and CAUSES[kind] in text:
        return "refused", kind
    if "no worker" in text:
        return "refused", "no worker"
    if not text.strip() or text.strip() in GENERIC_ERRORS:
        return "failed", f"error without a cause: {text[:120]!r}"
    return "refused", f"other error: {text[:80]}"


class Client:
    """Sends one request of a kind, the way upstream's UI does, and says how it ended."""

    def __init__(self, stack, payloads, headers: dict, timeout: float, clock):
        self.stack, self.payloads, self.headers, self.timeout, self.clock = stack, payloads, headers, timeout, clock
        self.unauth_turn = 0
        self.lock = threading.Lock()

    def send(self, index: int, kind: str) -> Request:
        import requests

        start = self.clock()
        t0 = time.monotonic()

        def done(status: str, cause: str, **kw) -> Request:
            return Request(index, kind, round(start, 3), round(time.monotonic() - t0, 3), status, cause, **kw)

        controller = self.stack.controller_url()
        if kind == "unauthenticated":
            with self.lock:
                self.unauth_turn += 1
                turn = self.unauth_turn
            url = (controller + "/get_worker_address") if turn % 2 else (self.stack.worker_url() + "/worker_generate_stream")
            try:
                r = requests.post(url, json=self.payloads("valid"), timeout=30)
            except requests.ConnectionError as err:
                return done("refused", f"connection refused ({'controller' if turn % 2 else 'worker'} down)") \
                    if _refused(err) else done("failed", f"{type(err).__name__}")
            return done("refused", "HTTP 401") if r.status_code == 401 else done("failed", f"HTTP {r.status_code} "
                                                                                         f"without the secret")
        payload = self.payloads(kind)
        try:
            r = requests.post(controller + "/get_worker_address", json={"model": payload["model"]},
                              headers=self.headers, timeout=30)
            address = r.json()["address"] if r.status_code == 200 else None
        except requests.ConnectionError as err:
            return done("refused", "connection refused (controller down)") if _refused(err) else \
                done("failed", f"controller: {type(err).__name__}", detail=str(err)[:300])
        except (requests.RequestException, ValueError, KeyError) as err:
            return done("failed", f"controller: {type(err).__name__}", detail=str(err)[:300])
        routed_at = round(self.clock(), 3)
        if address is None:
            return done("failed", f"controller: HTTP {r.status_code}")
        if not address:
            return done("refused", "no worker", routed_at=routed_at)
        last, chunks = None, 0
        try:
            with requests.post(address + "/worker_generate_stream", json=payload, stream=True, headers=self.headers,
                               timeout=(10, self.timeout)) as resp:
                if resp.status_code != 200:
                    return done("failed", f"worker HTTP {resp.status_code}", worker=address, routed_at=routed_at)
                for raw in resp.iter_lines(delimiter=b"\0"):
                    if raw:
                        last, chunks = json.loads(raw), chunks + 1
        except requests.ConnectionError as err:
            if _refused(err):
                return done("refused", "connection refused (worker down)", worker=address, routed_at=routed_at)
            return done("failed", f"stream: {type(err).__name__}", worker=address, routed_at=routed_at,
                        detail=str(err)[:300])
        except (requests.RequestException, ValueError) as err:
            return done("failed", f"stream: {type(err).__name__}", worker=address, routed_at=routed_at,
                        detail=str(err)[:300])
        if last is None:
            return done("failed", "empty stream", worker=address, routed_at=routed_at)
        if int(last.get("error_code", -1)) == 0:
            if kind != "valid":
                return done("failed", f"{kind} answered as if valid", worker=address, routed_at=routed_at)
            return done("answered", "answered", worker=address, routed_at=routed_at)
        status, cause = classify_error(kind, str(last.get("text", "")))
        return done(status, cause, worker=address, routed_at=routed_at)


def _refused(err: BaseException) -> bool:
    """Whether a requests error is a refused TCP connection (nothing listens there): urllib3
    keeps the OS's ECONNREFUSED only in its message."""
    return "Connection refused" in str(err) or "Errno 111" in str(err)


# ------------------------------------------------------------------------- the soak

class Soak:
    """The stack under load, with the worker and the controller killed and restarted."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.report = SoakReport(args.soak, args.concurrency or 4, args.faulty)
        self.t0 = time.monotonic()
        self.stop = threading.Event()
        self.started: list = []
        self.worker = None
        self.controller = None

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def controller_url(self) -> str:
        return self.controller.url

    def worker_url(self) -> str:
        return self.worker.url

    def event(self, what: str, detail: str = "") -> None:
        self.report.events.append(Event(round(self.clock(), 2), what, detail))
        print(f"[{self.clock():7.1f} s] {what} {detail}", flush=True)

    def run(self) -> SoakReport:
        from feallm_llava.bench.serve_load import Payloads, context_tokens, plan
        from feallm_llava.integration import access
        from feallm_llava.serve import stack as serve

        args = self.args
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(lambda: serve.stop_services(self.started))
            model_path = args.model_path
            if not model_path:
                from feallm_llava.tinykit import build_kit, build_llava

                root = args.kit_dir or Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="feallm-soak-")))
                model_path = str(build_llava(Path(root) / "feallm-llava-v1-tiny", build_kit(Path(root) / "kit")))
            log_dir = args.log_dir or Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="feallm-soak-logs-")))
            self.log_dir = Path(log_dir)
            secret = secrets.token_urlsafe(24)
            self.env = {**serve.service_env(), access.SECRET_ENV: secret, "HF_HUB_OFFLINE": "1"}
            self.env.pop(access.SECRET_FILE_ENV, None)
            self.headers = access.auth_headers(secret)
            self.model_path = model_path
            self.extra = ["--limit-model-concurrency", str(args.limit_model_concurrency)] \
                if args.limit_model_concurrency else []
            st = serve.start_stack(model_path, model_base=args.model_base, model_name=args.model_name,
                                   device=args.device, web=False, log_dir=self.log_dir, env=self.env,
                                   controller_port=serve.free_port(), extra_worker_args=self.extra)
            self.started.extend(st.services)
            self.controller, self.worker = st.controller, st.worker
            self.report.model_name = st.model_name
            payloads = Payloads(st.model_name, args.context_tokens or context_tokens(model_path), args.max_new_tokens,
                                args.oversized_side)
            faults = tuple(k.strip() for k in args.faults.split(",") if k.strip())
            kinds = plan(400, args.faulty, faults)  # the order requests take, in turn
            client = Client(self, payloads, self.headers, args.timeout, self.clock)
            self.t0 = time.monotonic()
            self.event("load", f"{self.report.concurrency} clients, {args.faulty:.0%} faulty "
                               f"({', '.join(faults)}), {args.soak:g} min")
            threads = [threading.Thread(target=self._client, args=(client, kinds, i), daemon=True, name=f"soak-{i}")
                       for i in range(self.report.concurrency)]
            sampler = threading.Thread(target=self._sample, daemon=True, name="soak-sampler")
            for t in [*threads, sampler]:
                t.start()
            self._schedule(serve)
            self.stop.set()
            for t in threads:
                t.join(timeout=args.timeout + 30)
            self.event("end")
        self.report.requests.sort(key=lambda r: r.start)
        for r in self.report.requests:
            if r.status == "failed":
                self._killed_in_flight(r)
        return self.report

    def _client(self, client: Client, kinds: list[str], offset: int) -> None:
        # each client walks the whole mix (a stride of `concurrency` through `kinds` would give
        # one client every faulty request), from its own place in it
        n = self.report.concurrency
        for j in itertools.count():
            if self.stop.is_set():
                return
            request = client.send(j * n + offset, kinds[(j + offset * len(kinds) // n) % len(kinds)])
            self.report.requests.append(request)
            if request.cause.startswith("connection refused") or request.cause == "no worker":
                self.stop.wait(RETRY_S)  # as a client does: a server is down, try again shortly

    def _killed_in_flight(self, r: Request) -> None:
        """A request cut by one of the soak's own kills (in flight at the SIGKILL, or sent while
        the killed process exited: its connections are reset): that kill is its cause."""
        end = r.start + r.latency_s
        rep = self.report
        if rep.dead_at is not None and r.worker == rep.dead_worker and r.start <= rep.dead_gone_at \
                and end >= rep.dead_at:
            r.status, r.cause = "killed", "in flight on the worker when it was killed"
        elif (rep.controller_killed_at is not None and r.cause.startswith("controller:")
              and r.start <= rep.controller_gone_at and end >= rep.controller_killed_at):
            r.status, r.cause = "killed", "in flight on the controller when it was killed"

    def _sample(self) -> None:
        from feallm_llava.bench.serve_load import rss_kib

        while not self.stop.wait(SAMPLE_S):
            pid = self.worker.process.pid
            try:
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                fds = None
            self.report.samples.append(Sample(round(self.clock(), 2), pid, rss_kib(pid), fds))

    def _schedule(self, serve) -> None:
        """Kill and restart the worker, then the controller, then let the load run to the end.
        Runs in the main thread: the children it starts die with it (PR_SET_PDEATHSIG follows
        the thread that started them)."""
        total = self.args.soak * 60
        self._until(total * WORKER_KILL_AT)
        old = self.worker
        self.report.dead_worker, self.report.dead_at = old.url, round(self.clock(), 3)
        os.killpg(old.process.pid, signal.SIGKILL)
        old.process.wait(timeout=30)
        self.report.dead_gone_at = round(self.clock(), 3)
        self.event("worker killed", f"{old.url} pid {old.process.pid}")
        new = serve.start_worker(self.controller.url, self.model_path, self.log_dir, self.env,
                                 model_base=self.args.model_base, model_name=self.args.model_name,
                                 device=self.args.device, extra_args=self.extra)
        self.started.append(new)
        self.worker = new
        serve.wait_worker(new, self.controller.url, self.report.model_name)
        self.event("worker restarted", f"{new.url} pid {new.process.pid}")
        self._until(total * CONTROLLER_KILL_AT)
        old = self.controller
        port = int(old.url.rsplit(":", 1)[1])
        self.report.controller_killed_at = round(self.clock(), 3)
        os.killpg(old.process.pid, signal.SIGKILL)
        old.process.wait(timeout=30)
        self.report.controller_gone_at = round(self.clock(), 3)
        self.event("controller killed", f"{old.url} pid {old.process.pid}")
        back = serve.start_controller(self.log_dir, self.env, port=port)
        self.started.append(back)
        self.controller = back
        serve.wait_worker(self.worker, back.url, self.report.model_name)
        self.event("controller restarted", f"{back.url} pid {back.process.pid}; the worker registered again")
        self._until(total)

    def _until(self, t: float) -> None:
        while self.clock() < t:
            for s in self.started:
                if s in (self.worker, self.controller) and not s.running:
                    raise RuntimeError(f"{s.name} exited with code {s.process.returncode}: {s.log_tail()}")
            time.sleep(min(1.0, max(0.0, t - self.clock())))


def format_report(report: SoakReport) -> str:
    lines = []
    for status, causes in sorted(report.counts().items()):
        for cause, n in sorted(causes.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {status:9s} {n:6d}  {cause}")
    lines.append(f"  {'minute':>6s} {'sent':>5s} {'answered':>8s} {'refused':>7s} {'failed':>6s} {'killed':>6s} "
                 f"{'p50 s':>6s} {'p99 s':>6s} {'RSS MiB':>8s} {'fds':>4s}")
    fmt = lambda v, w, f="": f"{'-':>{w}s}" if v is None else f"{v:>{w}{f}}"  # noqa: E731
    for row in report.per_minute():
        lines.append(f"  {row['minute']:6d} {row['sent']:5d} {row['answered']:8d} {row['refused']:7d} "
                     f"{row['failed']:6d} {row['killed']:6d} {fmt(row['p50_s'], 6, '.2f')} {fmt(row['p99_s'], 6, '.2f')} "
                     f"{fmt(row['worker_rss_mib'], 8, '.1f')} {fmt(row['worker_fds'], 4, 'g')}")
    for e in report.events:
        lines.append(f"  event {e.t:7.1f} s  {e.what} {e.detail}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.soak <= 0:
        print("error: --soak MINUTES must be > 0", file=sys.stderr)
        return 2
    report = Soak(args).run()
    print(format_report(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=1))
    for p in report.problems():
        print("problem:", p, file=sys.stderr)
    print(report.verdict(), flush=True)
    return 1 if report.problems() else 0
