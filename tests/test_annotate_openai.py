"""OpenAI annotator with the real `openai` client against feallm_llava.testing.fake_openai on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from feallm_llava.data.annotate_openai import (PROMPT_VERSION, RESPONSE_SCHEMA, AnnotationItem,
                                               AnnotatorFatalError, OpenAIAnnotator, OpenAIConfig,
                                               Prices, cache_key, collect_batch, submit_batch,
                                               write_batch_input)
from feallm_llava.data.annotation_cache import AnnotationCache, CacheError
from feallm_llava.facs.labels import AU_NAMES, AUS, EXPRESSIONS, PROTOTYPES
from feallm_llava.data.records import validate_annotation
from feallm_llava.testing.fake_openai import Fault, Reply, per_image, start_fake_openai
from tests.test_affwild2 import make_affwild2_tree, write_face

REPO = Path(__file__).resolve().parents[1]


# -- a responder that reads the labels from the prompt, as a model would ----------------------

def prompt_labels(text: str) -> tuple[str, list[int]]:
    expression = re.search(r"Facial expression: (\w+)", text).group(1)
    active_line = re.search(r"Active action units: (.*)", text).group(1)
    return expression, [int(n) for n in re.findall(r"AU(\d+)", active_line)]


def answer(expression: str, active: list[int]) -> str:
    name = lambda au: f"AU{au} ({AU_NAMES[au]})"  # noqa: E731
    return json.dumps({
        "summary": f"{expression}. The face clearly shows {expression.lower()}.",
        "movement": " ".join(f"{name(au)} is visible." for au in active) or "The face is relaxed.",
        "reasoning_steps": [{"au": au, "contribution": f"{name(au)} supports this reading."}
                            for au in active],
        "conclusion": f"Together, the face expresses {expression.lower()}.",
    })


def good(req) -> str:
    return answer(*prompt_labels(req.text))


def wrong(req) -> str:
    """Label-inconsistent: another expression and an extra AU."""
    expression, active = prompt_labels(req.text)
    other = EXPRESSIONS[(EXPRESSIONS.index(expression) + 1) % 7]
    extra = next(au for au in AUS if au not in active)
    return answer(other, active + [extra])


def make_items(tmp_path: Path, n: int) -> list[AnnotationItem]:
    items = []
    for i in range(n):
        expression = EXPRESSIONS[i % 7]
        path = tmp_path / "faces" / f"{i:05d}.jpg"
        write_face(path, f"face{i}")
        aus = {au: int(au in PROTOTYPES[expression]) for au in AUS}
        items.append(AnnotationItem(f"vid_{i:05d}", path, expression, aus))
    return items


def sha(item: AnnotationItem) -> str:
    return hashlib.sha256(item.image.read_bytes()).hexdigest()


def config(server, **kw) -> OpenAIConfig:
    base = dict(model="gpt-4o", base_url=server.base_url, api_key="test", concurrency=4,
                max_retries=3, max_regenerations=2, timeout=5.0, backoff_base=0.01, backoff_max=1.0)
    return OpenAIConfig(**{**base, **kw})


def run(server, tmp_path, items, **kw):
    with AnnotationCache(tmp_path / "cache.jsonl") as cache:
        annotator = OpenAIAnnotator(config(server, **kw), cache)
        results = annotator.annotate_all(items, progress=False)
    return results, annotator.stats


# -- the request ---------------------------------------------------------------------------------

def test_request_carries_the_image_its_labels_and_the_json_schema(tmp_path):
    items = make_items(tmp_path, 1)
    with start_fake_openai(good) as server:
        run(server, tmp_path, items)
        (req,) = server.requests.entries()
    assert req.image_hashes == (sha(items[0]),)
    url = req.body["messages"][1]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert "Facial expression: Neutral" in req.text and "Active action units: none" in req.text
    assert req.body["model"] == "gpt-4o"
    fmt = req.body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"] == RESPONSE_SCHEMA


def test_valid_answers_are_kept_in_face_order_and_cached(tmp_path):
    items = make_items(tmp_path, 7)
    with start_fake_openai(good) as server:
        results, stats = run(server, tmp_path, items)
    assert [r.status for r in results] == ["validated"] * 7 and stats.validated == 7
    fear = results[3]  # Fear: prototype 1, 2, 4, 25, 26 -> steps in labels.AUS order
    assert [int(n) for n in re.findall(r"AU(\d+) \(", fear.annotation.reasoning)] == [1, 2, 4, 25, 26]
    assert fear.annotation.reasoning.endswith("the face expresses fear.")
    lines = (tmp_path / "cache.jsonl").read_text().splitlines()
    entry = json.loads(lines[0])
    assert len(lines) == 7 and entry["status"] == "validated" and entry["prompt_version"] == PROMPT_VERSION


def test_cached_images_are_not_sent_again(tmp_path):
    items = make_items(tmp_path, 5)
    with start_fake_openai(good) as server:
        run(server, tmp_path, items)
        results, stats = run(server, tmp_path, items)
        assert server.requests.total == 5
    assert all(r.from_cache for r in results) and stats.from_cache == 5 and stats.requests == 0


def test_cache_key_covers_image_labels_and_prompt_version(tmp_path):
    aus = {au: 0 for au in AUS}
    base = cache_key(b"img", "Neutral", aus)
    assert base != cache_key(b"img2", "Neutral", aus)
    assert base != cache_key(b"img", "Anger", aus)
    assert base != cache_key(b"img", "Neutral", {**aus, 4: 1})
    assert base == cache_key(b"img", "Neutral", dict(aus))


# -- transport faults ------------------------------------------------------------------------------

def test_429_is_retried_after_its_retry_after(tmp_path):
    items = make_items(tmp_path, 2)
    with start_fake_openai(good, faults=per_image({0: Fault.status(429, retry_after=0.4)})) as server:
        start = time.monotonic()
        results, stats = run(server, tmp_path, items, backoff_base=0.001)
        elapsed = time.monotonic() - start
        counts = server.requests.counts()
    assert [r.status for r in results] == ["validated"] * 2
    assert all(counts[sha(i)] == 2 for i in items)
    assert stats.rate_limited == 2 and stats.retries == 2
    assert elapsed >= 0.4  # the 0.001 s backoff alone would not wait that long


@pytest.mark.parametrize("fault", [Fault.status(500), Fault.status(503), Fault.malformed_body()])
def test_server_errors_and_broken_bodies_are_retried(tmp_path, fault):
    items = make_items(tmp_path, 3)
    with start_fake_openai(good, faults=per_image({0: fault, 1: fault})) as server:
        results, stats = run(server, tmp_path, items)
        counts = server.requests.counts()
    assert [r.status for r in results] == ["validated"] * 3
    assert all(counts[sha(i)] == 3 for i in items) and stats.retries == 6


def test_timeouts_are_retried(tmp_path):
    items = make_items(tmp_path, 2)
    with start_fake_openai(good, faults=per_image({0: Fault.delay(3.0)})) as server:
        results, stats = run(server, tmp_path, items, timeout=0.3)
    assert [r.status for r in results] == ["validated"] * 2 and stats.timeouts == 2


def test_retries_are_bounded_then_the_image_falls_back_uncached(tmp_path):
    items = make_items(tmp_path, 2)
    with start_fake_openai(good, faults=lambda req: Fault.status(500)) as server:
        results, stats = run(server, tmp_path, items, max_retries=2)
        counts = server.requests.counts()
    assert all(counts[sha(i)] == 3 for i in items)
    assert all(r.status == "fallback" and "gave up after 3 attempts" in r.error for r in results)
    assert all(validate_annotation(r.annotation, i.expression, i.aus) == []
               for r, i in zip(results, items, strict=True))
    assert stats.fallback == stats.fallback_transport == 2
    assert (tmp_path / "cache.jsonl").read_text() == ""  # a later run tries the API again


def test_authentication_error_stops_the_run(tmp_path):
    items = make_items(tmp_path, 3)
    with start_fake_openai(good, faults=lambda req: Fault.status(401)) as server:
        with pytest.raises(AnnotatorFatalError, match="AuthenticationError.*API key"):
            run(server, tmp_path, items)
        assert server.requests.total <= 4  # no retries on a bad key


# -- invalid answers -----------------------------------------------------------------------------

def test_label_inconsistent_answer_is_regenerated_with_the_problems_fed_back(tmp_path):
    items = make_items(tmp_path, 3)

    def responder(req):
        return good(req) if "rejected because" in req.text else wrong(req)

    with start_fake_openai(responder) as server:
        results, stats = run(server, tmp_path, items)
        entries = server.requests.entries()
    assert [r.status for r in results] == ["validated"] * 3
    assert all(r.regenerated and r.answers == 2 for r in results)
    assert stats.rejected_answers == 3 and stats.regenerated_images == 3
    retry_text = next(e.text for e in entries if "rejected because" in e.text)
    assert "summary parses to expression" in retry_text or "does not start with" in retry_text


def test_malformed_json_content_is_regenerated(tmp_path):
    items = make_items(tmp_path, 2)
    with start_fake_openai(good, faults=per_image({0: Fault.content('{"summary": "Neutral.", ')})) as server:
        results, _ = run(server, tmp_path, items)
    assert all(r.status == "validated" and r.answers == 2 for r in results)
    assert "answer is not JSON" in results[0].problems[0]


def test_answer_that_keeps_failing_falls_back_to_the_template_and_is_flagged(tmp_path):
    items = make_items(tmp_path, 3)
    with start_fake_openai(wrong) as server:
        results, stats = run(server, tmp_path, items, max_regenerations=2)
        counts = server.requests.counts()
    assert all(counts[sha(i)] == 3 for i in items)  # 1 answer + 2 regenerations, no more
    assert all(r.status == "fallback" and len(r.problems) == 3 and r.error is None for r in results)
    assert all(validate_annotation(r.annotation, i.expression, i.aus) == []
               for r, i in zip(results, items, strict=True))
    cached = [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert sorted(e["status"] for e in cached) == ["fallback"] * 3  # finished: never re-sent
    assert stats.fallback == 3 and stats.fallback_transport == 0


def test_under_mixed_faults_every_image_ends_validated_or_flagged(tmp_path):
    items = make_items(tmp_path, 14)
    faults = [Fault.status(429, retry_after=0.01), Fault.status(500), Fault.delay(2.0),
              Fault.content("not json at all"), Fault.malformed_body(), None]
    hopeless = {sha(i) for i in items[::5]}

    def pick(req):
        return faults[int(req.image_hashes[0], 16) % len(faults)] if req.attempt == 0 else None

    def responder(req):
        return wrong(req) if req.image_hashes[0] in hopeless else good(req)

    with start_fake_openai(responder, faults=pick) as server:
        results, stats = run(server, tmp_path, items, timeout=0.5, concurrency=6)
        counts = server.requests.counts()
    for item, result in zip(items, results, strict=True):
        assert result.status in ("validated", "fallback")
        assert validate_annotation(result.annotation, item.expression, item.aus) == []
        assert result.status == ("fallback" if sha(item) in hopeless else "validated")
        assert counts[sha(item)] <= (2 + 1) * (3 + 1)  # regenerations x transport tries
    assert stats.validated + stats.fallback == 14 and stats.fallback == len(hopeless)


# -- accounting, rate, concurrency -----------------------------------------------------------------

def test_tokens_and_cost_are_counted(tmp_path):
    items = make_items(tmp_path, 4)
    with start_fake_openai(lambda req: Reply(good(req), prompt_tokens=1000, completion_tokens=200)) as server:
        _, stats = run(server, tmp_path, items, prices=Prices(2.5, 10.0))
    assert (stats.prompt_tokens, stats.completion_tokens) == (4000, 800)
    assert stats.cost_usd == pytest.approx(4 * (1000 * 2.5 + 200 * 10.0) / 1e6)


def test_tokens_of_cached_images_stay_in_the_report(tmp_path):
    items = make_items(tmp_path, 2)
    with start_fake_openai(lambda req: Reply(good(req), prompt_tokens=10, completion_tokens=5)) as server:
        run(server, tmp_path, items)
        _, stats = run(server, tmp_path, items)
    assert (stats.requests, stats.prompt_tokens, stats.completion_tokens) == (0, 20, 10)


def test_requests_per_minute_limit_spaces_requests(tmp_path):
    items = make_items(tmp_path, 6)
    with start_fake_openai(good) as server:
        start = time.monotonic()
        run(server, tmp_path, items, concurrency=6, requests_per_minute=600)  # one per 0.1 s
        elapsed = time.monotonic() - start
    assert elapsed >= 0.5


def test_concurrent_requests_overlap(tmp_path):
    items = make_items(tmp_path, 16)
    with start_fake_openai(good, latency=0.3) as server:
        start = time.monotonic()
        results, _ = run(server, tmp_path, items, concurrency=8)
        elapsed = time.monotonic() - start
    assert len(results) == 16
    assert elapsed < 16 * 0.3 * 0.6  # sequential needs >= 4.8 s; 8 workers ideally 0.6 s


# -- the cache -----------------------------------------------------------------------------------

def test_cache_ignores_and_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"key": "a", "v": 1}) + "\n" + '{"key": "b", "v"')
    with AnnotationCache(path) as cache:
        assert "a" in cache and "b" not in cache and cache.torn_lines == 1
        cache.put({"key": "b", "v": 2})
    with AnnotationCache(path) as cache:
        assert cache.get("b")["v"] == 2 and len(cache) == 2


def test_cache_damaged_inner_line_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"key": "a"}\n{broken\n{"key": "c"}\n')
    with pytest.raises(CacheError, match=r"c\.jsonl:2: damaged cache line"):
        AnnotationCache(path)


def test_cache_later_entry_of_a_key_wins(tmp_path):
    with AnnotationCache(tmp_path / "c.jsonl") as cache:
        cache.put({"key": "k", "status": "fallback"})
        cache.put({"key": "k", "status": "validated"})
    assert AnnotationCache(tmp_path / "c.jsonl").get("k")["status"] == "validated"


def _cli(out: Path, root: Path, server, *extra: str) -> list[str]:
    return ["build-dataset", "--root", str(root), "--out", str(out), "--annotator", "openai",
            "--base-url", server.base_url, "--train-size", "30", "--eval-size", "6",
            "--backoff", "0.01", "--no-progress", *extra]


def test_sigkill_mid_run_then_resume_sends_no_finished_image_twice(tmp_path):
    root = make_affwild2_tree(tmp_path / "aw2", frames=7)
    out = tmp_path / "out"
    cache_file = out / "annotation_cache.jsonl"
    with start_fake_openai(good, latency=0.15) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "feallm_llava.cli", *_cli(out, root, server, "--concurrency", "2")],
            cwd=REPO, env={**os.environ, "OPENAI_API_KEY": "test"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if cache_file.exists() and len(cache_file.read_bytes().splitlines()) >= 6:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with AnnotationCache(cache_file) as cache:
            finished = {e["image_sha256"] for e in cache.entries()}
        before = server.requests.counts()
        assert 6 <= len(finished) < 30  # killed mid-way

        from feallm_llava.cli import main
        assert main(_cli(out, root, server, "--concurrency", "4")) == 0
        after = server.requests.counts()
    assert all(after[h] == before[h] for h in finished)  # not one finished image re-sent
    assert all(n <= 2 for n in after.values())  # at most the request in flight at the kill
    report = json.loads((out / "report.json").read_text())
    assert report["annotator"]["stats"]["from_cache"] >= len(finished)
    assert report["annotations"]["validated"] == report["counts"]["train"]["images"] == 30


# -- Batch API -----------------------------------------------------------------------------------

def test_batch_input_file_holds_one_chat_request_per_uncached_image(tmp_path):
    items = make_items(tmp_path, 4)
    cfg = OpenAIConfig(base_url="http://127.0.0.1:9/v1", api_key="x")
    with AnnotationCache(tmp_path / "cache.jsonl") as cache:
        cache.put({"key": cache_key(items[0].image.read_bytes(), items[0].expression, items[0].aus)})
        (path,) = write_batch_input(items, tmp_path / "batch", cfg, cache)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 3
    for line, item in zip(lines, items[1:], strict=True):
        assert line["custom_id"] == cache_key(item.image.read_bytes(), item.expression, item.aus)
        assert (line["method"], line["url"]) == ("POST", "/v1/chat/completions")
        body = line["body"]
        assert body["model"] == "gpt-4o" and body["response_format"]["type"] == "json_schema"
        assert body["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
        assert f"Facial expression: {item.expression}" in body["messages"][1]["content"][0]["text"]


def test_batch_submit_and_collect_then_only_rejected_images_are_redone(tmp_path):
    items = make_items(tmp_path, 5)
    bad = {sha(items[1])}

    def responder(req):
        if req.batch and req.image_hashes[0] in bad:
            return wrong(req)
        return Reply(good(req), prompt_tokens=100, completion_tokens=10)

    with start_fake_openai(responder) as server:
        cfg = config(server)
        with AnnotationCache(tmp_path / "cache.jsonl") as cache:
            paths = write_batch_input(items, tmp_path / "batch", cfg, cache)
            state = submit_batch(cfg.make_client(), paths, tmp_path / "batch" / "state.json")
            assert len(state["batches"]) == 1 and state["batches"][0]["batch_id"] in server.batches
            summary = collect_batch(cfg.make_client(), tmp_path / "batch" / "state.json", items, cfg, cache)
            assert summary == {"pending": [], "validated": 4, "rejected": 1}
            annotator = OpenAIAnnotator(cfg, cache)
            results = annotator.annotate_all(items, progress=False)
        counts = server.requests.counts()
    assert all(r.status == "validated" for r in results)
    assert [counts[sha(i)] for i in items] == [1, 2, 1, 1, 1]  # batch line + one redo for the bad one
    assert sum(r.batch for r in results) == 4
    assert annotator.stats.cost_usd == pytest.approx(
        4 * 0.5 * (100 * 2.5 + 10 * 10) / 1e6 + (100 * 2.5 + 10 * 10) / 1e6)
