"""`feallm analyze`: per-face expression, action units and reasoning for photos and videos.

    feallm analyze INPUT... --model-path P [--model-base B] [--out results.csv|.jsonl|.json]
                   [--resume] [--device cpu|cuda] [--no-detect] [--require-face]
                   [--detector yunet|yunet-onnx|haar] [--detector-model FILE.onnx]
                   [--align affwild2|rafdb|synthetic|none]
                   [--annotate out.png|out.mp4|DIR] [--batch-size N]
                   [--every N | --fps F] [--start S] [--end S] [--reasoning every|keyframes|none]
                   [--smooth K] [--timeline DIR]
    feallm analyze INPUT... --openai-model NAME --base-url URL ...

One code path for both kinds of input: a photo is a video of one frame (frame 0 at 0 s).
For each sampled frame: decode it safely (`data.images.load_rgb`: corrupt, empty,
non-image, tiny and decompression-bomb files become an error row; `data.video`: empty,
unreadable and truncated videos likewise, the frames decoded before a cut kept), find the
faces (`serve.detectors`: YuNet with 5 landmarks by default, offline; Haar by name), give
each the id of its track (`serve.track`: IoU tracking across a video's frames, a short
memory for missed detections; a photo's faces are 0, 1, ... left to right), align each on
its landmarks to the template of the model's training crops (`serve.align`; a margin crop
with `--align none` or without landmarks), and ask the model the FEALLM questions (paper section 3.2: emotion summary = FER,
facial movement description = AUD, emotion reasoning), batched across faces and frames.
The answers are read with the evaluation parser (`facs.parse`), so `feallm analyze` and
`feallm score` agree on what a text means.

Reasoning (`--reasoning`): `every` face of every frame; `keyframes` (the default) when a
face first appears and whenever its expression differs from the last one read for it, so
a photo's faces all get it (each is new) while a video pays for the longest answer only
where the reading changes; `none`. Where it was not asked, `reasoning` is empty.

One row per face and frame, Py-Feat / LibreFace style (`COLUMNS`): the frame number and
its time in seconds (0 and 0.0 for a photo; empty in a row about the whole input, such as
a file that cannot be read), the face's track id, its box in frame pixels, the detector's
score and 5 landmarks (`face_score`, `x_0` ... `x_4`, `y_0` ... `y_4`), the expression
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
from collections.abc import Iterable, Sequence

from PIL import Image

from feallm_llava.data.video import VIDEO_SUFFIXES, Sampling
from feallm_llava.errors import EXIT_ITEMS_FAILED, UsageError
from feallm_llava.serve.align import ALIGNMENTS, DEFAULT_ALIGN
from feallm_llava.serve.analyzer import (DEFAULT_MARGIN, DEFAULT_REASONING, DEFAULT_TRACK_IOU, DEFAULT_TRACK_MEMORY,
                                         REASONING, Analyzer, FrameResult, Source, expand_inputs)
from feallm_llava.serve.detectors import DEFAULT_DETECTOR, DETECTORS
from feallm_llava.serve.results_file import ResultsFile
from feallm_llava.serve.rows import COLUMNS, DEFAULT_QUESTIONS, TASKS, plain_rows, to_frame, typed_row


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
            margin: float = DEFAULT_MARGIN, crop_shift: float = 0.0, max_new_tokens: int = 256,
            dtype: str | None = None,
            conv_mode: str | None = None, questions: dict[str, str] | None = None,
            backend=None, annotate: str | os.PathLike | None = None, progress: bool = True,
            every: int | None = None, fps: float | None = None, start: float = 0.0, end: float | None = None,
            reasoning: str = DEFAULT_REASONING, smooth: int = 0, timeline: str | os.PathLike | None = None,
            track_memory: float = DEFAULT_TRACK_MEMORY, track_iou: float = DEFAULT_TRACK_IOU,
            equalize: bool | str = True, note: str | None = None, detector=None,
            detector_model: str | os.PathLike | None = None, align: str | None = None):
    """One row per face of every frame of every input; a pandas DataFrame (a list of dicts
    without pandas). Its `attrs` hold the settings (`smooth`, `sampling`, ...) and, per
    video, what reading it found (`videos`).

    `inputs`: image and video files, directories (searched recursively) and/or PIL images.
    `backend`: an already loaded model (`load_backend(...)`), instead of `model_path`.
    `every` / `fps`, `start` / `end`: which frames of a video (default: 2 per second).
    `annotate`: boxes + labels there (PNG per photo, MP4 per video; see `sinks.annotation_paths`).
    `timeline`: a folder for one timeline PNG per face of each video.
    `detector`: a name of `serve.detectors.DETECTORS` (default yunet) or a detector object;
    `detector_model`: YuNet's ONNX file (yunet-onnx); `align`: a template of
    `serve.align.ALIGNMENTS` (default affwild2) or none (the margin crop).
    """
    if isinstance(inputs, (str, os.PathLike, Image.Image)):
        inputs = [inputs]
    sources, notes = expand_inputs(inputs)
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    analyzer = Analyzer(None, detect=detect, require_face=require_face, margin=margin, crop_shift=crop_shift,
                        batch_size=batch_size, questions=questions, reasoning=reasoning, smooth=smooth,
                        sampling=Sampling(every, fps, start, end), track_memory=track_memory, track_iou=track_iou,
                        detect_kwargs=None if equalize is True else {"equalize": equalize},
                        detector=detector, detector_model=detector_model, align=align)
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
    parser.add_argument("--detector", choices=DETECTORS, default=DEFAULT_DETECTOR,
                        help="face detector: YuNet (boxes + 5 landmarks, from the yuface wheel), YuNet from an ONNX "
                             "file through OpenCV (--detector-model), or OpenCV's Haar cascade (no landmarks; misses "
                             "most dark-skinned faces)")
    parser.add_argument("--detector-model", default=None, metavar="FILE.onnx",
                        help="YuNet's ONNX file for yunet-onnx (also used by yunet where its wheel is missing)")
    parser.add_argument("--align", choices=ALIGNMENTS, default=DEFAULT_ALIGN,
                        help="warp each face on its 5 landmarks to the template of the model's training crops: "
                             "Aff-Wild2 cropped_aligned (112 px), RAF-DB aligned (100 px), the demo's synthetic "
                             "faces, or none (a square crop around the box, --margin / --crop-shift)")
    parser.add_argument("--equalize", choices=("global", "local", "none"), default="global",
                        help="contrast the Haar cascade sees: one histogram equalisation of the frame, or local "
                             "(CLAHE: finds faces much darker or lighter than their surroundings)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="crop margin, x the face box side on each side (crops not aligned)")
    parser.add_argument("--crop-shift", type=float, default=0.0,
                        help="move the crop's centre down by this fraction of the box height (a detector whose "
                             "boxes sit higher on the face than the crops the model was trained on)")
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
                        batch_size=args.batch_size, margin=args.margin, crop_shift=args.crop_shift,
                        questions=questions,
                        reasoning=args.reasoning, smooth=args.smooth,
                        sampling=Sampling(args.every, args.fps, args.start, args.end),
                        track_memory=args.track_memory, track_iou=args.track_iou,
                        detect_kwargs=None if args.equalize == "global" else {"equalize": args.equalize},
                        detector=args.detector, detector_model=args.detector_model, align=args.align)
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
