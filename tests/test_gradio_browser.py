"""Upstream's Gradio chat page, driven by headless Chromium: upload a face, ask, read the
answer the FEALLM worker streams back.

Needs Debian's `chromium` + `chromium-driver` (apt-get install chromium chromium-driver)
and the `selenium` package; skipped with the reason when any is missing. The browser
never leaves 127.0.0.1 (every other host name resolves to nothing: the page's web fonts
fail fast instead of waiting on the network).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from feallm_llava.serve import stack as serve

if importlib.util.find_spec("gradio") is None:
    pytest.skip("gradio 4.16.0 is not installed (the `serve` extra)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("headless Chromium not found: apt-get install chromium chromium-driver", allow_module_level=True)

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

QUESTION = "Please describe the expression in this face."
CURSOR = "▌"  # upstream's UI shows it after the partial answer while the worker streams
WAIT = 120.0  # bounded waits for the page (s); a loaded 2-core CI machine is slow


@pytest.fixture(scope="module")
def served(kit, tmp_path_factory):
    from feallm_llava.tinykit import build_llava

    tmp = tmp_path_factory.mktemp("browser")
    checkpoint = build_llava(tmp_path_factory.mktemp("ckpt") / "feallm-llava-v1-tiny", kit)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               XDG_CACHE_HOME=str(tmp / "cache"), OMP_NUM_THREADS="1")
    st = serve.start_stack(str(checkpoint), device="cpu", web=True, log_dir=tmp / "logs", env=env)
    try:
        yield st
    finally:
        st.stop()
        assert all(s.process.poll() is not None for s in st.services)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def _until(fn, timeout: float = WAIT, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not reached within {timeout:.0f} s")


def test_chat_page_streams_the_workers_answer_about_an_uploaded_face(served, browser, tmp_path):
    face = tmp_path / "face.png"
    from feallm_llava.integration.compat.serving import serve_example_rows

    Image.open(serve_example_rows()[0][0]).save(face)  # the synthetic face
    requests_before = served.worker.log.read_text().count("POST /worker_generate_stream")

    browser.get(served.web.url + "/")
    # the page asks the controller for models on load; the FEALLM worker's model is selected
    model = _until(lambda: [e.get_attribute("value") for e in
                            browser.find_elements(By.CSS_SELECTOR, "#model_selector_row input")
                            if e.get_attribute("value")])
    assert model == [served.model_name]

    browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(face))
    textbox = _until(lambda: browser.find_elements(By.CSS_SELECTOR, "textarea[placeholder^='Enter text']"))[0]
    textbox.send_keys(QUESTION)
    next(b for b in browser.find_elements(By.CSS_SELECTOR, "button") if b.text.strip() == "Send").click()

    states: list[str] = []  # every distinct text of the answer bubble, as the user saw it

    def answered() -> bool:
        bubbles = browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=bot]")
        text = bubbles[-1].text if bubbles else ""
        if text and (not states or states[-1] != text):
            states.append(text)
        return bool(text) and not text.endswith(CURSOR)

    _until(answered)
    shot = tmp_path / "gradio_answer.png"
    browser.save_screenshot(str(shot))
    keep = os.environ.get("FEALLM_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
    print(f"screenshot: {shot}; {len(states)} answer states; final: {states[-1][:80]!r}")

    final = states[-1]
    assert "NETWORK ERROR" not in final and "error_code" not in final
    assert any(s.endswith(CURSOR) for s in states[:-1]), "the answer did not stream"
    assert len(final.strip()) > 0
    user = browser.find_elements(By.CSS_SELECTOR, "#chatbot [data-testid=user]")[-1]
    assert QUESTION in user.text and user.find_elements(By.CSS_SELECTOR, "img")  # the face went along
    assert served.worker.log.read_text().count("POST /worker_generate_stream") > requests_before
    assert shot.stat().st_size > 10_000
