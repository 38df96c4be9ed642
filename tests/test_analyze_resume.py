"""`feallm analyze` keeps its work: rows are written as images finish, an interrupt
(SIGINT or SIGTERM) leaves a valid file and exit status 130, `--resume` analyses only
the rest. The model is a local OpenAI-compatible server with a fixed latency per
request, so the run is slow enough to be interrupted midway, deterministically.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from feallm_llava.testing.fake_openai import start_fake_openai

FEALLM = Path(sys.executable).with_name("feallm")
IMAGES = 24
LATENCY = 0.05  # per request; 3 questions per face: ~0.15 s per image at concurrency 1


def _answer(req) -> str:
    if "action units" in req.text:
        return "AU06 (Cheek Raiser) and AU12 (Lip Corner Puller) are active."
    if "expression" in req.text:
        return "Happiness. The person smiles."
    return "The raised cheeks and pulled lip corners show happiness."


@pytest.fixture()
def faces(tmp_path) -> Path:
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(IMAGES):
        Image.new("RGB", (48, 48), (10 * i % 256, 90, 160)).save(folder / f"face_{i:02d}.png")
    return folder


@pytest.fixture()
def server():
    with start_fake_openai(_answer, latency=LATENCY) as fake:
        yield fake


def command(faces: Path, out: Path, server, *extra: str) -> list[str]:
    return [str(FEALLM), "analyze", str(faces), "--no-detect", "--openai-model", "feallm", "--base-url",
            server.base_url, "--concurrency", "1", "--batch-size", "3", "--out", str(out), "--no-progress", *extra]


def interrupt_midway(cmd: list[str], out: Path, sig: int, rows_before: int = 4) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": "test"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _count_rows(out) < rows_before:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _count_rows(out: Path) -> int:
    if not out.is_file():
        return 0
    text = out.read_text(encoding="utf-8")
    return text.count("\n") - (1 if out.suffix == ".csv" else 0)


def read_rows(out: Path) -> list[dict]:
    if out.suffix == ".csv":
        with out.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("sig,suffix", [(signal.SIGINT, ".csv"), (signal.SIGTERM, ".jsonl")])
def test_interrupted_run_keeps_finished_rows_and_resume_does_only_the_rest(faces, server, tmp_path, sig, suffix):
    out = tmp_path / f"results{suffix}"
    first = interrupt_midway(command(faces, out, server), out, sig)
    assert first.returncode == 130, first.stderr
    assert "Traceback" not in first.stderr and "--resume" in first.stderr
    kept = read_rows(out)  # parses: only whole rows
    assert 4 <= len(kept) < IMAGES
    done = [row["input"] for row in kept]
    assert len(set(done)) == len(done)
    assert all(row["expression"] == "Happiness" and str(row["AU12"]) == "1" for row in kept)
    requests_before = server.requests.total

    again = subprocess.run(command(faces, out, server, "--resume"), capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OPENAI_API_KEY": "test"})
    assert again.returncode == 0, again.stderr
    assert f"{len(kept)} of {IMAGES} image(s) already there" in again.stderr
    rows = read_rows(out)
    assert sorted(row["input"] for row in rows) == sorted(str(p) for p in faces.iterdir())
    assert rows[:len(kept)] == kept  # the first run's rows stay as they were
    assert server.requests.total - requests_before == 3 * (IMAGES - len(kept))  # nothing asked twice


def test_json_output_is_written_when_interrupted(faces, server, tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "OPENAI_API_KEY": "test"}
    proc = subprocess.Popen(command(faces, out, server), env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while server.requests.total < 12:  # about four images answered
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    rows = json.loads(out.read_text())
    assert 3 <= len(rows) < IMAGES and all(r["expression"] == "Happiness" for r in rows)


def test_existing_output_is_not_overwritten_without_being_asked(faces, server, tmp_path):
    out = tmp_path / "results.csv"
    out.write_text("input,error\nsomething.jpg,\n")
    refused = subprocess.run(command(faces, out, server), capture_output=True, text=True,
                             env={**os.environ, "OPENAI_API_KEY": "test"})
    assert refused.returncode == 2 and out.read_text() == "input,error\nsomething.jpg,\n"
    assert "--resume" in refused.stderr and "--overwrite" in refused.stderr


def test_a_note_reaches_the_metadata_the_annotated_image_and_stderr(faces, server, tmp_path):
    out = tmp_path / "results.csv"
    one = faces / "face_00.png"
    proc = subprocess.run(command(one, out, server, "--note", "OUT OF DOMAIN: cartoon-trained toy model",
                                  "--annotate", str(tmp_path / "boxes.png")),
                          capture_output=True, text=True, env={**os.environ, "OPENAI_API_KEY": "test"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("NOTE: OUT OF DOMAIN") == 2  # before and after the rows
    meta = json.loads((tmp_path / "results.csv.meta.json").read_text())
    assert meta["note"].startswith("OUT OF DOMAIN") and meta["model"]["openai_model"] == "feallm"
    annotated = Image.open(tmp_path / "boxes.png")
    assert annotated.height > Image.open(one).height  # the caption band under the image
