"""RAF-DB basic emotion set (Li et al., CVPR 2017), test split by default.

`EmoLabel/list_patition_label.txt` (sic, the release's spelling): one `<name> <label>`
per line, no header; the split is the name prefix (`train_00001.jpg`, `test_0001.jpg`).
Labels 1..7 = Surprise, Fear, Disgust, Happiness, Sadness, Anger, Neutral.
Images: `Image/aligned/<stem>_aligned.jpg` (100x100 aligned crops, the usual protocol)
or, with `--rafdb-images original`, `Image/original/<name>`. `--image-folder` replaces
`<root>/Image`.
"""

from __future__ import annotations

from pathlib import Path

from feallm_llava.eval.readers import FaceRecord, ReaderOptions, ReadResult

LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"

# RAF-DB basic label ids (README of the release) -> our class names (labels.EXPRESSIONS).
RAFDB_LABELS: dict[int, str] = {
    1: "Surprise", 2: "Fear", 3: "Disgust", 4: "Happiness", 5: "Sadness", 6: "Anger", 7: "Neutral",
}


def read(root: Path, options: ReaderOptions) -> ReadResult:
    path = root / LABEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"RAF-DB: label file {path} not found; --data must be the RAF-DB basic root "
                                f"(the folder holding EmoLabel/ and Image/)")
    if options.rafdb_images not in ("aligned", "original"):
        raise ValueError(f"RAF-DB: --rafdb-images must be 'aligned' or 'original', got {options.rafdb_images!r}")
    image_root = Path(options.image_folder) if options.image_folder else root / "Image"

    result = ReadResult([])
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) not in RAFDB_LABELS:
            raise ValueError(f"{path}:{lineno}: expected '<image name> <label 1..7>', got {line!r}")
        name, label = parts[0], int(parts[1])
        if not name.startswith(options.split + "_"):
            result.dropped[f"not in split {options.split!r}"] += 1
            continue
        stem = Path(name).stem
        if options.rafdb_images == "aligned":
            image = image_root / "aligned" / f"{stem}_aligned.jpg"
        else:
            image = image_root / "original" / name
        result.records.append(FaceRecord(
            id=stem, image=image, source=f"{path}:{lineno}", gt_expression=RAFDB_LABELS[label]))
    if not result.records:
        raise ValueError(f"RAF-DB: no {options.split!r} images listed in {path}")
    return result
