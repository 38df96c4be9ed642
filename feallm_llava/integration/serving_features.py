"""What FEALLM adds to upstream's controller and model worker: failover and access control.

Upstream's `python -m llava.serve.controller` and `python -m llava.serve.model_worker`
run unchanged; these features are applied in their process by the autoload hook, when
the entry point hands its FastAPI app to `uvicorn.run` (every name of the module and
the `controller` / `worker` object exist then, nothing is served yet). `uvicorn.run` of
any other app is passed through untouched.

Controller
- a probe thread asks every listed worker for its status each `FEALLM_CONTROLLER_PROBE_S`
  (1 s): a refused connection (nothing listens: the worker died) removes it at once; a
  worker that answers neither probe nor heart beat for `FEALLM_WORKER_EXPIRY_S` (10 s) is
  removed (upstream: up to 2 x 30 s, routing requests to it meanwhile);
- a worker that registers before it listens (upstream's does, then loads uvicorn) waits as
  pending and is routed to as soon as it answers its status;
- its own proxy path (`/worker_generate_stream`) evicts a worker that refuses the
  connection and tries another; "no worker" is said with the model's name.

Worker
- heart beats go from a thread of their own: the request path (upstream sends a blocking
  heart beat there, retried every 5 s while the controller is down, so the worker stopped
  answering) only wakes it; a controller that lost the worker (restarted) gets it
  registered again at the next beat; every `FEALLM_HEART_BEAT_S` (2 s).

Both
- with a shared secret set (`access.read_secret`), every request must carry it (401
  otherwise), and each sends it to the other.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from types import ModuleType

from feallm_llava import autoload
from feallm_llava.integration import access
from feallm_llava.integration.marks import wrap

log = logging.getLogger(__name__)

CONTROLLER_MODULE = "llava.serve.controller"
WORKER_MODULE = "llava.serve.model_worker"
PROBE_S_ENV, EXPIRY_S_ENV, BEAT_S_ENV = "FEALLM_CONTROLLER_PROBE_S", "FEALLM_WORKER_EXPIRY_S", "FEALLM_HEART_BEAT_S"
PROBE_TIMEOUT = 2.0
REGISTER_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 300.0  # between two chunks of a worker's stream (a first token on a busy CPU)
PROXY_TRIES = 3


def _seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        raise ValueError(f"${name}={os.environ[name]!r}: expected seconds") from None
    if value <= 0:
        raise ValueError(f"${name}={value}: must be > 0")
    return value


def install() -> None:
    """Arm the features on `uvicorn.run` and on llava's loader (now if imported, else at import)."""
    autoload.after_import("uvicorn", _hook_uvicorn)
    autoload.after_import("llava.model.builder", _hook_loader)


def _hook_loader(module: ModuleType) -> None:
    # The worker registers in ModelWorker.__init__, before uvicorn.run: its registration and
    # heart beat are mended where __init__ calls the loader (every name of the module exists then).
    wrap(module, "load_pretrained_model", "serving_features", _mending_worker)


def _mending_worker(original):
    def load_pretrained_model(*args, **kwargs):
        from feallm_llava.integration.compat.serving import worker_modules

        for module in worker_modules():
            mend_worker(module, access.read_secret())
        return original(*args, **kwargs)
    return load_pretrained_model


def _hook_uvicorn(module: ModuleType) -> None:
    wrap(module, "run", "serving_features", _serving)


def _entry_module(app) -> tuple[str, ModuleType] | None:
    """(role, module) of upstream's controller or worker module whose `app` this is."""
    for module in list(sys.modules.values()):
        name = getattr(getattr(module, "__spec__", None), "name", None)
        if name in (CONTROLLER_MODULE, WORKER_MODULE) and getattr(module, "app", None) is app:
            return ("controller" if name == CONTROLLER_MODULE else "worker"), module
    return None


def _serving(original):
    def run(app, *args, **kwargs):
        found = _entry_module(app)
        if found is not None:
            role, module = found
            secret = access.read_secret()
            if role == "controller":
                mend_controller(module, secret)
            else:
                mend_worker(module, secret)
            if secret:
                app = access.RequireSecret(app, secret, realm=f"llava {role}")
                log.info("%s: every request must carry the shared secret", role)
        return original(app, *args, **kwargs)
    return run


def _outcome(post, url: str, headers: dict, timeout: float):
    """("ok", json) | ("refused", why) | ("silent", why) of one POST."""
    import requests

    try:
        r = post(url, headers=headers, timeout=timeout)
    except requests.exceptions.ConnectionError as err:
        # a read timeout is a ConnectionError subclass in requests; a dead port is not a timeout
        if isinstance(err, requests.exceptions.Timeout):
            return "silent", f"{type(err).__name__}"
        return "refused", f"{type(err).__name__}: {err}"
    except requests.exceptions.RequestException as err:
        return "silent", f"{type(err).__name__}: {err}"
    if r.status_code != 200:
        return "silent", f"HTTP {r.status_code}"
    try:
        return "ok", r.json()
    except ValueError as err:
        return "silent", f"not JSON: {err}"


# ------------------------------------------------------------------------- controller

def mend_controller(module: ModuleType, secret: str | None) -> None:
    """Failover (probe, pending registration, eviction) and the secret on the controller."""
    import requests

    headers = access.auth_headers(secret)
    Controller = module.Controller

    def mend_status(_original):
        def get_worker_status(self, worker_name: str):
            state, value = _outcome(requests.post, worker_name + "/worker_get_status", headers, PROBE_TIMEOUT)
            if state != "ok":
                module.logger.error(f"Get status fails: {worker_name}, {value}")
                return None
            return value
        return get_worker_status

    def mend_register(original):
        def register_worker(self, worker_name: str, check_heart_beat: bool, worker_status: dict):
            ok = original(self, worker_name, check_heart_beat, worker_status)
            state, _ = _outcome(requests.post, worker_name + "/worker_get_status", headers, PROBE_TIMEOUT)
            if ok and state == "refused":  # registered before its server listens: not routable yet
                info = self.worker_info.pop(worker_name, None)
                if info is not None:
                    _pending(self)[worker_name] = info
                    module.logger.info(f"Pending until it answers: {worker_name}")
            else:
                _pending(self).pop(worker_name, None)
            return ok
        return register_worker

    def mend_remove(_original):
        def remove_worker(self, worker_name: str):
            # upstream's `del` raised KeyError when two threads removed the same worker
            self.worker_info.pop(worker_name, None)
        return remove_worker

    def mend_beat(original):
        def receive_heart_beat(self, worker_name: str, queue_length: int):
            if worker_name in _pending(self):
                return True  # known, waiting for its server to answer
            return original(self, worker_name, queue_length)
        return receive_heart_beat

    def mend_address(original):
        def get_worker_address(self, model_name: str):
            for _ in range(PROXY_TRIES):
                try:
                    return original(self, model_name)
                except KeyError:  # the probe removed the chosen worker between two of upstream's lines
                    continue
            return ""
        return get_worker_address

    def mend_stream(_original):
        def worker_api_generate_stream(self, params):
            yield from _proxy(self, module, params, headers)
        return worker_api_generate_stream

    wrap(Controller, "get_worker_status", "serving_features", mend_status)
    wrap(Controller, "register_worker", "serving_features", mend_register)
    wrap(Controller, "remove_worker", "serving_features", mend_remove)
    wrap(Controller, "receive_heart_beat", "serving_features", mend_beat)
    wrap(Controller, "get_worker_address", "serving_features", mend_address)
    wrap(Controller, "worker_api_generate_stream", "serving_features", mend_stream)
    controller = getattr(module, "controller", None)
    if controller is not None and not getattr(controller, "_feallm_probe", None):
        controller._feallm_probe = Probe(controller, module, headers)
        controller._feallm_probe.start()


def _pending(controller) -> dict:
    if not hasattr(controller, "_feallm_pending"):
        controller._feallm_pending = {}
    return controller._feallm_pending


def _proxy(controller, module: ModuleType, params: dict, headers: dict):
    """The controller's `/worker_generate_stream`: a worker that refuses is evicted, the next tried."""
    import requests

    model = params.get("model")
    for _ in range(PROXY_TRIES):
        address = controller.get_worker_address(model)
        if not address:
            module.logger.info(f"no worker: {model}")
            yield _chunk(f"no worker serves model {model!r} now (it may be starting or restarting); "
                         f"retry in a few seconds", 2)
            return
        sent = False
        try:
            with requests.post(address + "/worker_generate_stream", json=params, stream=True, headers=headers,
                               timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)) as r:
                if r.status_code != 200:
                    yield _chunk(f"worker {address}: HTTP {r.status_code}", 3)
                    return
                for chunk in r.iter_lines(decode_unicode=False, delimiter=b"\0"):
                    if chunk:
                        sent = True
                        yield chunk + b"\0"
            return
        except requests.exceptions.ConnectionError as err:
            if sent or isinstance(err, requests.exceptions.Timeout):
                yield _chunk(f"worker {address}: {type(err).__name__}: {err}", 3)
                return
            module.logger.info(f"Remove worker that refused a request: {address}")
            controller.remove_worker(address)
        except requests.exceptions.RequestException as err:
            yield _chunk(f"worker {address}: {type(err).__name__}: {err}", 3)
            return
    yield _chunk(f"no worker of model {model!r} answered after {PROXY_TRIES} tries", 3)


def _chunk(text: str, code: int) -> bytes:
    return json.dumps({"text": text, "error_code": code}).encode() + b"\0"


class Probe(threading.Thread):
    """Asks each listed and pending worker for its status; removes dead and silent ones."""

    def __init__(self, controller, module: ModuleType, headers: dict):
        super().__init__(name="feallm-worker-probe", daemon=True)
        self.controller, self.module, self.headers = controller, module, headers
        self.interval = _seconds(PROBE_S_ENV, 1.0)
        self.expiry = _seconds(EXPIRY_S_ENV, 10.0)
        self.stopped = threading.Event()

    def run(self) -> None:
        import requests

        while not self.stopped.wait(self.interval):
            pending = _pending(self.controller)
            for name in list(self.controller.worker_info) + list(pending):
                state, why = _outcome(requests.post, name + "/worker_get_status", self.headers, PROBE_TIMEOUT)
                info = self.controller.worker_info.get(name) or pending.get(name)
                if info is None:
                    continue
                if state == "ok":
                    info.last_heart_beat = time.time()
                    if name in pending:
                        self.controller.worker_info[name] = pending.pop(name)
                        self.module.logger.info(f"Worker answers, routing to it: {name}")
                elif state == "refused" and name in self.controller.worker_info:
                    self.module.logger.info(f"Remove dead worker: {name} ({why})")
                    self.controller.remove_worker(name)
                elif time.time() - info.last_heart_beat > self.expiry:
                    self.module.logger.info(f"Remove silent worker: {name} (nothing for {self.expiry:.0f} s: {why})")
                    self.controller.remove_worker(name)
                    pending.pop(name, None)


# ------------------------------------------------------------------------- worker

def mend_worker(module: ModuleType, secret: str | None) -> None:
    """Heart beats off the request path, registration that survives a controller outage, the secret."""
    import requests

    headers = access.auth_headers(secret)
    ModelWorker = module.ModelWorker

    def mend_register(_original):
        def register_to_controller(self):
            module.logger.info("Register to controller")
            data = {"worker_name": self.worker_addr, "check_heart_beat": True, "worker_status": self.get_status()}
            try:
                r = requests.post(self.controller_addr + "/register_worker", json=data, headers=headers,
                                  timeout=REGISTER_TIMEOUT)
                r.raise_for_status()
                return True
            except requests.exceptions.RequestException as err:
                module.logger.error(f"register with the controller failed ({err}); retried at the next heart beat")
                return False
        return register_to_controller

    def mend_beat(_original):
        def send_heart_beat(self):
            _beater(self, module, headers).wake.set()
        return send_heart_beat

    wrap(ModelWorker, "register_to_controller", "serving_features", mend_register)
    wrap(ModelWorker, "send_heart_beat", "serving_features", mend_beat)
    worker = getattr(module, "worker", None)
    if worker is not None and not getattr(getattr(module, "args", None), "no_register", False):
        _beater(worker, module, headers)


def _beater(worker, module: ModuleType, headers: dict) -> HeartBeat:
    beat = getattr(worker, "_feallm_beat", None)
    if beat is None:
        beat = worker._feallm_beat = HeartBeat(worker, module, headers)
        beat.start()
    return beat


class HeartBeat(threading.Thread):
    """The worker's heart beat, off the request path; registers again when the controller lost it."""

    def __init__(self, worker, module: ModuleType, headers: dict):
        super().__init__(name="feallm-heart-beat", daemon=True)
        self.worker, self.module, self.headers = worker, module, headers
        self.interval = _seconds(BEAT_S_ENV, 2.0)
        self.wake = threading.Event()
        self.down_since: float | None = None

    def run(self) -> None:
        import requests

        while True:
            self.wake.wait(self.interval)
            self.wake.clear()
            url = self.worker.controller_addr + "/receive_heart_beat"
            body = {"worker_name": self.worker.worker_addr, "queue_length": self.worker.get_queue_length()}
            try:
                r = requests.post(url, json=body, headers=self.headers, timeout=PROBE_TIMEOUT)
                r.raise_for_status()
                exist = bool(r.json().get("exist"))
            except (requests.exceptions.RequestException, ValueError) as err:
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    self.module.logger.error(f"heart beat error: {err}; serving on, beating every {self.interval:g} s")
                continue
            if self.down_since is not None:
                self.module.logger.info(f"controller back after {time.monotonic() - self.down_since:.1f} s")
                self.down_since = None
            if not exist:
                self.worker.register_to_controller()
