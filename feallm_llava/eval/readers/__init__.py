"""Benchmark readers: a dataset's native files -> `FaceRecord`s (one per image).

Each reader module (feabench, rafdb, affectnet, bp4d, disfa) provides
`read(root, options) -> ReadResult`. Readers only parse labels and build image paths;
whether the images exist is checked in one place (`benchmarks.load_items`), so that
`--skip-missing` behaves the same for every benchmark. Rows a reader drops on purpose
(contempt faces, unknown AU codes, frames left out by sampling) are counted by reason
in `ReadResult.dropped`, never lost silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Common 3-fold subject splits (the folds used by
# JAA-Net / ME-GraphAU and most AU papers since).
BP4D_FOLDS: dict[int, tuple[str, ...]] = {
    1: ("F001", "M007", "F018", "F008", "F002", "M004", "F010", "F009", "M012", "M001",
        "F016", "M014", "F023", "M008"),
    2: ("M011", "F003", "M010", "M002", "F005", "F022", "M018", "M017", "F013", "M016",
        "F020", "F011", "M013", "M005"),
    3: ("F007", "F015", "F006", "F019", "M006", "M009", "F012", "M003", "F004", "F021",
        "F017", "M015", "F014"),
}
DISFA_FOLDS: dict[int, tuple[str, ...]] = {
    1: ("SN002", "SN010", "SN001", "SN026", "SN027", "SN032", "SN030", "SN009", "SN016"),
    2: ("SN013", "SN018", "SN011", "SN028", "SN012", "SN006", "SN031", "SN021", "SN024"),
    3: ("SN003", "SN029", "SN023", "SN025", "SN008", "SN005", "SN007", "SN017", "SN004"),
}


@dataclass(frozen=True)
class FaceRecord:
    """One labelled image, as a dataset states it."""
    id: str
    image: Path                                     # where the image should be
    source: str                                     # "<label file>:<line>" for error messages
    gt_expression: str | None = None               # one of labels.EXPRESSIONS
    gt_aus: frozenset[int] | None = None           # active AUs among the benchmark's AUs
    crop: tuple[int, int, int, int] | None = None  # face box (x, y, width, height)
    subject: str | None = None


@dataclass
class ReadResult:
    records: list[FaceRecord]
    dropped: Counter = field(default_factory=Counter)  # reason -> number of rows dropped


@dataclass
class ReaderOptions:
    """Every reader knob; each reader reads only its own fields."""
    image_folder: Path | None = None        # image root; default: see each reader
    split: str = "test"                     # RAF-DB split (name prefix of the label file)
    rafdb_images: str = "aligned"           # RAF-DB: "aligned" (100x100 crops) or "original"
    affectnet_release: str = "auto"         # "csv", "npy" or "auto" (whichever is present)
    affectnet_classes: int = 7              # only 7 is scorable (our label space)
    sample_every: int = 50                  # BP4D / DISFA: keep every n-th frame (50 -> 2 %)
    folds: tuple[int, ...] = ()             # BP4D / DISFA subject folds to keep; () = all
    frame_pattern: str | None = None        # BP4D / DISFA image path pattern; None = default


def fold_subjects(folds: tuple[int, ...], table: dict[int, tuple[str, ...]], bench: str) -> set[str] | None:
    """Subjects of the chosen folds, or None when no fold filter is set."""
    if not folds:
        return None
    unknown = [f for f in folds if f not in table]
    if unknown:
        raise ValueError(f"{bench}: unknown fold(s) {unknown}; the folds are {sorted(table)}")
    return {s for f in folds for s in table[f]}


def sample_uniform(frames: list, every: int) -> list:
    """Every `every`-th element, starting with the first (2 % sampling: every=50)."""
    if every < 1:
        raise ValueError(f"--sample-every must be >= 1, got {every}")
    return frames[::every]


def sample_counted(frames: list, every: int, result: ReadResult) -> list:
    """`sample_uniform`, counting the frames left out under "not sampled" in `result`."""
    sampled = sample_uniform(frames, every)
    result.dropped["not sampled"] += len(frames) - len(sampled)
    return sampled


@dataclass(frozen=True)
class FrameLayout:
    """Where a per-frame AU dataset (BP4D, DISFA) keeps its labels and images, and which
    of its subjects the chosen folds keep."""
    label_dir: Path
    keep: set[str] | None   # subjects of the chosen folds; None = all
    image_root: Path
    pattern: str            # --frame-pattern, or the reader's default

    def keeps(self, subject: str) -> bool:
        return self.keep is None or subject in self.keep


def frame_layout(root: Path, options: ReaderOptions, *, bench: str, label_dir: Path,
                 folds: dict[int, tuple[str, ...]], image_root: Path, pattern: str) -> FrameLayout:
    """Check `root / label_dir` exists; resolve the folds and the image location
    (`--image-folder` / `--frame-pattern` over the reader's defaults `image_root` / `pattern`)."""
    labels = root / label_dir
    if not labels.is_dir():
        raise FileNotFoundError(f"{bench}: {labels} not found; --data must be the {bench} root "
                                f"(the folder holding {label_dir.as_posix()}/)")
    return FrameLayout(label_dir=labels, keep=fold_subjects(options.folds, folds, bench),
                       image_root=Path(options.image_folder) if options.image_folder else image_root,
                       pattern=options.frame_pattern or pattern)


def frame_path(root: Path, pattern: str, *, subject: str, frame: int, task: str = "") -> Path:
    """Fill an image path pattern such as "{subject}/{task}/{frame:04d}.jpg".

    Fields: `subject`, `task`, `frame` (the frame number in the label file) and
    `frame0` (= frame - 1, for frames extracted with 0-based names).
    """
    try:
        rel = pattern.format(subject=subject, task=task, frame=frame, frame0=frame - 1)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"bad --frame-pattern {pattern!r} ({e}); use the fields {{subject}}, {{task}}, "
            f"{{frame}}, {{frame0}}, e.g. '{{subject}}/{{task}}/{{frame:04d}}.jpg'") from e
    return root / rel
