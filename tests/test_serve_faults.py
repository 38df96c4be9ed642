"""The serving stack under faults and strangers: failover, exact context checks, no orphans,
access control. Upstream's own `python -m llava.serve.*` processes, real HTTP on 127.0.0.1.

One stack with a shared secret (controller + worker, and FEALLM's UI with a users file when
.venv-ui exists) is shared by the module; the failover tests kill and restart its parts.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from feallm_llava.integration import access
from feallm_llava.serve import stack as serve
from tests.browser import until

ROOT = Path(__file__).resolve().parents[1]
SECRET = "test-secret-" + "x7Qm2" * 4
UI_PYTHON = Path(os.environ.get("FEALLM_UI_PYTHON") or ROOT / ".venv-ui/bin/python")
USER, PASSWORD = "ana", "correct horse battery"


def _llava_serve_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llava")
    return Path(next(iter(spec.submodule_search_locations))) / "serve"


def upstream_routes(module_file: str) -> list[tuple[str, str]]:
    """(method, path) of every route upstream's module declares (read from its source)."""
    source = (_llava_serve_dir() / module_file).read_text()
    return re.findall(r'@app\.(get|post)\("([^"]+)"\)', source)


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (access.SECRET_ENV, access.SECRET_FILE_ENV)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               XDG_CACHE_HOME=str(tmp / "cache"), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def checkpoint(v1_checkpoint):
    return v1_checkpoint


@pytest.fixture(scope="module")
def secured(checkpoint, tmp_path_factory):
    """A stack whose every process demands SECRET; extra services started by tests join `extra`."""
    tmp = tmp_path_factory.mktemp("secured")
    secret_file = tmp / "secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    users = tmp / "users"
    access.add_user(users, USER, PASSWORD)
    web = UI_PYTHON.exists()
    st = serve.start_stack(str(checkpoint), device="cpu", web=web, ui="feallm", ui_python=str(UI_PYTHON),
                           log_dir=tmp / "logs", env=_env(tmp), secret_file=secret_file,
                           users_file=users if web else None)
    st.extra = []
    st.env = {**_env(tmp), access.SECRET_ENV: SECRET}
    try:
        yield st
    finally:
        serve.stop_services(st.services + st.extra)


def _prompt(question: str) -> str:
    """`question` with an image in the template the tiny checkpoint records (`v1`): the worker
    prompts the model with it as it is."""
    from llava.conversation import conv_templates

    conv = conv_templates["v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def _png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (190, 140, 110)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _ask(worker_url: str, st, prompt: str | None = None, max_new_tokens: int = 4) -> dict:
    payload = {"model": st.model_name, "prompt": prompt or _prompt("Please describe the expression."),
               "images": [_png_b64()], "temperature": 0.0, "max_new_tokens": max_new_tokens, "stop": "</s>"}
    r = requests.post(worker_url + "/worker_generate_stream", json=payload, headers=st.headers, timeout=120)
    r.raise_for_status()
    return json.loads([c for c in r.content.split(b"\0") if c][-1])


def _routed(st, controller_url: str | None = None) -> str:
    url = (controller_url or st.controller.url) + "/get_worker_address"
    return requests.post(url, json={"model": st.model_name}, headers=st.headers, timeout=10).json()["address"]


# ----------------------------------------------------------------------------- access control

def test_every_endpoint_of_controller_and_worker_demands_the_secret(secured):
    for service, module in ((secured.controller, "controller.py"), (secured.worker, "model_worker.py")):
        routes = upstream_routes(module) + [("get", "/docs"), ("get", "/openapi.json"), ("post", "/nowhere")]
        assert len(routes) >= (7 if module == "controller.py" else 2) + 3
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong-secret-wrong-secret"}, {"Authorization": SECRET}):
                r = requests.request(method, service.url + path, json={}, headers=headers, timeout=10)
                assert r.status_code == 401, (service.name, method, path, headers, r.status_code)
                assert r.headers["www-authenticate"].startswith("Bearer")
    ok = requests.post(secured.controller.url + "/list_models", headers=secured.headers, timeout=10)
    assert ok.status_code == 200 and secured.model_name in ok.json()["models"]
    assert _ask(secured.worker.url, secured)["error_code"] == 0  # worker and controller pass it to each other


def test_the_ui_logs_people_in_and_refuses_its_api_without_a_login(secured):
    if secured.web is None:
        pytest.skip(f"no UI environment at {UI_PYTHON} (bash launch/bootstrap.sh --env ui)")
    url = secured.web.url
    for method, path in (("get", "/config"), ("get", "/gradio_api/info"), ("post", "/gradio_api/queue/join"),
                         ("post", "/gradio_api/upload"), ("get", "/gradio_api/file=/etc/passwd"),
                         ("post", "/gradio_api/run/predict"), ("get", "/gradio_api/openapi.json")):
        r = requests.request(method, url + path, json={}, timeout=30)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
    session = requests.Session()
    bad = session.post(url + "/login", data={"username": USER, "password": "wrong password"}, timeout=30)
    assert bad.status_code == 400 and session.get(url + "/config", timeout=30).status_code == 401
    good = session.post(url + "/login", data={"username": USER, "password": PASSWORD}, timeout=60)
    assert good.status_code == 200, good.text[:300]
    assert session.get(url + "/config", timeout=30).status_code == 200


def test_no_secret_is_visible_in_the_process_list(secured):
    listing = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    for s in secured.services:
        assert str(s.process.pid) in listing  # the stack's processes are listed ...
    assert SECRET not in listing  # ... without the secret
    for s in secured.services:
        assert SECRET.encode() not in Path(f"/proc/{s.process.pid}/cmdline").read_bytes()


# ----------------------------------------------------------------------------- context

def _prompt_of_length(st, tokens: int) -> tuple[str, int]:
    """A prompt the model sees as exactly `tokens` tokens with its one image (and that count)."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(st.model_path, use_fast=False)
    per_image = 17  # the tiny tower's 16 patches + FEALLM's local token

    def length(n: int) -> int:
        ids = tokenizer_image_token(_prompt("Describe" + " the" * n), tok, IMAGE_TOKEN_INDEX)
        return len(ids) - 1 + per_image

    lo = 0
    while length(lo) < tokens:
        lo += max(1, (tokens - length(lo)) // 2)
    assert length(lo) == tokens, f"no filler length gives {tokens} tokens"
    return _prompt("Describe" + " the" * lo), length(lo)


def test_context_check_counts_feallms_17_image_tokens(secured, checkpoint):
    secured.model_path = str(checkpoint)
    context = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
    under, n = _prompt_of_length(secured, context - 1)
    reply = _ask(secured.worker.url, secured, under, max_new_tokens=8)
    assert reply["error_code"] == 0 and reply["text"].startswith(under)  # room for one token: answered
    over, n = _prompt_of_length(secured, context + 1)
    refused = _ask(secured.worker.url, secured, over)
    assert refused["error_code"] == 1
    assert f"the prompt is {context + 1} tokens, 1 image(s) x 17 tokens" in refused["text"]
    assert f"context {context}" in refused["text"] and "max token length" in refused["text"]
    at, _ = _prompt_of_length(secured, context)
    assert _ask(secured.worker.url, secured, at)["error_code"] == 1  # no room for a single token


# ----------------------------------------------------------------------------- ports

def test_a_start_on_a_busy_port_names_the_pid_holding_it(secured, checkpoint, tmp_path):
    port = int(secured.controller.url.rsplit(":", 1)[1])
    with pytest.raises(serve.StackError) as err:
        serve.start_stack(str(checkpoint), web=False, controller_port=port, log_dir=tmp_path, env=secured.env)
    assert f"port {port}" in str(err.value) and f"pid {secured.controller.process.pid}" in str(err.value)
    assert "llava.serve.controller" in str(err.value) and f"kill {secured.controller.process.pid}" in str(err.value)


# ----------------------------------------------------------------------------- failover

def test_a_killed_worker_is_no_longer_routed_to_within_seconds_and_its_restart_at_once(secured, checkpoint, tmp_path):
    old = secured.worker
    assert _routed(secured) == old.url
    os.killpg(old.process.pid, signal.SIGKILL)
    old.process.wait(timeout=10)
    died = time.monotonic()
    until(lambda: _routed(secured) != old.url, 5.0, what="the controller stops routing to the dead worker")
    assert time.monotonic() - died < 5.0

    new = serve.start_worker(secured.controller.url, str(checkpoint), tmp_path, secured.env)
    secured.extra.append(new)

    def answers() -> bool:
        try:
            return requests.post(new.url + "/worker_get_status", headers=secured.headers, timeout=2).ok
        except requests.ConnectionError:
            assert new.running, new.log_tail()
            return False

    until(answers, serve.WORKER_TIMEOUT, what="the restarted worker answers")
    first_answer = time.monotonic()
    until(lambda: _routed(secured) == new.url, 5.0, what="the controller routes to the restarted worker")
    assert time.monotonic() - first_answer < 3.0  # a probe interval, not a heart-beat expiry
    assert _ask(new.url, secured)["error_code"] == 0
    secured.worker = new


def test_the_worker_answers_while_the_controller_is_down_and_registers_again(secured):
    controller = secured.controller
    port = int(controller.url.rsplit(":", 1)[1])
    os.killpg(controller.process.pid, signal.SIGKILL)
    controller.process.wait(timeout=10)
    # requests on the worker stream on; heart beats to a dead controller do not block them
    for _ in range(2):
        t0 = time.monotonic()
        assert _ask(secured.worker.url, secured)["error_code"] == 0
        assert time.monotonic() - t0 < 60
    back = serve.start_controller(controller.log.parent, secured.env, port=port)
    secured.extra.append(back)
    until(lambda: _routed(secured, back.url) == secured.worker.url, 15.0,
          what="the worker registered again with the restarted controller")
    secured.controller = back


class _StatusOnly(http.server.BaseHTTPRequestHandler):
    """A stand-in worker that answers its status, then is shut down (its port refuses)."""

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.dumps({"model_names": ["ghost"], "speed": 1, "queue_length": 0}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_controller_proxy_evicts_a_worker_that_refuses_and_says_no_worker(secured, tmp_path):
    # probes far apart: only the proxy path can notice the dead worker here
    controller = serve.start_controller(tmp_path, {**secured.env, "FEALLM_CONTROLLER_PROBE_S": "600"})
    secured.extra.append(controller)
    ghost = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StatusOnly)
    threading.Thread(target=ghost.serve_forever, daemon=True).start()
    address = f"http://127.0.0.1:{ghost.server_address[1]}"
    requests.post(controller.url + "/register_worker", headers=secured.headers, timeout=10,
                  json={"worker_name": address, "check_heart_beat": True, "worker_status": None})
    models = lambda: requests.post(controller.url + "/list_models", headers=secured.headers,  # noqa: E731
                                   timeout=10).json()["models"]
    assert models() == ["ghost"]
    ghost.shutdown()
    ghost.server_close()
    body = {"model": "ghost", "prompt": "hi", "max_new_tokens": 2}
    r = requests.post(controller.url + "/worker_generate_stream", json=body, headers=secured.headers, timeout=30)
    last = json.loads([c for c in r.content.split(b"\0") if c][-1])
    assert last["error_code"] == 2 and "no worker serves model 'ghost'" in last["text"]
    assert models() == []
    assert "Remove worker that refused a request" in (tmp_path / "controller.log").read_text()


# ----------------------------------------------------------------------------- no orphans

def _children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkill_of_the_supervisor_leaves_no_controller_worker_or_ui(checkpoint, tmp_path):
    web = UI_PYTHON.exists()
    cmd = [sys.executable, "-m", "feallm_llava.serve.stack", "--model-path", str(checkpoint),
           "--log-dir", str(tmp_path / "logs")]
    cmd += ["--ui-python", str(UI_PYTHON)] if web else ["--no-web"]
    supervisor = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
    lines = []
    try:
        for line in supervisor.stdout:  # event: the supervisor says everything answers
            lines.append(line)
            if line.startswith("serving;"):
                break
        children = _children(supervisor.pid)
        assert len(children) == (3 if web else 2), "".join(lines)
        supervisor.kill()  # SIGKILL: no handler, no cleanup of its own
        supervisor.wait(timeout=10)
        until(lambda: not any(_alive(pid) for pid in children), 5.0,
              what=f"controller, worker{' and UI' if web else ''} gone after the supervisor's SIGKILL")
    finally:
        supervisor.kill()
        for pid in children if "children" in dir() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
