"""The analysis behind `feallm analyze` and the web UI: decode each sampled frame, find the
faces, track them, crop, ask the model the FEALLM questions in batches across faces and
frames, and parse the answers into rows (`serve.rows`). See `serve.analyze` for what the
rows mean."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from feallm_llava.data.video import VIDEO_SUFFIXES, Sampling, VideoError, VideoInfo, is_video
from feallm_llava.serve.rows import (AU_COLUMNS, BOX_COLUMNS, DEFAULT_QUESTIONS, LANDMARK_COLUMNS, P_AU_COLUMNS,
                                     P_COLUMNS, P_EXPRESSION_COLUMNS, SMOOTHED_COLUMNS, TASKS, empty_row,
                                     fill_answers, fill_probabilities, own_readings)

# what `--smooth` averages when a row has probabilities: a label column -> its probability columns
SMOOTHED_PROBABILITIES = {"expression": P_EXPRESSION_COLUMNS, **{c: (p,) for c, p in zip(AU_COLUMNS, P_AU_COLUMNS)}}

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
            analyzer.smooth, readings=lambda u: u.readings, apply=_apply_smoothed, resumed=lambda u: u.resumed,
            probabilities=SMOOTHED_PROBABILITIES)
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
                 margin: float = DEFAULT_MARGIN, crop_shift: float = 0.0, batch_size: int = 8,
                 questions: dict[str, str] | None = None, detect_kwargs: dict | None = None,
                 reasoning: str = DEFAULT_REASONING, smooth: int = 0, sampling: Sampling | None = None,
                 track_memory: float = DEFAULT_TRACK_MEMORY, track_iou: float = DEFAULT_TRACK_IOU,
                 detector=None, detector_model: str | os.PathLike | None = None, align: str | None = None,
                 scores: bool | None = None):
        from feallm_llava.serve.align import DEFAULT_ALIGN, template
        from feallm_llava.serve.detectors import DEFAULT_DETECTOR, make_detector
        from feallm_llava.serve.temporal import Smoother
        from feallm_llava.serve.track import IouTracker

        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        if margin < 0:
            raise ValueError(f"--margin must be >= 0, got {margin}")
        if not -0.5 <= crop_shift <= 0.5:
            raise ValueError(f"--crop-shift must be within [-0.5, 0.5] (a fraction of the box height), got {crop_shift}")
        if reasoning not in REASONING:
            raise ValueError(f"--reasoning must be one of {', '.join(REASONING)}, got {reasoning!r}")
        if track_memory < 0:
            raise ValueError(f"--track-memory must be >= 0 seconds, got {track_memory}")
        Smoother(smooth, None, None, None)  # checks the window
        IouTracker(track_iou)               # checks the threshold
        self.backend = backend
        self.detect, self.require_face = detect, require_face
        self.margin, self.crop_shift = margin, crop_shift   # how a detector's box becomes the crop
        self.batch_size = batch_size
        self.questions = {**DEFAULT_QUESTIONS, **(questions or {})}
        unknown = set(self.questions) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown question kind(s) {sorted(unknown)}; use {', '.join(TASKS)}")
        self.detect_kwargs = detect_kwargs or {}
        # detector: a name (`serve.detectors.DETECTORS`, built here) or a detector object; none without detection
        self.detector = None
        if detect:
            self.detector = (make_detector(detector or DEFAULT_DETECTOR, model=detector_model,
                                           **({"equalize": self.detect_kwargs["equalize"]}
                                              if "equalize" in self.detect_kwargs else {}))
                             if detector is None or isinstance(detector, str) else detector)
        self.align = align or DEFAULT_ALIGN
        self.template = None if self.align == "none" else template(self.align)   # checks the name
        self.reasoning = reasoning
        self.smooth = smooth
        self.sampling = sampling or Sampling()
        self.track_memory = track_memory
        self.track_iou = track_iou
        # probabilities (p_* / AUxx_p columns): by default where the backend computes them itself
        # (the LLaVA runner); a server may refuse them, so asking one is explicit
        self.scores = hasattr(backend, "continuation_scores") if scores is None else scores

    def settings(self) -> dict:
        """What shapes the rows, for OUT.meta.json and the DataFrame's attrs."""
        return {
            "questions": self.questions, "detect": self.detect,
            "detector": self.detector.describe() if self.detector is not None else None,
            "align": self.template.as_dict() if self.template is not None and self.detect else "none",
            "margin": self.margin, "crop_shift": self.crop_shift,
            "reasoning": self.reasoning, "sampling": self.sampling.as_dict(),
            "tracking": {"method": "IoU", "min_iou": self.track_iou, "memory_s": self.track_memory},
            "smooth": None if self.smooth <= 1 else {
                "window": self.smooth, "columns": list(SMOOTHED_COLUMNS),
                "method": "per face, centred window of sampled frames: with probabilities, the argmax of the "
                          "mean expression probabilities and each AU's mean >= 0.5; without, the most frequent "
                          "expression and the majority of each AU (ties: the frame nearest the centre); "
                          "raw_answer_* and the probability columns are the frame's own"},
            "scores": self.scores,
        }

    # -- one frame -> its face rows (answers pending) --------------------------------
    def _frame(self, stream: _Stream, img: Image.Image, frame: int, time_s: float, keep_image: bool) -> FrameResult:
        from feallm_llava.serve.detect import FaceBox

        stream.sampled += 1
        label = stream.source.label
        row = empty_row(label, frame, time_s)
        if self.detect:
            boxes = self.detector.detect(img)
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
            if self.detect:
                r["face_score"] = box.score
                if box.landmarks is not None:
                    r.update(zip(LANDMARK_COLUMNS, [p[0] for p in box.landmarks] + [p[1] for p in box.landmarks]))
            rows.append(r)
            crop = self.face_crop(img, box) if self.detect else img
            faces.append(_Face(r, crop, self._tasks(face_id >= known)))
        return FrameResult(stream.source, frame, time_s, kept, rows, stream, faces=faces)

    def face_crop(self, img: Image.Image, box) -> Image.Image:
        """What the model sees of a detected face: aligned to the template when the box has
        landmarks and --align is not none, else the square margin crop around the box."""
        from feallm_llava.serve.align import align_face
        from feallm_llava.serve.detect import crop_face

        if self.template is not None and box.landmarks is not None:
            return align_face(img, box.landmarks, self.template)
        return crop_face(img, self._crop_box(box), self.margin)

    def crop_of_row(self, img: Image.Image, row: dict) -> Image.Image | None:
        """`face_crop` again from a written row (its box and landmark columns); None for a row
        without a face."""
        from feallm_llava.serve.detect import FaceBox

        if row.get("face_id") is None or row.get("face_w") is None:
            return None
        if not self.detect:
            return img
        xs = [row.get(c) for c in LANDMARK_COLUMNS]
        points = None if any(v is None for v in xs) else tuple(zip(xs[:5], xs[5:]))
        box = FaceBox(int(row["face_x"]), int(row["face_y"]), int(row["face_w"]), int(row["face_h"]),
                      float(row.get("face_score") or 0.0), points)
        return self.face_crop(img, box)

    def _crop_box(self, box) -> tuple[int, int, int, int]:
        """The detector's box moved down by `crop_shift` x its height (the crop's centre)."""
        return box.x, box.y + round(self.crop_shift * box.h), box.w, box.h

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

    def _score(self, faces: list[_Face]) -> None:
        """The probabilities of the faces' FER and AU answers (`inference.scores`), batched;
        a failure leaves them empty and is named in the row's error."""
        from feallm_llava.facs.labels import AUS
        from feallm_llava.facs.parse import parse
        from feallm_llava.inference.scores import Scorer

        scorer = Scorer(self.backend, batch_size=self.batch_size)
        fer = [f for f in faces if "fer" in f.answers]
        aud = [f for f in faces if "aud" in f.answers]
        try:
            p_fer = scorer.expressions([_Query(_query_id(f.row, "fer"), f.crop, self.questions["fer"]) for f in fer])
            p_aud = scorer.aus([_Query(_query_id(f.row, "aud"), f.crop, self.questions["aud"]) for f in aud],
                               {_query_id(f.row, "aud"): parse(f.answers["aud"], AUS).aus for f in aud})
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            for f in faces:
                f.row["error"] = f.row["error"] or f"probabilities failed: {type(err).__name__}: {err}"
            return
        for f in fer:
            fill_probabilities(f.row, p_expression=p_fer[_query_id(f.row, "fer")])
        for f in aud:
            fill_probabilities(f.row, p_aus=p_aud[_query_id(f.row, "aud")])

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
        if self.scores:
            self._score(fresh)
        if self.reasoning == "keyframes":
            changed = self._keyframes(pending)
            self._answer(changed, ("reasoning",))
            for face in changed:
                fill_answers(face.row, face.answers)
        for unit in pending:
            if not unit.resumed:
                unit.readings = {f.row["face_id"]: {c: f.row[c] for c in (*SMOOTHED_COLUMNS, *P_COLUMNS)}
                                 for f in unit.faces}
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
