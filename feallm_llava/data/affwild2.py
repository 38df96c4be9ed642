"""Aff-Wild2 (ABAW) reader: expression + AU labels of both challenge layouts -> FaceRecords.

Layouts (as the ABAW challenges released them):

- 2020 (ABAW1): `EXPR_Set/` and `AU_Set/`, each with `Training_Set/` and
  `Validation_Set/`. Its AU files label only 8 AUs: AU1, AU2, AU4, AU6, AU12, AU15, AU20,
  AU25. We map the ones among FEALLM's 12 (AU20 is not one of them and is dropped); the
  other 5 (AU7, AU10, AU23, AU24, AU26) are UNKNOWN for these frames, never assumed
  inactive. FEALLM's full 12-AU set therefore needs the 2022+ layout.
- 2022+ (ABAW3 onwards): `EXPR_Classification_Challenge/` and `AU_Detection_Challenge/`,
  each with `Train_Set/` and `Validation_Set/`; 12 AU columns = labels.AUS.

Both: one `<video>.txt` per video; line 1 is a header; data line i (0-based after the
header) is frame i+1, whose image is `cropped_aligned/<video>/{i+1:05d}.jpg`. EXPR lines
hold one integer 0..7 (Neutral, Anger, Disgust, Fear, Happiness, Sadness, Surprise,
Other); AU lines hold comma-separated 0/1. -1 marks an invalid label; an AU row with
any -1 is invalid as a whole. Expression 7 (Other) is excluded (paper section 3.1 keeps
the 7 basic classes). Frames without an image are skipped and counted.

Subjects: a video is one subject; `<name>_left` / `<name>_right` are two subjects (two
people in one video) that share the person id `<name>` (records.person_of), and the
split keeps a person's videos on one side.

The reader reads BOTH official splits of each task and joins EXPR and AU labels by
video and frame: the FEA set is re-split by subject (split.py), as in the paper.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from feallm_llava.facs.labels import AUS, EXPRESSIONS
from feallm_llava.data.records import FaceRecord, SkipCounter

# Aff-Wild2 EXPR index 7 = "Other" (2022+ challenges); not one of FEALLM's 7 classes.
OTHER_INDEX = 7
INVALID = -1


@dataclass(frozen=True)
class Layout:
    """Where one Aff-Wild2 release keeps its expression and AU label files."""

    name: str
    expr_dir: str
    au_dir: str
    splits: tuple[str, ...]
    au_columns: tuple[int, ...]   # column order when a header does not name the AUs


LAYOUTS: dict[str, Layout] = {
    # ABAW 2020: 8 AU columns, see module docstring.
    "2020": Layout("2020", "EXPR_Set", "AU_Set", ("Training_Set", "Validation_Set"),
                   (1, 2, 4, 6, 12, 15, 20, 25)),
    # ABAW 2022 and later: the 12 AUs of labels.AUS.
    "2022": Layout("2022", "EXPR_Classification_Challenge", "AU_Detection_Challenge",
                   ("Train_Set", "Validation_Set"), AUS),
}


class LabelFileError(ValueError):
    """A label file line that cannot be read; names the file and the 1-based line."""

    def __init__(self, path: Path, line: int, message: str):
        self.path, self.line = path, line
        super().__init__(f"{path}:{line}: {message}")


def detect_layout(root: Path) -> Layout:
    """The layout found under `root` (its EXPR or AU folder, or both); the 2022+ one wins
    when both are present (12 AUs)."""
    root = Path(root)
    for name in ("2022", "2020"):
        layout = LAYOUTS[name]
        if (root / layout.expr_dir).is_dir() or (root / layout.au_dir).is_dir():
            return layout
    raise FileNotFoundError(
        f"{root}: no Aff-Wild2 label folders found; expected either "
        f"EXPR_Classification_Challenge/ + AU_Detection_Challenge/ (2022+) or "
        f"EXPR_Set/ + AU_Set/ (2020) directly under the root")


def _label_files(task_dir: Path, splits: tuple[str, ...], skips: SkipCounter) -> dict[str, Path]:
    """video name -> label file, over all splits; a video listed twice keeps its first file."""
    files: dict[str, Path] = {}
    if not task_dir.is_dir():
        skips.add("missing_label_dir", task_dir)
        return files
    for split in splits:
        split_dir = task_dir / split
        if not split_dir.is_dir():
            skips.add("missing_split_dir", split_dir)
            continue
        for path in sorted(split_dir.glob("*.txt")):
            if path.stem in files:
                skips.add("duplicate_label_file", path)
                continue
            files[path.stem] = path
    return files


def _read_lines(path: Path) -> tuple[str, list[tuple[int, str]]]:
    """The header and the (1-based line number, stripped text) of each data line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise LabelFileError(path, 1, f"cannot read label file ({err})") from err
    lines = text.splitlines()
    if not lines:
        raise LabelFileError(path, 1, "empty label file; expected a header line")
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()  # trailing blank lines are not frames; a blank line inside is an error
    return lines[0].strip(), [(n, line.strip()) for n, line in enumerate(lines[1:], start=2)]


def _ints(path: Path, number: int, line: str, n_columns: int) -> list[int]:
    cells = [c.strip() for c in line.split(",")]
    if len(cells) != n_columns:
        raise LabelFileError(path, number, f"expected {n_columns} comma-separated value(s), "
                             f"found {len(cells)}: {line!r}")
    try:
        return [int(c) for c in cells]
    except ValueError:
        raise LabelFileError(path, number, f"non-numeric value in {line!r}; labels are integers "
                             f"(-1 = invalid)") from None


def _label_rows(path: Path, lines: list[tuple[int, str]], n_columns: int, allowed: range | tuple[int, ...],
                problem: str, skips: SkipCounter, on_bad_line: str):
    """(frame, values, "file:line") of each well-formed data line; a bad line raises
    (`problem` formats its first bad value), or is skipped and counted with
    on_bad_line="skip"."""
    for number, line in lines:
        try:
            values = _ints(path, number, line, n_columns)
            bad = [v for v in values if v not in allowed]
            if bad:
                raise LabelFileError(path, number, problem.format(bad[0]))
        except LabelFileError:
            if on_bad_line != "skip":
                raise
            skips.add("bad_label_line", f"{path}:{number}")
            continue
        yield number - 1, values, f"{path}:{number}"  # data line i (0-based) = file line i + 2 = frame i + 1


def read_expression_file(path: Path, skips: SkipCounter, *,
                         on_bad_line: str = "error") -> dict[int, str]:
    """frame number -> expression name, valid frames only; invalid/Other frames counted."""
    labels: dict[int, str] = {}
    _, lines = _read_lines(path)
    rows = _label_rows(path, lines, 1, range(INVALID, OTHER_INDEX + 1), "expression {} outside -1..7",
                       skips, on_bad_line)
    for frame, (value,), where in rows:
        if value == INVALID:
            skips.add("expr_invalid", where)
        elif value == OTHER_INDEX:
            skips.add("expr_other", where)
        else:
            labels[frame] = EXPRESSIONS[value]
    return labels


def _au_columns(header: str, layout: Layout) -> list[int]:
    """AU numbers of the columns, from the header when it names them ("AU1,AU2,...")."""
    names = [c.strip().upper() for c in header.split(",")]
    if names and all(n.startswith("AU") and n[2:].isdigit() for n in names):
        return [int(n[2:]) for n in names]
    return list(layout.au_columns)


def read_au_file(path: Path, layout: Layout, skips: SkipCounter, *,
                 on_bad_line: str = "error") -> dict[int, dict[int, int]]:
    """frame number -> {AU: 0/1} over the AUs of labels.AUS that the file labels."""
    header, lines = _read_lines(path)
    columns = _au_columns(header, layout)
    keep = [(i, au) for i, au in enumerate(columns) if au in AUS]
    labels: dict[int, dict[int, int]] = {}
    rows = _label_rows(path, lines, len(columns), (INVALID, 0, 1), "AU value {} is not 0, 1 or -1",
                       skips, on_bad_line)
    for frame, values, where in rows:
        if INVALID in values:
            skips.add("au_invalid", where)
            continue
        labels[frame] = {au: values[i] for i, au in keep}
    return labels


def read_affwild2(root: Path, *, layout: str | None = None, image_root: Path | None = None,
                  skips: SkipCounter | None = None, on_bad_line: str = "error",
                  image_ext: str = ".jpg", progress: bool = False) -> list[FaceRecord]:
    """All labelled faces of an Aff-Wild2 copy, one FaceRecord per frame with an image.

    root: the folder holding the label folders (and by default `cropped_aligned/`).
    layout: "2020" or "2022" (default: detected, see `detect_layout`).
    image_root: the cropped-aligned image folder (default `root/cropped_aligned`).
    skips: receives the count of every dropped frame, by reason.
    on_bad_line: "error" (default) raises LabelFileError naming file and line for a row
        with a wrong column count or a non-numeric value; "skip" counts it instead.
    progress: show a progress bar over the videos.

    A frame enters when it has a valid expression or a valid AU row, and its image
    exists; the other label is None when absent/invalid.
    """
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    root = Path(root)
    lay = LAYOUTS[layout] if layout else detect_layout(root)
    image_root = Path(image_root) if image_root else root / "cropped_aligned"
    if not image_root.is_dir():
        raise FileNotFoundError(f"{image_root}: image folder not found; pass the folder that "
                                f"holds <video>/00001.jpg (Aff-Wild2's cropped_aligned)")
    skips = skips if skips is not None else SkipCounter()

    expr_files = _label_files(root / lay.expr_dir, lay.splits, skips)
    au_files = _label_files(root / lay.au_dir, lay.splits, skips)
    records: list[FaceRecord] = []
    videos = sorted(set(expr_files) | set(au_files))
    for video in tqdm(videos, desc="reading Aff-Wild2", unit="video", disable=not progress):
        expr = (read_expression_file(expr_files[video], skips, on_bad_line=on_bad_line)
                if video in expr_files else {})
        aus = (read_au_file(au_files[video], lay, skips, on_bad_line=on_bad_line)
               if video in au_files else {})
        frames = sorted(set(expr) | set(aus))
        if not frames:
            continue
        video_dir = image_root / video
        # One directory listing per video instead of a stat per frame (~2.6M frames).
        present = set(os.listdir(video_dir)) if video_dir.is_dir() else set()
        for frame in frames:
            name = f"{frame:05d}{image_ext}"
            if name not in present:
                skips.add("missing_image", video_dir / name)
                continue
            records.append(FaceRecord(image=video_dir / name, expression=expr.get(frame),
                                      aus=aus.get(frame), subject=video, video=video,
                                      frame=frame))
    return records
