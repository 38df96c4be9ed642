"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 (feallm_llava.testing.fake_openai)."""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import time

import pytest
from PIL import Image

from feallm_llava.inference.openai_client import BackendError, OpenAIBackend
from feallm_llava.eval.items import EvalItem
from feallm_llava.testing.fake_openai import Fault, per_image, start_fake_openai


def _items(tmp_path, n: int, crop=None) -> list[EvalItem]:
    items = []
    for i in range(n):
        path = tmp_path / f"face{i}.jpg"
        Image.new("RGB", (24, 20), (10 * i, 100, 200 - 5 * i)).save(path)
        items.append(EvalItem(id=f"item{i}", image=str(path), task="fer", question=f"Question {i}?",
                              bench="rafdb", gt_expression="Neutral", crop=crop))
    return items


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _echo(req) -> str:
    return f"Happiness. {req.text}"


def test_each_item_is_one_request_with_its_image_and_question(tmp_path):
    items = _items(tmp_path, 4)
    with start_fake_openai(_echo) as server:
        backend = OpenAIBackend("fake-vlm", base_url=server.base_url, concurrency=2, max_new_tokens=33)
        answers = dict((item.id, text) for item, text in backend.answer(items))
        entries = server.requests.entries()
    assert answers == {f"item{i}": f"Happiness. Question {i}?" for i in range(4)}
    assert sorted(e.image_hashes[0] for e in entries) == sorted(_sha(i.image) for i in items)
    body = entries[0].body
    assert body["model"] == "fake-vlm" and body["temperature"] == 0 and body["max_tokens"] == 33
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_crop_box_is_applied_before_sending(tmp_path):
    sizes = []

    def responder(req):
        url = req.body["messages"][0]["content"][0]["image_url"]["url"]
        sizes.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size)
        return "Neutral."

    with start_fake_openai(responder) as server:
        backend = OpenAIBackend("m", base_url=server.base_url)
        list(backend.answer(_items(tmp_path, 1, crop=(2, 3, 10, 8))))
    assert sizes == [(10, 8)]


@pytest.mark.parametrize("fault", [Fault.status(429, retry_after=0.01), Fault.status(500), Fault.status(503)])
def test_transient_errors_are_retried_until_answered(tmp_path, fault):
    items = _items(tmp_path, 3)
    with start_fake_openai(_echo, faults=per_image({0: fault, 1: fault})) as server:
        backend = OpenAIBackend("m", base_url=server.base_url, backoff_s=0.01)
        answers = dict((item.id, text) for item, text in backend.answer(items))
        counts = server.requests.counts()
    assert len(answers) == 3
    assert all(counts[_sha(i.image)] == 3 for i in items)


def test_timeouts_are_retried(tmp_path):
    items = _items(tmp_path, 2)
    with start_fake_openai(_echo, faults=per_image({0: Fault.delay(2.0)})) as server:
        backend = OpenAIBackend("m", base_url=server.base_url, backoff_s=0.01, timeout_s=0.3)
        answers = dict((item.id, text) for item, text in backend.answer(items))
        counts = server.requests.counts()
    assert sorted(answers) == ["item0", "item1"]
    assert all(counts[_sha(i.image)] == 2 for i in items)


def test_retries_give_up_after_max_attempts_naming_the_item(tmp_path):
    items = _items(tmp_path, 1)
    with start_fake_openai(_echo, faults=lambda req: Fault.status(502)) as server:
        backend = OpenAIBackend("m", base_url=server.base_url, backoff_s=0.001, max_attempts=3)
        with pytest.raises(BackendError, match="item 'item0'.*after 3 attempts"):
            list(backend.answer(items))
        assert server.requests.total == 3


def test_client_errors_are_not_retried(tmp_path):
    items = _items(tmp_path, 1)
    with start_fake_openai(_echo, faults=lambda req: Fault.status(400, message="model takes no images")) as server:
        backend = OpenAIBackend("m", base_url=server.base_url, backoff_s=0.001)
        with pytest.raises(BackendError, match="item 'item0'.*refused.*model takes no images"):
            list(backend.answer(items))
        assert server.requests.total == 1


def test_concurrency_is_bounded(tmp_path):
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    def responder(req):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return "Sadness."

    with start_fake_openai(responder) as server:
        backend = OpenAIBackend("m", base_url=server.base_url, concurrency=3)
        assert len(list(backend.answer(_items(tmp_path, 12)))) == 12
    assert 1 < state["peak"] <= 3


def test_answers_in_flight_are_delivered_before_a_failure_is_raised(tmp_path):
    items = _items(tmp_path, 6)
    bad = _sha(items[0].image)
    faults = per_image({0: Fault.status(401)}, select=lambda h: h == bad)
    got = []
    with start_fake_openai(_echo, faults=faults, latency=0.05) as server:
        backend = OpenAIBackend("m", base_url=server.base_url, concurrency=3)
        with pytest.raises(BackendError, match="item 'item0'"):
            for item, _ in backend.answer(items):
                got.append(item.id)
    assert {"item1", "item2"} <= set(got)  # in flight beside the failing request
    assert "item0" not in got
