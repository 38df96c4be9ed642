"""FEALLM's web UI without a browser: the two backends' protocols, the chat history, the
Analyze tab's work, the command line, and its own environment (.venv-ui: no torch).

The page itself (gradio 6, in .venv-ui) is driven by headless Chromium in
tests/test_ui_browser.py; everything here runs in the stack's environment.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from feallm_llava.serve.rows import COLUMNS
from feallm_llava.testing.fake_openai import start_fake_openai
from feallm_llava.ui.backends import (BackendError, ControllerBackend, OpenAIChatBackend, Turn, answer_of,
                                      llava_v1_prompt)
from feallm_llava.ui.chat import ERROR_MARK, conversation

ROOT = Path(__file__).resolve().parents[1]
UI_PYTHON = Path(os.environ.get("FEALLM_UI_PYTHON") or ROOT / ".venv-ui/bin/python")
NO_UI_ENV = f"no UI environment at {UI_PYTHON} (bash launch/bootstrap.sh --env ui)"


def scripted(req) -> str:
    """Answers of a FEALLM that reads the astronaut as happy (the three analysis questions)."""
    text = req.text.lower()
    if "lead to" in text:
        return "The raised cheeks and the pulled lip corners make a smile: happiness."
    if "action units" in text:
        return "AU6 (cheek raiser) and AU12 (lip corner puller) are activated."
    if "expression" in text:
        return "Happiness. The person smiles."
    return "A smiling face."


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory) -> Path:
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


# ----------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("turns,image", [
    ([Turn("Please describe the expression in this face.")], True),
    ([Turn("What is shown?")], False),
    ([Turn("Describe the face.", "Happiness. She smiles."), Turn("Which AUs?")], True),
])
def test_prompt_is_upstreams_llava_v1_rendering(turns, image):
    from llava.conversation import conv_templates

    conv = conv_templates["llava_v1"].copy()
    for i, turn in enumerate(turns):
        conv.append_message(conv.roles[0], ("<image>\n" if i == 0 and image else "") + turn.question)
        conv.append_message(conv.roles[1], turn.answer)
    assert llava_v1_prompt(turns, image) == conv.get_prompt()


def test_the_worker_text_loses_the_prompt_it_repeats():
    prompt = llava_v1_prompt([Turn("Q?")], True)
    assert answer_of(prompt + " Happiness. ", prompt) == "Happiness."
    assert answer_of("no prompt here", prompt) == "no prompt here"


# ----------------------------------------------------------------------------- chat history

def test_conversation_starts_at_the_latest_image_and_leaves_failed_turns_out():
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/a.png"}}, {"type": "text", "text": "Old?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Old answer."}]},
        {"role": "user", "content": [{"path": "/b.png"}]},             # an image on its own ...
        {"role": "user", "content": "Describe the face."},              # ... then its question
        {"role": "assistant", "content": "Happiness."},
        {"role": "user", "content": "And the AUs?"},
        {"role": "assistant", "content": f"{ERROR_MARK} worker down"},  # not context
    ]
    turns, image = conversation(history, "Which AUs are active?")
    assert image == "/b.png"
    assert turns == [Turn("Describe the face.", "Happiness."), Turn("Which AUs are active?")]

    turns, image = conversation(history, "This one?", ["/c.png"])  # a new image: a new conversation
    assert (turns, image) == ([Turn("This one?")], "/c.png")
    assert conversation([], "Hello") == ([Turn("Hello")], None)


# ----------------------------------------------------------------------------- upstream's protocol

class _FakeStack(BaseHTTPRequestHandler):
    """A controller and its worker in one server, speaking upstream's protocol."""

    protocol_version = "HTTP/1.0"
    payloads: list = []

    def log_message(self, *args) -> None:
        pass

    def _json(self, value) -> None:
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
        address = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.path == "/list_models":
            return self._json({"models": ["feallm-b", "feallm-a"]})
        if self.path == "/get_worker_address":
            return self._json({"address": address if body["model"].startswith("feallm") else ""})
        self.payloads.append(body)
        self.send_response(200)
        self.end_headers()
        if "fail" in body["prompt"]:
            self.wfile.write(json.dumps({"text": body["prompt"] + " ImageError: not an image", "error_code": 1}).encode()
                             + b"\0")
            return
        text = body["prompt"]
        for piece in (" Happiness.", " The person", " smiles."):
            text += piece
            self.wfile.write(json.dumps({"text": text, "error_code": 0}).encode() + b"\0")
            self.wfile.flush()


@pytest.fixture
def fake_stack():
    _FakeStack.payloads = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeStack)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _FakeStack.payloads
    finally:
        server.shutdown()
        server.server_close()


def test_controller_backend_lists_models_and_streams_the_answer_without_the_prompt(fake_stack):
    url, payloads = fake_stack
    backend = ControllerBackend(url + "/", max_new_tokens=40)
    assert backend.models() == ["feallm-a", "feallm-b"]
    face = Image.new("RGB", (2000, 1500), (190, 140, 110))
    states = list(backend.stream("feallm-a", [Turn("Describe the expression.")], face, temperature=0.0))
    assert states == ["Happiness.", "Happiness. The person", "Happiness. The person smiles."]
    (sent,) = payloads
    assert sent["prompt"] == llava_v1_prompt([Turn("Describe the expression.")], True) and "<image>\n" in sent["prompt"]
    assert sent["stop"] == "</s>" and sent["max_new_tokens"] == 40 and sent["temperature"] == 0.0
    import base64
    import io

    with Image.open(io.BytesIO(base64.b64decode(sent["images"][0]))) as im:
        assert max(im.size) == 1024  # downscaled before sending: the model sees 336 px


def test_controller_backend_reports_worker_errors_and_unknown_models(fake_stack):
    url, _ = fake_stack
    backend = ControllerBackend(url)
    with pytest.raises(BackendError, match="ImageError: not an image.*error_code 1"):
        list(backend.stream("feallm-a", [Turn("fail")], None))
    with pytest.raises(BackendError, match="no worker serves 'other'"):
        list(backend.stream("other", [Turn("hi")], None))
    with pytest.raises(BackendError, match="controller http://127.0.0.1:9/list_models"):
        ControllerBackend("http://127.0.0.1:9").models()


def test_controller_backend_answers_the_analyzers_batches_in_order(fake_stack):
    url, payloads = fake_stack

    class Q:
        def __init__(self, question):
            self.question = question

        def load_image(self):
            return Image.new("RGB", (64, 64))

    answers = ControllerBackend(url, concurrency=3).for_model("feallm-a").generate([Q(f"q{i}") for i in range(5)])
    assert answers == ["Happiness. The person smiles."] * 5
    assert sorted(p["prompt"].split("\n")[1].split()[0] for p in payloads) == [f"q{i}" for i in range(5)]
    assert all(p["temperature"] == 0.0 for p in payloads)


# ----------------------------------------------------------------------------- OpenAI-compatible servers

def test_fake_openai_streams_chunks_that_add_up_to_the_answer():
    import openai

    with start_fake_openai(lambda req: "Happiness.  The person smiles.", stream_interval=0.05) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
        t0, times, pieces = time.monotonic(), [], []
        for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                    stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                times.append(time.monotonic() - t0)
            usage = chunk.usage
        assert "".join(pieces) == "Happiness.  The person smiles." and len(pieces) == 4
        assert times[-1] - times[0] >= 0.14  # paced: three intervals between four words
        assert usage.completion_tokens == 4
        # the same connection then answers an ordinary request
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "Happiness.  The person smiles." and server.requests.total == 2


def test_openai_chat_backend_streams_with_the_image_in_the_first_turn():
    with start_fake_openai(lambda req: f"{len(req.image_hashes)} image(s), {req.text!r}") as server:
        backend = OpenAIChatBackend(server.base_url, "feallm", api_key="k")
        assert backend.models() == ["feallm"]
        turns = [Turn("Describe.", "Happiness."), Turn("Why?")]
        states = list(backend.stream("feallm", turns, Image.new("RGB", (40, 40))))
        assert len(states) > 1 and states[-1] == "1 image(s), 'Describe.\\nHappiness.\\nWhy?'"
        (request,) = server.requests.entries()
        roles = [m["role"] for m in request.body["messages"]]
        assert roles == ["user", "assistant", "user"] and request.body["stream"] is True
    with pytest.raises(BackendError, match="feallm at http://127.0.0.1:9"):
        list(OpenAIChatBackend("http://127.0.0.1:9/v1", "feallm", timeout_s=5).stream("feallm", [Turn("hi")]))


# ----------------------------------------------------------------------------- the Analyze tab

def test_analyze_file_boxes_reads_and_tabulates_the_astronauts_face(astronaut, tmp_path):
    from feallm_llava.ui.faces import analyze_file

    with start_fake_openai(scripted) as server:
        asker = OpenAIChatBackend(server.base_url, "feallm").for_model("feallm")
        report = analyze_file(astronaut, asker, label="my photo.png", out_dir=tmp_path)
    (face,) = report.faces
    assert (face["face_x"], face["face_y"]) == pytest.approx((177, 66), abs=3)
    assert face["expression"] == "Happiness" and face["AU06"] == 1 and face["AU12"] == 1 and face["AU04"] == 0
    assert report.image is not None and report.image.size == (512, 512)
    assert "Happiness" in report.message and "AU06 Cheek Raiser, AU12 Lip Corner Puller" in report.message
    assert report.au_headers == ["AU", "FACS name", "face #0"]
    assert report.au_table[3] == ["AU06", "Cheek Raiser", "active"] and report.au_table[0][2] == ""
    with open(report.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert report.csv.name == "my_photo_faces.csv" and list(rows[0]) == list(COLUMNS)
    assert rows[0]["AU12"] == "1" and rows[0]["expression"] == "Happiness"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_analyze_file_says_what_is_wrong_with_a_bad_upload_or_a_faceless_photo(tmp_path):
    from feallm_llava.ui.faces import analyze_file

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # a few KB on disk, 144 Mpx decoded
    blank = tmp_path / "wall.png"
    Image.new("RGB", (300, 200), (200, 200, 200)).save(blank)

    class Never:
        def generate(self, queries):
            raise AssertionError("no face: nothing to ask")

    bad = analyze_file(corrupt, Never(), out_dir=tmp_path)
    assert bad.image is None and bad.faces == [] and bad.message.startswith("**Could not analyse this file:** bad image")
    assert "decompression-bomb" in analyze_file(bomb, Never(), out_dir=tmp_path).message
    empty = analyze_file(blank, Never(), out_dir=tmp_path)
    assert empty.image is not None and "No face found" in empty.message and empty.au_table[0] == ["AU01", "Inner Brow Raiser"]


# ----------------------------------------------------------------------------- command line, environment

def test_command_line_wants_exactly_one_backend(capsys):
    from feallm_llava.ui.app import main

    for argv in ([], ["--controller", "http://c", "--base-url", "http://o/v1", "--model", "m"],
                 ["--base-url", "http://o/v1"], ["--controller", "http://c", "--concurrency", "0"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    assert "--base-url needs --model" in capsys.readouterr().err


def test_exposing_the_ui_prints_a_warning():
    # this environment has no gradio 6: the UI stops after the warning, saying where it runs
    proc = subprocess.run([sys.executable, "-m", "feallm_llava.ui", "--controller", "http://127.0.0.1:9",
                           "--host", "0.0.0.0", "--port", "7999"], capture_output=True, text=True, timeout=300,
                          check=False, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    err = proc.stderr
    assert proc.returncode == 2, err
    assert "WARNING" in err and "0.0.0.0" in err and "no login" in err and "ssh -L 7999:127.0.0.1:7999" in err
    assert "bootstrap.sh --env ui" in err


def test_ui_modules_import_no_torch_transformers_or_llava():
    code = ("import sys, feallm_llava.ui.app, feallm_llava.ui.backends, feallm_llava.ui.chat, feallm_llava.ui.faces\n"
            "print(sorted(m for m in ('torch', 'transformers', 'llava', 'gradio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(not UI_PYTHON.exists(), reason=NO_UI_ENV)
def test_ui_environment_builds_the_page_without_torch():
    code = ("import sys\n"
            "from feallm_llava.ui.app import UI, build\n"
            "from feallm_llava.ui.backends import ControllerBackend\n"
            "import gradio\n"
            "build(UI(ControllerBackend('http://127.0.0.1:9')))\n"
            "print(gradio.__version__, sorted(m for m in ('torch', 'transformers', 'llava') if m in sys.modules))")
    proc = subprocess.run([str(UI_PYTHON), "-c", code], capture_output=True, text=True, timeout=300, check=False,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    version, loaded = proc.stdout.strip().split(" ", 1)
    assert tuple(int(x) for x in version.split(".")[:2]) >= (6, 16) and loaded == "[]"
    pinned = (ROOT / "launch/requirements-ui.txt").read_text()
    assert f"gradio=={version} " in pinned
    assert subprocess.run([str(UI_PYTHON), "-c", "import torch"], capture_output=True, timeout=120).returncode != 0


def _stub_venv(root: Path) -> tuple[Path, Path]:
    """A venv whose python records each pip call (nothing is installed) and has no gradio."""
    log = root / "pip.log"
    (root / "bin").mkdir(parents=True)
    (root / "site").mkdir()
    python = root / "bin" / "python"
    python.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -m ]; then shift 2; echo "$*" >> {log}; exit 0; fi
case "$2" in *sysconfig*) echo {root / "site"} ;; *) exit 1 ;; esac
""")
    python.chmod(0o755)
    return root, log


def _bootstrap(*argv: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("FEALLM_EXTRAS", "FEALLM_VENV", "FEALLM_UI_VENV")}
    proc = subprocess.run(["bash", str(ROOT / "launch/bootstrap.sh"), *argv], env={**full, **env},
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_bootstrap_installs_gradio_4_only_with_legacy_ui_and_each_step_once(tmp_path):
    venv, log = _stub_venv(tmp_path / "venv")
    _bootstrap(FEALLM_VENV=str(venv))
    calls = log.read_text()
    assert "-e .[test,serve]" in calls and "gradio" not in calls and "legacy-ui" not in calls
    assert (venv / "site" / "feallm_llava_autoload.pth").exists()

    legacy = _bootstrap("--legacy-ui", FEALLM_VENV=str(venv))
    added = log.read_text()[len(calls):]
    assert "-e .[test,serve,legacy-ui]" in added and "--no-deps gradio==4.16.0" in added
    assert "torch" not in added  # the stack itself was up to date
    assert "WARNING" in legacy.stderr and "GHSA-j36p-7w88-g82j" in legacy.stderr

    before = log.read_text()
    again = _bootstrap("--legacy-ui", FEALLM_VENV=str(venv))
    plain = _bootstrap(FEALLM_VENV=str(venv))
    assert log.read_text() == before and "up to date" in again.stdout and "up to date" in plain.stdout


def test_bootstrap_ui_env_installs_the_pinned_ui_requirements_and_this_package_without_deps(tmp_path):
    venv, log = _stub_venv(tmp_path / "venv-ui")
    _bootstrap("--env", "ui", FEALLM_UI_VENV=str(venv))
    assert log.read_text().splitlines() == ["install -q -r launch/requirements-ui.txt", "install -q --no-deps -e ."]
    assert "up to date" in _bootstrap("--env", "ui", FEALLM_UI_VENV=str(venv)).stdout
    lines = (ROOT / "launch/requirements-ui.txt").read_text().splitlines()
    names = {line.split("==")[0].strip() for line in lines if line.strip() and not line.startswith("#")}
    assert "gradio" in names and not names & {"torch", "transformers", "llava-torch", "huggingface-hub"}


def test_bootstrap_refuses_unknown_choices_and_venv_dirs_are_ignored():
    for argv, code in ((["--env", "bogus"], 2), (["--env", "ui", "--legacy-ui"], 2), (["--help"], 0)):
        proc = subprocess.run(["bash", str(ROOT / "launch/bootstrap.sh"), *argv], capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == code, proc.stderr
    ignored = subprocess.run(["git", "check-ignore", ".venv-ui", ".venv-anything"], cwd=ROOT, capture_output=True,
                             text=True, check=False).stdout.split()
    assert ignored == [".venv-ui", ".venv-anything"]
