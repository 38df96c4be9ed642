"""`feallm eval` end to end with an OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from feallm_llava.cli import main as cli
from feallm_llava.facs.labels import AUS
from feallm_llava.eval.predictions import read_predictions
from feallm_llava.testing.fake_openai import start_fake_openai

REPO = Path(__file__).resolve().parents[1]
LINE_KEYS = ["id", "image", "task", "question", "gt_expression", "gt_aus", "au_targets", "bench",
             "answer", "model"]


def _rafdb(root: Path, n: int, missing: tuple[int, ...] = ()) -> dict[str, str]:
    """A RAF-DB basic tree with n test images; returns image sha256 -> item id."""
    (root / "EmoLabel").mkdir(parents=True)
    lines, by_hash = [], {}
    for i in range(1, n + 1):
        stem = f"test_{i:04d}"
        lines.append(f"{stem}.jpg {1 + i % 7}")
        if i in missing:
            continue
        path = root / "Image" / "aligned" / f"{stem}_aligned.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (i * 7 % 256, i * 13 % 256, 90)).save(path)
        by_hash[hashlib.sha256(path.read_bytes()).hexdigest()] = stem
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return by_hash


def _happy(req) -> str:
    return "The person looks happy: the cheeks are raised (AU6) and the lip corners pulled (AU12), no AU4."


def _eval_args(data: Path, out: Path, server, *extra: str, bench: str = "rafdb") -> list[str]:
    return ["eval", "--bench", bench, "--data", str(data), "--openai-model", "fake-vlm",
            "--base-url", server.base_url, "--out", str(out), *extra]


def test_eval_writes_one_line_per_item_with_the_documented_fields(tmp_path):
    _rafdb(tmp_path / "raf", 5)
    with start_fake_openai(_happy) as server:
        assert cli(_eval_args(tmp_path / "raf", tmp_path / "out", server)) == 0
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [f"test_{i:04d}" for i in range(1, 6)]
    assert all(list(r) == LINE_KEYS for r in lines)  # answers only: the scorer parses them
    assert {r["answer"] for r in lines} == {_happy(None)}
    assert lines[0]["gt_expression"] == "Fear" and lines[0]["model"] == "fake-vlm"
    summary = json.loads((tmp_path / "out" / "run.json").read_text())
    assert summary["answered_now"] == 5 and summary["answered_before"] == 0


def test_feabench_lines_carry_the_truth_the_scorer_needs(tmp_path):
    data = tmp_path / "fea"
    data.mkdir()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(data / "a.jpg")
    (data / "eval.json").write_text(json.dumps(
        [{"id": "v1_1", "image": "a.jpg", "expression": "Happiness", "aus": [6, 12], "subject": "v1"}]))
    with start_fake_openai(_happy) as server:
        assert cli(_eval_args(data, tmp_path / "out", server, bench="feabench")) == 0
    fer, aud = read_predictions(tmp_path / "out" / "predictions.jsonl")
    assert (fer["task"], fer["gt_expression"], fer["answer"]) == ("fer", "Happiness", _happy(None))
    assert (aud["task"], aud["gt_aus"], aud["au_targets"]) == ("aud", [6, 12], list(AUS))
    assert cli(["score", str(tmp_path / "out" / "predictions.jsonl"), "--out", str(tmp_path / "report")]) == 0
    (row,) = json.loads((tmp_path / "report" / "scores.json").read_text())["rows"]
    assert row["fer"]["accuracy"] == 1.0 and row["aud"]["f1"]["AU06"] == 1.0 and row["aud"]["f1"]["AU12"] == 1.0


def test_rerun_asks_nothing_already_answered(tmp_path):
    _rafdb(tmp_path / "raf", 4)
    with start_fake_openai(_happy) as server:
        assert cli(_eval_args(tmp_path / "raf", tmp_path / "out", server, "--limit", "2")) == 0
        assert server.requests.total == 2
        assert cli(_eval_args(tmp_path / "raf", tmp_path / "out", server)) == 0
        assert server.requests.total == 4
    assert len(read_predictions(tmp_path / "out" / "predictions.jsonl")) == 4


def test_chunks_then_merge_equal_one_run(tmp_path):
    _rafdb(tmp_path / "raf", 7)
    with start_fake_openai(_happy) as server:
        assert cli(_eval_args(tmp_path / "raf", tmp_path / "whole", server)) == 0
        for idx in range(3):
            assert cli(_eval_args(tmp_path / "raf", tmp_path / "split", server,
                                  "--num-chunks", "3", "--chunk-idx", str(idx))) == 0
    assert cli(["eval", "--bench", "rafdb", "--data", str(tmp_path / "raf"), "--out", str(tmp_path / "split"),
                "--num-chunks", "3", "--merge"]) == 0
    whole = read_predictions(tmp_path / "whole" / "predictions.jsonl")
    merged = read_predictions(tmp_path / "split" / "predictions.jsonl")
    assert [r["id"] for r in merged] == [f"test_{i:04d}" for i in range(1, 8)]  # item order
    assert merged == whole


def test_merge_with_an_unfinished_chunk_fails_naming_it(tmp_path, capsys):
    _rafdb(tmp_path / "raf", 6)
    with start_fake_openai(_happy) as server:
        for idx in (0, 1):
            cli(_eval_args(tmp_path / "raf", tmp_path / "split", server, "--num-chunks", "3", "--chunk-idx", str(idx)))
    code = cli(["eval", "--bench", "rafdb", "--data", str(tmp_path / "raf"), "--out", str(tmp_path / "split"),
                "--num-chunks", "3", "--merge"])
    assert code == 2
    assert "--num-chunks 3 --chunk-idx 2" in capsys.readouterr().err


def test_missing_image_stops_with_its_name_or_is_skipped_and_counted(tmp_path, capsys):
    _rafdb(tmp_path / "raf", 3, missing=(2,))
    with start_fake_openai(_happy) as server:
        assert cli(_eval_args(tmp_path / "raf", tmp_path / "out", server)) == 2  # bad input: nothing asked
        assert "test_0002_aligned.jpg" in capsys.readouterr().err
        assert server.requests.total == 0
        assert cli(_eval_args(tmp_path / "raf", tmp_path / "out", server, "--skip-missing")) == 1  # done, 1 skipped
    assert [r["id"] for r in read_predictions(tmp_path / "out" / "predictions.jsonl")] == ["test_0001", "test_0003"]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["dropped"] == {"missing image": 1}


def test_exactly_one_model_is_required(tmp_path, capsys):
    _rafdb(tmp_path / "raf", 1)
    assert cli(["eval", "--bench", "rafdb", "--data", str(tmp_path / "raf"), "--out", str(tmp_path / "o")]) == 2
    assert "exactly one model" in capsys.readouterr().err


def test_resume_after_sigkill_never_reasks_an_answered_item(tmp_path):
    by_hash = _rafdb(tmp_path / "raf", 24)
    out = tmp_path / "out"
    predictions = out / "predictions.jsonl"
    with start_fake_openai(_happy, latency=0.1) as server:
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "feallm_llava.cli", *_eval_args(tmp_path / "raf", out, server, "--concurrency", "2")],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while time.time() < deadline and (not predictions.exists() or predictions.read_text().count("\n") < 6):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        answered = {r["id"] for r in read_predictions(predictions)}
        assert 6 <= len(answered) < 24, proc.stderr.read().decode()[-2000:]
        before = server.requests.total

        assert cli(_eval_args(tmp_path / "raf", out, server)) == 0
        asked_again = [by_hash[e.image_hashes[0]] for e in server.requests.entries()[before:]]
    assert not answered & set(asked_again)
    final = [r["id"] for r in read_predictions(predictions)]
    assert sorted(final) == sorted(by_hash.values())
    assert len(final) == len(set(final))


def test_unreadable_image_stops_the_run_naming_it(tmp_path, capsys):
    _rafdb(tmp_path / "raf", 2)
    (tmp_path / "raf" / "Image" / "aligned" / "test_0002_aligned.jpg").write_bytes(b"not a jpeg")
    with start_fake_openai(_happy) as server:
        assert cli(_eval_args(tmp_path / "raf", tmp_path / "out", server)) == 2
    assert "item 'test_0002': cannot read image" in capsys.readouterr().err
    assert [r["id"] for r in read_predictions(tmp_path / "out" / "predictions.jsonl")] == ["test_0001"]
