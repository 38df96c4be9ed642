"""Headless Chromium for the browser tests (upstream's legacy page and FEALLM's UI).

Needs Debian's `chromium` + `chromium-driver` (apt-get install chromium chromium-driver)
and the `selenium` package; `skip_without_chromium()` skips the calling module with the
reason when any is missing. The browser never leaves 127.0.0.1 (every other host name
resolves to nothing: a page's web fonts fail fast instead of waiting on the network).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

import pytest

WAIT = 120.0  # bounded waits for a page (s); a loaded 2-core CI machine is slow
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")


def skip_without_chromium() -> None:
    if importlib.util.find_spec("selenium") is None:
        pytest.skip("selenium is not installed (pip install selenium)", allow_module_level=True)
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium not found: apt-get install chromium chromium-driver",
                    allow_module_level=True)


def chrome(profile: Path, width: int = 1280, height: int = 900):
    """A headless Chromium driver (quit it when done)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    return driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium per test module (import this fixture into the module)."""
    driver = chrome(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


def running(stack):
    """A fixture body: yield `stack` (serve.stack.Stack), then stop it and check that every
    process is gone."""
    try:
        yield stack
    finally:
        stack.stop()
        assert all(s.process.poll() is not None for s in stack.services)


def until(fn, timeout: float = WAIT, every: float = 0.1, what: str = "the condition"):
    """`fn()`'s first truthy value, polled every `every` s for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} not reached within {timeout:.0f} s")


RECORD_ANSWER = """
const chat = document.querySelector('#chatbot'), before = chat.querySelectorAll('[data-testid=bot]').length;
window.feallmStates = []; window.feallmChanged = Date.now();
new MutationObserver(() => {
  const bots = chat.querySelectorAll('[data-testid=bot]');
  const text = bots.length > before ? bots[bots.length - 1].innerText.trim() : '';
  const states = window.feallmStates;
  if (text && states[states.length - 1] !== text) { states.push(text); window.feallmChanged = Date.now(); }
}).observe(chat, {subtree: true, childList: true, characterData: true});
"""


def record_answer(browser) -> None:
    """From now on the page itself records every distinct text of the next answer bubble
    in `#chatbot` (a polling test misses the states of an answer that streams fast)."""
    browser.execute_script(RECORD_ANSWER)


def recorded_answer(browser) -> tuple[list[str], float]:
    """(the texts recorded since `record_answer`, ms since the last change)."""
    states, still_ms = browser.execute_script("return [window.feallmStates, Date.now() - window.feallmChanged]")
    return list(states), float(still_ms)


def keep_screenshot(shot: Path, name: str | None = None, colours: int | None = None) -> Path | None:
    """Copy `shot` into $FEALLM_SCREENSHOT_DIR when set (as `name`); with `colours`, as a
    palette PNG of that many colours (a page shot shrinks to a fraction of its size)."""
    keep = os.environ.get("FEALLM_SCREENSHOT_DIR")
    if not keep:
        return None
    target = Path(keep) / (name or shot.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if colours is None:
        shutil.copy(shot, target)
    else:
        from PIL import Image

        with Image.open(shot) as im:
            im.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    return target
