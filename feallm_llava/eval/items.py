"""One evaluation question: an image (optionally a face box in it), a task and its truth.

Every benchmark reader ends in a list of `EvalItem`s; every backend answers them; the
predictions file stores one line per item. FER items carry `gt_expression`, AUD items
`gt_aus` (the active AUs among `au_targets`, the AUs that benchmark scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

TASKS: tuple[str, ...] = ("fer", "aud")


@dataclass(frozen=True)
class EvalItem:
    id: str                                         # unique within a benchmark
    image: str                                      # absolute path of the image file
    task: str                                       # "fer" or "aud"
    question: str                                   # the prompt sent with the image
    bench: str                                      # benchmark name, e.g. "rafdb"
    gt_expression: str | None = None               # one of labels.EXPRESSIONS (FER items)
    gt_aus: tuple[int, ...] | None = None          # active AUs, sorted (AUD items)
    au_targets: tuple[int, ...] = ()               # AUs scored for this item (AUD items)
    crop: tuple[int, int, int, int] | None = None  # face box (x, y, width, height) in pixels

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"item {self.id!r}: task {self.task!r} is not one of {TASKS}")
        if self.task == "fer" and self.gt_expression is None:
            raise ValueError(f"item {self.id!r}: a FER item needs gt_expression")
        if self.task == "aud" and (self.gt_aus is None or not self.au_targets):
            raise ValueError(f"item {self.id!r}: an AUD item needs gt_aus and au_targets")

    def load_image(self) -> Image.Image:
        """The RGB image the model sees: the file, cut to `crop` when there is one.

        A box reaching past the border is clipped to the image (AffectNet boxes do,
        by a few pixels, on some faces).
        """
        path = Path(self.image)
        if not path.is_file():
            raise FileNotFoundError(f"item {self.id!r}: image not found: {path}")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as e:  # PIL: unreadable / truncated / not an image
            raise ValueError(f"item {self.id!r}: cannot read image {path}: {e}") from e
        if self.crop is not None:
            x, y, w, h = self.crop
            box = (max(0, x), max(0, y), min(image.width, x + w), min(image.height, y + h))
            if box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(
                    f"item {self.id!r}: face box {self.crop} lies outside the "
                    f"{image.width}x{image.height} image {path}")
            image = image.crop(box)
        return image

    def record(self) -> dict:
        """The item's fields of a predictions.jsonl line (JSON types only)."""
        return {
            "id": self.id,
            "image": self.image,
            "task": self.task,
            "question": self.question,
            "gt_expression": self.gt_expression,
            "gt_aus": list(self.gt_aus) if self.gt_aus is not None else None,
            "au_targets": list(self.au_targets),
            "bench": self.bench,
        }
