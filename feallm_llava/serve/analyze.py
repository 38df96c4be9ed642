"""`feallm analyze`: per-face expression, action units and reasoning for photos.

    feallm analyze IMAGE_OR_DIR... --model-path P [--model-base B] [--out results.csv|.jsonl|.json]
                   [--resume] [--device cpu|cuda] [--no-detect] [--require-face]
                   [--annotate out.png] [--batch-size N]
    feallm analyze IMAGE_OR_DIR... --openai-model NAME --base-url URL ...

For each image: load it safely (`data.images.load_rgb`: corrupt, empty, non-image, tiny
and decompression-bomb files become an error row; grayscale, RGBA, CMYK, 16-bit are
converted), find the faces (`serve.detect`, OpenCV's Haar cascade, offline), crop each
with a margin to a square, and ask the model the three FEALLM questions (paper section
3.2: emotion summary = FER, facial movement description = AUD, emotion reasoning),
batched across faces and images. The answers are read with the evaluation parser
(`facs.parse`), so `feallm analyze` and `feallm score` agree on what a text means.

One row per face, Py-Feat / LibreFace style (`COLUMNS`): box in image pixels, the
expression (one of `labels.EXPRESSIONS`, empty when the answer names none), `AU01` ...
`AU26` as 1/0 (empty when the AUD answer mentions no AU at all: unknown, not absent), the
reasoning text and the raw answers, and `error`. An image without a face gives one row
with an empty `face_id` (an error row with `--require-face`). `--no-detect` treats every
image as an aligned face crop (the paper's setting): one face, the whole image. One bad
file never stops the run: it gets a row whose `error` says what was wrong. Rows are
written as each image finishes (`serve.results_file`): an interrupted run keeps them,
and `--resume` analyses only the images not yet in `--out`.

Python: `analyze(["photo.jpg"], model_path=...)` returns a pandas DataFrame (a list of
dicts when pandas is not installed).
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

from feallm_llava.errors import EXIT_ITEMS_FAILED, UsageError
from feallm_llava.facs.labels import AUS, au_key
from feallm_llava.serve.results_file import ResultsFile

AU_COLUMNS: tuple[str, ...] = tuple(au_key(au) for au in AUS)  # AU01 ... AU26 (labels.AUS order)
BOX_COLUMNS = ("face_x", "face_y", "face_w", "face_h")
COLUMNS: tuple[str, ...] = (
    "input", "face_id", *BOX_COLUMNS, "expression", *AU_COLUMNS, "reasoning",
    "raw_answer_fer", "raw_answer_aud", "raw_answer_reasoning", "error",
)

# Paper section 3.2 gives the first two verbatim as its examples of the emotion-summary and
# facial-movement instructions; the reasoning question is the first of our reasoning
# templates (resources/templates/reasoning.json). All three are overridable.
DEFAULT_QUESTIONS = {
    "fer": "Please describe the expression in this face.",
    "aud": "Please describe the action units in this face.",
    "reasoning": "How do the facial action units in this face lead to its expression?",
}
TASKS = tuple(DEFAULT_QUESTIONS)  # fer, aud, reasoning: three answers per face

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm", ".pbm", ".jp2", ".jfif"})

DEFAULT_MARGIN = 0.25  # x the box side on every side: brows, chin and jaw stay in the crop


# ----------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Source:
    """One image to analyse: a file, or an in-memory image passed to the Python API."""

    label: str                      # the `input` column
    path: Path | None = None
    image: Image.Image | None = None


def expand_inputs(inputs: Iterable[str | os.PathLike | Image.Image]) -> tuple[list[Source], list[str]]:
    """Files as given (in order), directories as their image files (recursive, sorted).

    Returns (sources, notes): a directory's files whose suffix is not an image suffix are
    skipped and counted in `notes`; a path that does not exist stays a source (it gets an
    error row: the user named it).
    """
    sources: list[Source] = []
    notes: list[str] = []
    for i, item in enumerate(inputs):
        if isinstance(item, Image.Image):
            sources.append(Source(f"<image {i}>", image=item))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
            if len(files) > len(images):
                notes.append(f"{path}: skipped {len(files) - len(images)} file(s) without an image suffix")
            if not images:
                notes.append(f"{path}: directory holds no image files")
            sources.extend(Source(str(p), path=p) for p in images)
        else:
            sources.append(Source(str(path), path=path))
    return sources, notes


# ----------------------------------------------------------------------------- rows

def empty_row(label: str) -> dict:
    row = {c: None for c in COLUMNS}
    row["input"] = label
    row["error"] = ""
    return row


@dataclass
class _Face:
    """A face waiting for its answers: the row it fills and the square crop the model sees."""

    row: dict
    crop: Image.Image
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


# ----------------------------------------------------------------------------- analysis

class Analyzer:
    """Detect, crop, ask, parse. Holds the model (a `LlavaBackend` or anything with its
    `generate(items) -> list[str]`) so that several `run` calls share one load."""

    def __init__(self, backend, *, detect: bool = True, require_face: bool = False,
                 margin: float = DEFAULT_MARGIN, batch_size: int = 8,
                 questions: dict[str, str] | None = None, detect_kwargs: dict | None = None):
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        if margin < 0:
            raise ValueError(f"--margin must be >= 0, got {margin}")
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

    # -- one image -> its face rows (answers pending) ------------------------------
    def _load(self, source: Source) -> Image.Image:
        from feallm_llava.data.images import load_rgb

        if source.image is not None:
            return source.image.convert("RGB")
        return load_rgb(source.path)

    def faces_of(self, source: Source) -> tuple[list[dict], list[_Face], Image.Image | None]:
        """(rows, faces waiting for answers, the decoded image or None on error)."""
        from feallm_llava.data.images import ImageError

        row = empty_row(source.label)
        try:
            img = self._load(source)
        except ImageError as err:
            row["error"] = f"bad image: {err.reason}"
            return [row], [], None
        except OSError as err:  # unreadable file (permissions, I/O)
            row["error"] = f"cannot read image: {type(err).__name__}: {err}"
            return [row], [], None

        if not self.detect:
            row.update(face_id=0, face_x=0, face_y=0, face_w=img.width, face_h=img.height)
            return [row], [_Face(row, img)], img  # the model's own `pad` squares it

        from feallm_llava.serve.detect import crop_face, detect_faces

        boxes = detect_faces(img, **self.detect_kwargs)
        if not boxes:
            if self.require_face:
                row["error"] = "no face found (--require-face)"
            return [row], [], img
        rows, faces = [], []
        for i, box in enumerate(boxes):
            r = empty_row(source.label)
            r.update(face_id=i, face_x=box.x, face_y=box.y, face_w=box.w, face_h=box.h)
            rows.append(r)
            faces.append(_Face(r, crop_face(img, box, self.margin)))
        return rows, faces, img

    # -- batched answers ---------------------------------------------------------
    def _answer(self, faces: list[_Face]) -> None:
        """Ask every pending face its three questions, `batch_size` queries per generate call."""
        jobs = [(face, task) for face in faces for task in TASKS]
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            for (face, task), answer in zip(chunk, self._generate(chunk)):
                if isinstance(answer, _Failed):
                    face.row["error"] = face.row["error"] or answer.message
                else:
                    face.answers[task] = answer
        for face in faces:
            fill_answers(face.row, face.answers)

    def _generate(self, chunk: list[tuple[_Face, str]]) -> list[str | _Failed]:
        queries = [_Query(f"{face.row['input']} face {face.row['face_id']} ({task})", face.crop,
                          self.questions[task]) for face, task in chunk]
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

    # -- many images -------------------------------------------------------------
    def iter_images(self, sources: Sequence[Source], *, progress: bool = True,
                    on_image=None) -> Iterator[tuple[Source, list[dict]]]:
        """(source, its rows) in input order, each image once its rows are complete. Faces
        are collected across images until a full batch of queries is pending, so small
        images still fill the batch. `on_image(source, img, rows)` is called for each
        image with its decoded picture (used for --annotate)."""
        from tqdm.auto import tqdm

        pending: list[tuple[Source, Image.Image | None, list[dict], list[_Face]]] = []
        n_faces = 0
        bar = tqdm(total=len(sources), desc="analyze", unit="img", disable=not progress)
        try:
            for source in sources:
                rows, faces, img = self.faces_of(source)
                pending.append((source, img, rows, faces))
                n_faces += len(faces)
                if n_faces * len(TASKS) >= self.batch_size:
                    yield from self._flush(pending, on_image, bar)
                    pending, n_faces = [], 0
            yield from self._flush(pending, on_image, bar)
        finally:
            bar.close()

    def iter_rows(self, sources: Sequence[Source], *, progress: bool = True, on_image=None) -> Iterator[dict]:
        """Every row, in input order."""
        for _source, rows in self.iter_images(sources, progress=progress, on_image=on_image):
            yield from rows

    def _flush(self, pending, on_image, bar) -> Iterator[tuple[Source, list[dict]]]:
        self._answer([face for _s, _i, _r, faces in pending for face in faces])
        for source, img, rows, _faces in pending:
            if on_image is not None and img is not None:
                on_image(source, img, rows)
            bar.update(1)
            yield source, rows


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
    """A pandas DataFrame with `COLUMNS` (nullable integer AU and box columns), or the rows."""
    try:
        import pandas as pd
    except ImportError:
        return rows
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in ("face_id", *BOX_COLUMNS, *AU_COLUMNS):
        frame[col] = frame[col].astype("Int64")
    return frame


def analyze(inputs: Iterable[str | os.PathLike | Image.Image] | str | os.PathLike, *,
            model_path: str | None = None, model_base: str | None = None, device: str = "cpu",
            detect: bool = True, require_face: bool = False, batch_size: int = 8,
            margin: float = DEFAULT_MARGIN, max_new_tokens: int = 256, dtype: str | None = None,
            conv_mode: str | None = None, questions: dict[str, str] | None = None,
            backend=None, annotate: str | os.PathLike | None = None, progress: bool = True):
    """One row per face of every input image; a pandas DataFrame (list of dicts without pandas).

    `inputs`: image files, directories (searched recursively) and/or PIL images.
    `backend`: an already loaded model (`load_backend(...)`), instead of `model_path`.
    `annotate`: write annotated PNGs (boxes + labels) there (see `annotation_paths`).
    """
    if isinstance(inputs, (str, os.PathLike, Image.Image)):
        inputs = [inputs]
    sources, notes = expand_inputs(inputs)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if backend is None:
        if model_path is None:
            raise ValueError("analyze() needs model_path=... (or backend=load_backend(...))")
        backend = load_backend(model_path, model_base, device=device, dtype=dtype, conv_mode=conv_mode,
                               max_new_tokens=max_new_tokens)
    analyzer = Analyzer(backend, detect=detect, require_face=require_face, margin=margin,
                        batch_size=batch_size, questions=questions)
    on_image = annotating(annotate, sources) if annotate is not None else None
    return to_frame(list(analyzer.iter_rows(sources, progress=progress, on_image=on_image)))


def annotating(target: str | os.PathLike, sources: Sequence[Source], caption: str | None = None):
    """The `on_image` callback that saves each image's annotated PNG (`annotation_paths`),
    with `caption` under each image."""
    from feallm_llava.serve.annotate_png import annotate_image

    targets = annotation_paths(target, sources)

    def on_image(source, img, rows):
        annotate_image(img, rows, caption).save(targets[source.label], format="PNG")
    return on_image


def annotation_paths(target: str | os.PathLike, sources: Sequence[Source]) -> dict[str, Path]:
    """Where each image's annotated PNG goes.

    A `.png` target with one input image is that file; otherwise the target (minus a
    `.png` suffix) is a directory with one `<NNNN>_<stem>.png` per image.
    """
    target = Path(target)
    if target.suffix.lower() == ".png" and len(sources) == 1:
        target.parent.mkdir(parents=True, exist_ok=True)
        return {sources[0].label: target}
    folder = target.with_suffix("") if target.suffix.lower() == ".png" else target
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, s in enumerate(sources):
        stem = Path(s.label).stem if s.path is not None else "image"
        out[s.label] = folder / f"{i:04d}_{stem}.png"
    return out


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


class _Tally:
    """What a run produced, for the summary and the exit status."""

    def __init__(self):
        self.images, self.faces, self.no_face, self.errors = 0, 0, 0, []

    def add(self, rows: list[dict]) -> None:
        self.images += 1
        self.faces += sum(r["face_id"] is not None for r in rows)
        self.no_face += sum(r["face_id"] is None and not r["error"] for r in rows)
        self.errors += [r for r in rows if r["error"]]

    def __str__(self) -> str:
        text = (f"{self.images} image(s), {self.faces} face(s), {self.no_face} without a face, "
                f"{len(self.errors)} error(s)")
        for r in self.errors[:20]:
            face = f" face {r['face_id']}" if r["face_id"] is not None else ""
            text += f"\n  {r['input']}{face}: {r['error']}"
        if len(self.errors) > 20:
            text += f"\n  ... {len(self.errors) - 20} more (see the error column)"
        return text


# ----------------------------------------------------------------------------- command line

EXAMPLES = """\
  feallm analyze photos/ --model-path runs/demo/train/llava-tiny-feallm-lora --model-base runs/demo/llm \\
      --out results.csv --annotate boxes/          # the demo's checkpoint (bash launch/demo.sh makes it)
  feallm analyze faces/ --no-detect --model-path CKPT --model-base BASE --out results.jsonl --resume
  feallm analyze photo.jpg --openai-model feallm --base-url http://127.0.0.1:8000/v1   # a served model"""
INTERRUPTED = "the images finished before it are in --out; add --resume to the same command to do the rest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or directories")
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
                          "images finish")
    out.add_argument("--resume", action="store_true", help="continue --out: skip the images already in it")
    out.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    out.add_argument("--annotate", default=None, metavar="OUT.png",
                     help="write boxes + labels: a PNG for one image, else a directory of PNGs")
    out.add_argument("--note", default=None,
                     help="a note on these results (e.g. that the model was not trained for such images): "
                          "printed, written under each annotated image and into OUT.meta.json")
    parser.add_argument("--no-detect", action="store_true",
                        help="treat each image as an aligned face crop (the paper's setting)")
    parser.add_argument("--require-face", action="store_true", help="an image without a face is an error row")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="crop margin, x the face box side on each side")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit")
    for task in TASKS:
        parser.add_argument(f"--{task}-question", default=None, help=f"default: {DEFAULT_QUESTIONS[task]!r}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def main(args: argparse.Namespace) -> int:
    if (args.resume or args.overwrite) and args.out is None:
        raise UsageError("--resume and --overwrite need --out")
    results = ResultsFile(args.out, COLUMNS, resume=args.resume, overwrite=args.overwrite) if args.out else None
    backend = load_backend(args.model_path, args.model_base, device=args.device, dtype=args.dtype,
                           conv_mode=args.conv_mode, max_new_tokens=args.max_new_tokens,
                           openai_model=args.openai_model, base_url=args.base_url, concurrency=args.concurrency)
    sources, notes = expand_inputs(args.inputs)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if results is not None and results.done:
        before = len(sources)
        sources = [s for s in sources if s.label not in results.done]
        print(f"resuming {results.path}: {before - len(sources)} of {before} image(s) already there",
              file=sys.stderr)
    questions = {t: getattr(args, f"{t}_question") for t in TASKS if getattr(args, f"{t}_question")}
    analyzer = Analyzer(backend, detect=not args.no_detect, require_face=args.require_face,
                        batch_size=args.batch_size, margin=args.margin, questions=questions)
    on_image = annotating(args.annotate, sources, args.note) if args.annotate else None
    if results is not None:
        from feallm_llava import __version__

        results.metadata = {
            "feallm_llava": __version__, "inputs": list(args.inputs), "note": args.note,
            "model": {"model_path": args.model_path, "model_base": args.model_base,
                      "conv_template": getattr(backend, "conv_mode", None),
                      "openai_model": args.openai_model, "base_url": args.base_url},
            "questions": analyzer.questions, "detect": not args.no_detect}
    if args.note:
        print(f"NOTE: {args.note}", file=sys.stderr)
    tally = _Tally()
    stdout = None if results is not None else csv.DictWriter(sys.stdout, fieldnames=list(COLUMNS))
    if stdout is not None:
        stdout.writeheader()
    try:
        for _source, rows in analyzer.iter_images(sources, progress=not args.no_progress, on_image=on_image):
            rows = plain_rows(rows)
            if results is not None:
                results.add(rows)
            else:
                stdout.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
                sys.stdout.flush()
            tally.add(rows)
    finally:
        if results is not None:
            results.close()
            print(f"wrote {results.path}", file=sys.stderr)
    print(tally, file=sys.stderr)
    if args.note:
        print(f"NOTE: {args.note}", file=sys.stderr)
    return EXIT_ITEMS_FAILED if tally.errors else 0
