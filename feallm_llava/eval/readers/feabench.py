"""FEABench (paper section 3.3): the evaluation split written by `feallm build-dataset`.

`eval.json` is a list of {"id", "image", "expression", "aus", "subject", "image_folder"}:
`expression` one of the 7 classes, `aus` the active AUs among the 12 (ints). Relative
image paths are resolved against `--image-folder` when given, else against the item's
`image_folder` (written by the builder), else against the directory holding
`eval.json`; absolute paths are used as they are.

`--data` may name the json file itself or the directory that holds `eval.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from feallm_llava.facs.labels import AUS, EXPRESSIONS

from feallm_llava.eval.readers import FaceRecord, ReaderOptions, ReadResult

EVAL_FILE = "eval.json"


def locate(root: Path) -> Path:
    path = root / EVAL_FILE if root.is_dir() else root
    if not path.is_file():
        raise FileNotFoundError(
            f"FEABench: {path} not found; pass --data the eval.json written by "
            f"`feallm build-dataset` or the directory that holds it")
    return path


def _parse_aus(value, where: str) -> frozenset[int]:
    if not isinstance(value, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in value):
        raise ValueError(f"{where}: 'aus' must be a list of AU numbers, got {value!r}")
    unknown = sorted(set(value) - set(AUS))
    if unknown:
        raise ValueError(f"{where}: AU(s) {unknown} are not among the 12 FEALLM AUs {list(AUS)}")
    return frozenset(value)


def read(root: Path, options: ReaderOptions) -> ReadResult:
    path = locate(root)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"FEABench: {path} is not valid JSON: {e}") from e
    if not isinstance(entries, list):
        raise ValueError(f"FEABench: {path} must hold a JSON list of records, got {type(entries).__name__}")

    records: list[FaceRecord] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{path}: record {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {entry!r}")
        missing = [k for k in ("id", "image", "expression", "aus") if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        rid = str(entry["id"])
        where = f"{path}: record {i} (id {rid!r})"
        if rid in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(rid)
        if entry["expression"] not in EXPRESSIONS:
            raise ValueError(f"{where}: expression {entry['expression']!r} is not one of {list(EXPRESSIONS)}")
        image = Path(entry["image"])
        image_root = Path(options.image_folder or entry.get("image_folder") or path.parent)
        records.append(FaceRecord(
            id=rid,
            image=image if image.is_absolute() else image_root / image,
            source=f"{path}:record {i}",
            gt_expression=entry["expression"],
            gt_aus=_parse_aus(entry["aus"], where),
            subject=entry.get("subject"),
        ))
    return ReadResult(records)
