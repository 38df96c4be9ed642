"""`feallm analyze`: per-face expression, action units and reasoning for photos and videos.

    feallm analyze INPUT... --model-path P [--model-base B] [--out results.csv|.jsonl|.json]
                   [--resume] [--device cpu|cuda] [--no-detect] [--require-face]
                   [--annotate out.png|out.mp4|DIR] [--batch-size N]
                   [--every N | --fps F] [--start S] [--end S] [--reasoning every|keyframes|none]
                   [--smooth K] [--timeline DIR]
    feallm analyze INPUT... --openai-model NAME --base-url URL ...

One code path for both kinds of input: a photo is a video of one frame (frame 0 at 0 s).
For each sampled frame: decode it safely (`data.images.load_rgb`: corrupt, empty,
non-image, tiny and decompression-bomb files become an error row; `data.video`: empty,
unreadable and truncated videos likewise, the frames decoded before a cut kept), find the
faces (`serve.detect`, OpenCV's Haar cascade, offline), give each the id of its track
(`serve.track`: IoU tracking across a video's frames, a short memory for missed
detections; a photo's faces are 0, 1, ... left to right), crop each with a margin to a
square, and ask the model the FEALLM questions (paper section 3.2: emotion summary = FER,
facial movement description = AUD, emotion reasoning), batched across faces and frames.
The answers are read with the evaluation parser (`facs.parse`), so `feallm analyze` and
`feallm score` agree on what a text means.

Reasoning (`--reasoning`): `every` face of every frame; `keyframes` (the default) when a
face first appears and whenever its expression differs from the last one read for it, so
a photo's faces all get it (each is new) while a video pays for the longest answer only
where the reading changes; `none`. Where it was not asked, `reasoning` is empty.

One row per face and frame, Py-Feat / LibreFace style (`COLUMNS`): the frame number and
its time in seconds (0 and 0.0 for a photo; empty in a row about the whole input, such as
a file that cannot be read), the face's track id, its box in frame pixels, the expression
(one of `labels.EXPRESSIONS`, empty when the answer names none), `AU01` ... `AU26` as 1/0
(empty when the AUD answer mentions no AU at all: unknown, not absent), the reasoning
text, the raw answers, and `error`. A frame without a face gives one row with an empty
`face_id` (an error row with `--require-face`). `--no-detect` treats every frame as an
aligned face crop (the paper's setting): one face, the whole frame. `--smooth K` replaces
a face's expression and AUs by their vote over K sampled frames (`serve.temporal`;
stated in OUT.meta.json; the raw answers stay the frame's own). One bad file never stops
the run: it gets a row whose `error` says what was wrong.

Rows are written as each frame finishes (`serve.results_file`): an interrupted run keeps
them, and `--resume` continues: photos not yet in `--out`, and each video from the frame
after its last finished one, its tracks (and smoothing window, and keyframe state)
rebuilt from the rows already written. `--annotate` draws boxes and labels (a PNG per
photo, an MP4 of the sampled frames per video), `--timeline DIR` one PNG per face of a
video (`serve.timeline`).

Python: `analyze(["photo.jpg", "clip.mp4"], model_path=...)` returns a pandas DataFrame
(a list of dicts when pandas is not installed).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from feallm_llava.data.video import VIDEO_SUFFIXES, Sampling, VideoError, VideoInfo, is_video
from feallm_llava.errors import EXIT_ITEMS_FAILED, UsageError
from feallm_llava.facs.labels import AUS, au_key
from feallm_llava.serve.results_file import ResultsFile

AU_COLUMNS: tuple[str, ...] = tuple(au_key(au) for au in AUS)  # AU01 ... AU26 (labels.AUS order)
BOX_COLUMNS = ("face_x", "face_y", "face_w", "face_h")
COLUMNS: tuple[str, ...] = (
    "input", "frame", "time_s", "face_id", *BOX_COLUMNS, "expression", *AU_COLUMNS, "reasoning",
    "raw_answer_fer", "raw_answer_aud", "raw_answer_reasoning", "error",
)
INT_COLUMNS = ("frame", "face_id", *BOX_COLUMNS, *AU_COLUMNS)
SMOOTHED_COLUMNS = ("expression", *AU_COLUMNS)

# Paper section 3.2 gives the first two verbatim as its examples of the emotion-summary and
# facial-movement instructions; the reasoning question is the first of our reasoning
# templates (resources/templates/reasoning.json). All three are overridable.
DEFAULT_QUESTIONS = {
    "fer": "Please describe the expression in this face.",
    "aud": "Please describe the action units in this face.",
    "reasoning": "How do the facial action units in this face lead to its expression?",
}
TASKS = tuple(DEFAULT_QUESTIONS)  # fer, aud, reasoning: up to three answers per face
REASONING = ("every", "keyframes", "none")
DEFAULT_REASONING = "keyframes"

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm", ".pbm", ".jp2", ".jfif"})

DEFAULT_MARGIN = 0.25     # x the box side on every side: brows, chin and jaw stay in the crop
DEFAULT_TRACK_MEMORY = 1.0  # seconds a track survives without a detection
DEFAULT_TRACK_IOU = 0.3
_MAX_PENDING_FRAMES = 64  # frames held for one batch at most (frames without faces ask nothing)


# ----------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Source:
    """One input: an image or video file, or an in-memory image passed to the Python API."""

    label: str                      # the `input` column
    path: Path | None = None
    image: Image.Image | None = None

    @property
    def video(self) -> bool:
        return self.path is not None and is_video(self.path)


def expand_inputs(inputs: Iterable[str | os.PathLike | Image.Image]) -> tuple[list[Source], list[str]]:
    """Files as given (in order), directories as their image and video files (recursive, sorted).

    Returns (sources, notes): a directory's files with neither an image nor a video suffix
    are skipped and counted in `notes`; a path that does not exist stays a source (it gets
    an error row: the user named it).
    """
    sources: list[Source] = []
    notes: list[str] = []
    media = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    for i, item in enumerate(inputs):
        if isinstance(item, Image.Image):
            sources.append(Source(f"<image {i}>", image=item))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            found = [p for p in files if p.suffix.lower() in media]
            if len(files) > len(found):
                notes.append(f"{path}: skipped {len(files) - len(found)} file(s) without an image or video suffix")
            if not found:
                notes.append(f"{path}: directory holds no image or video files")
            sources.extend(Source(str(p), path=p) for p in found)
        else:
            sources.append(Source(str(path), path=path))
    return sources, notes


# ----------------------------------------------------------------------------- rows

def empty_row(label: str, frame: int | None = None, time_s: float | None = None) -> dict:
    row = {c: None for c in COLUMNS}
    row.update(input=label, frame=frame, time_s=time_s, error="")
    return row


@dataclass
class _Face:
    """A face waiting for its answers: the row it fills, the square crop the model sees and
    the questions it gets."""

    row: dict
    crop: Image.Image
    tasks: tuple[str, ...]
    answers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Failed:
    """A query the model could not answer, and why."""

    message: str


@dataclass(frozen=True)
class _Query:
    """One question about one face crop (an `inference.Query`)."""

    id: str
    image: Image.Image
    question: str

    def load_image(self) -> Image.Image:
        return self.image


def fill_answers(row: dict, answers: dict[str, str]) -> None:
    """Parse the answers there are into the row's expression, AU and reasoning columns."""
    from feallm_llava.facs.parse import parse

    for task in TASKS:
        row[f"raw_answer_{task}"] = answers.get(task)
    if "fer" in answers:
        row["expression"] = parse(answers["fer"]).expression or ""
    if "aud" in answers:
        aud = parse(answers["aud"], targets=AUS)
        for au, col in zip(AUS, AU_COLUMNS):
            # an AUD answer that mentions no AU (and does not say "no AUs") leaves them unknown
            row[col] = int(au in aud.aus) if aud.aus_answered else None
    if "reasoning" in answers:
        row["reasoning"] = answers["reasoning"].strip()


def _int(value) -> int | None:
    try:
        return None if value is None or value == "" else int(float(value))
    except (TypeError, ValueError):
        return None


def typed_row(row: dict) -> dict:
    """A row read back from a results file (CSV: every cell a string) with `COLUMNS` and
    the values `analyze` writes: ints, a float time, None for empty cells."""
    out = {c: row.get(c) for c in COLUMNS}
    for c in INT_COLUMNS:
        out[c] = _int(out[c])
    try:
        out["time_s"] = None if out["time_s"] in (None, "") else float(out["time_s"])
    except (TypeError, ValueError):
        out["time_s"] = None
    for task in TASKS:
        out[f"raw_answer_{task}"] = out[f"raw_answer_{task}"] or None
    out["error"] = out["error"] or ""
    return out


def own_readings(row: dict) -> dict:
    """What a row's own answers say (expression and AUs), re-read from its raw answers:
    the values smoothing votes over, whatever the row's (smoothed) columns hold."""
    answers = {t: row[f"raw_answer_{t}"] for t in ("fer", "aud") if row.get(f"raw_answer_{t}") is not None}
    fresh = dict.fromkeys(SMOOTHED_COLUMNS)
    fill_answers(fresh, answers)
    return {c: fresh[c] for c in SMOOTHED_COLUMNS}


# ----------------------------------------------------------------------------- frames

@dataclass
class FrameResult:
    """One sampled frame of one input (a photo: its only frame) and its rows, or a row about
    the whole input (frame None). `resumed`: its rows come from the --out being resumed
    (written before, not asked again). `last`: the input's last result; `stream.notes`
    and `stream.info` then say what reading a video found."""

    source: Source
    frame: int | None
    time_s: float | None
    image: Image.Image | None
    rows: list[dict]
    stream: _Stream
    faces: list[_Face] = field(default_factory=list)
    resumed: bool = False
    last: bool = False
    readings: dict[int, dict] = field(default_factory=dict)   # face_id -> own values, for smoothing


class _Stream:
    """Per-input state carried from frame to frame: the tracker, the last expression read for
    each track (keyframes), the smoothing window, what the video reader noted."""

    def __init__(self, source: Source, analyzer: Analyzer):
        from feallm_llava.serve.temporal import Smoother
        from feallm_llava.serve.track import IouTracker

        self.source = source
        self.tracker = IouTracker(analyzer.track_iou, memory=5)
        self.last_expression: dict[int, str] = {}
        self.smoother: Smoother[FrameResult] = Smoother(
            analyzer.smooth, readings=lambda u: u.readings, apply=_apply_smoothed, resumed=lambda u: u.resumed)
        self.info: VideoInfo | None = None
        self.notes: list[str] = []
        self.sampled = 0          # frames yielded (resumed ones included)
        self.faces = 0            # face rows over those frames

    def set_memory(self, seconds: float, sampling: Sampling, info: VideoInfo | None) -> None:
        interval = sampling.interval(info.fps if info else None)
        self.tracker.memory = round(seconds / interval) if interval else 5


def _apply_smoothed(unit: FrameResult, smoothed: dict[int, dict]) -> None:
    for row in unit.rows:
        if row["face_id"] in smoothed:
            row.update(smoothed[row["face_id"]])


def _marking_last(units: Iterator[FrameResult]) -> Iterator[FrameResult]:
    """`units` with the last one's `last` set (one unit of lookahead)."""
    previous = None
    for unit in units:
        if previous is not None:
            yield previous
        previous = unit
    if previous is not None:
        previous.last = True
        yield previous


# ----------------------------------------------------------------------------- analysis

class Analyzer:
    """Decode, detect, track, crop, ask, parse. Holds the model (a `LlavaBackend` or anything
    with its `generate(items) -> list[str]`) so that several runs share one load."""

    def __init__(self, backend, *, detect: bool = True, require_face: bool = False,
                 margin: float = DEFAULT_MARGIN, batch_size: int = 8,
                 questions: dict[str, str] | None = None, detect_kwargs: dict | None = None,
                 reasoning: str = DEFAULT_REASONING, smooth: int = 0, sampling: Sampling | None = None,
                 track_memory: float = DEFAULT_TRACK_MEMORY, track_iou: float = DEFAULT_TRACK_IOU):
        from feallm_llava.serve.temporal import Smoother
        from feallm_llava.serve.track import IouTracker

        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        if margin < 0:
            raise ValueError(f"--margin must be >= 0, got {margin}")
        if reasoning not in REASONING:
            raise ValueError(f"--reasoning must be one of {', '.join(REASONING)}, got {reasoning!r}")
        if track_memory < 0:
            raise ValueError(f"--track-memory must be >= 0 seconds, got {track_memory}")
        Smoother(smooth, None, None, None)  # checks the window
        IouTracker(track_iou)               # checks the threshold
        self.backend = backend
        self.detect = detect
        self.require_face = require_face
        self.margin = margin
        self.batch_size = batch_size
        self.questions = {**DEFAULT_QUESTIONS, **(questions or {})}
        unknown = set(self.questions) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown question kind(s) {sorted(unknown)}; use {', '.join(TASKS)}")
        self.detect_kwargs = detect_kwargs or {}
        self.reasoning = reasoning
        self.smooth = smooth
        self.sampling = sampling or Sampling()
        self.track_memory = track_memory
        self.track_iou = track_iou

    def settings(self) -> dict:
        """What shapes the rows, for OUT.meta.json and the DataFrame's attrs."""
        return {
            "questions": self.questions, "detect": self.detect, "margin": self.margin,
            "reasoning": self.reasoning, "sampling": self.sampling.as_dict(),
            "tracking": {"method": "IoU", "min_iou": self.track_iou, "memory_s": self.track_memory},
            "smooth": None if self.smooth <= 1 else {
                "window": self.smooth, "columns": list(SMOOTHED_COLUMNS),
                "method": "per face, centred window of sampled frames: the most frequent expression, "
                          "the majority of each AU (ties: the frame nearest the centre); raw_answer_* "
                          "are the frame's own"},
        }

    # -- one frame -> its face rows (answers pending) --------------------------------
    def _frame(self, stream: _Stream, img: Image.Image, frame: int, time_s: float, keep_image: bool) -> FrameResult:
        from feallm_llava.serve.detect import FaceBox, crop_face, detect_faces

        stream.sampled += 1
        label = stream.source.label
        row = empty_row(label, frame, time_s)
        if self.detect:
            boxes = detect_faces(img, **self.detect_kwargs)
        else:  # an aligned face crop: the whole frame is the face (the model's own `pad` squares it)
            boxes = [FaceBox(0, 0, img.width, img.height, 0.0)]
        known = stream.tracker.next_id
        ids = stream.tracker.update(boxes)
        kept = img if keep_image else None
        if not boxes:
            if self.require_face:
                row["error"] = "no face found (--require-face)"
            return FrameResult(stream.source, frame, time_s, kept, [row], stream)
        rows, faces = [], []
        for face_id, box in sorted(zip(ids, boxes), key=lambda p: p[0]):
            r = empty_row(label, frame, time_s)
            r.update(face_id=face_id, face_x=box.x, face_y=box.y, face_w=box.w, face_h=box.h)
            rows.append(r)
            crop = crop_face(img, box, self.margin) if self.detect else img
            faces.append(_Face(r, crop, self._tasks(face_id >= known)))
        return FrameResult(stream.source, frame, time_s, kept, rows, stream, faces=faces)

    def _tasks(self, new_track: bool) -> tuple[str, ...]:
        if self.reasoning == "every" or (self.reasoning == "keyframes" and new_track):
            return TASKS
        return ("fer", "aud")   # keyframes: a known face's reasoning waits for its expression

    def _error(self, stream: _Stream, message: str) -> FrameResult:
        row = empty_row(stream.source.label)
        row["error"] = message
        return FrameResult(stream.source, None, None, None, [row], stream)

    # -- one input -> its frames -----------------------------------------------------
    def _units(self, source: Source, before: list[dict] | None, keep_images: bool) -> Iterator[FrameResult]:
        stream = _Stream(source, self)
        if not source.video:
            yield from self._image_units(stream, keep_images)
            return
        from feallm_llava.data.video import VideoReader

        done: dict[int, list[dict]] = {}
        for row in before or []:
            if row["frame"] is not None:
                done.setdefault(row["frame"], []).append(row)
        try:
            reader = VideoReader(source.path)
        except VideoError as err:
            yield self._error(stream, f"bad video: {err.reason}")
            return
        except OSError as err:
            yield self._error(stream, f"cannot read video: {type(err).__name__}: {err}")
            return
        with reader:
            stream.info = reader.info
            stream.set_memory(self.track_memory, self.sampling, reader.info)
            frames = reader.frames(self.sampling, want_image=lambda i: i not in done or keep_images)
            try:
                for vf in frames:
                    if vf.index in done:
                        yield self._resumed(stream, vf.index, vf.image, done[vf.index])
                    else:
                        yield self._frame(stream, vf.image, vf.index, round(vf.time_s, 4), keep_images)
            except VideoError as err:
                kept = f"; the {stream.sampled} sampled frame(s) before it are kept" if stream.sampled else ""
                yield self._error(stream, f"bad video: {err.reason}{kept}")
            except OSError as err:
                yield self._error(stream, f"cannot read video: {type(err).__name__}: {err}")
            else:
                if stream.sampled == 0:
                    span = f" between {self.sampling.start} s and {self.sampling.end} s" if self.sampling.end else (
                        f" at or after --start {self.sampling.start} s" if self.sampling.start else "")
                    yield self._error(stream, f"no frame sampled{span} (the video decodes {reader.frames_decoded} "
                                              f"frame(s))")
            finally:
                stream.notes.extend(reader.notes)

    def _image_units(self, stream: _Stream, keep_image: bool) -> Iterator[FrameResult]:
        from feallm_llava.data.images import ImageError, load_rgb

        source = stream.source
        try:
            img = source.image.convert("RGB") if source.image is not None else load_rgb(source.path)
        except ImageError as err:
            yield self._error(stream, f"bad image: {err.reason}")
            return
        except OSError as err:  # unreadable file (permissions, I/O)
            yield self._error(stream, f"cannot read image: {type(err).__name__}: {err}")
            return
        yield self._frame(stream, img, 0, 0.0, keep_image)

    def _resumed(self, stream: _Stream, frame: int, img, rows: list[dict]) -> FrameResult:
        """A frame finished by the run being resumed: its rows replayed into the tracker and
        the keyframe state, its own readings re-read for the smoothing window."""
        stream.sampled += 1
        faces = [r for r in rows if r["face_id"] is not None]
        stream.tracker.observe([tuple(r[c] for c in BOX_COLUMNS) for r in faces], [r["face_id"] for r in faces])
        unit = FrameResult(stream.source, frame, rows[0]["time_s"], img, rows, stream, resumed=True)
        unit.readings = {r["face_id"]: own_readings(r) for r in faces}
        return unit

    # -- batched answers ---------------------------------------------------------
    def _answer(self, faces: list[_Face], tasks: Sequence[str] = TASKS) -> None:
        """Ask every pending face its questions, `batch_size` queries per generate call; one
        task after the other, so a batch holds prompts of one length (no padding)."""
        jobs = [(face, task) for task in tasks for face in faces if task in face.tasks]
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            for (face, task), answer in zip(chunk, self._generate(chunk)):
                if isinstance(answer, _Failed):
                    face.row["error"] = face.row["error"] or answer.message
                else:
                    face.answers[task] = answer

    def _generate(self, chunk: list[tuple[_Face, str]]) -> list[str | _Failed]:
        queries = [_Query(_query_id(face.row, task), face.crop, self.questions[task]) for face, task in chunk]
        try:
            return list(self.backend.generate(queries))
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            if len(queries) == 1:
                task = chunk[0][1]
                return [_Failed(f"generation failed ({task} question): {type(err).__name__}: {err}")]
        # a failing batch: ask one at a time, so only the face that fails gets the error
        out: list = []
        for item in chunk:
            out.extend(self._generate([item]))
        return out

    def _keyframes(self, pending: list[FrameResult]) -> list[_Face]:
        """In frame order: the faces whose expression changed since the last one read for
        their track (their reasoning is asked next); updates each input's state."""
        out = []
        for unit in pending:
            last = unit.stream.last_expression
            if unit.resumed:
                for face_id, own in unit.readings.items():
                    last[face_id] = own["expression"] or last.get(face_id, "")
                continue
            for face in unit.faces:
                face_id, expression = face.row["face_id"], face.row["expression"] or ""
                if "reasoning" not in face.tasks and expression and last.get(face_id) not in ("", None, expression):
                    face.tasks += ("reasoning",)
                    out.append(face)
                if expression or face_id not in last:
                    last[face_id] = expression
        return out

    # -- many inputs -------------------------------------------------------------
    def iter_frames(self, sources: Sequence[Source], *, progress: bool = True,
                    resume: dict[str, list[dict]] | None = None, finished: Iterable[str] = (),
                    keep_images: bool = False) -> Iterator[FrameResult]:
        """Every input's frames in order, each once its rows are complete. Faces are collected
        across frames and inputs until a batch of queries per question is pending.

        resume: rows already written per input (`typed_row`s): a photo with rows is skipped,
        a video continues after them (its rows come back as `resumed` results, with their
        images decoded only when `keep_images`); `finished` inputs are skipped entirely.
        """
        from tqdm.auto import tqdm

        resume, finished = resume or {}, set(finished)
        pending: list[FrameResult] = []
        n_faces = 0
        videos = any(s.video for s in sources)
        bar = tqdm(total=None if videos else len(sources), desc="analyze", unit="frame" if videos else "img",
                   disable=not progress)
        try:
            for source in sources:
                before = resume.get(source.label)
                if before and (not source.video or source.label in finished
                               or any(r["frame"] is None for r in before)):
                    continue   # done: a photo with rows, a video that ended (or failed) in the run resumed
                for unit in _marking_last(self._units(source, before, keep_images)):
                    pending.append(unit)
                    n_faces += len(unit.faces)
                    if n_faces >= self.batch_size or len(pending) >= _MAX_PENDING_FRAMES:
                        yield from self._flush(pending, bar)
                        pending, n_faces = [], 0
            yield from self._flush(pending, bar)
        finally:
            bar.close()

    def _flush(self, pending: list[FrameResult], bar) -> Iterator[FrameResult]:
        fresh = [face for unit in pending if not unit.resumed for face in unit.faces]
        self._answer(fresh)
        for face in fresh:
            fill_answers(face.row, face.answers)
        if self.reasoning == "keyframes":
            changed = self._keyframes(pending)
            self._answer(changed, ("reasoning",))
            for face in changed:
                fill_answers(face.row, face.answers)
        for unit in pending:
            if not unit.resumed:
                unit.readings = {f.row["face_id"]: {c: f.row[c] for c in SMOOTHED_COLUMNS} for f in unit.faces}
            unit.faces = []   # crops are no longer needed
            ready = unit.stream.smoother.push(unit)
            if unit.last:
                ready += unit.stream.smoother.finish()
            for done in ready:
                done.stream.faces += sum(r["face_id"] is not None for r in done.rows)
                bar.update(1)
                yield done

    def iter_rows(self, sources: Sequence[Source], *, progress: bool = True, on_image=None) -> Iterator[dict]:
        """Every row, in input order. `on_image(source, img, rows)` is called for each decoded
        frame (a photo's picture) with its rows."""
        for result in self.iter_frames(sources, progress=progress, keep_images=on_image is not None):
            if on_image is not None and result.image is not None:
                on_image(result.source, result.image, result.rows)
            yield from result.rows


def _query_id(row: dict, task: str) -> str:
    frame = f" frame {row['frame']}" if row["frame"] else ""
    return f"{row['input']}{frame} face {row['face_id']} ({task})"


def load_backend(model_path: str | None = None, model_base: str | None = None, *, device: str = "cpu",
                 dtype: str | None = None, conv_mode: str | None = None, max_new_tokens: int = 256,
                 openai_model: str | None = None, base_url: str | None = None, concurrency: int = 8):
    """A LLaVA checkpoint (`model_path`), or an OpenAI-compatible server (`openai_model`,
    `base_url`; the key from OPENAI_API_KEY)."""
    if (model_path is None) == (openai_model is None):
        raise UsageError("give exactly one model: --model-path (a LLaVA checkpoint) or --openai-model "
                         "(an OpenAI-compatible server, with --base-url)")
    if openai_model is not None:
        from feallm_llava.inference.openai_client import OpenAIBackend

        return OpenAIBackend(openai_model, base_url=base_url, concurrency=concurrency,
                             max_new_tokens=max_new_tokens)
    from feallm_llava.inference.llava_runner import LlavaBackend

    return LlavaBackend(model_path, model_base, conv_mode=conv_mode, device=device, dtype=dtype,
                        max_new_tokens=max_new_tokens)


def to_frame(rows: list[dict]):
    """A pandas DataFrame with `COLUMNS` (nullable integer frame, id, box and AU columns,
    float time), or the rows."""
    try:
        import pandas as pd
    except ImportError:
        return rows
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in INT_COLUMNS:
        frame[col] = frame[col].astype("Int64")
    frame["time_s"] = frame["time_s"].astype("Float64")
    return frame


# ----------------------------------------------------------------------------- a run

class Run:
    """One analysis with its outputs: rows to a results file (or stdout, or a list), the
    annotations and timelines, the tally. Shared by the command and `analyze()`."""

    def __init__(self, analyzer: Analyzer, sources: Sequence[Source], *, results: ResultsFile | None = None,
                 stdout: bool = False, collect: bool = False, annotate=None, timeline=None,
                 note: str | None = None, finished: Iterable[str] = ()):
        from feallm_llava.serve.sinks import Annotations, Timelines

        self.analyzer, self.sources, self.results = analyzer, sources, results
        self.rows: list[dict] | None = [] if collect else None
        self.annotations = Annotations(annotate, sources, note, analyzer.sampling) if annotate else None
        self.timelines = Timelines(timeline, sources, analyzer.settings()["smooth"]) if timeline else None
        self.tally = Tally()
        self.finished = set(finished)
        self.videos: dict[str, dict] = {}
        self.stdout = csv.DictWriter(sys.stdout, fieldnames=list(COLUMNS)) if stdout else None

    def run(self, *, progress: bool = True, resume: dict[str, list[dict]] | None = None) -> None:
        if self.stdout is not None:
            self.stdout.writeheader()
        try:
            for result in self.analyzer.iter_frames(self.sources, progress=progress, resume=resume,
                                                    finished=self.finished, keep_images=self.annotations is not None):
                self._take(result)
        finally:
            if self.annotations is not None:
                self.annotations.close()
            if self.timelines is not None:
                self.timelines.close()

    def _take(self, result: FrameResult) -> None:
        if not result.resumed:
            rows = plain_rows(result.rows)
            if self.results is not None:
                self.results.add(rows)
            if self.stdout is not None:
                self.stdout.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
                sys.stdout.flush()
            if self.rows is not None:
                self.rows.extend(result.rows)
            self.tally.add(rows)
        if self.annotations is not None:
            self.annotations.add(result)
        if self.timelines is not None:
            self.timelines.add(result)
        if result.last:
            self.tally.end(result)
            if result.source.video:
                self.finished.add(result.source.label)
                info = result.stream.info
                self.videos[result.source.label] = {
                    "fps": info.fps if info else None, "frames_declared": info.frame_count if info else None,
                    "codec": info.codec if info else None, "sampled_frames": result.stream.sampled,
                    "face_rows": result.stream.faces, "notes": result.stream.notes}
            for note in result.stream.notes:
                print(f"note: {result.source.label}: {note}", file=sys.stderr)


def analyze(inputs: Iterable[str | os.PathLike | Image.Image] | str | os.PathLike, *,
            model_path: str | None = None, model_base: str | None = None, device: str = "cpu",
            detect: bool = True, require_face: bool = False, batch_size: int = 8,
            margin: float = DEFAULT_MARGIN, max_new_tokens: int = 256, dtype: str | None = None,
            conv_mode: str | None = None, questions: dict[str, str] | None = None,
            backend=None, annotate: str | os.PathLike | None = None, progress: bool = True,
            every: int | None = None, fps: float | None = None, start: float = 0.0, end: float | None = None,
            reasoning: str = DEFAULT_REASONING, smooth: int = 0, timeline: str | os.PathLike | None = None,
            track_memory: float = DEFAULT_TRACK_MEMORY, track_iou: float = DEFAULT_TRACK_IOU,
            equalize: bool | str = True, note: str | None = None):
    """One row per face of every frame of every input; a pandas DataFrame (a list of dicts
    without pandas). Its `attrs` hold the settings (`smooth`, `sampling`, ...) and, per
    video, what reading it found (`videos`).

    `inputs`: image and video files, directories (searched recursively) and/or PIL images.
    `backend`: an already loaded model (`load_backend(...)`), instead of `model_path`.
    `every` / `fps`, `start` / `end`: which frames of a video (default: 2 per second).
    `annotate`: boxes + labels there (PNG per photo, MP4 per video; see `sinks.annotation_paths`).
    `timeline`: a folder for one timeline PNG per face of each video.
    """
    if isinstance(inputs, (str, os.PathLike, Image.Image)):
        inputs = [inputs]
    sources, notes = expand_inputs(inputs)
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    analyzer = Analyzer(None, detect=detect, require_face=require_face, margin=margin, batch_size=batch_size,
                        questions=questions, reasoning=reasoning, smooth=smooth,
                        sampling=Sampling(every, fps, start, end), track_memory=track_memory, track_iou=track_iou,
                        detect_kwargs=None if equalize is True else {"equalize": equalize})
    if backend is None:
        if model_path is None:
            raise ValueError("analyze() needs model_path=... (or backend=load_backend(...))")
        backend = load_backend(model_path, model_base, device=device, dtype=dtype, conv_mode=conv_mode,
                               max_new_tokens=max_new_tokens)
    analyzer.backend = backend
    run = Run(analyzer, sources, collect=True, annotate=annotate, timeline=timeline, note=note)
    run.run(progress=progress)
    frame = to_frame(run.rows)
    if hasattr(frame, "attrs"):
        frame.attrs.update(analyzer.settings(), videos=run.videos)
    return frame


# ----------------------------------------------------------------------------- output

def plain_rows(rows_or_frame) -> list[dict]:
    """Rows with `COLUMNS` only and plain values (pandas' NA / numpy scalars -> None / Python)."""
    rows = rows_or_frame.to_dict(orient="records") if hasattr(rows_or_frame, "to_dict") else rows_or_frame
    return [{c: _plain(r.get(c)) for c in COLUMNS} for r in rows]


def write_results(rows_or_frame, out: str | os.PathLike) -> Path:
    """CSV, JSONL or JSON (a list of records, null for empty) by the suffix; replaces `out`."""
    with ResultsFile(out, COLUMNS, overwrite=True) as results:
        results.add(plain_rows(rows_or_frame))
    return results.path


def _plain(value):
    """pandas' NA / numpy scalars -> None / Python scalars (JSON- and CSV-friendly)."""
    if value is None:
        return None
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (ImportError, TypeError, ValueError):
        pass
    return value.item() if hasattr(value, "item") else value


class Tally:
    """What a run produced, for the summary and the exit status."""

    def __init__(self):
        self.inputs, self.videos, self.frames, self.faces, self.no_face = 0, 0, 0, 0, 0
        self.errors: list[dict] = []
        self.faceless_videos: list[str] = []

    def add(self, rows: list[dict]) -> None:
        self.frames += any(r["frame"] is not None for r in rows)
        self.faces += sum(r["face_id"] is not None for r in rows)
        self.no_face += sum(r["face_id"] is None and r["frame"] is not None and not r["error"] for r in rows)
        self.errors += [r for r in rows if r["error"]]

    def end(self, result: FrameResult) -> None:
        self.inputs += 1
        if result.source.video:
            self.videos += 1
            if result.stream.sampled and not result.stream.faces:
                self.faceless_videos.append(f"{result.source.label}: no face in any of its "
                                            f"{result.stream.sampled} sampled frame(s)")

    def __str__(self) -> str:
        if self.videos:
            text = (f"{self.inputs} input(s) ({self.videos} video(s)), {self.frames} frame(s) analysed, "
                    f"{self.faces} face row(s), {self.no_face} frame(s) without a face, {len(self.errors)} error(s)")
        else:
            text = (f"{self.inputs} image(s), {self.faces} face(s), {self.no_face} without a face, "
                    f"{len(self.errors)} error(s)")
        for line in self.faceless_videos:
            text += f"\n  {line}"
        for r in self.errors[:20]:
            where = (f" frame {r['frame']}" if r["frame"] else "") + (
                f" face {r['face_id']}" if r["face_id"] is not None else "")
            text += f"\n  {r['input']}{where}: {r['error']}"
        if len(self.errors) > 20:
            text += f"\n  ... {len(self.errors) - 20} more (see the error column)"
        return text


# ----------------------------------------------------------------------------- command line

EXAMPLES = """\
  feallm analyze photos/ --model-path runs/demo/train/llava-tiny-feallm-lora --model-base runs/demo/llm \\
      --out results.csv --annotate boxes/          # the demo's checkpoint (bash launch/demo.sh makes it)
  feallm analyze faces/ --no-detect --model-path CKPT --model-base BASE --out results.jsonl --resume
  feallm analyze clip.mp4 --fps 5 --smooth 3 --model-path CKPT --model-base BASE --out clip.csv \\
      --timeline clip_timeline/ --annotate clip_annotated.mp4   # a video: tracked faces over time
  feallm analyze photo.jpg --openai-model feallm --base-url http://127.0.0.1:8000/v1   # a served model"""
INTERRUPTED = ("the frames finished before it are in --out; add --resume to the same command to do the rest "
               "(videos continue after their last finished frame)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help=f"image files, video files ({' '.join(sorted(VIDEO_SUFFIXES))}) and/or directories")
    model = parser.add_argument_group("model: a LLaVA checkpoint, or an OpenAI-compatible server")
    model.add_argument("--model-path", default=None, help="FEALLM / LLaVA checkpoint directory")
    model.add_argument("--model-base", default=None, help="base LLM for LoRA / projector-only checkpoints")
    model.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    model.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                       help="default: float32 on CPU, float16 on GPU")
    model.add_argument("--conv-mode", default=None, help="conversation template (default: the one the checkpoint "
                                                        "was trained with, else upstream's folder-name rule)")
    model.add_argument("--openai-model", default=None, help="model name on the server (instead of --model-path)")
    model.add_argument("--base-url", default=None, help="the server, e.g. http://127.0.0.1:8000/v1 "
                                                        "(key from OPENAI_API_KEY)")
    model.add_argument("--concurrency", type=int, default=8, help="requests in flight to the server")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default=None,
                     help="results .csv, .jsonl or .json (default: CSV on stdout); rows are written as "
                          "frames finish")
    out.add_argument("--resume", action="store_true",
                     help="continue --out: skip the images already in it, continue each video after its last "
                          "finished frame")
    out.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    out.add_argument("--annotate", default=None, metavar="OUT.png|OUT.mp4|DIR",
                     help="write boxes + labels: a PNG for one image, an MP4 of the sampled frames for one video, "
                          "else a directory of both")
    out.add_argument("--timeline", default=None, metavar="DIR",
                     help="one PNG per face of each video: expression band and AU heat map over time")
    out.add_argument("--note", default=None,
                     help="a note on these results (e.g. that the model was not trained for such images): "
                          "printed, written under each annotated image and into OUT.meta.json")
    video = parser.add_argument_group("video")
    rate = video.add_mutually_exclusive_group()
    rate.add_argument("--every", type=int, default=None, metavar="N", help="analyse every N-th frame")
    rate.add_argument("--fps", type=float, default=None, metavar="F",
                      help="analyse F frames per second of video time (default when neither is given: 2)")
    video.add_argument("--start", type=float, default=0.0, metavar="S", help="first second analysed")
    video.add_argument("--end", type=float, default=None, metavar="S", help="last second analysed (default: the end)")
    video.add_argument("--smooth", type=int, default=0, metavar="K",
                       help="vote each face's expression and AUs over K sampled frames (odd; 0: off)")
    video.add_argument("--track-memory", type=float, default=DEFAULT_TRACK_MEMORY, metavar="S",
                       help="seconds a face keeps its id without being detected")
    video.add_argument("--track-iou", type=float, default=DEFAULT_TRACK_IOU,
                       help="overlap a detection needs with a face's last box to keep its id")
    parser.add_argument("--reasoning", choices=REASONING, default=DEFAULT_REASONING,
                        help="ask the reasoning question of every face, of keyframes only (a face's first frame "
                             "and frames where its expression changed; every face of a photo), or never")
    parser.add_argument("--no-detect", action="store_true",
                        help="treat each image (each frame) as an aligned face crop (the paper's setting)")
    parser.add_argument("--require-face", action="store_true", help="a frame without a face is an error row")
    parser.add_argument("--equalize", choices=("global", "local", "none"), default="global",
                        help="contrast the face detector sees: one histogram equalisation of the frame, or local "
                             "(CLAHE: finds faces much darker or lighter than their surroundings)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="crop margin, x the face box side on each side")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit")
    for task in TASKS:
        parser.add_argument(f"--{task}-question", default=None, help=f"default: {DEFAULT_QUESTIONS[task]!r}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _check_resumable(results: ResultsFile, analyzer: Analyzer, sources: Sequence[Source]) -> None:
    """A video continued with other sampling or smoothing would mix two kinds of rows."""
    before = results.previous_metadata
    if not before or not any(s.video and s.label in results.previous for s in sources):
        return
    now = analyzer.settings()
    for key, flags in (("sampling", "--every / --fps / --start / --end"), ("smooth", "--smooth")):
        if key in before and before[key] != now[key]:
            raise UsageError(f"--out {results.path} was written with {key} {before[key]}, this run asks for "
                             f"{now[key]}: resume with the same {flags} (or --overwrite)")


def main(args: argparse.Namespace) -> int:
    if (args.resume or args.overwrite) and args.out is None:
        raise UsageError("--resume and --overwrite need --out")
    questions = {t: getattr(args, f"{t}_question") for t in TASKS if getattr(args, f"{t}_question")}
    analyzer = Analyzer(None, detect=not args.no_detect, require_face=args.require_face,
                        batch_size=args.batch_size, margin=args.margin, questions=questions,
                        reasoning=args.reasoning, smooth=args.smooth,
                        sampling=Sampling(args.every, args.fps, args.start, args.end),
                        track_memory=args.track_memory, track_iou=args.track_iou,
                        detect_kwargs=None if args.equalize == "global" else {"equalize": args.equalize})
    results = ResultsFile(args.out, COLUMNS, resume=args.resume, overwrite=args.overwrite) if args.out else None
    sources, notes = expand_inputs(args.inputs)
    if results is not None:
        _check_resumable(results, analyzer, sources)
    analyzer.backend = load_backend(args.model_path, args.model_base, device=args.device, dtype=args.dtype,
                                    conv_mode=args.conv_mode, max_new_tokens=args.max_new_tokens,
                                    openai_model=args.openai_model, base_url=args.base_url,
                                    concurrency=args.concurrency)
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    resume = {label: [typed_row(r) for r in rows] for label, rows in results.previous.items()} if results else {}
    finished = set(results.previous_metadata.get("finished", [])) if results else set()
    if resume:
        _print_resuming(results, sources, resume, finished)
    run = Run(analyzer, sources, results=results, stdout=results is None, annotate=args.annotate,
              timeline=args.timeline, note=args.note, finished=finished)
    if results is not None:
        from feallm_llava import __version__

        results.metadata = {
            "feallm_llava": __version__, "inputs": list(args.inputs), "note": args.note,
            "model": {"model_path": args.model_path, "model_base": args.model_base,
                      "conv_template": getattr(analyzer.backend, "conv_mode", None),
                      "openai_model": args.openai_model, "base_url": args.base_url},
            **analyzer.settings()}
    if args.note:
        print(f"NOTE: {args.note}", file=sys.stderr)
    try:
        run.run(progress=not args.no_progress, resume=resume)
    finally:
        if results is not None:
            results.metadata.update(finished=sorted(run.finished),
                                    videos={**results.previous_metadata.get("videos", {}), **run.videos})
            results.close()
            print(f"wrote {results.path}", file=sys.stderr)
    print(run.tally, file=sys.stderr)
    if args.note:
        print(f"NOTE: {args.note}", file=sys.stderr)
    return EXIT_ITEMS_FAILED if run.tally.errors else 0


def _print_resuming(results: ResultsFile, sources: Sequence[Source], resume: dict, finished: set[str]) -> None:
    images = [s for s in sources if not s.video]
    videos = [s for s in sources if s.video]
    done = sum(s.label in resume for s in images)
    text = f"resuming {results.path}: {done} of {len(images)} image(s) already there"
    for s in videos:
        frames = sorted(r["frame"] for r in resume.get(s.label, []) if r["frame"] is not None)
        if s.label in finished or any(r["frame"] is None for r in resume.get(s.label, [])):
            text += f"\n  {s.label}: finished"
        elif frames:
            text += f"\n  {s.label}: continues after frame {frames[-1]} ({len(set(frames))} frame(s) there)"
    print(text, file=sys.stderr)
