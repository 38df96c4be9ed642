"""Upstream's Gradio chat page (`launch/serve.sh --legacy-ui`), driven by headless Chromium:
upload a face, ask, read the answer the FEALLM worker streams back.

Opt-in, as the page is: it needs gradio 4.16.0 in this environment (`bash
launch/bootstrap.sh --legacy-ui`; `launch/test.sh` installs it unless FEALLM_LEGACY_UI=0),
and headless Chromium (`tests/browser.py`); skipped with the reason otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from PIL import Image

from feallm_llava.serve import stack as serve
from tests.browser import (browser, keep_screenshot, record_answer, recorded_answer, running,  # noqa: F401
                           skip_without_chromium, until)

if importlib.util.find_spec("gradio") is None:
    pytest.skip("upstream's UI is opt-in: gradio 4.16.0 is not installed (bash launch/bootstrap.sh --legacy-ui)",
                allow_module_level=True)
skip_without_chromium()

from selenium.webdriver.common.by import By  # noqa: E402

QUESTION = "Please describe the expression in this face."
CURSOR = "\u258c"  # upstream's UI shows it after the partial answer while the worker streams


@pytest.fixture(scope="module")
def served(kit, tmp_path_factory):
    from feallm_llava.tinykit import build_llava

    tmp = tmp_path_factory.mktemp("browser")
    checkpoint = build_llava(tmp_path_factory.mktemp("ckpt") / "feallm-llava-v1-tiny", kit)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               XDG_CACHE_HOME=str(tmp / "cache"), OMP_NUM_THREADS="1")
    yield from running(serve.start_stack(str(checkpoint), device="cpu", web=True, ui="legacy",
                                         log_dir=tmp / "logs", env=env))


def test_chat_page_streams_the_workers_answer_about_an_uploaded_face(served, browser, tmp_path):
    face = tmp_path / "face.png"
    from feallm_llava.integration.compat.serving import serve_example_rows

    Image.open(serve_example_rows()[0][0]).save(face)  # the synthetic face
    requests_before = served.worker.log.read_text().count("POST /worker_generate_stream")

    browser.get(served.web.url + "/")
    # the page asks the controller for models on load; the FEALLM worker's model is selected
    model = until(lambda: [e.get_attribute("value") for e in
                            browser.find_elements(By.CSS_SELECTOR, "#model_selector_row input")
                            if e.get_attribute("value")])
    assert model == [served.model_name]

    browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(face))
    textbox = until(lambda: browser.find_elements(By.CSS_SELECTOR, "textarea[placeholder^='Enter text']"))[0]
    textbox.send_keys(QUESTION)
    record_answer(browser)
    next(b for b in browser.find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == "Send").click()

    def answered() -> list[str] | None:   # every distinct text of the answer bubble, as the user saw it
        states, _ = recorded_answer(browser)
        return states if states and not states[-1].endswith(CURSOR) else None

    states = until(answered)
    shot = tmp_path / "gradio_answer.png"
    browser.save_screenshot(str(shot))
    keep_screenshot(shot)
    print(f"screenshot: {shot}; {len(states)} answer states; final: {states[-1][:80]!r}")

    final = states[-1]
    assert "NETWORK ERROR" not in final and "error_code" not in final
    assert any(s.endswith(CURSOR) for s in states[:-1]), "the answer did not stream"
    assert len(final.strip()) > 0
    user = browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=user]")[-1]
    assert QUESTION in user.text and user.find_elements(By.CSS_SELECTOR, "img")  # the face went along
    assert served.worker.log.read_text().count("POST /worker_generate_stream") > requests_before
    assert shot.stat().st_size > 10_000
