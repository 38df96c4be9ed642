"""BP4D-Spontaneous AU occurrence (Zhang et al., 2014), zero-shot AUD (paper Tab. 5).

Labels: `AUCoding/AU_OCC/<subject>_<task>.csv` (tasks T1..T8), a header row, then one
row per coded frame: column `0` (the first) is the frame number, the column headed `k`
(or `AUk` / `AU0k`) holds AU k: 1 = present, 0 = absent, 9 = unknown. A frame with a 9
in any evaluated AU is dropped and counted (the usual protocol); 9s in AUs we do not
evaluate are ignored.

Evaluated AUs: those BP4D shares with FEALLM's 12 (paper section 5.3): 1, 2, 4, 6, 7,
10, 12, 15, 23, 24. Sampling: every `--sample-every`-th (default 50 = 2 %, paper
section 5.3) valid frame of each sequence, starting with its first.

Images: `--frame-pattern` under `--image-folder` (default: the data root), default
"{subject}/{task}/{frame}.jpg" with the frame number as written in the csv, unpadded.
Copies of BP4D differ here (e.g. "{subject}/{task}/{frame:04d}.jpg"); set the pattern to
match yours.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from feallm_llava.eval.readers import BP4D_FOLDS, FaceRecord, ReaderOptions, ReadResult, frame_layout, frame_path, sample_counted

LABEL_DIR = Path("AUCoding") / "AU_OCC"
BP4D_AUS: tuple[int, ...] = (1, 2, 4, 6, 7, 10, 12, 15, 23, 24)  # shared with labels.AUS
DEFAULT_PATTERN = "{subject}/{task}/{frame}.jpg"
UNKNOWN = "9"  # BP4D AU_OCC code for "not coded"

_NAME = re.compile(r"^([A-Za-z]\d+)_(T\d+)\.csv$")
_HEADER_AU = re.compile(r"^(?:AU)?\s*0*(\d+)$", re.IGNORECASE)


def _au_columns(header: list[str], path: Path) -> dict[int, int]:
    """AU number -> column index, from the header row."""
    columns: dict[int, int] = {}
    for i, name in enumerate(header[1:], start=1):
        m = _HEADER_AU.match(name.strip())
        if m:
            columns[int(m.group(1))] = i
    missing = [au for au in BP4D_AUS if au not in columns]
    if missing:
        raise ValueError(f"{path}:1: no column for AU(s) {missing} in the header {header[:8]}...; "
                         f"expected column names like '1' or 'AU1'")
    return columns


def read(root: Path, options: ReaderOptions) -> ReadResult:
    layout = frame_layout(root, options, bench="BP4D", label_dir=LABEL_DIR, folds=BP4D_FOLDS,
                          image_root=root, pattern=DEFAULT_PATTERN)
    label_dir = layout.label_dir

    result = ReadResult([])
    files = sorted(label_dir.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"BP4D: no <subject>_<task>.csv in {label_dir}")
    for path in files:
        m = _NAME.match(path.name)
        if not m:
            raise ValueError(f"BP4D: {path}: file name is not <subject>_<task>.csv (e.g. F001_T1.csv)")
        subject, task = m.groups()
        if not layout.keeps(subject):
            continue
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows:
            raise ValueError(f"BP4D: {path} is empty; expected a header row and one row per frame")
        columns = _au_columns(rows[0], path)
        valid: list[tuple[int, frozenset[int], str]] = []
        for lineno, row in enumerate(rows[1:], start=2):
            if not row:
                continue
            where = f"{path}:{lineno}"
            try:
                frame = int(row[0])
                codes = {au: row[columns[au]].strip() for au in BP4D_AUS}
            except (ValueError, IndexError):
                raise ValueError(f"{where}: expected a frame number and {len(rows[0]) - 1} AU codes, "
                                 f"got {row[:6]}...") from None
            bad = {au: c for au, c in codes.items() if c not in ("0", "1", UNKNOWN)}
            if bad:
                raise ValueError(f"{where}: AU code(s) {bad} are not 0, 1 or 9 (unknown)")
            if UNKNOWN in codes.values():
                result.dropped["unknown AU code (9)"] += 1
                continue
            valid.append((frame, frozenset(au for au, c in codes.items() if c == "1"), where))
        for frame, aus, where in sample_counted(valid, options.sample_every, result):
            result.records.append(FaceRecord(
                id=f"{subject}_{task}_{frame}",
                image=frame_path(layout.image_root, layout.pattern, subject=subject, task=task, frame=frame),
                source=where, gt_aus=aus, subject=subject))
    if not result.records:
        raise ValueError(f"BP4D: no valid frame left in {label_dir} (folds {list(options.folds) or 'all'}, "
                         f"dropped: {dict(result.dropped)})")
    return result
