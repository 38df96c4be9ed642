"""The soak's bookkeeping (`python -m feallm_llava.bench serve-load --soak MINUTES`): how a
request's end is classified and what the verdict is measured on. The soak itself runs for
minutes and is a benchmark, not a test (figures in docs/results.md)."""

from __future__ import annotations

from feallm_llava.bench.serve_soak import Request, Sample, SoakReport, classify_error


def _report(requests, samples=(), minutes=5.0) -> SoakReport:
    report = SoakReport(minutes, 4, 0.25, "m")
    report.requests, report.samples = list(requests), list(samples)
    report.dead_worker, report.dead_at, report.dead_gone_at = "http://w1", 30.0, 30.2
    return report


def _flat_samples(rss=400_000, fds=12, minutes=5):
    return [Sample(t, 1, rss, fds) for t in range(0, minutes * 60, 5)]


def test_an_error_reply_is_refused_when_it_names_its_cause_and_failed_when_it_does_not():
    assert classify_error("corrupt_image", "ImageError: request image (base64), 4096 bytes: not an image file") \
        == ("refused", "corrupt_image")
    assert classify_error("valid", "no worker serves model 'm' now")[0] == "refused"
    assert classify_error("valid", "NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.")[0] \
        == "failed"
    assert classify_error("valid", "")[0] == "failed"


def test_a_steady_run_meets_every_target():
    reqs = [Request(i, "valid", i * 1.0, 0.5, "answered", "answered", "http://w2", i * 1.0) for i in range(290)]
    reqs += [Request(900, "unauthenticated", 10.0, 0.01, "refused", "HTTP 401")]
    report = _report(reqs, _flat_samples())
    assert report.problems() == []
    assert report.growth() == {"rss": 0.0, "fds": 0.0}
    assert report.verdict().endswith(": met")
    rows = report.per_minute()
    assert [r["minute"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["answered"] == 60
    assert rows[0]["worker_rss_mib"] == round(400_000 / 1024, 1) and rows[0]["p50_s"] == 0.5


def test_routing_to_the_dead_worker_after_5_s_and_growth_over_5_percent_fail_the_verdict():
    reqs = [Request(0, "valid", 31.0, 0.01, "refused", "connection refused (worker down)", "http://w1", 31.0),
            Request(1, "valid", 36.0, 0.01, "refused", "connection refused (worker down)", "http://w1", 36.5)]
    samples = _flat_samples()
    samples = [Sample(s.t, 1, s.rss_kib * (1.08 if s.t >= 240 else 1.0), s.fds) for s in samples]
    report = _report(reqs, samples)
    assert report.late_routes() == (1, 6.5)
    problems = report.problems()
    assert any("routed to the dead worker more than 5 s" in p for p in problems)
    assert any("worker rss grew 8.0%" in p for p in problems) and not any("fds" in p for p in problems)
    assert report.verdict().endswith(": not met")


def test_a_failure_without_a_cause_and_an_unauthenticated_request_answered_fail_the_verdict():
    reqs = [Request(0, "valid", 5.0, 300.0, "failed", "stream: ReadTimeout"),
            Request(1, "unauthenticated", 6.0, 0.01, "failed", "HTTP 200 without the secret"),
            Request(2, "unauthenticated", 7.0, 0.01, "refused", "connection refused (worker down)")]
    report = _report(reqs, _flat_samples())
    assert report.unauthenticated() == (1, 0)  # the one sent while its server was down is not counted
    problems = report.problems()
    assert any("2 request(s) failed without a stated cause" in p for p in problems)
    assert any("1 of 1 unauthenticated request(s) not refused with 401" in p for p in problems)
