"""predictions.jsonl: whole lines, resume, chunking and merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from feallm_llava.eval.predictions import (PREDICTIONS, PredictionWriter, answered_ids, check_same_run,
                                           chunk, merge_shards, read_predictions, shard_path)


def _rec(i: int, **kw) -> dict:
    return {"id": f"item{i}", "bench": "rafdb", "model": "m", "answer": f"answer {i}", **kw}


def test_writer_appends_and_reader_returns_lines_in_order(tmp_path):
    path = tmp_path / PREDICTIONS
    with PredictionWriter(path) as w:
        w.write(_rec(0))
    with PredictionWriter(path) as w:
        w.write(_rec(1))
    assert [r["id"] for r in read_predictions(path)] == ["item0", "item1"]


def test_torn_last_line_is_ignored_then_cut_before_the_next_append(tmp_path):
    path = tmp_path / PREDICTIONS
    path.write_text(json.dumps(_rec(0)) + "\n" + '{"id": "item1", "ans')
    assert answered_ids(read_predictions(path)) == {"item0"}
    with PredictionWriter(path) as w:
        w.write(_rec(2))
    assert [r["id"] for r in read_predictions(path)] == ["item0", "item2"]
    assert path.read_text().count("\n") == 2


def test_damaged_whole_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / PREDICTIONS
    path.write_text(json.dumps(_rec(0)) + "\nnot json\n" + json.dumps(_rec(1)) + "\n")
    with pytest.raises(ValueError, match=r"predictions.jsonl:2"):
        read_predictions(path)


_KILLED_WRITER = """
import sys, time
from feallm_llava.eval.predictions import PredictionWriter
with PredictionWriter(sys.argv[1]) as w:
    i = 0
    while True:
        w.write({"id": f"item{i}", "answer": "x" * 5000, "bench": "b", "model": "m"})
        i += 1
        if i == 50:
            print("ready", flush=True)
"""


def test_sigkill_during_writing_reads_back_whole_lines_only(tmp_path):
    # Linux lets a fatal signal cut a large write(2) short, so the file may end in a
    # torn line; the reader must ignore it and a resumed writer must cut it.
    path = tmp_path / PREDICTIONS
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data = path.read_bytes()
    records = read_predictions(path)
    assert len(records) >= 50 and len(records) == data.count(b"\n")
    assert [r["id"] for r in records] == [f"item{i}" for i in range(len(records))]
    with PredictionWriter(path) as w:  # resuming cuts a torn tail before appending
        w.write(_rec(len(records)))
    assert [r["id"] for r in read_predictions(path)] == [f"item{i}" for i in range(len(records) + 1)]


def test_resume_refuses_a_file_of_another_model(tmp_path):
    path = tmp_path / PREDICTIONS
    with PredictionWriter(path) as w:
        w.write(_rec(0))
    with pytest.raises(ValueError, match=r"model 'm' on 'rafdb' \(item 'item0'\), not of 'other'"):
        check_same_run(read_predictions(path), path, bench="rafdb", model="other")


def test_chunks_are_contiguous_and_cover_every_item_once():
    items = list(range(10))
    parts = [chunk(items, 3, i) for i in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="--chunk-idx must be in 0..2"):
        chunk(items, 3, 3)


def test_merge_joins_chunks_in_item_order(tmp_path):
    ids = [f"item{i}" for i in range(5)]
    for idx in range(2):
        with PredictionWriter(shard_path(tmp_path, 2, idx)) as w:
            for i in reversed(range(5)):
                if f"item{i}" in chunk(ids, 2, idx):
                    w.write(_rec(i))
    target = merge_shards(tmp_path, 2, ids)
    assert [r["id"] for r in read_predictions(target)] == ids


def test_merge_names_the_chunk_to_rerun_when_items_are_missing(tmp_path):
    ids = [f"item{i}" for i in range(6)]
    with PredictionWriter(shard_path(tmp_path, 3, 0)) as w:
        w.write(_rec(0))
        w.write(_rec(1))
    with PredictionWriter(shard_path(tmp_path, 3, 1)) as w:
        w.write(_rec(2))
    with PredictionWriter(shard_path(tmp_path, 3, 2)) as w:
        w.write(_rec(4))
        w.write(_rec(5))
    with pytest.raises(ValueError, match=r"1 of 6 items are unanswered.*--chunk-idx 1\b"):
        merge_shards(tmp_path, 3, ids)


def test_finished_file_is_rewritten_in_item_order(tmp_path):
    from feallm_llava.eval.predictions import sort_in_item_order

    path = tmp_path / PREDICTIONS
    with PredictionWriter(path) as w:
        for i in (2, 0, 9, 1):
            w.write(_rec(i))
    sort_in_item_order(path, ["item0", "item1", "item2"])
    assert [r["id"] for r in read_predictions(path)] == ["item0", "item1", "item2", "item9"]
