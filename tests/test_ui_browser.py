"""FEALLM's web UI (`python -m feallm_llava.ui`, gradio 6 in .venv-ui), driven by headless
Chromium against both backends:

- upstream's controller + model_worker serving a tiny FEALLM checkpoint (the stack
  `launch/serve.sh` starts): a chat answer streams in about an uploaded face; the Analyze
  tab boxes the astronaut's face and lists an expression and the 12 AUs; a corrupt upload
  gets a message;
- an OpenAI-compatible server (the scripted `testing.fake_openai`, streaming): the same
  chat, an analysis whose answers the parser reads (Happiness, AU6 + AU12), the CSV; an
  upload over the size limit and a file that is no image get Gradio's own messages.

The tiny checkpoint is untrained (its answers are noise), so against the stack the tests
check the machinery, and against the scripted server what the page makes of real answers.
With FEALLM_SCREENSHOT_DIR set, the OpenAI-server tests keep screenshots of both tabs
there (ui_chat.png, ui_analyze.png: the pictures in docs/).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from feallm_llava.serve import stack as serve
from feallm_llava.serve.annotate_png import PALETTE
from feallm_llava.serve.rows import COLUMNS
from feallm_llava.testing.fake_openai import start_fake_openai
from tests.browser import (browser, keep_screenshot, record_answer, recorded_answer, running,  # noqa: F401
                           skip_without_chromium, until)
from tests.test_ui import UI_PYTHON, NO_UI_ENV, scripted

skip_without_chromium()
if not UI_PYTHON.exists():
    pytest.skip(NO_UI_ENV, allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402

QUESTION = "Please describe the expression in this face."
ERROR_MARK = "\u26a0\ufe0f"


def _env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
                XDG_CACHE_HOME=str(tmp / "cache"), GRADIO_TEMP_DIR=str(tmp / "gradio"), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def stack(kit, tmp_path_factory):
    """Controller + worker + FEALLM's UI, as `launch/serve.sh` starts them."""
    from feallm_llava.tinykit import build_llava

    tmp = tmp_path_factory.mktemp("ui-stack")
    checkpoint = build_llava(tmp_path_factory.mktemp("ckpt") / "feallm-llava-v1-tiny", kit)
    yield from running(serve.start_stack(
        str(checkpoint), device="cpu", web=True, ui="feallm", ui_python=str(UI_PYTHON), log_dir=tmp / "logs",
        env=_env(tmp), extra_web_args=["--max-new-tokens", "128", "--analysis-max-new-tokens", "16"]))


@pytest.fixture(scope="module")
def openai_ui(tmp_path_factory):
    """FEALLM's UI in front of a scripted OpenAI-compatible server that streams."""
    tmp = tmp_path_factory.mktemp("ui-openai")
    with start_fake_openai(scripted, stream_interval=0.05) as server:
        ui = serve.start_ui(None, tmp, _env(tmp), python=str(UI_PYTHON),
                            extra_args=["--base-url", server.base_url, "--model", "feallm", "--api-key", "k",
                                        "--max-upload-mb", "1"])
        try:
            serve.wait_web(ui)
            yield server, ui
        finally:
            serve.stop_services([ui])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    from skimage import data

    from feallm_llava.integration.compat.serving import serve_example_rows

    folder = tmp_path_factory.mktemp("uploads")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    Image.open(serve_example_rows()[0][0]).save(folder / "face.png")   # the synthetic face
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
    (folder / "notes.txt").write_text("not a photo")
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "big.png")   # ~1.9 MB: over the openai_ui's 1 MB limit
    return {p.stem: p for p in folder.iterdir()}


# ----------------------------------------------------------------------------- page actions

def open_page(browser, url: str, tab: str = "Chat") -> str:
    """Load the page, wait for the model list, select `tab`; the selected model."""
    browser.get(url + "/")
    model = until(lambda: [e.get_attribute("value") for e in browser.find_elements(By.CSS_SELECTOR, "#model input")
                           if e.get_attribute("value")], what="the model list")[0]
    if tab != "Chat":
        next(e for e in browser.find_elements(By.CSS_SELECTOR, "[role=tab]") if e.text.strip() == tab).click()
    return model


QUIET_S = 1.5  # an answer is complete once the send button is back and the bubble kept still this long


def ask(browser, image: Path, question: str) -> list[str]:
    """Upload `image` in the chat box, send `question`; every distinct text the answer
    bubble showed (recorded in the page on each change, however fast the answer streams),
    once the answer is complete."""
    until(lambda: browser.find_elements(By.CSS_SELECTOR, "#chat_input input[type=file]"),
          what="the chat box")[0].send_keys(str(image))
    until(lambda: browser.find_elements(By.CSS_SELECTOR, "#chat_input img"), what="the upload's thumbnail")
    browser.find_element(By.CSS_SELECTOR, "#chat_input textarea").send_keys(question)
    record_answer(browser)
    browser.find_element(By.CSS_SELECTOR, "#chat_input [data-testid=submit-button]").click()

    def done() -> list[str] | None:
        states, still_ms = recorded_answer(browser)
        send = browser.find_elements(By.CSS_SELECTOR, "#chat_input [data-testid=submit-button]")
        complete = states and still_ms >= QUIET_S * 1000 and any(b.is_displayed() for b in send)
        return list(states) if complete else None

    return until(done, every=0.1, what="the whole answer")


def analyze(browser, photo: Path) -> str:
    """Upload `photo` in the Analyze tab; the report once it is there."""
    until(lambda: browser.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"),
          what="the photo box")[0].send_keys(str(photo))
    return until(lambda: browser.find_element(By.CSS_SELECTOR, "#face_report").text.strip(), what="the report")


def annotated(browser) -> Image.Image:
    """The picture the Faces box shows, fetched as the browser fetched it."""
    src = until(lambda: [e.get_attribute("src") for e in browser.find_elements(By.CSS_SELECTOR, "#annotated img")
                         if e.get_attribute("src")], what="the annotated image")[0]
    return Image.open(io.BytesIO(requests.get(src, timeout=30).content)).convert("RGB")


def au_rows(browser) -> list[list[str]]:
    """The cells of the AU table, row by row (gradio 6 draws it as a grid of divs)."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#au_table [role=row][data-index]')).map("
        "r => Array.from(r.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim()))")


def box_is_drawn(img: Image.Image, report: str) -> bool:
    """The first face's box, as the report gives it, is outlined in the first face's colour."""
    import re

    x, y, w, h = map(int, re.search(r"Box x=(\d+) y=(\d+) w=(\d+) h=(\d+)", report).groups())
    edge = [img.getpixel((x + w // 2, y)), img.getpixel((x, y + h // 2)), img.getpixel((x + w - 1, y + h // 2))]
    return all(p == PALETTE[0] for p in edge)


def screenshot(browser, path: Path, keep_as: str) -> Path:
    """The whole page (the viewport grown to it), kept as a small palette PNG when asked."""
    height = 900
    for _ in range(4):  # the page reflows as the viewport grows
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
        wanted = min(int(browser.execute_script("return document.documentElement.scrollHeight")), 1800)
        if wanted <= height:
            break
        height = wanted
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(path))
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    keep_screenshot(path, keep_as, colours=96)
    return path


# ----------------------------------------------------------------------------- upstream's controller

def test_chat_streams_the_workers_answer_about_an_uploaded_face(stack, browser, photos):
    requests_before = stack.worker.log.read_text().count("POST /worker_generate_stream")
    assert open_page(browser, stack.web.url) == stack.model_name
    states = ask(browser, photos["face"], QUESTION)
    print(f"{len(states)} answer states; final: {states[-1][:80]!r}")
    assert len(states) > 1, "the answer did not stream"
    assert not states[-1].startswith(ERROR_MARK) and states[-1].strip()
    user = browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=user]")
    assert any(QUESTION in u.text for u in user) and any(u.find_elements(By.CSS_SELECTOR, "img") for u in user)
    assert stack.worker.log.read_text().count("POST /worker_generate_stream") == requests_before + 1


def test_analyze_tab_boxes_the_face_and_lists_an_expression_and_the_aus(stack, browser, photos):
    open_page(browser, stack.web.url, "Analyze")
    report = analyze(browser, photos["astronaut"])
    assert "1 face(s) found" in report and "Expression:" in report and "Active AUs:" in report
    assert box_is_drawn(annotated(browser), report)
    rows = until(lambda: au_rows(browser), what="the AU table")
    assert [r[:2] for r in rows[:1] + rows[-1:]] == [["AU01", "Inner Brow Raiser"], ["AU26", "Jaw Drop"]]
    assert len(rows) == 12 and all(len(r) == 3 and r[2] in ("active", "", "?") for r in rows)
    assert stack.worker.log.read_text().count("POST /worker_generate_stream") >= 3  # fer, aud, reasoning


def test_a_corrupt_upload_gets_a_message_and_the_page_keeps_working(stack, browser, photos):
    open_page(browser, stack.web.url, "Analyze")
    report = analyze(browser, photos["corrupt"])
    assert report.startswith("Could not analyse this file: bad image") and "corrupt.jpg" not in report[:20]
    assert not browser.find_elements(By.CSS_SELECTOR, "#annotated img[src]")
    open_page(browser, stack.web.url)
    states = ask(browser, photos["corrupt"], QUESTION)
    assert states[-1].startswith(ERROR_MARK) and "Cannot use this image" in states[-1]


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_the_ui_listens_on_loopback_only(stack):
    from tests.test_serve_stack import _listening_addresses

    assert _listening_addresses(int(stack.web.url.rsplit(":", 1)[1])) == {"127.0.0.1"}


# ----------------------------------------------------------------------------- an OpenAI-compatible server

def test_chat_streams_an_openai_compatible_servers_answer(openai_ui, browser, photos, tmp_path):
    server, ui = openai_ui
    assert open_page(browser, ui.url) == "feallm"
    states = ask(browser, photos["astronaut"], QUESTION)
    assert states[-1] == "Happiness. The person smiles."
    assert len(states) > 1 and all(states[-1].startswith(s) for s in states), states  # grew word by word
    (request,) = [r for r in server.requests.entries() if r.body.get("stream")]
    assert len(request.image_hashes) == 1 and QUESTION in request.text
    screenshot(browser, tmp_path / "ui_chat.png", "ui_chat.png")


def test_analyze_through_an_openai_compatible_server_reads_the_answers(openai_ui, browser, photos, tmp_path):
    server, ui = openai_ui
    open_page(browser, ui.url, "Analyze")
    report = analyze(browser, photos["astronaut"])
    assert "Expression: Happiness" in report
    assert "Active AUs: AU06 Cheek Raiser, AU12 Lip Corner Puller" in report and "Reasoning: The raised" in report
    assert box_is_drawn(annotated(browser), report)
    rows = until(lambda: au_rows(browser), what="the AU table")
    assert [r for r in rows if r[2] == "active"] == [["AU06", "Cheek Raiser", "active"],
                                                     ["AU12", "Lip Corner Puller", "active"]]
    link = until(lambda: [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#rows_csv a")
                          if a.get_attribute("href")], what="the CSV link")[0]
    lines = requests.get(link, timeout=30).text.splitlines()
    assert lines[0].split(",") == list(COLUMNS) and len(lines) == 2
    screenshot(browser, tmp_path / "ui_analyze.png", "ui_analyze.png")


def test_oversize_and_non_image_uploads_are_refused_with_a_message(openai_ui, browser, photos):
    _server, ui = openai_ui
    for name, message in (("big", "exceed the maximum allowed size of 1.0 Mb"), ("notes", "Invalid file type")):
        open_page(browser, ui.url, "Analyze")
        until(lambda: browser.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"),
              what="the photo box")[0].send_keys(str(photos[name]))
        until(lambda: message in browser.find_element(By.TAG_NAME, "body").text, every=0.05, what=message)
    assert not browser.find_element(By.CSS_SELECTOR, "#face_report").text.strip()  # nothing was analysed
