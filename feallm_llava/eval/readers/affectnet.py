"""AffectNet (Mollahosseini et al., 2017) validation set, 7 classes.

The official test set was never released, so the validation set is the test set.
Two releases exist; `--affectnet-release auto` takes whichever is present (CSV first):

- CSV release: `Manually_Annotated_file_lists/validation.csv` with columns
  `subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,
  expression,valence,arousal` (the header row is absent in some copies of
  validation.csv; the documented column order is then assumed). Images under
  `Manually_Annotated_Images/` (or `--image-folder`); the face box of the CSV is cut
  out before the model sees the image.
- npy release: `val_set/images/<id>.jpg` (already cropped faces) with
  `val_set/annotations/<id>_exp.npy` (the expression code; `_val`, `_aro`, `_lnd`
  are ignored).

Expression codes 0..10 = neutral, happy, sad, surprise, fear, disgust, anger, contempt,
none, uncertain, non-face. The 7-class protocol keeps 0..6; contempt (7) and 8..10 are
dropped and counted. The 8-class protocol (with contempt) is refused: contempt is not in
FEALLM's label space, so no answer could be scored as correct on those faces.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from feallm_llava.eval.readers import FaceRecord, ReaderOptions, ReadResult

CSV_FILE = Path("Manually_Annotated_file_lists") / "validation.csv"
CSV_IMAGES = "Manually_Annotated_Images"
NPY_DIR = Path("val_set")
CSV_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
               "facial_landmarks", "expression", "valence", "arousal")

# AffectNet expression codes (the release README) -> our class names; None = not a
# 7-class face, dropped under the reason given.
AFFECTNET_LABELS: dict[int, str] = {
    0: "Neutral", 1: "Happiness", 2: "Sadness", 3: "Surprise", 4: "Fear", 5: "Disgust", 6: "Anger",
}
AFFECTNET_DROPPED: dict[int, str] = {7: "contempt", 8: "none", 9: "uncertain", 10: "non-face"}


def _label(code: str, where: str, result: ReadResult) -> str | None:
    try:
        value = int(float(code))
    except ValueError:
        raise ValueError(f"{where}: expression code {code!r} is not a number") from None
    if value in AFFECTNET_LABELS:
        return AFFECTNET_LABELS[value]
    if value in AFFECTNET_DROPPED:
        result.dropped[f"expression {value} ({AFFECTNET_DROPPED[value]})"] += 1
        return None
    raise ValueError(f"{where}: expression code {value} is outside AffectNet's 0..10")


def _read_csv(root: Path, options: ReaderOptions) -> ReadResult:
    path = root / CSV_FILE
    image_root = Path(options.image_folder) if options.image_folder else root / CSV_IMAGES
    result = ReadResult([])
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        for lineno, row in enumerate(rows, start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if lineno == 1 and row[0].strip() == CSV_COLUMNS[0]:
                if tuple(c.strip() for c in row[:len(CSV_COLUMNS)]) != CSV_COLUMNS:
                    raise ValueError(f"{path}:1: unexpected header {row}; expected {','.join(CSV_COLUMNS)}")
                continue
            where = f"{path}:{lineno}"
            if len(row) < 7:
                raise ValueError(f"{where}: expected {len(CSV_COLUMNS)} columns "
                                 f"({','.join(CSV_COLUMNS)}), got {len(row)}")
            label = _label(row[6], where, result)
            if label is None:
                continue
            try:
                box = tuple(int(round(float(v))) for v in row[1:5])
            except ValueError:
                raise ValueError(f"{where}: face box {row[1:5]} is not numeric") from None
            if box[2] <= 0 or box[3] <= 0:
                raise ValueError(f"{where}: face box {box} has no area")
            rel = row[0].strip()
            result.records.append(FaceRecord(
                id=rel, image=image_root / rel, source=where, gt_expression=label, crop=box))
    return result


def _read_npy(root: Path, options: ReaderOptions) -> ReadResult:
    ann_dir = root / NPY_DIR / "annotations"
    image_root = Path(options.image_folder) if options.image_folder else root / NPY_DIR / "images"
    result = ReadResult([])
    files = sorted(ann_dir.glob("*_exp.npy"))
    if not files:
        raise FileNotFoundError(f"AffectNet: no *_exp.npy annotation in {ann_dir}")
    for path in files:
        try:
            value = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a plain numpy array ({e})") from e
        if value.size != 1:
            raise ValueError(f"{path}: expected one expression code, got an array of shape {value.shape}")
        label = _label(str(value.reshape(-1)[0]), str(path), result)
        if label is None:
            continue
        sid = path.name[: -len("_exp.npy")]
        result.records.append(FaceRecord(
            id=sid, image=image_root / f"{sid}.jpg", source=str(path), gt_expression=label))
    return result


def read(root: Path, options: ReaderOptions) -> ReadResult:
    if options.affectnet_classes != 7:
        raise ValueError(
            f"AffectNet: --affectnet-classes {options.affectnet_classes} is not supported. FEALLM's "
            f"label space (labels.EXPRESSIONS) and answer parser have 7 classes; contempt is not "
            f"among them, so the 8-class protocol cannot be scored. Use the 7-class protocol "
            f"(the default), which drops contempt faces and counts them.")
    has_csv = (root / CSV_FILE).is_file()
    has_npy = (root / NPY_DIR / "annotations").is_dir()
    release = options.affectnet_release
    if release == "auto":
        release = "csv" if has_csv else "npy" if has_npy else ""
    if release == "csv" and has_csv:
        result = _read_csv(root, options)
    elif release == "npy" and has_npy:
        result = _read_npy(root, options)
    elif release in ("csv", "npy", ""):
        raise FileNotFoundError(
            f"AffectNet: found neither {root / CSV_FILE} (CSV release) nor "
            f"{root / NPY_DIR / 'annotations'} (npy release)"
            + (f" for --affectnet-release {release}" if release else "")
            + "; --data must be the AffectNet root")
    else:
        raise ValueError(f"AffectNet: --affectnet-release must be csv, npy or auto, got {release!r}")
    if not result.records:
        raise ValueError(f"AffectNet: no 7-class face in {root} (dropped: {dict(result.dropped)})")
    return result
