"""Upstream's controller + model_worker under a burst of concurrent and faulty requests.

`python -m feallm_llava.bench serve-load` runs once for the module with the tiny FEALLM
checkpoint: 32 requests at once (a quarter faulty: corrupt image, 12000x12000 PNG,
prompt over the 1024-token context), then a SIGKILL of the worker and a restart. Its
JSON report is what the tests read. A second, smaller run targets a stack this module
started itself (`--controller`, `--worker-pid`). Offline, CPU, ~1-2 min on 2 cores.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from feallm_llava.bench import serve_load
from feallm_llava.serve import stack as serve

# Peak RSS growth of the worker during the burst (VmRSS sampled every 50 ms, minus the
# RSS just before it). Measured with the tiny checkpoint, OMP_NUM_THREADS=1, upstream's
# --limit-model-concurrency 5: +183 MiB for 32 valid requests, +196 MiB for 32 with a
# quarter faulty, +212 MiB for 96 with a quarter faulty (the growth follows the 5
# concurrent generations, not the burst's size), +29 MiB for 32 faulty ones, +66 MiB at a
# concurrency limit of 1. One decoded 12000x12000 RGB image alone is 412 MiB: the bound
# fails if the worker decodes an oversized image instead of refusing it.
RSS_GROWTH_BOUND_MIB = 350

REQUESTS = 32
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def checkpoint(v1_checkpoint):
    return v1_checkpoint


@pytest.fixture(scope="module")
def report(checkpoint, tmp_path_factory):
    """The bench through its dispatcher, as `python -m feallm_llava.bench serve-load ...` runs it."""
    from feallm_llava.bench.__main__ import main

    tmp = tmp_path_factory.mktemp("load")
    out = tmp / "report.json"
    with mock.patch.dict(os.environ, ENV):
        rc = main(["serve-load", "--model-path", str(checkpoint), "--requests", str(REQUESTS),
                   "--faulty", "0.25", "--timeout", "120", "--restart-timeout", "300",
                   "--log-dir", str(tmp / "logs"), "--json", str(out)])
    data = json.loads(out.read_text())
    data["rc"], data["log_dir"] = rc, tmp / "logs"
    return data


def _by_kind(report, kind):
    return [o for o in report["outcomes"] if o["kind"] == kind]


def test_every_request_got_an_answer_or_a_clean_error(report):
    s = report["summary"]
    assert s["sent"] == REQUESTS and s["failed"] == 0, [o for o in report["outcomes"] if o["status"] == "failed"]
    assert s["answered"] + s["errored"] == REQUESTS  # none hung, none dropped
    valid = _by_kind(report, "valid")
    assert len(valid) == REQUESTS - round(REQUESTS * 0.25) and all(o["status"] == "ok" for o in valid)
    assert all(o["message"].strip() and o["chunks"] > 1 for o in valid)  # streamed generated text
    assert len({o["message"] for o in valid}) == 1  # greedy: concurrent generations do not disturb each other
    for part in ("all", "ok", "error"):
        p = s["latency_s"][part]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"] <= 120
    assert report["rc"] == 0


def test_each_faulty_kind_is_refused_with_its_cause(report):
    """worker_error_replies: upstream answered all three with "NETWORK ERROR DUE TO HIGH
    TRAFFIC" (images) or error_code 0 (the over-long prompt)."""
    expected = {"corrupt_image": "ImageError: request image (base64), 4096 bytes: not an image file",
                "oversized_image": "image is 12000x12000 = 144.0 Mpx, over the limit",
                "overlong_prompt": "1 image(s) x 17 tokens, the model's context 1024: no room to answer"}
    for kind, text in expected.items():
        outcomes = _by_kind(report, kind)
        assert outcomes, f"no {kind} request sent"
        for o in outcomes:
            assert o["status"] == "error" and o["error_code"] == 1 and o["named_cause"], o
            assert text in o["message"] and "NETWORK ERROR" not in o["message"], o
    log = (report["log_dir"] / "model_worker.out").read_text(encoding="utf-8", errors="replace")
    assert "Caught ValueError: request image (base64)" in log  # upstream's log lines stay


def test_worker_stayed_up_through_the_burst_and_its_memory_is_bounded(report):
    assert report["worker_alive_after_burst"] is True
    rss = report["rss_mib"]
    assert rss["before_burst"] and rss["peak_burst"] >= rss["before_burst"]
    growth = rss["peak_burst"] - rss["before_burst"]
    assert growth < RSS_GROWTH_BOUND_MIB, f"worker RSS grew by {growth:.0f} MiB during the burst ({rss})"
    assert rss["hwm"] >= rss["peak_burst"] - 1  # the kernel's high-water mark agrees with the samples


def test_after_sigkill_the_controller_routes_to_the_restarted_worker(report):
    r = report["restart"]
    assert r["error"] == "" and r["killed_pid"] == report["worker_pid"]
    assert r["new_address"] and r["new_address"] != r["old_address"]
    # upstream's controller handed out the dead worker for up to 60 s; the integration's probe drops it
    assert r["unrouted_after_s"] is not None and r["unrouted_after_s"] < 5
    assert r["request"]["status"] == "ok" and r["request"]["worker"] == r["new_address"]
    assert 0 < r["listed_after_s"] <= r["answered_after_s"] < 300


def test_every_process_the_run_started_is_stopped(report):
    pids = report["started_pids"]
    assert len(pids) == 3  # controller, worker, restarted worker
    assert not any(serve_load.alive(pid) for pid in pids)


# ----------------------------------------------------------------------------- a stack not ours

@pytest.fixture(scope="module")
def foreign(checkpoint, tmp_path_factory):
    """A stack started here; the bench gets only its controller URL and the worker's pid."""
    tmp = tmp_path_factory.mktemp("foreign")
    with mock.patch.dict(os.environ, ENV):
        st = serve.start_stack(str(checkpoint), web=False, log_dir=tmp / "logs")
        try:
            args = serve_load.build_parser().parse_args([
                "--controller", st.controller.url, "--worker-pid", str(st.worker.process.pid),
                "--requests", "8", "--faulty", "0.5", "--context-tokens", "1024", "--timeout", "120",
                "--restart-timeout", "300"])
            report = serve_load.run(args)
            yield st, report
        finally:
            st.stop()


def test_a_running_controller_is_loaded_and_its_worker_restarted_in_place(foreign):
    st, report = foreign
    assert report.model_name == st.model_name and report.summary["failed"] == 0
    assert report.summary["answered"] == 4 and report.summary["errored"] == 4
    assert report.problems() == []
    r = report.restart
    assert st.worker.process.poll() is not None  # the test's worker was SIGKILLed ...
    assert r.new_address == r.old_address == st.worker.url  # ... and started again, same command line
    assert r.request.status == "ok" and r.request.worker == st.worker.url
    assert not any(serve_load.alive(pid) for pid in report.started_pids)  # the restarted one too


# ----------------------------------------------------------------------------- cleanup on failure

def test_processes_are_stopped_when_the_run_fails(monkeypatch, tmp_path):
    def fake_stack(model_path, **kwargs):
        services = [serve.Service(name, subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                                                         start_new_session=True), "http://127.0.0.1:9", tmp_path / "x")
                    for name in ("controller", "model_worker")]
        started.extend(services)
        return serve.Stack(services[0], services[1], None, "feallm-llava-v1-tiny", tmp_path, services)

    def broken_burst(*args, **kwargs):
        raise RuntimeError("the client broke mid-burst")

    started: list[serve.Service] = []
    monkeypatch.setattr(serve, "start_stack", fake_stack)
    monkeypatch.setattr(serve_load, "burst", broken_burst)
    args = serve_load.build_parser().parse_args(["--model-path", str(tmp_path / "m-llava"), "--oversized-side", "64"])
    with pytest.raises(RuntimeError, match="mid-burst"):
        serve_load.run(args)
    assert len(started) == 2 and all(s.process.poll() is not None for s in started)


# ----------------------------------------------------------------------------- pieces

def test_plan_spreads_each_faulty_kind_among_valid_requests():
    kinds = serve_load.plan(32, 0.25)
    assert len(kinds) == 32 and kinds.count("valid") == 24
    assert {k: kinds.count(k) for k in serve_load.FAULTS} == {"corrupt_image": 3, "oversized_image": 3,
                                                             "overlong_prompt": 2}
    assert serve_load.plan(4, 0.0) == ["valid"] * 4 and serve_load.plan(3, 1.0) == list(serve_load.FAULTS)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_oversized_png_is_valid_and_declares_its_size_without_being_decoded():
    from PIL import Image

    t0 = time.monotonic()
    data = serve_load.png_bytes(12000, 12000)
    assert len(data) < 1_000_000 and time.monotonic() - t0 < 30
    with Image.open(io.BytesIO(data)) as im:  # the header only
        assert im.size == (12000, 12000) and im.mode == "RGB" and im.format == "PNG"
    with Image.open(io.BytesIO(serve_load.png_bytes(40, 30))) as small:
        assert small.convert("RGB").getpixel((39, 29)) == (190, 140, 110)


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert [serve_load.percentile(values, q) for q in (50, 90, 99)] == [50.0, 90.0, 99.0]
    assert serve_load.percentile([3.0], 99) == 3.0 and serve_load.percentile([], 50) is None


def test_bench_dispatcher_knows_serve_load():
    from feallm_llava.bench.__main__ import BENCHMARKS, build_parser

    assert BENCHMARKS["serve-load"][0] == "feallm_llava.bench.serve_load"
    args = build_parser("serve-load").parse_args(["serve-load", "--tiny"])
    assert args.tiny and args.requests == 32 and args.faulty == 0.25
    with pytest.raises(SystemExit):  # one source: a checkpoint, the tiny one, or a running controller
        build_parser("serve-load").parse_args(["serve-load", "--tiny", "--controller", "http://127.0.0.1:1"])
    assert Path(serve_load.__file__).name == "serve_load.py"
