"""`feallm analyze` on videos: sampled frames, faces tracked with stable ids, rows per frame
and face written as frames finish, resume after a real SIGINT, timelines, annotated MP4,
temporal smoothing, keyframe reasoning, and bad files (truncated, empty, not a video,
variable frame rate, without faces) as error rows or messages.

The video is drawn from the synthetic FACS faces (`data.synthetic_video`): two subjects
moving towards each other's side and changing expression, one of them left out of two
frames (a missed detection the tracker must bridge), written as Motion-JPEG AVI by
OpenCV's VideoWriter. The model is a scripted backend in-process, a local
OpenAI-compatible server for the command line (its answers depend on the face crop, so a
resumed run must send exactly the crops an uninterrupted one sends), and the tiny LLaVA
checkpoint once, for the batched local runner.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feallm_llava.cli import main as cli
from feallm_llava.data.synthetic_video import Person, two_people, write_synthetic_video
from feallm_llava.data.video import Sampling, VideoReader
from feallm_llava.serve.analyze import analyze
from feallm_llava.serve.rows import COLUMNS
from feallm_llava.serve.temporal import Smoother, vote
from feallm_llava.serve.track import IouTracker, iou
from feallm_llava.testing.fake_openai import start_fake_openai
from feallm_llava.testing.video_files import truncated_copy, variable_frame_rate

FEALLM = Path(sys.executable).with_name("feallm")
FRAMES, FPS = 24, 8.0
HIDDEN = (10, 11)          # person 1 is not drawn in these frames
SUBJECTS = (7, 19)         # synthetic subjects the Haar cascade finds in every frame of this clip
EXPRESSIONS = ("Happiness", "Sadness", "Surprise", "Anger")


def _pick(data: bytes) -> int:
    return int(hashlib.sha256(data).hexdigest()[:8], 16)


def answer_for(question: str, key: int) -> str:
    """What the scripted model says about a crop (`key` derived from its pixels)."""
    if "lead to" in question:
        return f"The movements show {EXPRESSIONS[key % 4].lower()}."
    if "action units" in question:
        return "AU06 (Cheek Raiser) and AU12 (Lip Corner Puller) are active." if key % 3 else "AU04 is active."
    return f"{EXPRESSIONS[key % 4]}. The person shows it."


class Scripted:
    """An in-process backend: answers from the crop's pixels; records every query."""

    def __init__(self):
        self.queries = []

    def generate(self, items):
        self.queries += items
        return [answer_for(i.question, _pick(np.asarray(i.load_image()).tobytes())) for i in items]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return write_synthetic_video(folder / "two_faces.avi", two_people(FRAMES, subjects=SUBJECTS, hidden=((), HIDDEN)),
                                 frames=FRAMES, fps=FPS)


def person_of(row, truth) -> int:
    """The synthetic person whose face picture the row's box lies on."""
    box = tuple(int(row[k]) for k in ("face_x", "face_y", "face_w", "face_h"))
    best = max(truth, key=lambda t: iou(box, t["box"]))
    assert iou(box, best["box"]) > 0.5, (row, truth)
    return best["person"]


# ----------------------------------------------------------------------------- frames and tracks

def test_sampling_every_fps_start_and_end(clip):
    def sampled(**kw):
        with VideoReader(clip.path) as reader:
            return [(f.index, round(f.time_s, 3)) for f in reader.frames(Sampling(**kw), want_image=lambda i: False)]

    assert [i for i, _ in sampled(every=1)] == list(range(FRAMES))
    assert sampled(every=5) == [(0, 0.0), (5, 0.625), (10, 1.25), (15, 1.875), (20, 2.5)]
    assert sampled(fps=2) == [(0, 0.0), (4, 0.5), (8, 1.0), (12, 1.5), (16, 2.0), (20, 2.5)]
    assert sampled(fps=100)[:3] == [(0, 0.0), (1, 0.125), (2, 0.25)]  # above the video's rate: every frame
    assert sampled(every=2, start=1.0, end=2.0) == [(8, 1.0), (10, 1.25), (12, 1.5), (14, 1.75), (16, 2.0)]
    assert [i for i, _ in sampled()] == [0, 4, 8, 12, 16, 20]  # the default: 2 frames per second
    with pytest.raises(ValueError, match="--every or --fps"):
        Sampling(every=2, fps=3)


def test_faces_keep_their_ids_through_motion_and_a_missed_detection(clip):
    backend = Scripted()
    frame = analyze(clip.path, backend=backend, every=1, progress=False)
    rows = frame.to_dict("records")
    assert list(frame.columns) == list(COLUMNS)
    assert len(rows) == len(clip.truth) == 2 * FRAMES - len(HIDDEN)      # one row per face and frame
    assert sorted({r["frame"] for r in rows}) == list(range(FRAMES))
    assert all(abs(r["time_s"] - r["frame"] / FPS) < 1e-3 for r in rows)
    ids: dict[int, set] = {0: set(), 1: set()}
    for r in rows:
        assert r["error"] == "" and r["expression"] in EXPRESSIONS
        ids[person_of(r, clip.truth_of(r["frame"]))].add(r["face_id"])
    assert ids == {0: {0}, 1: {1}}   # one id per person, kept across the frames person 1 was missed
    assert [r["face_id"] for r in rows if r["frame"] in HIDDEN] == [0, 0]
    # keyframes (the default): reasoning where a face first appears or its expression changed
    for face_id in (0, 1):
        track = [r for r in rows if r["face_id"] == face_id]
        asked = [r["frame"] for r in track if isinstance(r["reasoning"], str)]
        changed = [b["frame"] for a, b in pairwise(track) if a["expression"] != b["expression"]]
        assert asked == [track[0]["frame"], *changed]
    questions = [q.question for q in backend.queries]
    assert questions.count("How do the facial action units in this face lead to its expression?") < len(rows)


def test_sampled_rows_and_the_reasoning_modes(clip):
    counts = {}
    for mode in ("every", "keyframes", "none"):
        backend = Scripted()
        rows = analyze(clip.path, backend=backend, every=3, reasoning=mode, progress=False).to_dict("records")
        assert sorted({r["frame"] for r in rows}) == list(range(0, FRAMES, 3))
        assert len(rows) == sum(1 for t in clip.truth if t["frame"] % 3 == 0)
        counts[mode] = sum("lead to" in q.question for q in backend.queries)
        assert len(backend.queries) == 2 * len(rows) + counts[mode]
    assert counts["every"] == len(rows) and counts["none"] == 0 and 2 <= counts["keyframes"] < len(rows)


def test_tracker_memory_velocity_and_replay():
    t = IouTracker(memory=2)
    assert t.update([(10, 10, 50, 50), (200, 10, 50, 50)]) == [0, 1]
    assert t.update([(215, 12, 50, 50), (18, 10, 50, 50)]) == [1, 0]
    assert t.update([(26, 10, 50, 50)]) == [0]              # face 1 missed once, twice: kept
    assert t.update([]) == []
    assert t.update([(42, 10, 50, 50), (245, 14, 50, 50)]) == [0, 1]
    for _ in range(3):
        t.update([])
    assert t.update([(50, 10, 50, 50)]) == [2]              # gone for more than the memory: a new id
    moving = IouTracker(memory=3)
    assert moving.update([(0, 0, 40, 40)]) == [0]
    assert moving.update([(20, 0, 40, 40)]) == [0]          # IoU 0.33: the same face, 20 px per frame
    moving.update([])
    assert moving.update([(60, 0, 40, 40)]) == [0]          # no overlap with its last box, all with the predicted
    replay = IouTracker(memory=3)                           # the same frames replayed (a resumed run)
    replay.observe([(0, 0, 40, 40)], [0])
    replay.observe([(20, 0, 40, 40)], [0])
    replay.observe([], [])
    assert replay.update([(60, 0, 40, 40), (300, 0, 40, 40)]) == [0, 1]


def test_smoothing_votes_over_a_centred_window(clip):
    assert vote(["Happiness", "Sadness", "Sadness"]) == "Sadness"
    assert vote(["Happiness", "Sadness", None]) == "Happiness"   # a tie goes to the frame nearest the centre
    assert vote([None, ""]) is None
    with pytest.raises(ValueError, match="odd"):
        Smoother(4, None, None, None)
    raw = analyze(clip.path, backend=Scripted(), every=1, progress=False)
    smooth = analyze(clip.path, backend=Scripted(), every=1, smooth=5, progress=False)
    assert smooth.attrs["smooth"]["window"] == 5 and raw.attrs["smooth"] is None
    assert len(smooth) == len(raw)
    for face_id in (0, 1):
        own = dict(zip(raw[raw.face_id == face_id].frame, raw[raw.face_id == face_id].expression))
        out = dict(zip(smooth[smooth.face_id == face_id].frame, smooth[smooth.face_id == face_id].expression))
        for frame, value in out.items():   # the window: 2 sampled frames either side, where the face is
            window = [own[f] for f in range(frame - 2, frame + 3) if f in own]
            assert window.count(value) == max(window.count(v) for v in window)
        assert _flips(own.values()) > _flips(out.values())
    assert list(smooth.raw_answer_fer) == list(raw.raw_answer_fer)   # the frames' own answers stay


def _flips(values) -> int:
    return sum(a != b for a, b in pairwise(values))


# ----------------------------------------------------------------------------- the command line

def _responder(req) -> str:
    return answer_for(req.text, _pick(req.image_hashes[0].encode()) if req.image_hashes else 0)


@pytest.fixture()
def server():
    with start_fake_openai(_responder, latency=0.02) as fake:
        yield fake


def command(inputs, out: Path, server, *extra: str) -> list[str]:
    return [str(FEALLM), "analyze", *map(str, inputs), "--openai-model", "feallm", "--base-url", server.base_url,
            "--concurrency", "1", "--batch-size", "2", "--out", str(out), "--no-progress", *extra]


def read_rows(out: Path) -> list[dict]:
    with out.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _env() -> dict:
    return {**os.environ, "OPENAI_API_KEY": "test"}


def test_interrupted_video_resumes_after_its_last_finished_frame(clip, server, tmp_path):
    reference = tmp_path / "reference.csv"
    whole = subprocess.run(command([clip.path], reference, server, "--every", "1", "--smooth", "3"),
                           capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert whole.returncode == 0, whole.stderr
    expected = read_rows(reference)
    assert len(expected) == len(clip.truth)

    out = tmp_path / "results.csv"
    cmd = command([clip.path], out, server, "--every", "1", "--smooth", "3", "--timeline", tmp_path / "timeline")
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not out.is_file() or len(read_rows(out)) < 12:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    kept = read_rows(out)
    frames = sorted({int(r["frame"]) for r in kept})
    assert 12 <= len(kept) < len(expected) and frames == list(range(len(frames)))   # whole frames, in order
    assert kept == expected[:len(kept)]
    assert sorted((tmp_path / "timeline").glob("*.png"))   # the partial timelines of what was done
    before = server.requests.total

    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert f"continues after frame {frames[-1]}" in again.stderr
    rows = read_rows(out)
    assert rows == expected   # ids, keyframes and smoothing as if never interrupted
    asked = [e for e in server.requests.entries()[before:] if "expression in this face" in e.text]
    assert len(asked) == sum(int(r["frame"]) > frames[-1] for r in expected)   # nothing kept is asked again
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["finished"] == [str(clip.path)] and meta["smooth"]["window"] == 3
    assert meta["sampling"]["every"] == 1 and meta["videos"][str(clip.path)]["sampled_frames"] == FRAMES
    timelines = sorted(p.name for p in (tmp_path / "timeline").glob("*.png"))
    assert timelines == ["two_faces_face0.png", "two_faces_face1.png"]
    for name in timelines:
        with Image.open(tmp_path / "timeline" / name) as png:
            assert png.format == "PNG" and png.width > 300

    third = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert third.returncode == 0 and read_rows(out) == expected and f"{clip.path}: finished" in third.stderr
    changed = subprocess.run(command([clip.path], out, server, "--every", "2", "--resume"),
                             capture_output=True, text=True, env=_env(), timeout=300, check=False)
    assert changed.returncode == 2 and "--every / --fps" in changed.stderr


def test_truncated_copy_keeps_the_frames_before_the_cut_and_ends_with_an_error_row(clip, server, tmp_path, capsys):
    cut = truncated_copy(clip.path, tmp_path / "cut.avi", 0.6)
    out = tmp_path / "cut.jsonl"
    code = cli(["analyze", str(cut), "--every", "1", "--openai-model", "feallm", "--base-url", server.base_url,
                "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    *frames, last = rows
    assert last["frame"] is None and last["face_id"] is None
    assert "truncated or damaged video" in last["error"] and "sampled frame(s) before it are kept" in last["error"]
    kept = sorted({r["frame"] for r in frames})
    assert 8 <= len(kept) < FRAMES and kept == list(range(len(kept)))
    assert all(r["error"] == "" and r["expression"] for r in frames)
    assert "truncated or damaged video" in err


def test_bad_videos_are_error_rows_and_nothing_else_is_lost(clip, server, tmp_path, capsys):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mkv").write_bytes(os.urandom(4000))
    good = write_synthetic_video(tmp_path / "good.mp4", two_people(8, subjects=SUBJECTS), frames=8, fps=FPS)
    truncated_copy(good.path, tmp_path / "cut.mp4", 0.5)
    Image.new("RGB", (64, 64), (90, 120, 150)).save(tmp_path / "photo.png")
    names = ["empty.mp4", "junk.mkv", "cut.mp4", "good.mp4", "photo.png", "missing.webm"]
    out = tmp_path / "r.csv"
    code = cli(["analyze", *[str(tmp_path / n) for n in names], "--every", "4", "--openai-model", "feallm",
                "--base-url", server.base_url, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1, err
    rows = read_rows(out)
    by_input = {n: [r for r in rows if r["input"].endswith(n)] for n in names}
    assert "empty file (0 bytes)" in by_input["empty.mp4"][0]["error"]
    assert "not a video" in by_input["junk.mkv"][0]["error"]
    assert "truncated MP4" in by_input["cut.mp4"][0]["error"] and "moov" in by_input["cut.mp4"][0]["error"]
    assert "no such file" in by_input["missing.webm"][0]["error"]
    for name in ("empty.mp4", "junk.mkv", "cut.mp4", "missing.webm"):
        (row,) = by_input[name]
        assert row["frame"] == "" and row["error"].startswith("bad video:")
    assert [r["frame"] for r in by_input["good.mp4"]] == ["0", "0", "4", "4"]
    assert [(r["frame"], r["time_s"], r["face_id"]) for r in by_input["photo.png"]] == [("0", "0.0", "")]


def test_a_video_without_faces_says_so_and_exits_0(server, tmp_path, capsys):
    import cv2

    path = tmp_path / "empty_room.avi"
    writer = cv2.VideoWriter(str(path), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (160, 120))
    for k in range(10):
        writer.write(np.full((120, 160, 3), 60 + 10 * k, np.uint8))
    writer.release()
    out = tmp_path / "r.csv"
    code = cli(["analyze", str(path), "--every", "2", "--openai-model", "feallm", "--base-url", server.base_url,
                "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    rows = read_rows(out)
    assert [(r["frame"], r["face_id"], r["error"]) for r in rows] == [(str(f), "", "") for f in range(0, 10, 2)]
    assert "no face in any of its 5 sampled frame(s)" in err
    assert server.requests.total == 0


def test_a_variable_frame_rate_file_gets_its_own_times(clip, tmp_path, capsys):
    good = write_synthetic_video(tmp_path / "cfr.mp4", [Person(SUBJECTS[0], (40, 40), (80, 60))], frames=12, fps=10.0)
    vfr = variable_frame_rate(good.path, tmp_path / "vfr.mp4", [1, 3])  # frames of 100 and 300 ms in turn
    with VideoReader(vfr) as reader:
        times = [round(f.time_s, 3) for f in reader.frames(Sampling(every=1), want_image=lambda i: False)]
    assert times == [0.0, 0.1, 0.4, 0.5, 0.8, 0.9, 1.2, 1.3, 1.6, 1.7, 2.0, 2.1]
    frame = analyze(vfr, backend=Scripted(), fps=2.5, progress=False)
    assert list(frame.frame) == [0, 2, 4, 6, 8, 10] and list(frame.time_s) == [0.0, 0.4, 0.8, 1.2, 1.6, 2.0]
    assert "variable frame rate" in frame.attrs["videos"][str(vfr)]["notes"][0]
    assert "variable frame rate" in capsys.readouterr().err


def test_annotate_writes_an_mp4_of_the_sampled_frames(clip, tmp_path):
    out = tmp_path / "annotated.mp4"
    frame = analyze(clip.path, backend=Scripted(), every=4, annotate=out, progress=False, note="synthetic faces")
    with VideoReader(out) as reader:
        pictures = list(reader.frames(Sampling(every=1)))
        assert reader.info.fps == pytest.approx(FPS / 4)
    assert [p.index for p in pictures] == list(range(FRAMES // 4))
    first = np.asarray(pictures[0].image).astype(int)
    x, y, _w, h = (int(frame.iloc[0][k]) for k in ("face_x", "face_y", "face_w", "face_h"))
    assert np.abs(first[y + h // 2, x + 1] - (255, 64, 64)).max() < 60   # face 0's box, in its colour
    assert pictures[0].image.height > 240                                  # the note's band below
    with pytest.raises(ValueError, match=r"\.mp4"):
        analyze(clip.path, backend=Scripted(), every=4, annotate=tmp_path / "one.png", progress=False)


def test_the_local_llava_runner_batches_across_frames(clip, kit, tmp_path_factory):
    """The LLaVA backend (the tiny untrained checkpoint: plumbing only) answers a video's
    faces in batches across frames, the same answers as one query at a time."""
    import torch

    from feallm_llava.serve.analyze import load_backend
    from feallm_llava.tinykit import build_llava

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        checkpoint = build_llava(tmp_path_factory.mktemp("ckpt") / "feallm-llava-v1-tiny", kit)
        backend = load_backend(str(checkpoint), device="cpu", max_new_tokens=4)
        one = analyze(clip.path, backend=backend, every=8, batch_size=1, reasoning="none", progress=False)
        many = analyze(clip.path, backend=backend, every=8, batch_size=6, reasoning="none", progress=False)
    finally:
        torch.set_num_threads(before)
    assert len(one) == sum(1 for t in clip.truth if t["frame"] % 8 == 0)
    cols = ["frame", "face_id", "raw_answer_fer", "raw_answer_aud"]
    assert one[cols].astype(str).values.tolist() == many[cols].astype(str).values.tolist()
    assert all(isinstance(a, str) for a in many.raw_answer_aud)
