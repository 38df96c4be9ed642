"""Start and stop the serving stack: upstream LLaVA's controller and model worker, and a web UI.

The controller and worker are upstream's own entry points, unchanged; the web UI is ours
by default, upstream's on request (`--legacy-ui`):

    python -m llava.serve.controller        (routes requests to workers)
    python -m llava.serve.model_worker      (loads the checkpoint; FEALLM is registered in
                                             it by the installed autoload hook)
    <.venv-ui>/bin/python -m feallm_llava.ui --controller URL
                                            (the chat and Analyze page on a current Gradio,
                                             in its own environment: `bootstrap.sh --env ui`)
    python -m llava.serve.gradio_web_server (--legacy-ui: upstream's chat page, gradio 4.16.0)

`start_stack(...)` starts them on free ports, waits (bounded) until each answers, and
returns a `Stack` whose `stop()` ends every process group; `launch/serve.sh` and the tests
use it, and `python -m feallm_llava.serve.stack --model-path P` runs it in the foreground
until Ctrl-C.

Every server binds to 127.0.0.1 unless the caller asks for another host. Upstream's
controller and worker have no authentication of their own (whoever reaches their ports
can generate, or register a worker that the controller then routes requests to), so the
integration (`integration.serving_features`) makes them demand a shared secret when one
is set (`integration.access`: from a file or the environment, handed to each process in
its environment, never on a command line), and FEALLM's UI logs people in from a users
file. Another host is refused without both (`check_access`) unless `insecure`, which
prints `EXPOSURE_WARNING`; upstream's UI (gradio 4.16.0, published path-traversal
advisories) can send no secret and has no login.

No orphans: each process gets SIGKILL when the supervisor dies, however it dies
(Linux's PR_SET_PDEATHSIG, `die_with_parent`), and a start on a port still held names
the pids holding it (`check_port`).

Each process runs in its own session (process group) with its working directory in
`log_dir`: upstream writes its log files (`controller.log`, `model_worker_<id>.log`,
`gradio_web_server.log`, `serve_images/`) into the current directory, and stdout+stderr
of each process go to `<log_dir>/<name>.out`. Start-up takes ~10-15 s per process on a
CPU machine (importing torch and transformers; FEALLM's UI imports neither); the
controller comes first because the worker registers with it and the UI asks it for the
model list, then worker and UI start side by side (both UIs ask the controller for models
on every page load, so a worker registered later still shows up).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

from feallm_llava.integration import access

LOCALHOST = "127.0.0.1"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

EXPOSURE_WARNING = (
    "WARNING: serving on {host}, reachable from other machines. {ui}"
    "Upstream's controller and model_worker have no authentication: anyone who reaches "
    "their ports can use the model and register workers (the controller then routes "
    "requests to them). "
    "Expose it only on a network you trust; better: set a shared secret "
    "(FEALLM_SERVE_SECRET_FILE) and the UI's --users-file behind a TLS reverse proxy, or keep the "
    "default 127.0.0.1 and use an SSH tunnel (ssh -L PORT:127.0.0.1:PORT host)."
)
# What each web UI adds to the warning ({ui} above).
UI_RISKS = {
    "feallm": "The web UI has no login: anyone who reaches it can use the model and upload files. ",
    "legacy": "Upstream LLaVA's web UI (--legacy-ui) needs gradio 4.16.0, which has published "
              "path-traversal advisories (files on this machine can be read through crafted URLs) "
              "fixed only in much later gradio releases. ",
    None: "",
}
UIS = ("feallm", "legacy")


def exposure_warning(host: str, ui: str | None) -> str:
    return EXPOSURE_WARNING.format(host=host, ui=UI_RISKS[ui])


# Bounded waits (seconds). Generous for a loaded 2-core CPU machine; a process that dies
# ends the wait at once with the tail of its log.
CONTROLLER_TIMEOUT = 180.0
WORKER_TIMEOUT = 600.0
WEB_TIMEOUT = 300.0
STOP_GRACE = 5.0  # SIGTERM -> SIGKILL; the worker's heart-beat thread outlives uvicorn on SIGTERM


class StackError(RuntimeError):
    """A serving process failed to start or to answer; the message carries its log tail."""


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that is free on `host` now (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


def url_host(host: str) -> str:
    """The address clients on this machine use for a server bound to `host`."""
    if host in ("0.0.0.0", "", "::"):
        return LOCALHOST
    return f"[{host}]" if ":" in host else host


def is_exposed(host: str) -> bool:
    return host not in LOCAL_HOSTS


def model_name_from_path(model_path: str) -> str:
    """The name upstream's worker registers: the last path part (`a_checkpoint-N` for checkpoints)."""
    parts = model_path.rstrip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


# ------------------------------------------------------------------------- processes

@dataclass
class Service:
    """One started server: its process (leader of its own process group) and where it listens."""

    name: str
    process: subprocess.Popen
    url: str
    log: Path  # stdout + stderr of the process
    headers: dict = field(default_factory=dict)  # what a request to it carries (the shared secret)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:])


def command(module: str, args: list[str], python: str | None = None) -> list[str]:
    return [python or sys.executable, "-u", "-m", module, *args]


def controller_args(host: str, port: int) -> list[str]:
    return ["--host", host, "--port", str(port)]


def worker_args(controller_url: str, model_path: str, *, model_base: str | None, model_name: str | None,
                device: str, host: str, port: int) -> list[str]:
    args = ["--host", host, "--port", str(port),
            "--worker-address", f"http://{url_host(host)}:{port}",
            "--controller-address", controller_url,
            "--model-path", model_path, "--device", device]
    if model_base:
        args += ["--model-base", model_base]
    if model_name:
        args += ["--model-name", model_name]
    return args


def web_args(controller_url: str, *, host: str, port: int) -> list[str]:
    return ["--host", host, "--port", str(port), "--controller-url", controller_url,
            "--model-list-mode", "reload"]


def ui_args(controller_url: str | None, *, host: str, port: int) -> list[str]:
    """FEALLM's UI on `host:port`, asking `controller_url` (None: the caller gives another
    backend, e.g. `--base-url URL --model NAME`, in extra_args)."""
    backend = ["--controller", controller_url] if controller_url else []
    return [*backend, "--host", host, "--port", str(port)]


def default_ui_python() -> str:
    """The Python of the web UI's environment: $FEALLM_UI_PYTHON, else $FEALLM_UI_VENV/bin/python,
    else `.venv-ui` of this checkout when it exists, else this Python."""
    if os.environ.get("FEALLM_UI_PYTHON"):
        return os.environ["FEALLM_UI_PYTHON"]
    if os.environ.get("FEALLM_UI_VENV"):
        return str(Path(os.environ["FEALLM_UI_VENV"]) / "bin" / "python")
    checkout = Path(__file__).resolve().parents[2] / ".venv-ui" / "bin" / "python"
    return str(checkout) if checkout.exists() else sys.executable


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _libc():
    """libc loaded before any fork (the child may not load libraries safely)."""
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive SIGKILL when this process dies, however
    it dies (SIGKILL, the OOM killer, a scheduler's limit); None where Linux's
    PR_SET_PDEATHSIG is not available.

    The signal follows the *thread* that forked: a child started from a thread that then
    ends would be killed with it, so only the main thread's children get it.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    libc, parent = _libc(), os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody would signal us
            os._exit(1)
    return preexec


def port_holders(port: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes listening on TCP `port` (Linux /proc; [] elsewhere
    or for processes of other users)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])  # state 0A = LISTEN
    found = []
    if not inodes:
        return found
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    found.append((int(proc.name), cmd[:200]))
                    break
    return found


def check_port(host: str, port: int, name: str) -> None:
    """Fail with the pids that hold `port` when it cannot be bound on `host`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return
        except OSError as err:
            holders = port_holders(port)
            who = "; ".join(f"pid {pid} ({cmd})" for pid, cmd in holders) or "a process this user cannot see"
            pids = " ".join(str(pid) for pid, _ in holders)
            hint = f" (a previous stack? kill {pids})" if holders else ""
            raise StackError(f"{name}: port {port} on {host} is in use by {who}{hint}, or pick another "
                             f"port ({err.strerror})") from err


def _start(name: str, module: str, args: list[str], log_dir: Path, env: dict[str, str],
           host: str, port: int, python: str | None = None, headers: dict | None = None) -> Service:
    log = log_dir / f"{name}.out"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command(module, args, python),
            cwd=log_dir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() reaches every child
            preexec_fn=die_with_parent(),  # and none outlives this process
        )
    return Service(name, process, f"http://{url_host(host)}:{port}", log, dict(headers or {}))


def _signal_group(service: Service, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(service.process.pid, sig)  # pgid == pid: started with start_new_session


def stop_services(services: list[Service], grace: float = STOP_GRACE) -> None:
    """SIGTERM every process group, wait up to `grace` s in all, SIGKILL what is left, reap."""
    for s in services:
        _signal_group(s, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for s in services:
        with contextlib.suppress(subprocess.TimeoutExpired):
            s.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for s in services:
        _signal_group(s, signal.SIGKILL)  # also children of an exited leader, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            s.process.wait(timeout=10)


def _post_json(url: str, payload: dict | None = None, timeout: float = 5.0, headers: dict | None = None):
    import requests

    r = requests.post(url, json=payload or {}, timeout=timeout, headers=headers)
    r.raise_for_status()
    return r.json()


def _wait(service: Service, ready, timeout: float, what: str) -> None:
    """Poll `ready()` until it is true; fail early if the process exits, or at `timeout`."""
    import requests

    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        if not service.running:
            raise StackError(f"{service.name} exited with code {service.process.returncode} before "
                             f"{what}; log {service.log}:\n{service.log_tail()}")
        try:
            if ready():
                return
        except (requests.RequestException, ValueError, KeyError) as err:
            last = f"{type(err).__name__}: {err}"
        if time.monotonic() > deadline:
            raise StackError(f"{service.name} at {service.url}: {what} did not happen within "
                             f"{timeout:.0f} s (last: {last}); log {service.log}:\n{service.log_tail()}")
        time.sleep(0.5)


def _port(host: str, port: int | None, name: str) -> int:
    """`port` checked free (naming who holds it), or a free one."""
    if port:
        check_port(host, port, name)
        return port
    return free_port(host)


def start_controller(log_dir: Path, env: dict[str, str], host: str = LOCALHOST, port: int | None = None,
                     timeout: float = CONTROLLER_TIMEOUT) -> Service:
    port = _port(host, port, "controller")
    service = _start("controller", "llava.serve.controller", controller_args(host, port), log_dir, env, host, port,
                     headers=access.auth_headers(access.read_secret(env)))
    try:
        _wait(service, lambda: isinstance(_post_json(service.url + "/list_models", headers=service.headers)
                                          .get("models"), list),
              timeout, "answering /list_models")
    except BaseException:
        stop_services([service])
        raise
    return service


def start_worker(controller_url: str, model_path: str, log_dir: Path, env: dict[str, str], *,
                 model_base: str | None = None, model_name: str | None = None, device: str = "cpu",
                 host: str = LOCALHOST, port: int | None = None, extra_args: list[str] = ()) -> Service:
    port = _port(host, port, "model_worker")
    args = worker_args(controller_url, model_path, model_base=model_base, model_name=model_name,
                       device=device, host=host, port=port)
    return _start("model_worker", "llava.serve.model_worker", args + list(extra_args), log_dir, env, host, port,
                  headers=access.auth_headers(access.read_secret(env)))


def wait_worker(worker: Service, controller_url: str, model_name: str, timeout: float = WORKER_TIMEOUT) -> None:
    """Until the controller lists `model_name` and the worker answers its status."""
    def ready() -> bool:
        models = _post_json(controller_url + "/list_models", headers=worker.headers)["models"]
        return model_name in models and model_name in _post_json(worker.url + "/worker_get_status",
                                                                 headers=worker.headers)["model_names"]

    _wait(worker, ready, timeout, f"model {model_name!r} registered with the controller")


def start_web(controller_url: str, log_dir: Path, env: dict[str, str], *, host: str = LOCALHOST,
              port: int | None = None, extra_args: list[str] = ()) -> Service:
    port = _port(host, port, "gradio_web_server")
    args = web_args(controller_url, host=host, port=port)
    return _start("gradio_web_server", "llava.serve.gradio_web_server", args + list(extra_args),
                  log_dir, env, host, port)


def start_ui(controller_url: str | None, log_dir: Path, env: dict[str, str], *, python: str | None = None,
             host: str = LOCALHOST, port: int | None = None, extra_args: list[str] = ()) -> Service:
    """FEALLM's web UI (`feallm_llava.ui`) run by `python` (default: `default_ui_python()`)."""
    python = python or default_ui_python()
    if not Path(python).exists() and shutil.which(python) is None:
        raise StackError(f"no Python at {python} for the web UI: bash launch/bootstrap.sh --env ui "
                         f"creates .venv-ui (or pass --legacy-ui, or --no-web)")
    port = _port(host, port, "feallm_ui")
    return _start("feallm_ui", "feallm_llava.ui", ui_args(controller_url, host=host, port=port) + list(extra_args),
                  log_dir, env, host, port, python=python)


def wait_web(web: Service, timeout: float = WEB_TIMEOUT) -> None:
    import requests

    _wait(web, lambda: requests.get(web.url + "/", timeout=5).status_code == 200, timeout, "GET / = 200")


# ------------------------------------------------------------------------- the stack

@dataclass
class Stack:
    """Controller + worker (+ Gradio server). Use as a context manager, or call stop()."""

    controller: Service
    worker: Service
    web: Service | None
    model_name: str
    log_dir: Path
    services: list[Service] = field(default_factory=list)
    headers: dict = field(default_factory=dict)  # what a client's requests carry (the shared secret)

    def stop(self, grace: float = STOP_GRACE) -> None:
        stop_services(self.services, grace)

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> str:
        rows = [f"controller  {self.controller.url}", f"worker      {self.worker.url}  (model {self.model_name})"]
        if self.web is not None:
            rows.append(f"web UI      {self.web.url}")
        rows.append(f"logs        {self.log_dir}")
        return "\n".join(rows)


def service_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from the UI process
    # glibc's malloc in a long-running threaded server (a generate thread per request): few
    # arenas and a fixed mmap threshold keep its RSS flat instead of stepping up for minutes
    # (the soak: +7 % from minute 3 to 10 with glibc's defaults, plateauing)
    env.setdefault("MALLOC_ARENA_MAX", "2")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 << 20))
    return env


def start_stack(model_path: str, *, model_base: str | None = None, model_name: str | None = None,
                device: str = "cpu", host: str = LOCALHOST, web: bool = True, ui: str = "feallm",
                ui_python: str | None = None, controller_port: int | None = None,
                worker_port: int | None = None, web_port: int | None = None,
                log_dir: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                extra_worker_args: list[str] = (), extra_web_args: list[str] = (),
                worker_timeout: float = WORKER_TIMEOUT, web_timeout: float = WEB_TIMEOUT,
                secret_file: str | os.PathLike | None = None, users_file: str | os.PathLike | None = None,
                insecure: bool = False) -> Stack:
    """Start controller, then worker and (if `web`) the web UI; wait until all answer.

    `ui`: "feallm" (`feallm_llava.ui`, run by `ui_python`, default `default_ui_python()`)
    or "legacy" (upstream's gradio_web_server, in this Python). Access control: the shared
    secret from `secret_file`, else `env`'s $FEALLM_SERVE_SECRET(_FILE) (`access`), handed
    to every process in its environment; FEALLM's UI logs its people in from `users_file`.
    A `host` other than loopback is refused without both unless `insecure`. On any
    failure every process already started is stopped before the error propagates.
    """
    if ui not in UIS:
        raise ValueError(f"ui must be one of {UIS}, got {ui!r}")
    env = service_env(env)
    try:
        secret = access.read_secret(env, secret_file)
    except access.AccessError as err:
        raise StackError(str(err)) from err
    if check_access(host, secret, users_file, ui if web else None, insecure):
        print(exposure_warning(host, ui if web else None), file=sys.stderr)
    if web and ui == "legacy":
        _check_gradio()
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="feallm-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_dir = log_dir.resolve()
    env.pop(access.SECRET_FILE_ENV, None)
    if secret:  # in the environment, never on a command line (`ps` shows those to every user)
        env[access.SECRET_ENV] = secret
    else:
        env.pop(access.SECRET_ENV, None)
    if users_file and ui == "feallm":
        extra_web_args = [*extra_web_args, "--users-file", str(Path(users_file).resolve())]
    # the processes run in log_dir: a relative local path must not change meaning there
    model_path, model_base = local_to_absolute(model_path), local_to_absolute(model_base)
    name = model_name or model_name_from_path(model_path)
    started: list[Service] = []
    try:
        controller = start_controller(log_dir, env, host, controller_port)
        started.append(controller)
        worker = start_worker(controller.url, model_path, log_dir, env, model_base=model_base,
                              model_name=model_name, device=device, host=host, port=worker_port,
                              extra_args=list(extra_worker_args))
        started.append(worker)
        web_service = None
        if web and ui == "legacy":
            web_service = start_web(controller.url, log_dir, env, host=host, port=web_port,
                                    extra_args=list(extra_web_args))
        elif web:
            web_service = start_ui(controller.url, log_dir, env, python=ui_python, host=host, port=web_port,
                                   extra_args=list(extra_web_args))
        if web_service is not None:
            started.append(web_service)
        wait_worker(worker, controller.url, name, worker_timeout)
        if web_service is not None:
            wait_web(web_service, web_timeout)
    except BaseException:
        stop_services(started)
        raise
    return Stack(controller, worker, web_service, name, log_dir, started, access.auth_headers(secret))


def check_access(host: str, secret: str | None, users_file, ui: str | None, insecure: bool) -> bool:
    """Refuse a stack that a network could reach without access control (unless `insecure`),
    and combinations that cannot work (upstream's UI cannot send the secret). True when it
    is exposed without access control (`insecure`): the caller prints the warning."""
    if secret and ui == "legacy":
        raise StackError("upstream's web UI (--legacy-ui) cannot send the shared secret to the controller "
                         "and worker: drop --legacy-ui (FEALLM's UI sends it), or --no-web")
    if users_file and ui == "feallm":
        try:
            access.read_users(users_file)
        except access.AccessError as err:
            raise StackError(str(err)) from err
    if secret and ui == "feallm" and not users_file:
        raise StackError("a shared secret is set but the web UI has no users file: its page would let anyone "
                         "who reaches it use the model. Pass --users-file FILE (python -m "
                         "feallm_llava.integration.access add-user FILE NAME), or --no-web")
    if not is_exposed(host):
        return False
    missing = []
    if not secret:
        missing.append(f"a shared secret (${access.SECRET_ENV} or ${access.SECRET_FILE_ENV}, or --secret-file)")
    if ui == "legacy":
        missing.append("a web UI with a login (--legacy-ui has none)")
    if missing and insecure:
        return True
    if missing:
        raise StackError(f"refusing to serve on {host} without access control: set {' and '.join(missing)}; "
                         f"put TLS in front with a reverse proxy (README); or pass --insecure to expose it "
                         f"as it is")
    return False


def local_to_absolute(path: str | None) -> str | None:
    """An existing local path made absolute; hub ids (and None) unchanged."""
    if path is None or not os.path.exists(path):
        return path
    return os.path.abspath(path)


def _check_gradio() -> None:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise StackError("upstream's web UI (--legacy-ui) needs gradio 4.16.0 (with fastapi 0.110.3), "
                         "which has published advisories and is installed only on request: "
                         "bash launch/bootstrap.sh --legacy-ui (or drop --legacy-ui for FEALLM's UI, "
                         "or pass --no-web)")


# ------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, help="LLaVA / FEALLM checkpoint directory (or hub id)")
    parser.add_argument("--model-base", default=None, help="base LLM for LoRA / projector-only checkpoints")
    parser.add_argument("--model-name", default=None,
                        help="name the worker registers (default: the checkpoint directory name; "
                             "upstream picks the conversation template from it, e.g. 'v1' -> llava_v1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ... (default: cpu)")
    parser.add_argument("--host", default=os.environ.get("FEALLM_SERVE_HOST", LOCALHOST),
                        help="address every server binds to (default 127.0.0.1, or $FEALLM_SERVE_HOST); "
                             "0.0.0.0 exposes the stack to the network (see the warning it prints)")
    parser.add_argument("--controller-port", type=int, default=None, help="default: a free port")
    parser.add_argument("--worker-port", type=int, default=None, help="default: a free port")
    parser.add_argument("--web-port", type=int, default=None, help="default: a free port")
    parser.add_argument("--no-web", action="store_true", help="controller and worker only")
    parser.add_argument("--legacy-ui", action="store_true",
                        help="upstream's gradio 4.16.0 chat page instead of FEALLM's UI (published "
                             "advisories; bash launch/bootstrap.sh --legacy-ui installs it)")
    parser.add_argument("--ui-python", default=None,
                        help="the Python that runs FEALLM's UI (default: $FEALLM_UI_PYTHON, else .venv-ui "
                             "of this checkout; bash launch/bootstrap.sh --env ui creates it)")
    parser.add_argument("--log-dir", default=None, help="where logs go (default: a new temporary directory)")
    parser.add_argument("--secret-file", default=None,
                        help="file holding the shared secret every process demands and sends (default: "
                             f"${access.SECRET_ENV}, else the file ${access.SECRET_FILE_ENV} names; never a value "
                             "on the command line)")
    parser.add_argument("--users-file", default=os.environ.get(access.USERS_FILE_ENV),
                        help="the web UI's logins, NAME:scrypt$... lines (python -m "
                             f"feallm_llava.integration.access add-user FILE NAME; default ${access.USERS_FILE_ENV})")
    parser.add_argument("--insecure", action="store_true",
                        help="serve on a non-loopback --host without access control (not advised)")
    parser.add_argument("--load-4bit", action="store_true", help="passed to the worker")
    parser.add_argument("--load-8bit", action="store_true", help="passed to the worker")
    parser.add_argument("--dry-run", action="store_true", help="print the three commands, start nothing")


def ui_of(args: argparse.Namespace) -> str | None:
    """The web UI the command line asks for: None (--no-web), "legacy" or "feallm"."""
    return None if args.no_web else "legacy" if args.legacy_ui else "feallm"


def dry_run(args: argparse.Namespace, extra_worker_args: list[str]) -> str:
    """The commands `main` would run (ports shown as given, or as PORT when chosen at start)."""
    import shlex

    host = args.host
    c_port, w_port, g_port = (args.controller_port or "PORT", args.worker_port or "PORT",
                              args.web_port or "PORT")
    controller_url = f"http://{url_host(host)}:{c_port}"
    lines = [command("llava.serve.controller", controller_args(host, c_port)),
             command("llava.serve.model_worker",
                     worker_args(controller_url, local_to_absolute(args.model_path),
                                 model_base=local_to_absolute(args.model_base),
                                 model_name=args.model_name, device=args.device, host=host, port=w_port)
                     + extra_worker_args)]
    if ui_of(args) == "legacy":
        lines.append(command("llava.serve.gradio_web_server", web_args(controller_url, host=host, port=g_port)))
    elif ui_of(args) == "feallm":
        users = ["--users-file", str(Path(args.users_file).resolve())] if args.users_file else []
        lines.append(command("feallm_llava.ui", ui_args(controller_url, host=host, port=g_port) + users,
                             args.ui_python or default_ui_python()))
    return "\n".join(shlex.join(str(a) for a in line) for line in lines)


def main(args: argparse.Namespace) -> int:
    extra_worker_args = [flag for flag, on in (("--load-4bit", args.load_4bit), ("--load-8bit", args.load_8bit)) if on]
    if args.dry_run:
        try:
            exposed = check_access(args.host, access.read_secret(secret_file=args.secret_file), args.users_file,
                                   ui_of(args), args.insecure)
        except (StackError, access.AccessError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if exposed:
            print(exposure_warning(args.host, ui_of(args)), file=sys.stderr)
        print(dry_run(args, extra_worker_args))
        return 0
    try:
        stack = start_stack(args.model_path, model_base=args.model_base, model_name=args.model_name,
                            device=args.device, host=args.host, web=not args.no_web,
                            ui="legacy" if args.legacy_ui else "feallm", ui_python=args.ui_python,
                            controller_port=args.controller_port, worker_port=args.worker_port,
                            web_port=args.web_port, log_dir=args.log_dir, extra_worker_args=extra_worker_args,
                            secret_file=args.secret_file, users_file=args.users_file, insecure=args.insecure)
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(stack.describe(), flush=True)
    print("serving; Ctrl-C stops all three", flush=True)
    stopping = []

    def _stop(signum, _frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stopping:
            dead = [s for s in stack.services if not s.running]
            if dead:
                s = dead[0]
                print(f"error: {s.name} exited with code {s.process.returncode}; log {s.log}:\n"
                      f"{s.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(1.0)
        return 0
    finally:
        stack.stop()
        print("stopped", flush=True)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m feallm_llava.serve.stack", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
